"""Heatmap refinement: grow CAM peaks into the extent of the opacity they sit on.

A CAM lights up the most discriminative part of an opacity, not all of it. The random walk of
AffinityNet (Ahn & Kwak, CVPR 2018) and IRNet propagates the CAM to neighbouring pixels that
belong to the same region: ``cam <- T^t cam`` with a row-stochastic transition matrix ``T``
built from pixel affinities inside a small radius. AffinityNet *learns* the affinities from
confident CAM regions; here they come from the image itself (intensity similarity, a bilateral
affinity as in a dense CRF's appearance kernel), so refinement needs no training, works for
every checkpoint and backend (PyTorch and ONNX), and uses no label of any kind.

Hand-written because no well-kept library provides it: pydensecrf is unmaintained and needs a
compiler, and AffinityNet/IRNet are research code tied to their own networks.

Written in numpy (and scipy's 1-d correlation for the blur) since issue 15; it was torch. It
runs on the CPU after the network for every backend, so importing it no longer loads torch
(the ONNX Runtime path needs none), and on the small 64 x 64 grid one numpy multiply-and-sum
per step over contiguous shifted slices beats torch's ``unfold``: ``benchmarks/bench_refine.py``
times both. It computes what the torch version computed (area resize = torch's adaptive
average pooling, replicate-padded Gaussian blur, 7 x 7 neighbourhood affinities, bilinear
resize with ``align_corners=False``) up to float32 rounding; ``tests/test_refine.py`` keeps the
torch version as its reference. Torch tensors, on any device, are accepted and copied to host
memory.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING, Any

import numpy as np
from scipy import ndimage

from pneumoloc.errors import ConfigError

if TYPE_CHECKING:
    from torch import Tensor

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


# --- resizing (torch's "area" and "bilinear" interpolation, one axis at a time) -------------


@lru_cache(maxsize=32)
def _area_bounds(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray]:
    """``reduceat`` bounds and window sizes of adaptive average pooling ``n_in -> n_out``.

    Output cell i averages input [floor(i*in/out), ceil((i+1)*in/out)) (torch's
    ``adaptive_avg_pool``, which ``F.interpolate(mode="area")`` is): windows overlap when
    ``out`` does not divide ``in``. The bounds are s0, e0, s1, e1, ..., s_last: reduceat's even
    outputs are then the windows' sums.
    """
    i = np.arange(n_out)
    start = (i * n_in) // n_out
    end = ((i + 1) * n_in + n_out - 1) // n_out
    bounds = np.stack([start, end], axis=1).ravel()[:-1]
    return bounds, (end - start).astype(np.float64)


def _area_resize(x: np.ndarray, axis: int, n_out: int) -> np.ndarray:
    """Average-pool ``x`` along ``axis`` to ``n_out`` cells; float64."""
    n_in = x.shape[axis]
    if n_in % n_out == 0:
        f = n_in // n_out
        blocks = x.reshape(*x.shape[:axis], n_out, f, *x.shape[axis + 1 :])
        return blocks.sum(axis=axis + 1, dtype=np.float64) / f
    bounds, count = _area_bounds(n_in, n_out)
    if n_in < n_out:  # windows before the last one end at n_in: reduceat needs an index there
        x = np.pad(x, [(0, int(a == axis)) for a in range(x.ndim)])
    sums = np.add.reduceat(x, bounds, axis=axis, dtype=np.float64)
    sums = np.take(sums, np.arange(0, len(bounds), 2), axis=axis)
    view = [1] * x.ndim
    view[axis] = n_out
    return sums / count.reshape(view)


def _to_grid(x: np.ndarray, size: int) -> np.ndarray:
    """(B, H, W) -> float32 (B, size, size), area interpolation; uint8 is scaled to [0, 1]."""
    grid = _area_resize(_area_resize(x, 1, size), 2, size)
    if x.dtype == np.uint8:
        grid /= 255.0
    return grid.astype(np.float32)


@lru_cache(maxsize=32)
def _bilinear_taps(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Source indices i0, i1 and the weight of i1 of bilinear resizing, align_corners=False."""
    src = np.maximum((np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5, 0.0)
    i0 = np.minimum(np.floor(src).astype(np.intp), n_in - 1)
    i1 = np.minimum(i0 + 1, n_in - 1)
    return i0, i1, np.clip(src - i0, 0.0, 1.0)


def _bilinear_resize(x: np.ndarray, axis: int, n_out: int) -> np.ndarray:
    i0, i1, lam = _bilinear_taps(x.shape[axis], n_out)
    view = [1] * x.ndim
    view[axis] = n_out
    lam = lam.reshape(view)
    return np.take(x, i0, axis=axis) * (1 - lam) + np.take(x, i1, axis=axis) * lam


# --- the walk --------------------------------------------------------------------------------


def _gaussian_blur(x: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur of (B, h, w) over the last two axes, replicate padding."""
    if sigma <= 0:
        return x
    half = max(1, round(3 * sigma))
    t = np.arange(-half, half + 1, dtype=np.float64)
    kernel = np.exp(-(t**2) / (2 * sigma**2))
    kernel /= kernel.sum()
    x = ndimage.correlate1d(x, kernel, axis=-1, mode="nearest")
    return ndimage.correlate1d(x, kernel, axis=-2, mode="nearest")


# One grid (n x n) is kept zero-padded by r on every side, P = n + 2r wide, and flattened:
# pixel (i, j) sits at r*P + r + i*P + j and its neighbour (i + dy - r, j + dx - r) exactly
# dy*P + dx before that. So every pixel's neighbour at one offset (dy, dx) is one contiguous
# slice of the flat array, read as (n, P) rows whose last 2r columns fall on the padding
# ("strips"); the walk's weights are zero there and for neighbours outside the grid.


class _PaddedGrid:
    """A flat zero-padded grid with its strips view, pixel slice and (n, n) view."""

    def __init__(self, n: int, r: int) -> None:
        p = n + 2 * r
        k = 2 * r + 1
        self.flat = np.zeros(p * p + 2 * r, np.float32)
        step = self.flat.itemsize
        self.strips = np.lib.stride_tricks.as_strided(
            self.flat, shape=(k, k, n * p), strides=(p * step, step, step), writeable=False
        )
        self.pixels = self.flat[r * p + r : r * p + r + n * p]  # (n, P) rows, flattened
        self.grid = self.flat[: p * p].reshape(p, p)[r : r + n, r : r + n]

    def load(self, values: np.ndarray) -> None:
        self.flat[:] = 0
        self.grid[...] = values


@lru_cache(maxsize=8)
def _inside(n: int, r: int) -> np.ndarray:
    """(k, k, n*P) float32: 1 where pixel (i, j) exists and so does its neighbour at (dy, dx)."""
    ones = _PaddedGrid(n, r)
    ones.load(np.ones((n, n), np.float32))
    mask = ones.strips * ones.pixels
    mask.flags.writeable = False
    return mask


def _random_walk(guides: np.ndarray, heatmaps: np.ndarray, config: RandomWalkConfig) -> np.ndarray:
    """Walk heatmaps (B, n, n) on the affinities of the smoothed images ``guides`` (B, n, n).

    For each pixel, the ``(2r+1)^2`` transition weights to the neighbours inside its window
    are ``exp(-(g_i - g_j)^2 / (2 sigma^2))``, normalised to sum to 1 (neighbours outside the
    grid get 0); each of the ``steps`` steps sets every pixel to the weighted mean of its
    neighbours' values, so values flow along regions of similar intensity and hardly across
    edges. One image at a time, in preallocated buffers: one image's (k, k, n*P) weights and
    products stay in cache, which a whole batch's do not; and every image gets the same
    arithmetic whatever the batch.
    """
    n = guides.shape[-1]
    r = config.radius
    inside = _inside(n, r)
    scale = np.float32(-2 * config.sigma**2)
    guide = _PaddedGrid(n, r)
    walk = _PaddedGrid(n, r)
    weights = np.empty(inside.shape, np.float32)
    products = np.empty(inside.shape, np.float32)
    total = np.empty(inside.shape[-1], np.float32)
    out = np.empty(heatmaps.shape, np.float32)
    for b in range(len(heatmaps)):
        guide.load(guides[b])
        np.subtract(guide.strips, guide.pixels, out=weights)
        np.multiply(weights, weights, out=weights)
        np.divide(weights, scale, out=weights)
        np.exp(weights, out=weights)
        weights *= inside
        np.sum(weights, axis=(0, 1), out=total)
        np.maximum(total, np.float32(1e-12), out=total)
        weights /= total
        walk.load(heatmaps[b])
        for _ in range(config.steps):
            # The step's sums go back into the pixels: zero weights keep the padding zero.
            np.multiply(weights, walk.strips, out=products)
            np.sum(products, axis=(0, 1), out=walk.pixels)
        out[b] = walk.grid
    return out


def _to_numpy(x: np.ndarray | Tensor | Any) -> np.ndarray:
    """An array as numpy; a torch tensor (on any device) is copied to host memory."""
    if not isinstance(x, np.ndarray) and hasattr(x, "detach") and hasattr(x, "cpu"):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def random_walk_refine(
    images: np.ndarray | Tensor,
    heatmaps: np.ndarray | Tensor,
    config: RandomWalkConfig | None = None,
) -> np.ndarray:
    """Refine heatmaps with an image-guided random walk.

    Args:
        images: uint8 (B, H, W) (0 = black) or float in [0, 1], the images the heatmaps are of.
        heatmaps: float (B, H, W) >= 0, e.g. CAMs normalised to [0, 1].
        config: Walk settings (default ``RandomWalkConfig()``).

    Returns:
        float32 (B, H, W): refined heatmaps, each divided by its maximum (all-zero stays zero).
        The peak stays where evidence was; the support grows into regions that look like it.

    Raises:
        ValueError: Images and heatmaps of different shapes.
    """
    config = config or RandomWalkConfig()
    config.validate()
    img = _to_numpy(images)
    maps = np.asarray(_to_numpy(heatmaps), dtype=np.float32)
    if img.shape != maps.shape or maps.ndim != 3:
        raise ValueError(
            f"images {tuple(img.shape)} and heatmaps {tuple(maps.shape)} must both be (B, S, S)"
        )
    if len(maps) == 0:
        return maps.copy()
    size = config.work_size
    guides = _gaussian_blur(_to_grid(img, size), config.smooth)
    walked = _random_walk(guides, _to_grid(maps, size), config).astype(np.float64)
    out_h, out_w = maps.shape[-2:]
    refined = _bilinear_resize(_bilinear_resize(walked, 1, out_h), 2, out_w)
    refined = np.maximum(refined, 0.0)
    peak = refined.max(axis=(-2, -1), keepdims=True)
    refined = np.divide(refined, peak, out=np.zeros_like(refined), where=peak > 0)
    return refined.astype(np.float32)


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
