"""Small array helpers of the renderer: resizing, soft masks, smooth noise, soft edges, bands.

Pure functions of float images; the only randomness is the generator passed to
:func:`_smooth_noise`.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image
from scipy.ndimage import gaussian_filter


def _resize(a: np.ndarray, size: int) -> np.ndarray:
    """Bicubic resize of a float image to size x size (Pillow's float resampler is fast)."""
    if a.shape == (size, size):
        return a.astype(np.float32, copy=False)
    img = Image.fromarray(np.ascontiguousarray(a, dtype=np.float32))
    return np.asarray(img.resize((size, size), Image.Resampling.BICUBIC), dtype=np.float32)


def _soft(mask: np.ndarray, sigma: float) -> np.ndarray:
    """A binary mask with Gaussian-blurred edges, float32 in [0, 1].

    Wide blurs run on a subsampled mask (then resized back): same look, a fraction of the cost.
    """
    m = mask.astype(np.float32)
    f = int(sigma // 2)
    if f < 2 or min(m.shape) < 8 * f:
        return gaussian_filter(m, sigma=max(sigma, 1e-3), mode="nearest", truncate=3.0)
    h, w = m.shape
    small = np.asarray(Image.fromarray(m).resize((w // f, h // f), Image.Resampling.BOX))
    small = gaussian_filter(small, sigma=sigma / f, mode="nearest", truncate=3.0)
    return np.asarray(
        Image.fromarray(small).resize((w, h), Image.Resampling.BILINEAR), dtype=np.float32
    )


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], cells: int) -> np.ndarray:
    """Zero-mean, unit-sd smooth random field with about ``cells`` blobs across."""
    cells = max(2, cells)
    small = gaussian_filter(rng.standard_normal((cells + 2, cells + 2)), 0.8, mode="wrap")
    img = Image.fromarray(small.astype(np.float32))
    field = np.asarray(img.resize(shape[::-1], Image.Resampling.BICUBIC), dtype=np.float32)
    sd = float(field.std())
    return (field - field.mean()) / (sd if sd > 0 else 1.0)


def _smoothstep(t: np.ndarray) -> np.ndarray:
    t = np.clip(t, 0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)


def _bands(phase: np.ndarray, duty: float) -> np.ndarray:
    """Periodic rounded bands: 1 at integer ``phase``, covering ``duty`` of each period."""
    thr = math.cos(math.pi * duty)
    c = np.cos(2.0 * np.pi * phase)
    return np.sqrt(np.clip((c - thr) / (1.0 - thr), 0.0, 1.0))


def _ramp(signed: np.ndarray, width: float) -> np.ndarray:
    """Soft inside-ness from a signed distance (positive inside, fraction of the image side).

    An analytic soft edge: much cheaper than blurring a binary mask, for shapes with a closed
    form.
    """
    return _smoothstep(signed / width + 0.5)


def _ellipse_ramp(
    u: np.ndarray,
    v: np.ndarray,
    centre: tuple[float, float],
    radii: tuple[float, float],
    width: float,
) -> np.ndarray:
    r = np.sqrt(((u - centre[0]) / radii[0]) ** 2 + ((v - centre[1]) / radii[1]) ** 2)
    return _ramp((1.0 - r) * (0.5 * (radii[0] + radii[1])), width)
