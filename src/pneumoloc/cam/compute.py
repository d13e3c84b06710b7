"""Heatmaps of a batch: :func:`compute_cam` and :func:`open_cam` (imports torch)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from pneumoloc.cam.classic import check_cam_align, classic_cam, prepare_input
from pneumoloc.cam.gradcam import CamFn, library_cam
from pneumoloc.cam.names import check_cam_floor, check_cam_method
from pneumoloc.cam.tta import DEFAULT_TTA_SCALES, tta_cam
from pneumoloc.errors import ConfigError
from pneumoloc.models.classifier import CamClassifier


@contextmanager
def open_cam(
    model: CamClassifier,
    method: str = "cam",
    *,
    target_layers: Sequence[nn.Module] | None = None,
    batch_size: int | None = None,
    align: str = "centre",
    floor: str = "relu",
) -> Iterator[CamFn]:
    """Yield a function images -> (probs (B,), heatmaps (B, H, W)) for ``method``.

    ``align`` is the classic CAM's upsampling (:data:`pneumoloc.cam.names.CAM_ALIGNS`); the
    library methods upsample their own way and take only ``"centre"``.

    Raises:
        ConfigError: Unknown method, target layers given for "cam", or ``align="cells"`` with
            a library method.
    """
    check_cam_method(method)
    check_cam_align(align)
    check_cam_floor(floor)
    if method == "cam":
        if target_layers:
            raise ConfigError("method 'cam' uses the model's own head; target_layers is not used")
        yield lambda x: classic_cam(model, x, align, floor)
        return
    if align != "centre":
        raise ConfigError(f"cam_align {align!r} is for the classic CAM (method 'cam') only")
    if floor != "relu":
        raise ConfigError(f"cam_floor {floor!r} is for the classic CAM (method 'cam') only")
    with library_cam(model, method, target_layers=target_layers, batch_size=batch_size) as fn:
        yield fn


def compute_cam(
    model: CamClassifier,
    x: Tensor,
    *,
    method: str = "cam",
    target_layers: Sequence[nn.Module] | None = None,
    tta: bool = False,
    tta_scales: Sequence[float] = DEFAULT_TTA_SCALES,
    batch_size: int | None = None,
    scale_to_max: bool = False,
    align: str = "centre",
    floor: str = "relu",
) -> tuple[Tensor, Tensor]:
    """Pneumonia probabilities and heatmaps for a batch of images.

    The model runs in eval mode; its training flags, parameter gradients and hooks are left as
    they were.

    Args:
        model: The classifier.
        x: Images (B, 1, H, W), on any device (moved to the model's).
        method: A key of ``CAM_METHODS``.
        target_layers: Layers for library methods; default the model's final feature map.
        tta: Average over the horizontal flip (and ``tta_scales``) of every image.
        tta_scales: Input rescalings used when ``tta`` is on; (1.0,) is flip only.
        batch_size: Largest number of images per forward pass (also ScoreCAM's number of
            masked copies per pass); default: the whole batch at once.
        scale_to_max: Divide each heatmap by its maximum (all-zero maps stay zero).
        align: The classic CAM's upsampling (:data:`pneumoloc.cam.names.CAM_ALIGNS`).
        floor: How the classic CAM is made non-negative (:data:`pneumoloc.cam.names.CAM_FLOORS`).

    Returns:
        ``probs`` (B,) and ``heatmaps`` (B, H, W) float32 >= 0 at the input resolution, both on
        the model's device.

    Raises:
        ConfigError: Unknown method, bad TTA scales or batch size.
    """
    if batch_size is not None and batch_size < 1:
        raise ConfigError(f"batch_size must be at least 1, got {batch_size}")
    x = prepare_input(model, x)
    step = batch_size or max(1, len(x))
    probs: list[Tensor] = []
    maps: list[Tensor] = []
    with open_cam(
        model,
        method,
        target_layers=target_layers,
        batch_size=batch_size,
        align=align,
        floor=floor,
    ) as fn:
        for start in range(0, len(x), step):
            chunk = x[start : start + step]
            p, h = tta_cam(fn, chunk, scales=tta_scales) if tta else fn(chunk)
            probs.append(p)
            maps.append(h)
    heatmaps = torch.cat(maps).float().clamp_(min=0)
    if scale_to_max:
        peak = heatmaps.amax(dim=(-2, -1), keepdim=True)
        heatmaps = torch.where(peak > 0, heatmaps / peak.clamp(min=1e-12), heatmaps)
    return torch.cat(probs).float(), heatmaps


__all__ = ["compute_cam", "open_cam"]
