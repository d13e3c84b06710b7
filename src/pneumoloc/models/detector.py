"""The box detector of self-training: torchvision's FCOS on a resnet18 or EfficientNet-lite
feature pyramid.

Built, run and loaded here, below both its users: ``pneumoloc selftrain`` trains it on the
classifier's CAM pseudo-boxes, and the inference backends run it to draw the boxes of positive
images. Turning its detections into scored boxes in original pixels is
:func:`pneumoloc.localise.boxes.detector_boxes`.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from pneumoloc.errors import CheckpointError

__all__ = [
    "DETECTOR_BACKBONES",
    "DETECTOR_KIND",
    "PNEUMONIA_LABEL",
    "build_detector",
    "detect",
    "detect_with_maps",
    "detector_input",
    "detector_kind",
    "fcos_with_score_map",
    "init_detector_from_classifier",
    "load_detector",
]

DETECTOR_KIND = "fcos-resnet18-fpn"
"""The kind of the first detector (resnet18 from scratch); others are ``fcos-NAME-fpn``."""
DETECTOR_BACKBONES = (
    "resnet18",
    "tf_efficientnet_lite0",
    "tf_efficientnet_lite1",
    "tf_efficientnet_lite2",
)
"""Backbones a detector can have: torchvision's resnet18, or the timm encoders a pneumoloc
classifier is built on, so the detector can start from the classifier's own weights."""


PNEUMONIA_LABEL = 1
"""The class index of a pseudo-box (``pneumoloc selftrain`` labels every box 1; FCOS scores each
class with its own sigmoid, so index 0 is never trained)."""


def detector_kind(backbone: str) -> str:
    """The checkpoint ``kind`` of a detector with this backbone."""
    return DETECTOR_KIND if backbone == "resnet18" else f"fcos-{backbone}-fpn"


class TimmFpnBackbone(nn.Module):
    """A 1-channel timm encoder's stride-8/16/32 stages under a feature pyramid (P3-P7), the
    backbone FCOS expects (``out_channels``, an ordered dict of maps). Its ``body`` has the
    parameter names of the classifier's encoder, so the classifier's weights load into it.

    FCOS hands it the grey image repeated to three channels (normalised like the classifier's
    input); the encoder reads the first.
    """

    def __init__(self, name: str, fpn_channels: int) -> None:
        super().__init__()
        import timm
        from torchvision.ops.feature_pyramid_network import FeaturePyramidNetwork, LastLevelP6P7

        self.body = timm.create_model(
            name, features_only=True, out_indices=(2, 3, 4), in_chans=1, pretrained=False
        )
        info: Any = self.body.feature_info
        self.fpn = FeaturePyramidNetwork(
            info.channels(),
            fpn_channels,
            extra_blocks=LastLevelP6P7(fpn_channels, fpn_channels),
        )
        self.out_channels = fpn_channels

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        feats = self.body(x[:, :1])
        return self.fpn(OrderedDict((str(i), f) for i, f in enumerate(feats)))  # type: ignore[no-any-return]


def build_detector(
    image_size: int, fpn_channels: int = 128, backbone: str = "resnet18"
) -> nn.Module:
    """FCOS on a feature pyramid (strides 8-128) over ``backbone`` (one of
    :data:`DETECTOR_BACKBONES`), for grey images of one size.

    Grey images are repeated to three channels inside torchvision's transform-free path
    (``min_size = max_size = image_size``: no resizing, boxes stay in input pixels), normalised
    with mean 0.5 and std 0.25 (the classifier's own input scaling).

    Raises:
        CheckpointError: An unknown backbone.
    """
    from torchvision.models import resnet18
    from torchvision.models.detection import FCOS
    from torchvision.models.detection.backbone_utils import BackboneWithFPN
    from torchvision.ops.feature_pyramid_network import LastLevelP6P7

    if backbone not in DETECTOR_BACKBONES:
        raise CheckpointError(
            f"unknown detector backbone {backbone!r} (known: {', '.join(DETECTOR_BACKBONES)})"
        )
    features: nn.Module
    if backbone == "resnet18":
        features = BackboneWithFPN(
            resnet18(weights=None),
            return_layers={"layer2": "0", "layer3": "1", "layer4": "2"},
            in_channels_list=[128, 256, 512],
            out_channels=fpn_channels,
            extra_blocks=LastLevelP6P7(fpn_channels, fpn_channels),
        )
    else:
        features = TimmFpnBackbone(backbone, fpn_channels)
    return FCOS(
        features,
        num_classes=2,
        min_size=image_size,
        max_size=image_size,
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.25, 0.25, 0.25],
        score_thresh=0.01,
        detections_per_img=20,
    )


def init_detector_from_classifier(detector: nn.Module, classifier: nn.Module) -> int:
    """Copy a classifier's encoder weights into the detector's backbone of the same
    architecture (resnet18, or the timm encoder of :class:`TimmFpnBackbone`); returns how many
    tensors were copied (0 when the architectures do not match). A resnet18 classifier's
    1-channel stem becomes a 3-channel one (weights / 3, the input is grey repeated)."""
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


def fcos_with_score_map(
    detector: nn.Module, images: list[Tensor], label: int = PNEUMONIA_LABEL
) -> tuple[list[dict[str, Tensor]], Tensor]:
    """torchvision FCOS's inference (eval mode), plus its score map: per image (S, S) in [0, 1],
    the score FCOS gives each location of its pyramid for ``label``
    (``sqrt(sigmoid(class logit) * sigmoid(centerness))``, what its post-processing ranks boxes
    by), each level upsampled bilinearly to the input size, the maximum over levels.

    Written out here because FCOS's ``forward`` returns the boxes only: these are its own eval
    steps (transform, backbone, head, anchors, ``postprocess_detections``,
    ``transform.postprocess``) in its order, so the detections are exactly ``detector(images)``
    (a test checks), with the head's outputs kept for the map. Images of one size (no
    resizing: ``min_size = max_size`` = that size, as :func:`build_detector` builds it).
    """
    from collections import OrderedDict as _OrderedDict

    import torch.nn.functional as F

    model: Any = detector
    sizes = [(int(img.shape[-2]), int(img.shape[-1])) for img in images]
    batch, _ = model.transform(images, None)
    features = model.backbone(batch.tensors)
    if isinstance(features, Tensor):  # pragma: no cover - every pneumoloc backbone gives a dict
        features = _OrderedDict([("0", features)])
    feats = list(features.values())
    head = model.head(feats)
    anchors = model.anchor_generator(batch, feats)
    per_level = [f.size(2) * f.size(3) for f in feats]
    split_head = {k: list(v.split(per_level, dim=1)) for k, v in head.items()}
    split_anchors = [list(a.split(per_level)) for a in anchors]
    detections = model.postprocess_detections(split_head, split_anchors, batch.image_sizes)
    detections = model.transform.postprocess(detections, batch.image_sizes, sizes)
    score = (
        head["cls_logits"][..., label].sigmoid() * head["bbox_ctrness"][..., 0].sigmoid()
    ).sqrt()
    h, w = batch.tensors.shape[-2:]
    levels, offset = [], 0
    for f in feats:
        fh, fw = f.shape[-2:]
        level = score[:, offset : offset + fh * fw].reshape(-1, 1, fh, fw)
        offset += fh * fw
        levels.append(F.interpolate(level, size=(h, w), mode="bilinear", align_corners=False))
    maps = torch.cat(levels, dim=1).amax(dim=1)
    return detections, maps


@torch.no_grad()
def detect_with_maps(
    detector: nn.Module,
    images: np.ndarray | Tensor,
    *,
    min_score: float,
    max_boxes: int,
    batch_size: int = 16,
) -> tuple[list[tuple[np.ndarray, np.ndarray]], np.ndarray]:
    """:func:`detect`, and the detector's score map per image (float32 (B, S, S) in [0, 1],
    :func:`fcos_with_score_map`) from the same pass."""
    device = next(detector.parameters()).device
    tensor = torch.as_tensor(np.asarray(images)) if not isinstance(images, Tensor) else images
    detector.eval()
    found, maps = [], []
    for start in range(0, len(tensor), batch_size):
        batch = tensor[start : start + batch_size].to(device)
        detections, score = fcos_with_score_map(detector, detector_input(batch))
        for det in detections:
            keep = det["scores"] >= min_score
            boxes = det["boxes"][keep][:max_boxes].cpu().numpy().astype(np.float32)
            scores = det["scores"][keep][:max_boxes].cpu().numpy().astype(np.float32)
            found.append((boxes, scores))
        maps.append(score.float().cpu().numpy())
    size = tensor.shape[-1] if tensor.ndim >= 2 else 0
    out = np.concatenate(maps) if maps else np.zeros((0, size, size), np.float32)
    return found, out.astype(np.float32)


def detect(
    detector: nn.Module,
    images: np.ndarray | Tensor,
    *,
    min_score: float,
    max_boxes: int,
    batch_size: int = 16,
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Boxes (xyxy, input pixels) and scores per image, best first, at most ``max_boxes``
    (:func:`detect_with_maps` without its maps: FCOS's own detections)."""
    return detect_with_maps(
        detector, images, min_score=min_score, max_boxes=max_boxes, batch_size=batch_size
    )[0]


def load_detector(entry: dict[str, Any], device: str | torch.device = "cpu") -> nn.Module:
    """Rebuild the detector stored in a checkpoint's ``"detector"`` entry (eval mode).

    Raises:
        CheckpointError: Unknown kind or weights that do not fit.
    """
    kinds = {detector_kind(b): b for b in DETECTOR_BACKBONES}
    if entry.get("kind") not in kinds:
        raise CheckpointError(f"unknown detector kind {entry.get('kind')!r}")
    detector = build_detector(
        int(entry["image_size"]),
        int(entry.get("fpn_channels", 128)),
        kinds[str(entry["kind"])],
    )
    try:
        detector.load_state_dict(entry["state_dict"])
    except RuntimeError as exc:
        raise CheckpointError(f"detector weights do not fit: {str(exc).splitlines()[0]}") from None
    return detector.to(device).eval()
