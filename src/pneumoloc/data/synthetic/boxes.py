"""Box sampling: the opacity boxes of one positive image, RSNA-like, inside its lung fields.

:func:`sample_boxes` draws the count, the lung of each box, its size (the RSNA log-normal) and
its position from the statistics in :mod:`~pneumoloc.data.synthetic.stats`.
"""

from __future__ import annotations

import math

import numpy as np

from pneumoloc.data.anatomy import (
    SIDES,
    Anatomy,
    Side,
    anatomical_grid,
    lung_masks_on_grid,
    mask_bbox,
)
from pneumoloc.data.synthetic.stats import (
    BOX_CENTRE_IN_LUNG,
    BOX_COUNT_PROBS,
    BOX_LOG_CORR,
    BOX_LOG_MEAN,
    BOX_LOG_SD,
    BOX_MIN_WH,
    REFERENCE_SIZE,
    RENDER_BASE,
    RIGHT_LUNG_FRACTION,
    TWO_BOX_BILATERAL_FRACTION,
)
from pneumoloc.errors import ConfigError


def _box_count(rng: np.random.Generator) -> int:
    counts = list(BOX_COUNT_PROBS)
    probs = np.array([BOX_COUNT_PROBS[c] for c in counts])
    return int(counts[int(rng.choice(len(counts), p=probs / probs.sum()))])


def _box_sides(rng: np.random.Generator, k: int) -> list[Side]:
    """Which lung each of ``k`` boxes goes in (patient sides)."""
    first: Side = "right" if rng.random() < RIGHT_LUNG_FRACTION else "left"
    other: Side = "left" if first == "right" else "right"
    if k == 1:
        return [first]
    if k == 2:
        return [first, other] if rng.random() < TWO_BOX_BILATERAL_FRACTION else [first, first]
    return [first, first, other]


def _box_wh(rng: np.random.Generator, size: int) -> tuple[float, float]:
    """One (width, height) from the RSNA log-normal, scaled to ``size``."""
    z1, z2 = rng.standard_normal(2)
    lw = BOX_LOG_MEAN[0] + BOX_LOG_SD[0] * z1
    lh = BOX_LOG_MEAN[1] + BOX_LOG_SD[1] * (BOX_LOG_CORR * z1 + math.sqrt(1 - BOX_LOG_CORR**2) * z2)
    k = size / REFERENCE_SIZE
    return math.exp(lw) * k, math.exp(lh) * k


def _place_box(
    rng: np.random.Generator,
    region: tuple[float, float, float, float],
    mask: np.ndarray,
    size: int,
    y_prior: bool,
) -> np.ndarray:
    """An integer xywh box inside ``region`` (x0, y0, x1, y1, image pixels) whose centre lies
    in ``mask`` (a coarse lung mask) and which is mostly lung."""
    g = mask.shape[0]
    rx0, ry0, rx1, ry1 = region
    k = size / REFERENCE_SIZE
    min_w, min_h = max(3.0, BOX_MIN_WH[0] * k), max(3.0, BOX_MIN_WH[1] * k)
    for attempt in range(60):
        shrink = 0.85 ** (attempt // 12)
        bw, bh = _box_wh(rng, size)
        w = min(max(bw * shrink, min_w), 0.95 * (rx1 - rx0))
        h = min(max(bh * shrink, min_h), 0.95 * (ry1 - ry0))
        x = rng.uniform(rx0, rx1 - w)
        if y_prior:
            mu, sd = BOX_CENTRE_IN_LUNG
            cy = ry0 + (ry1 - ry0) * rng.normal(mu, sd)
            y = min(max(cy - h / 2, ry0), ry1 - h)
        else:
            y = rng.uniform(ry0, ry1 - h)
        xi, yi = math.ceil(x), math.ceil(y)
        wi, hi = math.floor(min(w, rx1 - xi)), math.floor(min(h, ry1 - yi))
        if wi < 2 or hi < 2:
            continue
        c0, c1 = int(xi * g / size), max(int(xi * g / size) + 1, round((xi + wi) * g / size))
        r0, r1 = int(yi * g / size), max(int(yi * g / size) + 1, round((yi + hi) * g / size))
        centre = mask[
            min(g - 1, int((yi + hi / 2) * g / size)), min(g - 1, int((xi + wi / 2) * g / size))
        ]
        if centre and mask[r0:r1, c0:c1].mean() >= 0.65:
            return np.array([xi, yi, wi, hi], dtype=np.float64)
    # Fallback (not seen in practice): a small box around the lung's centroid.
    rows, cols = np.nonzero(mask)
    cx, cy = (cols.mean() + 0.5) * size / g, (rows.mean() + 0.5) * size / g
    w, h = max(2.0, 0.15 * (rx1 - rx0)), max(2.0, 0.15 * (ry1 - ry0))
    return np.array([round(cx - w / 2), round(cy - h / 2), math.floor(w), math.floor(h)], float)


def sample_boxes(rng: np.random.Generator, anatomy: Anatomy, size: int) -> np.ndarray:
    """Draw the opacity boxes of one positive image, RSNA-like, inside its lung fields.

    The count follows :data:`BOX_COUNT_PROBS`, two boxes usually go one per lung, sizes follow
    the RSNA log-normal scaled to ``size``; every box lies inside the bounding box of its lung
    field, its centre is in the lung field and most of its area is lung. Two boxes in one lung
    go one in its upper and one in its lower half.

    Returns:
        (k, 4) float64 xywh in pixels (integer valued), 1 <= k <= 3.
    """
    g = min(size, RENDER_BASE)
    u, v = anatomical_grid(g, anatomy)
    masks = dict(zip(SIDES, lung_masks_on_grid(u, v, anatomy), strict=True))
    sides = _box_sides(rng, _box_count(rng))
    boxes = []
    for side in SIDES:
        n_here = sides.count(side)
        if n_here == 0:
            continue
        bbox = mask_bbox(masks[side])
        if bbox is None:  # not possible with sample_anatomy's ranges
            raise ConfigError(f"image_size={size} is too small to hold a {side} lung field")
        c0, r0, c1, r1 = bbox
        # shrink by one coarse pixel so the box is inside the lung bbox at full resolution too
        region = (
            (c0 + 1) * size / g,
            (r0 + 1) * size / g,
            (c1 - 1) * size / g,
            (r1 - 1) * size / g,
        )
        if n_here == 1:
            boxes.append(_place_box(rng, region, masks[side], size, y_prior=True))
        else:
            mid = (region[1] + region[3]) / 2
            upper = (region[0], region[1], region[2], mid)
            lower = (region[0], mid, region[2], region[3])
            boxes.append(_place_box(rng, upper, masks[side], size, y_prior=False))
            boxes.append(_place_box(rng, lower, masks[side], size, y_prior=False))
    return np.stack(boxes)
