"""Evidence-free localisation baselines: boxes that anatomy alone draws.

A localiser of pneumonia is worth something only where it beats what the lung fields give
without looking at any disease: one box per lung field, or the lower two thirds of each (where
most pneumonia sits). These are computed from pneumoloc's label-free lung mask
(:mod:`pneumoloc.localise.lungs`), with the same gate as the model's boxes, so a report can put
the model's figures beside them in the same run.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from pneumoloc.localise.boxes import ScoredBoxes

__all__ = ["ANATOMY_RULES", "anatomy_boxes", "lung_field_boxes"]

ANATOMY_RULES = ("lung_fields", "lower_lung_fields")
"""``lung_fields``: the bounding box of each half (left/right of the midline) of the lung mask;
``lower_lung_fields``: the lower two thirds of each of those boxes."""

LOWER_FRACTION = 2.0 / 3.0


def lung_field_boxes(mask: np.ndarray, *, lower_fraction: float = 1.0) -> np.ndarray:
    """xywh boxes (mask pixels) of each half of a lung mask, cut at the vertical midline.

    Args:
        mask: bool (H, W) lung mask.
        lower_fraction: Keep this lower fraction of each box's height (1 = the whole field).

    Returns:
        ``(N, 4)`` float boxes, N <= 2 (a half without mask pixels has no box).
    """
    mask = np.asarray(mask, dtype=bool)
    if mask.ndim != 2:
        raise ValueError(f"expected a 2-D mask, got shape {mask.shape}")
    if not 0.0 < lower_fraction <= 1.0:
        raise ValueError(f"lower_fraction must be in (0, 1], got {lower_fraction}")
    w = mask.shape[1]
    mid = w // 2
    boxes = []
    for x0, half in ((0, mask[:, :mid]), (mid, mask[:, mid:])):
        found = ndimage.find_objects(half.astype(np.int32))
        if not found or found[0] is None:
            continue
        rows, cols = found[0]
        height = rows.stop - rows.start
        top = rows.stop - lower_fraction * height
        boxes.append((x0 + cols.start, top, cols.stop - cols.start, rows.stop - top))
    return np.asarray(boxes, dtype=np.float64).reshape(-1, 4)


def anatomy_boxes(
    masks: list[np.ndarray | None],
    probabilities: np.ndarray,
    *,
    threshold: float,
    out_shapes: list[tuple[int, int]],
    rule: str = "lung_fields",
) -> list[ScoredBoxes]:
    """The anatomy baseline's boxes, gated like the model's: none below ``threshold``.

    Args:
        masks: Per image the lung mask at the model's size (None: no lungs found, no boxes).
        probabilities: Per image the gate's probability (the model's, or 1/0 labels for the
            label-gated variant).
        threshold: Boxes only where ``probability >= threshold``.
        out_shapes: Per image ``(H0, W0)`` of the original image; boxes are scaled to it.
        rule: A key of :data:`ANATOMY_RULES`.

    Returns:
        One :class:`ScoredBoxes` per image; each box scores the image's probability.
    """
    if rule not in ANATOMY_RULES:
        raise ValueError(f"unknown anatomy rule {rule!r}; choose one of {ANATOMY_RULES}")
    if not len(masks) == len(probabilities) == len(out_shapes):
        raise ValueError("masks, probabilities and out_shapes differ in length")
    lower = LOWER_FRACTION if rule == "lower_lung_fields" else 1.0
    out = []
    for mask, prob, shape in zip(masks, probabilities, out_shapes, strict=True):
        if mask is None or float(prob) < threshold:
            out.append(ScoredBoxes())
            continue
        boxes = lung_field_boxes(mask, lower_fraction=lower)
        sy, sx = shape[0] / mask.shape[0], shape[1] / mask.shape[1]
        boxes = boxes * np.array([sx, sy, sx, sy])
        out.append(ScoredBoxes(boxes=boxes, scores=np.full(len(boxes), float(prob))))
    return out
