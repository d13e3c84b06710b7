"""The box detector of self-training: torchvision's FCOS on a resnet18 feature pyramid.

Built, run and loaded here, below both its users: ``pneumoloc selftrain`` trains it on the
classifier's CAM pseudo-boxes, and the inference backends run it to draw the boxes of positive
images. Turning its detections into scored boxes in original pixels is
:func:`pneumoloc.localise.boxes.detector_boxes`.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from pneumoloc.errors import CheckpointError

__all__ = [
    "DETECTOR_KIND",
    "DETECTOR_MAX_BOXES",
    "DETECTOR_MIN_SCORE",
    "build_detector",
    "detect",
    "detector_input",
    "init_detector_from_classifier",
    "load_detector",
]

DETECTOR_KIND = "fcos-resnet18-fpn"
DETECTOR_MIN_SCORE = 0.05
"""Detector boxes scoring below this are dropped at inference (unless a checkpoint says)."""
DETECTOR_MAX_BOXES = 2
"""At most this many detector boxes per image (unless a checkpoint says)."""


def build_detector(image_size: int, fpn_channels: int = 128) -> nn.Module:
    """FCOS on a resnet18 feature pyramid (strides 8-128), for grey images of one size.

    Grey images are repeated to three channels inside torchvision's transform-free path
    (``min_size = max_size = image_size``: no resizing, boxes stay in input pixels).
    """
    from torchvision.models import resnet18
    from torchvision.models.detection import FCOS
    from torchvision.models.detection.backbone_utils import BackboneWithFPN
    from torchvision.ops.feature_pyramid_network import LastLevelP6P7

    body = resnet18(weights=None)
    backbone = BackboneWithFPN(
        body,
        return_layers={"layer2": "0", "layer3": "1", "layer4": "2"},
        in_channels_list=[128, 256, 512],
        out_channels=fpn_channels,
        extra_blocks=LastLevelP6P7(fpn_channels, fpn_channels),
    )
    return FCOS(
        backbone,
        num_classes=2,
        min_size=image_size,
        max_size=image_size,
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.25, 0.25, 0.25],
        score_thresh=0.01,
        detections_per_img=20,
    )


def init_detector_from_classifier(detector: nn.Module, classifier: nn.Module) -> int:
    """Copy a resnet18 classifier's backbone weights into the detector's; returns how many
    tensors were copied (0 when the architectures do not match). The classifier's 1-channel
    stem becomes a 3-channel one (weights / 3, the input is grey repeated)."""
    source: Any = getattr(classifier, "backbone", None)
    if source is None:
        return 0
    target: Any = getattr(detector.backbone, "body")  # noqa: B009 (an nn.Module attribute)
    own = target.state_dict()
    copied = 0
    new = {}
    for key, value in source.state_dict().items():
        if key not in own:
            continue
        if key == "conv1.weight" and value.shape[1] == 1 and own[key].shape[1] == 3:
            value = value.repeat(1, 3, 1, 1) / 3
        if own[key].shape != value.shape:
            continue
        new[key] = value
        copied += 1
    if copied < len(own) // 2:  # not a resnet18: keep the random initialisation
        return 0
    target.load_state_dict(new, strict=False)
    return copied


def detector_input(images: Tensor) -> list[Tensor]:
    """uint8 (B, S, S) -> list of float (3, S, S) in [0, 1] (FCOS normalises them)."""
    x = images.float().div(255.0)
    return [img[None].expand(3, -1, -1) for img in x]


@torch.no_grad()
def detect(
    detector: nn.Module,
    images: np.ndarray | Tensor,
    *,
    min_score: float,
    max_boxes: int,
    batch_size: int = 16,
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Boxes (xyxy, input pixels) and scores per image, best first, at most ``max_boxes``."""
    device = next(detector.parameters()).device
    tensor = torch.as_tensor(np.asarray(images)) if not isinstance(images, Tensor) else images
    detector.eval()
    out = []
    for start in range(0, len(tensor), batch_size):
        batch = tensor[start : start + batch_size].to(device)
        for det in detector(detector_input(batch)):
            keep = det["scores"] >= min_score
            boxes = det["boxes"][keep][:max_boxes].cpu().numpy().astype(np.float32)
            scores = det["scores"][keep][:max_boxes].cpu().numpy().astype(np.float32)
            out.append((boxes, scores))
    return out


def load_detector(entry: dict[str, Any], device: str | torch.device = "cpu") -> nn.Module:
    """Rebuild the detector stored in a checkpoint's ``"detector"`` entry (eval mode).

    Raises:
        CheckpointError: Unknown kind or weights that do not fit.
    """
    if entry.get("kind") != DETECTOR_KIND:
        raise CheckpointError(f"unknown detector kind {entry.get('kind')!r}")
    detector = build_detector(int(entry["image_size"]), int(entry.get("fpn_channels", 128)))
    try:
        detector.load_state_dict(entry["state_dict"])
    except RuntimeError as exc:
        raise CheckpointError(f"detector weights do not fit: {str(exc).splitlines()[0]}") from None
    return detector.to(device).eval()
