"""Test-time augmentation for heatmaps: horizontal flip and rescaling, mapped back and averaged.

Implemented here rather than with the library's ``aug_smooth`` (ttach) so that it applies the
same way to every method, classic CAM included, and averages probabilities too. Every scale
is used with and without the flip, so the result is exactly flip-equivariant: a mirrored
image gives the mirrored heatmap.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch.nn.functional as F
from torch import Tensor

from pneumoloc.cam.classic import upsample_cam
from pneumoloc.errors import ConfigError

DEFAULT_TTA_SCALES: tuple[float, ...] = (1.0,)
"""Identity + flip only. ``(0.9, 1.0, 1.1)`` adds two rescaled views (each also flipped)."""


def tta_cam(
    cam_fn: Callable[[Tensor], tuple[Tensor, Tensor]],
    x: Tensor,
    *,
    flip: bool = True,
    scales: Sequence[float] = DEFAULT_TTA_SCALES,
) -> tuple[Tensor, Tensor]:
    """Average ``cam_fn`` over flipped and rescaled views of ``x``.

    Args:
        cam_fn: Images (B, 1, h, w) -> (probs (B,), heatmaps (B, h, w)) at the size given.
        x: Images (B, 1, H, W).
        flip: Add the horizontally flipped view of each scale (its heatmap flipped back).
        scales: Resampling factors of the input; heatmaps are resampled back to (H, W).

    Returns:
        Mean probabilities (B,) and mean heatmaps (B, H, W).

    Raises:
        ConfigError: No scales, or a scale that is not positive.
    """
    if not scales or any(s <= 0 for s in scales):
        raise ConfigError(f"TTA scales must be positive and non-empty, got {list(scales)}")
    height, width = x.shape[-2], x.shape[-1]
    prob_sum: Tensor | None = None
    heat_sum: Tensor | None = None
    views = 0
    for scale in scales:
        size = (max(1, round(height * scale)), max(1, round(width * scale)))
        scaled = x if size == (height, width) else _resize(x, size)
        for flipped in (False, True) if flip else (False,):
            probs, heat = cam_fn(scaled.flip(-1) if flipped else scaled)
            if flipped:
                heat = heat.flip(-1)
            if heat.shape[-2:] != (height, width):
                heat = upsample_cam(heat, (height, width))
            prob_sum = probs if prob_sum is None else prob_sum + probs
            heat_sum = heat if heat_sum is None else heat_sum + heat
            views += 1
    assert prob_sum is not None and heat_sum is not None
    return prob_sum / views, heat_sum / views


def _resize(x: Tensor, size: tuple[int, int]) -> Tensor:
    """Bilinear resize of images (B, 1, H, W), antialiased when shrinking."""
    shrink = size[0] < x.shape[-2] or size[1] < x.shape[-1]
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=shrink)
