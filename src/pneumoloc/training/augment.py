"""Batched training augmentations, run on the training device.

Augmentations suit chest X-rays: a small random affine (rotation, scale, translation; no flips by
default since anatomy is not left-right symmetric: the heart sits on the left), brightness,
contrast and gamma. Nothing depends on boxes. They run batched on the device with an explicit
``torch.Generator``, so a GPU never waits on CPU-side image processing. They work on images
in ``[0, 1]``; the intensity convention (``standardise``) is :mod:`pneumoloc.io.preprocess`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class AugmentConfig:
    """Strengths of the training augmentations (0 disables each)."""

    rotate_deg: float = 7.0
    scale: float = 0.08
    translate: float = 0.06
    brightness: float = 0.1
    contrast: float = 0.15
    gamma: float = 0.2
    hflip: float = 0.0

    @property
    def enabled(self) -> bool:
        """Whether any augmentation is on."""
        return any(v > 0 for v in vars(self).values())


def _uniform(
    n: int, low: float, high: float, generator: torch.Generator, device: torch.device
) -> torch.Tensor:
    return torch.rand(n, generator=generator, device=device) * (high - low) + low


def augment_batch(
    x: torch.Tensor, config: AugmentConfig, generator: torch.Generator
) -> torch.Tensor:
    """Augment a batch of images in [0, 1], shape (B, 1, H, W), on its own device.

    Args:
        x: Float images in [0, 1].
        config: Strengths.
        generator: A generator on ``x.device``; the result is a pure function of its state.
    """
    if not config.enabled:
        return x
    b, device = x.shape[0], x.device
    angle = _uniform(b, -config.rotate_deg, config.rotate_deg, generator, device) * (math.pi / 180)
    scale = 1 + _uniform(b, -config.scale, config.scale, generator, device)
    tx = _uniform(b, -config.translate, config.translate, generator, device) * 2
    ty = _uniform(b, -config.translate, config.translate, generator, device) * 2
    flip = (torch.rand(b, generator=generator, device=device) < config.hflip).float() * -2 + 1
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack(
        [torch.stack([cos * flip, -sin, tx], 1), torch.stack([sin * flip, cos, ty], 1)], 1
    ).to(x.dtype)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    shape = (b, 1, 1, 1)
    gamma = torch.exp(_uniform(b, -config.gamma, config.gamma, generator, device)).view(shape)
    x = x.clamp(0, 1) ** gamma.to(x.dtype)
    contrast = (1 + _uniform(b, -config.contrast, config.contrast, generator, device)).view(shape)
    brightness = _uniform(b, -config.brightness, config.brightness, generator, device).view(shape)
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    x = (x - mean) * contrast.to(x.dtype) + mean + brightness.to(x.dtype)
    return x.clamp(0, 1)
