"""Lung fields from the image alone (no labels of any kind), to keep localisation inside them.

Hand-written with scipy.ndimage because no well-kept library ships a label-free lung segmenter
for chest radiographs (torchxrayvision's segmenter is a trained network whose weights download
at run time). The classical recipe: the lungs are the large dark regions INSIDE the body; dark
regions touching the image border are the air around the patient.

Speed (issue 15): the same mask as the first version (``tests/test_lungs.py`` keeps it as the
reference and compares), computed in about half the time. The wide Gaussian that removes the
exposure gradient (sigma = side/8, a 193-tap kernel at 192 px, most of the cost) is applied as
two small matrix products with the filter's own matrix (``gaussian_filter1d`` of the identity,
so edge handling and weights are scipy's), on one BLAS thread; the iterated erosions and
dilations by the 3x3 cross are thresholds of the exact city-block distance transform (k
iterations by the cross = the L1 ball of radius k), and hole filling labels the background
once instead of flooding it.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import numpy as np
from scipy import ndimage

from pneumoloc.localise.geometry import otsu_threshold

_BLAS: Any = None


def _one_blas_thread() -> Any:
    """A context limiting numpy's BLAS to one thread (threadpoolctl): the matrices are small,
    and on a busy machine several BLAS threads per product are many times slower."""
    global _BLAS
    if _BLAS is None:
        from threadpoolctl import ThreadpoolController

        _BLAS = ThreadpoolController()
    return _BLAS.limit(limits=1, user_api="blas")


@lru_cache(maxsize=16)
def _gaussian_matrix(n: int, sigma: float) -> np.ndarray:
    """``M`` with ``M @ x == gaussian_filter1d(x, sigma, axis=0)`` (mode "reflect")."""
    matrix = ndimage.gaussian_filter1d(np.eye(n), sigma, axis=0, mode="reflect")
    matrix.setflags(write=False)
    return matrix


def _gaussian_filter(image: np.ndarray, sigma: float) -> np.ndarray:
    """``ndimage.gaussian_filter(image, sigma)`` of a float32 image (H, W), as matrix products:
    axis 0 first with the intermediate rounded to float32, as scipy stores it."""
    rows = _gaussian_matrix(image.shape[0], sigma)
    cols = _gaussian_matrix(image.shape[1], sigma)
    with _one_blas_thread():
        tmp = (rows @ image.astype(np.float64)).astype(np.float32)
        return (tmp.astype(np.float64) @ cols.T).astype(np.float32)


def _distance_to_false(mask: np.ndarray) -> np.ndarray:
    """City-block distance of each pixel to the nearest False pixel of ``mask`` (0 on False
    pixels; inf everywhere when there is none)."""
    if mask.all():
        return np.full(mask.shape, np.inf)
    return ndimage.distance_transform_cdt(mask, metric="taxicab").astype(np.float64)


def _distance_to_outside(shape: tuple[int, int]) -> np.ndarray:
    """City-block distance of each pixel to the nearest pixel outside the image."""
    h, w = shape
    i = np.arange(h)[:, None]
    j = np.arange(w)[None, :]
    return np.minimum(np.minimum(i + 1, h - i), np.minimum(j + 1, w - j)).astype(np.float64)


def _fill_holes(mask: np.ndarray) -> np.ndarray:
    """``ndimage.binary_fill_holes``: background regions (4-connected) not touching the border."""
    labels, _ = ndimage.label(~mask)
    outside = np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))
    return mask | ((labels > 0) & ~np.isin(labels, outside))


def estimate_lung_mask(
    pixels: np.ndarray, *, min_area_fraction: float = 0.02, dilate_fraction: float = 0.08
) -> np.ndarray | None:
    """A boolean mask of the lung fields of a frontal chest X-ray, or None when none is found.

    Args:
        pixels: uint8 (H, W), 0 = black (air).
        min_area_fraction: Dark regions smaller than this fraction of the image are ignored.
        dilate_fraction: The mask is grown by this fraction of the image side (opacities make
            the lung brighter at its edges, so a tight mask would cut them off).

    Returns:
        bool (H, W), True inside the (at most two) lung fields; None if no plausible lung region
        exists, in which case callers should not restrict anything.
    """
    image = np.asarray(pixels, dtype=np.float32)
    if image.ndim != 2 or image.size == 0:
        raise ValueError(f"expected a 2-D image, got shape {image.shape}")
    h, w = image.shape
    side = min(h, w)
    smooth = ndimage.gaussian_filter(image, sigma=max(1.0, side / 100))
    # Local contrast: remove the slow exposure gradient so the threshold sees lung vs body.
    background = _gaussian_filter(smooth, side / 8)
    detail = smooth - background
    dark_full = detail < otsu_threshold(detail, bins=64)
    # Cut thin dark bridges (neck, armpits) that join the lungs to the outside air, find the
    # seeds not touching the border, then grow them back inside the dark region.
    cut = max(1, round(0.025 * side))
    # The erosion by `cut` (outside the image counts as dark, so regions touching the border
    # keep touching it): dark pixels farther than `cut` from any bright one.
    seeds = dark_full & (_distance_to_false(dark_full) > cut)
    labels, n = ndimage.label(seeds)
    if n == 0:
        return None
    border = np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))
    areas = ndimage.sum_labels(np.ones_like(labels), labels, index=np.arange(1, n + 1))
    centres = ndimage.center_of_mass(seeds, labels, index=np.arange(1, n + 1))
    candidates = [
        (area, i + 1)
        for i, area in enumerate(areas)
        if (i + 1) not in border
        and area >= min_area_fraction * h * w / 4
        # lungs sit in the middle of a frontal film, never at its edges
        and 0.1 * h < centres[i][0] < 0.85 * h
        and 0.12 * w < centres[i][1] < 0.88 * w
    ]
    if not candidates:
        return None
    keep = [label for _, label in sorted(candidates, reverse=True)[:2]]
    mask = ndimage.binary_dilation(np.isin(labels, keep), iterations=cut, mask=dark_full)
    mask = _fill_holes(mask)
    # Consolidation makes a lung (or part of it) as bright as the body, so it drops out of the
    # dark mask exactly where the pneumonia is. Lungs are roughly mirror images: add the mirror
    # image of what was found, then close concavities, so an opaque lung is still covered.
    mask = mask | mask[:, ::-1]
    close = max(1, round(0.06 * side))
    # Closing by `close` (outside the image counts as not lung): dilate, then erode.
    dilated = _distance_to_false(~mask) <= close
    distance = np.minimum(_distance_to_false(dilated), _distance_to_outside((h, w)))
    mask = dilated & (distance > close)
    grow = round(dilate_fraction * min(h, w))
    if grow > 0:
        mask = _distance_to_false(~mask) <= grow
    return np.asarray(mask, dtype=bool)


def restrict_to_lungs(
    images: np.ndarray,
    heatmaps: np.ndarray,
    masks: list[np.ndarray | None] | None = None,
) -> np.ndarray:
    """Zero each heatmap outside its image's lung mask and rescale it to a peak of 1.

    Args:
        images: uint8 (B, H, W), the model's inputs.
        heatmaps: (B, H, W) heatmaps in [0, 1] at the same size.
        masks: The images' :func:`estimate_lung_mask` when already computed (else computed).

    Returns:
        A new array; a heatmap whose image has no detectable lungs is left as it was.
    """
    out = np.array(heatmaps, copy=True)
    if masks is None:
        masks = [estimate_lung_mask(image) for image in images]
    for i, mask in enumerate(masks):
        if mask is None or mask.shape != out[i].shape:
            continue
        out[i] = np.where(mask, out[i], 0.0)
        peak = out[i].max()
        if peak > 0:
            out[i] /= peak
    return out
