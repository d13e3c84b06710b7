"""Heatmap refinement: grow CAM peaks into the extent of the opacity they sit on.

A CAM lights up the most discriminative part of an opacity, not all of it. The random walk of
AffinityNet (Ahn & Kwak, CVPR 2018) and IRNet propagates the CAM to neighbouring pixels that
belong to the same region: ``cam <- T^t cam`` with a row-stochastic transition matrix ``T``
built from pixel affinities inside a small radius. AffinityNet *learns* the affinities from
confident CAM regions; here they come from the image itself (intensity similarity, a bilateral
affinity as in a dense CRF's appearance kernel), so refinement needs no training, works for
every checkpoint and backend (PyTorch and ONNX), and uses no label of any kind.

Hand-written with torch because no well-kept library provides it: pydensecrf is unmaintained
and needs a compiler, and AffinityNet/IRNet are research code tied to their own networks.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from pneumoloc.errors import ConfigError

REFINE_METHODS = ("randomwalk",)
"""Names accepted by ``refine_heatmaps`` (``None`` means no refinement)."""


@dataclass(frozen=True)
class RandomWalkConfig:
    """Settings of the image-guided random walk.

    Attributes:
        work_size: Side of the square grid the walk runs on (the heatmap is resized to it and
            back); 64 keeps it at a few ms per image on a CPU.
        radius: Neighbourhood radius in grid pixels: each step moves mass at most this far.
        sigma: Intensity scale of the affinity ``exp(-(I_i - I_j)^2 / (2 sigma^2))``, image in
            [0, 1] after smoothing. Smaller: the walk stops at weaker edges.
        steps: Number of random-walk steps ``t`` (diffusion grows like ``radius * sqrt(t)``).
        smooth: Gaussian sigma (grid pixels) applied to the image before affinities, so
            speckle and rib edges do not stop the walk.
    """

    work_size: int = 64
    radius: int = 3
    sigma: float = 0.06
    steps: int = 24
    smooth: float = 1.0

    def validate(self) -> None:
        """Raise ConfigError on settings the walk cannot run with."""
        if self.work_size < 8 or self.radius < 1 or self.steps < 0 or self.sigma <= 0:
            raise ConfigError(
                f"random walk needs work_size >= 8, radius >= 1, steps >= 0, sigma > 0; got {self}"
            )


def _gaussian_blur(x: Tensor, sigma: float) -> Tensor:
    if sigma <= 0:
        return x
    half = max(1, round(3 * sigma))
    t = torch.arange(-half, half + 1, dtype=x.dtype, device=x.device)
    kernel = torch.exp(-(t**2) / (2 * sigma**2))
    kernel = kernel / kernel.sum()
    x = F.conv2d(F.pad(x, (half, half, 0, 0), mode="replicate"), kernel.view(1, 1, 1, -1))
    return F.conv2d(F.pad(x, (0, 0, half, half), mode="replicate"), kernel.view(1, 1, -1, 1))


def transition_matrix(images: Tensor, config: RandomWalkConfig) -> Tensor:
    """Local transition probabilities (B, K, N) of the walk on images (B, 1, n, n) in [0, 1].

    ``K = (2r+1)^2`` neighbours (a square window, outside-the-image neighbours get weight 0)
    of each of the ``N = n*n`` pixels; each pixel's K weights sum to 1.
    """
    r = config.radius
    k = 2 * r + 1
    guide = _gaussian_blur(images, config.smooth)
    centre = guide.flatten(2)  # (B, 1, N)
    neighbours = F.unfold(guide, k, padding=r)  # (B, K, N), zero-padded
    inside = F.unfold(torch.ones_like(guide), k, padding=r)  # 1 where the neighbour exists
    affinity = torch.exp(-((neighbours - centre) ** 2) / (2 * config.sigma**2)) * inside
    return affinity / affinity.sum(dim=1, keepdim=True).clamp(min=1e-12)


def random_walk(heatmaps: Tensor, transition: Tensor, steps: int, size: int) -> Tensor:
    """``steps`` applications of the walk to heatmaps (B, 1, n, n); returns the same shape.

    Each step sets every pixel to the affinity-weighted mean of its neighbours' values, so
    values flow along regions of similar intensity and hardly across edges.
    """
    k = round(transition.shape[1] ** 0.5)
    r = k // 2
    x = heatmaps
    for _ in range(steps):
        patches = F.unfold(x, k, padding=r)  # (B, K, N)
        x = (patches * transition).sum(dim=1).view(-1, 1, size, size)
    return x


def random_walk_refine(
    images: np.ndarray | Tensor,
    heatmaps: np.ndarray | Tensor,
    config: RandomWalkConfig | None = None,
) -> np.ndarray:
    """Refine heatmaps with an image-guided random walk.

    Args:
        images: uint8 (B, S, S) (0 = black) or float in [0, 1], the images the heatmaps are of.
        heatmaps: float (B, S, S) >= 0, e.g. CAMs normalised to [0, 1].
        config: Walk settings (default ``RandomWalkConfig()``).

    Returns:
        float32 (B, S, S): refined heatmaps, each divided by its maximum (all-zero stays zero).
        The peak stays where evidence was; the support grows into regions that look like it.

    Raises:
        ValueError: Images and heatmaps of different shapes.
    """
    config = config or RandomWalkConfig()
    config.validate()
    img = torch.as_tensor(np.asarray(images) if not isinstance(images, Tensor) else images)
    maps = torch.as_tensor(
        np.asarray(heatmaps) if not isinstance(heatmaps, Tensor) else heatmaps
    ).float()
    if img.shape != maps.shape or maps.ndim != 3:
        raise ValueError(
            f"images {tuple(img.shape)} and heatmaps {tuple(maps.shape)} must both be (B, S, S)"
        )
    if len(maps) == 0:
        return maps.numpy().astype(np.float32)
    img = img.to(maps.device)
    img = img.float() / 255.0 if img.dtype == torch.uint8 else img.float()
    size = config.work_size
    out_hw = maps.shape[-2:]
    small_img = F.interpolate(img[:, None], size=(size, size), mode="area")
    small_map = F.interpolate(maps[:, None], size=(size, size), mode="area")
    transition = transition_matrix(small_img, config)
    walked = random_walk(small_map, transition, config.steps, size)
    refined = F.interpolate(walked, size=tuple(out_hw), mode="bilinear", align_corners=False)[:, 0]
    refined = refined.clamp(min=0)
    peak = refined.amax(dim=(-2, -1), keepdim=True)
    refined = torch.where(peak > 0, refined / peak.clamp(min=1e-12), torch.zeros_like(refined))
    return refined.cpu().numpy().astype(np.float32)


def refine_heatmaps(
    method: str | None, images: np.ndarray | Tensor, heatmaps: np.ndarray
) -> np.ndarray:
    """Apply the named refinement (``None``: return the heatmaps unchanged).

    Raises:
        ConfigError: Unknown method.
    """
    if method is None or method == "none":
        return heatmaps
    if method == "randomwalk":
        return random_walk_refine(images, heatmaps)
    raise ConfigError(f"unknown refinement {method!r}; choose one of {list(REFINE_METHODS)}")
