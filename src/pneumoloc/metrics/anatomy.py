"""Localisation measured against anatomy: what a box or a peak adds over the lung fields.

* :func:`random_in_lung_pointing`: the pointing game of a point drawn uniformly inside the lung
  mask, computed exactly (the share of lung pixels that lie in a truth box), not sampled;
* :func:`box_accuracy`: the share of images with truth whose boxes contain one with IoU >= t
  with a truth box (CorLoc, Deselaers et al. 2012);
* :func:`top_box_pointing`: the pointing game of the centre of each image's highest-scoring box
  (for a detector, which draws no heatmap of its own, the point it would show);
* :func:`lung_coverage`: the share of the lung mask that the final boxes cover (a map flooded
  over both lungs covers ~1; the median RSNA box is ~6% of the image);
* :func:`median_box_area`: the median predicted box area as a fraction of its image.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from pneumoloc.localise.geometry import as_boxes, iou_matrix
from pneumoloc.metrics.localisation import point_in_boxes

__all__ = [
    "anatomy_comparison",
    "box_accuracy",
    "lung_coverage",
    "median_box_area",
    "random_in_lung_pointing",
    "top_box_pointing",
]


def _box_mask(boxes: np.ndarray, shape: tuple[int, int], scale: tuple[float, float]) -> np.ndarray:
    """bool mask (shape) of the union of xywh boxes given in coordinates ``scale`` times larger."""
    sy, sx = scale
    out = np.zeros(shape, dtype=bool)
    for x, y, w, h in boxes:
        r0, r1 = math.floor(y / sy), math.ceil((y + h) / sy)
        c0, c1 = math.floor(x / sx), math.ceil((x + w) / sx)
        out[max(r0, 0) : max(r1, 0), max(c0, 0) : max(c1, 0)] = True
    return out


def random_in_lung_pointing(
    masks: Sequence[np.ndarray | None],
    gts: Sequence[Any],
    image_shapes: Sequence[tuple[int, int]],
) -> float | None:
    """Expected pointing-game hit rate of a uniformly random point of each lung mask.

    Args:
        masks: Per image a bool lung mask (any resolution); None: the whole image.
        gts: Per image truth ``(Ng, 4)`` xywh boxes in original pixels.
        image_shapes: Per image ``(H0, W0)`` of the truth coordinates.

    Returns:
        The mean over images with truth of (lung pixels inside a truth box) / (lung pixels);
        None when no image has truth.
    """
    rates = []
    for mask, g, shape in zip(masks, gts, image_shapes, strict=True):
        boxes = as_boxes(g)
        if boxes.shape[0] == 0:
            continue
        m = np.ones((64, 64), bool) if mask is None or not mask.any() else np.asarray(mask, bool)
        scale = (shape[0] / m.shape[0], shape[1] / m.shape[1])
        inside = _box_mask(boxes, m.shape, scale)
        rates.append(float((inside & m).sum()) / float(m.sum()))
    return float(np.mean(rates)) if rates else None


def box_accuracy(
    pred_boxes: Sequence[Any], gts: Sequence[Any], iou_threshold: float
) -> float | None:
    """Share of images with truth where some predicted box has IoU >= ``iou_threshold`` with
    some truth box (images without predicted boxes count as misses); None without truth."""
    hits = []
    for p, g in zip(pred_boxes, gts, strict=True):
        truth = as_boxes(g)
        if truth.shape[0] == 0:
            continue
        pred = as_boxes(p)
        hits.append(bool(pred.shape[0] and (iou_matrix(pred, truth) >= iou_threshold).any()))
    return float(np.mean(hits)) if hits else None


def top_box_pointing(boxes: Sequence[Any], gts: Sequence[Any]) -> float | None:
    """Share of images with truth where the centre of the highest-scoring box lies in a
    truth box (an image without a box is a miss).

    Args:
        boxes: Per image a :class:`~pneumoloc.localise.boxes.ScoredBoxes` (xywh, scores).
        gts: Per image truth ``(Ng, 4)`` xywh boxes, same pixels.

    Returns:
        The hit rate; None when no image has truth.
    """
    hits = []
    for scored, g in zip(boxes, gts, strict=True):
        truth = as_boxes(g)
        if not truth.shape[0]:
            continue
        pred = as_boxes(scored.boxes)
        if not pred.shape[0]:
            hits.append(False)
            continue
        x, y, w, h = pred[int(np.argmax(np.asarray(scored.scores, np.float64)))]
        hits.append(point_in_boxes(x + w / 2, y + h / 2, truth))
    return float(np.mean(hits)) if hits else None


def lung_coverage(
    pred_boxes: Sequence[Any],
    masks: Sequence[np.ndarray | None],
    image_shapes: Sequence[tuple[int, int]],
) -> float | None:
    """Mean over images with boxes and a lung mask of the share of the mask the boxes cover."""
    shares = []
    for p, mask, shape in zip(pred_boxes, masks, image_shapes, strict=True):
        boxes = as_boxes(p)
        if boxes.shape[0] == 0 or mask is None or not mask.any():
            continue
        scale = (shape[0] / mask.shape[0], shape[1] / mask.shape[1])
        covered = _box_mask(boxes, mask.shape, scale) & mask
        shares.append(float(covered.sum()) / float(mask.sum()))
    return float(np.mean(shares)) if shares else None


def median_box_area(
    pred_boxes: Sequence[Any], image_shapes: Sequence[tuple[int, int]]
) -> float | None:
    """Median area of all predicted boxes as a fraction of their image; None without boxes."""
    areas = [
        float(b[2] * b[3]) / float(shape[0] * shape[1])
        for p, shape in zip(pred_boxes, image_shapes, strict=True)
        for b in as_boxes(p)
    ]
    return float(np.median(areas)) if areas else None


def _summary(
    boxes: Sequence[Any],
    gated: Sequence[Any],
    gts: Sequence[Any],
    shapes: Sequence[tuple[int, int]],
    masks: Sequence[np.ndarray | None],
) -> dict[str, Any]:
    """The box figures of one localiser: ``boxes`` gated by the classifier, ``gated`` by the
    true labels (boxes on every truly positive image, none elsewhere)."""
    from pneumoloc.metrics.localisation import _nan_to_none, notebook_mean_iou, rsna_map

    def score(b: Sequence[Any]) -> float | None:
        pairs = list(zip([x.boxes for x in b], [x.scores for x in b], strict=True))
        return _nan_to_none(rsna_map(pairs, gts))

    gated_boxes = [x.boxes for x in gated]
    return {
        "rsna_map": score(boxes),
        "rsna_map_label_gated": score(gated),
        "box_acc_iou30": box_accuracy(gated_boxes, gts, 0.3),
        "box_acc_iou50": box_accuracy(gated_boxes, gts, 0.5),
        "notebook_mean_iou_label_gated": _nan_to_none(notebook_mean_iou(gated_boxes, gts)),
        "median_box_area": median_box_area(gated_boxes, shapes),
        "top_box_pointing_label_gated": top_box_pointing(gated, gts),
        "lung_coverage": lung_coverage(gated_boxes, masks, shapes),
    }


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b == 0 else float(a) / float(b)


def anatomy_comparison(
    *,
    heatmaps: Sequence[np.ndarray | None],
    probs: np.ndarray,
    labels: np.ndarray,
    model_boxes: Sequence[Any],
    gts: Sequence[Any],
    shapes: Sequence[tuple[int, int]],
    masks: Sequence[np.ndarray | None],
    box_threshold: float,
    box_config: Any,
    pointing: float | None,
    label_gated_boxes: Sequence[Any] | None = None,
) -> dict[str, Any]:
    """The model's localisation beside the anatomy baselines, measured on the same images.

    Args:
        heatmaps: Per image the final heatmap (needed where ``labels == 1``; else may be None).
        probs: Per image the model's probability.
        labels: Per image the true label (gates the label-gated variants).
        model_boxes: Per image the model's :class:`~pneumoloc.localise.boxes.ScoredBoxes`.
        gts: Per image truth ``(Ng, 4)`` xywh boxes in original pixels.
        shapes: Per image ``(H0, W0)``.
        masks: Per image the label-free lung mask at the heatmap's size (None: not found).
        box_threshold: The probability that gates the model's boxes (and the baselines').
        box_config: The model's :class:`~pneumoloc.localise.boxes.BoxConfig`.
        pointing: The model's pointing game on the same images.
        label_gated_boxes: The model's boxes on every truly positive image (none elsewhere)
            when they do not come from the box rule (a self-trained detector); None: drawn
            here from the heatmaps with ``box_config``.

    Returns:
        ``{"model": {...}, "lung_fields": {...}, "lower_lung_fields": {...}, "ratios": {...}}``;
        each localiser has ``rsna_map`` (gated by the model's probability, as deployed),
        ``rsna_map_label_gated``, ``box_acc_iou30/50``, ``notebook_mean_iou_label_gated``,
        ``median_box_area``, ``lung_coverage``, ``top_box_pointing_label_gated`` (the centre
        of the best label-gated box in a truth box) and ``pointing_game`` (the heatmap's
        peak; for the baselines: a random point of the lung mask, its exact expectation).
    """
    from pneumoloc.localise.anatomy import anatomy_boxes
    from pneumoloc.localise.boxes import ScoredBoxes, cam_to_boxes

    positive = np.asarray(labels) == 1
    gated_model = (
        list(label_gated_boxes)
        if label_gated_boxes is not None
        else [
            cam_to_boxes(
                np.asarray(heatmaps[i], np.float32),
                float(probs[i]),
                threshold=0.0,
                config=box_config,
                out_shape=(int(shapes[i][0]), int(shapes[i][1])),
            )
            if is_pos and heatmaps[i] is not None
            else ScoredBoxes()
            for i, is_pos in enumerate(positive)
        ]
    )
    out: dict[str, Any] = {"model": _summary(model_boxes, gated_model, gts, shapes, masks)}
    out["model"]["pointing_game"] = pointing
    random_point = random_in_lung_pointing(masks, gts, shapes)
    mask_list = list(masks)
    shape_list = [(int(s[0]), int(s[1])) for s in shapes]
    for rule in ("lung_fields", "lower_lung_fields"):
        deployed = anatomy_boxes(
            mask_list, np.asarray(probs), threshold=box_threshold, out_shapes=shape_list, rule=rule
        )
        gated = anatomy_boxes(
            mask_list, positive.astype(float), threshold=0.5, out_shapes=shape_list, rule=rule
        )
        out[rule] = _summary(deployed, gated, gts, shapes, masks)
        out[rule]["pointing_game"] = random_point
    model, lungs = out["model"], out["lung_fields"]
    out["ratios"] = {
        "rsna_map_vs_lung_fields": _ratio(model["rsna_map"], lungs["rsna_map"]),
        "rsna_map_label_gated_vs_lung_fields": _ratio(
            model["rsna_map_label_gated"], lungs["rsna_map_label_gated"]
        ),
        "rsna_map_label_gated_vs_lower_lung_fields": _ratio(
            model["rsna_map_label_gated"], out["lower_lung_fields"]["rsna_map_label_gated"]
        ),
        "pointing_minus_random_in_lung": None
        if pointing is None or random_point is None
        else float(pointing) - float(random_point),
    }
    out["note"] = (
        "lung_fields / lower_lung_fields use no heatmap: one box per half of the label-free "
        "lung mask (or its lower two thirds), gated like the model. *_label_gated: boxes on "
        "every truly positive image and none elsewhere (localisation judged apart from "
        "classification). Baselines' pointing_game: a uniformly random point of the lung mask "
        "(exact expectation). top_box_pointing_label_gated: the centre of the highest-scoring "
        "label-gated box inside a truth box (a detector's point; not the heatmap's peak)."
    )
    return out
