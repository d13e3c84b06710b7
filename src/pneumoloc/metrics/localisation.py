"""Localisation metrics: the RSNA Kaggle score, the notebook's IoU, pointing game, MaxBoxAcc.

Boxes are ``(x, y, width, height)`` in pixels, as in the RSNA labels file, held in float
arrays of shape ``(N, 4)``; an image without boxes has shape ``(0, 4)``. Coordinates are
continuous: a box covering pixel columns ``c0 .. c1`` inclusive is ``x=c0, width=c1-c0+1``.

Why hand-written: no maintained library implements the RSNA Pneumonia Detection Challenge
metric (a per-image ``TP / (TP + FP + FN)`` averaged over IoU thresholds, *not* COCO-style
average precision over a ranked list, so ``torchmetrics``/``pycocotools`` mAP give different
numbers), nor the original notebook's metric. MaxBoxAcc follows ``clovaai/wsolevaluation``,
which is a research script tied to OpenCV and its own data layout rather than a library; it is
re-implemented here with ``scipy.ndimage`` so the sweep runs on NumPy heatmaps directly.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from scipy import ndimage

from pneumoloc.localise.geometry import as_boxes, iou_matrix, min_max

__all__ = [
    "RSNA_IOU_THRESHOLDS",
    "as_boxes",
    "component_boxes",
    "iou_matrix",
    "localisation_metrics",
    "max_box_acc",
    "notebook_mean_iou",
    "pointing_game",
    "rsna_image_score",
    "rsna_map",
]

#: The challenge's IoU thresholds 0.40, 0.45, ..., 0.75 (8 values). Rounded so that each is the
#: exact decimal it names (``np.arange`` alone yields e.g. 0.45000000000000007), which matters
#: for the strict ``IoU > t`` comparison.
RSNA_IOU_THRESHOLDS: np.ndarray = np.round(np.arange(0.40, 0.751, 0.05), 2)

_EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)

#: ``box_fn(normalised_heatmap, cam_thresholds) -> one (N_k, 4) box array per threshold``.
BoxFn = Callable[[np.ndarray, np.ndarray], list[np.ndarray]]


def rsna_image_score(
    pred_boxes: Any,
    pred_scores: Any,
    gt_boxes: Any,
    thresholds: Sequence[float] | np.ndarray = RSNA_IOU_THRESHOLDS,
) -> float | None:
    """The RSNA Pneumonia Detection Challenge score of one image.

    For each IoU threshold ``t``, predictions are taken in descending confidence order (ties
    keep input order) and each is matched to the still-unmatched truth box with the highest
    IoU, provided that IoU is strictly greater than ``t`` (the challenge's wording: a hit is
    an IoU "greater than" the threshold). Matched predictions are TP, unmatched predictions
    FP, unmatched truths FN, and ``precision(t) = TP / (TP + FP + FN)``. The image score is
    the mean of ``precision(t)`` over thresholds.

    Note: the widely copied Kaggle kernel ``map_iou`` matches each prediction to the *first*
    unmatched truth with ``IoU >= t`` instead; the two agree except with overlapping truth
    boxes or an IoU exactly on a threshold.

    Args:
        pred_boxes: ``(Np, 4)`` predicted xywh boxes.
        pred_scores: ``(Np,)`` confidences (only their order matters).
        gt_boxes: ``(Ng, 4)`` truth xywh boxes.
        thresholds: IoU thresholds; the challenge's eight by default.

    Returns:
        The score in ``[0, 1]``; 0 when exactly one of truth and prediction is empty;
        ``None`` when both are empty (the challenge does not count such images).

    Raises:
        ValueError: When boxes and scores disagree in length, or boxes are malformed.
    """
    pred = as_boxes(pred_boxes, name="pred_boxes")
    gt = as_boxes(gt_boxes, name="gt_boxes")
    scores = np.asarray(pred_scores, dtype=np.float64).reshape(-1)
    if scores.shape[0] != pred.shape[0]:
        raise ValueError(f"{pred.shape[0]} predicted boxes but {scores.shape[0]} scores")
    n_pred, n_gt = pred.shape[0], gt.shape[0]
    if n_pred == 0 and n_gt == 0:
        return None
    if n_pred == 0 or n_gt == 0:
        return 0.0
    order = np.argsort(-scores, kind="stable")
    ious = iou_matrix(pred[order], gt)
    precisions = []
    for t in np.asarray(thresholds, dtype=np.float64):
        matched = np.zeros(n_gt, dtype=bool)
        tp = 0
        for row in ious:
            candidates = np.where(matched, -1.0, row)
            j = int(np.argmax(candidates))
            if candidates[j] > t:
                matched[j] = True
                tp += 1
        fp = n_pred - tp
        fn = n_gt - tp
        precisions.append(tp / (tp + fp + fn))
    return float(np.mean(precisions))


def rsna_map(
    preds: Sequence[tuple[Any, Any]],
    gts: Sequence[Any],
    thresholds: Sequence[float] | np.ndarray = RSNA_IOU_THRESHOLDS,
) -> float:
    """The RSNA challenge score of a data set: the mean of the scorable images' scores.

    Args:
        preds: Per image, ``(boxes (Np, 4), scores (Np,))``.
        gts: Per image, the truth boxes ``(Ng, 4)``.
        thresholds: IoU thresholds; the challenge's eight by default.

    Returns:
        The mean of :func:`rsna_image_score` over images, skipping those without truth and
        without prediction; NaN when no image is scorable.

    Raises:
        ValueError: When ``preds`` and ``gts`` differ in length.
    """
    _check_same_length(preds, gts, "preds", "gts")
    scores = [rsna_image_score(b, s, g, thresholds) for (b, s), g in zip(preds, gts, strict=True)]
    kept = [s for s in scores if s is not None]
    return float(np.mean(kept)) if kept else math.nan


def notebook_mean_iou(preds_boxes: Sequence[Any], gts: Sequence[Any]) -> float:
    """The original notebook's localisation metric.

    Per image: the best IoU between any predicted and any truth box, or 0 when either list
    is empty. The result is the mean over **all** images, so an image without truth always
    contributes 0 -- even when, correctly, no box was predicted -- and the metric can never
    exceed the fraction of images with truth. Kept for comparison with the notebook; prefer
    :func:`rsna_map`.

    Args:
        preds_boxes: Per image, predicted ``(Np, 4)`` boxes.
        gts: Per image, truth ``(Ng, 4)`` boxes.

    Returns:
        The mean, or NaN for an empty input.
    """
    _check_same_length(preds_boxes, gts, "preds_boxes", "gts")
    if len(gts) == 0:
        return math.nan
    best = []
    for p, g in zip(preds_boxes, gts, strict=True):
        ious = iou_matrix(p, g)
        best.append(float(ious.max()) if ious.size else 0.0)
    return float(np.mean(best))


def pointing_game(
    heatmaps: Sequence[np.ndarray],
    gts: Sequence[Any],
    tolerance_px: int = 0,
    *,
    image_shapes: Sequence[tuple[int, int]] | None = None,
) -> float:
    """Pointing game hit rate (Zhang et al., 2016) over the images that have truth boxes.

    An image is a hit when the centre of the heatmap's maximal pixel (the first one in
    row-major order on ties) lies inside some truth box grown by ``tolerance_px`` on each side.

    Args:
        heatmaps: Per image a 2-D heatmap.
        gts: Per image the truth ``(Ng, 4)`` boxes.
        tolerance_px: Margin added around each truth box, in truth-box pixels.
        image_shapes: Per image ``(H0, W0)`` of the truth boxes' coordinate system, when it
            differs from the heatmap's own (e.g. boxes at 1024 px, heatmap at 256 px).

    Returns:
        The fraction of hits; NaN when no image has truth.
    """
    _check_same_length(heatmaps, gts, "heatmaps", "gts")
    shapes = _shapes_or_none(image_shapes, len(gts))
    hits = []
    for i, (heatmap, g) in enumerate(zip(heatmaps, gts, strict=True)):
        boxes = as_boxes(g, name=f"gts[{i}]")
        if boxes.shape[0] == 0:
            continue
        hm = _check_heatmap(heatmap, i)
        r, c = np.unravel_index(int(np.argmax(hm)), hm.shape)
        sy, sx = _scale(hm.shape, shapes[i] if shapes else None)
        hits.append(point_in_boxes((c + 0.5) * sx, (r + 0.5) * sy, boxes, float(tolerance_px)))
    return float(np.mean(hits)) if hits else math.nan


def point_in_boxes(x: float, y: float, boxes: np.ndarray, tolerance: float = 0.0) -> bool:
    """Whether the point ``(x, y)`` lies in one of the ``(N, 4)`` xywh ``boxes``, each grown
    by ``tolerance`` on every side (edges count as inside)."""
    return bool(
        (
            (x >= boxes[:, 0] - tolerance)
            & (x <= boxes[:, 0] + boxes[:, 2] + tolerance)
            & (y >= boxes[:, 1] - tolerance)
            & (y <= boxes[:, 1] + boxes[:, 3] + tolerance)
        ).any()
    )


def component_boxes(
    heatmap: np.ndarray, cam_thresholds: np.ndarray, *, largest_only: bool = True
) -> list[np.ndarray]:
    """Bounding boxes of the connected regions of ``heatmap > t`` for each threshold ``t``.

    8-connectivity, like OpenCV's outer contours used by wsolevaluation. The largest region is
    the one with the most pixels (wsolevaluation takes the largest contour polygon area; the
    two only differ for regions with holes or thin spurs).

    Args:
        heatmap: A 2-D map, normally min-max normalised to ``[0, 1]``.
        cam_thresholds: The thresholds, any order.
        largest_only: Keep only the largest region's box (wsolevaluation's default);
            otherwise every region's box.

    Returns:
        Per threshold, an ``(N, 4)`` xywh array in heatmap pixels (``(0, 4)`` when empty).
    """
    # Speed: crop each thresholded mask to the rows/columns whose maximum exceeds the
    # threshold before labelling; computed for all thresholds at once from row/column maxima.
    row_max = heatmap.max(axis=1)
    col_max = heatmap.max(axis=0)
    # One label buffer reused for every threshold: allocating a fresh output per call doubles
    # ndimage.label's cost; intp avoids a cast in bincount.
    buffer = np.empty(heatmap.size, dtype=np.intp)
    out: list[np.ndarray] = []
    for t in np.asarray(cam_thresholds, dtype=np.float64):
        rows = np.flatnonzero(row_max > t)
        if rows.size == 0:
            out.append(np.zeros((0, 4)))
            continue
        cols = np.flatnonzero(col_max > t)
        r0, c0 = int(rows[0]), int(cols[0])
        crop = heatmap[r0 : int(rows[-1]) + 1, c0 : int(cols[-1]) + 1] > t
        labels = buffer[: crop.size].reshape(crop.shape)
        n = ndimage.label(crop, structure=_EIGHT_CONNECTED, output=labels)
        if n == 1:  # the crop is the single region's bounding box
            slices = [(slice(0, crop.shape[0]), slice(0, crop.shape[1]))]
        elif largest_only:
            biggest = labels == int(np.argmax(np.bincount(labels.ravel())[1:])) + 1
            r, c = np.flatnonzero(biggest.any(axis=1)), np.flatnonzero(biggest.any(axis=0))
            slices = [(slice(r[0], r[-1] + 1), slice(c[0], c[-1] + 1))]
        else:
            slices = ndimage.find_objects(labels)
        boxes = [
            (c0 + s[1].start, r0 + s[0].start, s[1].stop - s[1].start, s[0].stop - s[0].start)
            for s in slices
            if s is not None
        ]
        out.append(np.asarray(boxes, dtype=np.float64).reshape(-1, 4))
    return out


def max_box_acc(
    heatmaps: Sequence[np.ndarray],
    gts: Sequence[Any],
    iou_thresholds: Sequence[float] = (0.3, 0.5),
    cam_thresholds: Sequence[float] | np.ndarray = np.linspace(0, 1, 101)[1:-1],
    box_fn: BoxFn | None = None,
    *,
    all_components: bool = False,
    image_shapes: Sequence[tuple[int, int]] | None = None,
) -> dict[str, Any]:
    """MaxBoxAcc of Choe et al. (CVPR 2020, "Evaluating weakly supervised object localization
    methods right"), as in ``clovaai/wsolevaluation``.

    Each heatmap is min-max normalised (a constant map becomes all zeros). For each CAM
    threshold ``t`` the pixels ``> t`` form regions; by default the largest region's bounding
    box is the image's box (wsolevaluation v1), with ``all_components`` every region's box is
    tried and the image counts as correct when any of them matches. At IoU threshold ``d`` an
    image is correct when a box has ``IoU >= d`` with some truth box. Accuracy is over the
    images that have truth; MaxBoxAcc at ``d`` is the best accuracy over CAM thresholds.

    Args:
        heatmaps: Per image a 2-D heatmap.
        gts: Per image truth ``(Ng, 4)`` boxes; images without truth are skipped.
        iou_thresholds: The IoU thresholds ``d``.
        cam_thresholds: The CAM thresholds swept (default 0.01 .. 0.99).
        box_fn: Optional replacement for the box extraction:
            ``box_fn(normalised_heatmap, cam_thresholds)`` returns one ``(N, 4)`` xywh array
            (heatmap pixels) per CAM threshold.
        all_components: Use every region's box, not only the largest (ignored with ``box_fn``).
        image_shapes: Per image ``(H0, W0)`` of the truth boxes' coordinate system when it
            differs from the heatmap's; boxes are scaled per axis before the IoU.

    Returns:
        JSON-serialisable dict: ``"iou_0.3"`` (best accuracy), ``"iou_0.3_cam_threshold"``
        (its CAM threshold, the lowest on ties), the same for every IoU threshold, ``"mean"``
        (mean of the best accuracies), ``"n_images"`` (images with truth) and ``"curve"``:
        ``{"cam_thresholds": [...], "iou_0.3": [accuracy per CAM threshold], ...}``. Values
        are ``None`` when no image has truth.
    """
    _check_same_length(heatmaps, gts, "heatmaps", "gts")
    shapes = _shapes_or_none(image_shapes, len(gts))
    cams = np.asarray(cam_thresholds, dtype=np.float64).reshape(-1)
    d_thr = [float(d) for d in iou_thresholds]
    correct = np.zeros((len(d_thr), cams.size), dtype=np.int64)
    n_images = 0
    for i, (heatmap, g) in enumerate(zip(heatmaps, gts, strict=True)):
        truth = as_boxes(g, name=f"gts[{i}]")
        if truth.shape[0] == 0:
            continue
        n_images += 1
        hm = min_max(_check_heatmap(heatmap, i))
        if box_fn is None:
            per_thr = component_boxes(hm, cams, largest_only=not all_components)
        else:
            per_thr = [as_boxes(b, name="box_fn output") for b in box_fn(hm, cams)]
            if len(per_thr) != cams.size:
                raise ValueError(
                    f"box_fn returned {len(per_thr)} box sets for {cams.size} CAM thresholds"
                )
        counts = np.array([b.shape[0] for b in per_thr])
        if counts.sum() == 0:
            continue
        sy, sx = _scale(hm.shape, shapes[i] if shapes else None)
        boxes = np.concatenate(per_thr) * np.array([sx, sy, sx, sy])
        best_per_box = iou_matrix(boxes, truth).max(axis=1)
        owner = np.repeat(np.arange(cams.size), counts)
        best = np.zeros(cams.size)
        np.maximum.at(best, owner, best_per_box)
        for k, d in enumerate(d_thr):
            correct[k] += best >= d
    result: dict[str, Any] = {"n_images": n_images}
    curve: dict[str, Any] = {"cam_thresholds": [float(c) for c in cams]}
    bests = []
    for k, d in enumerate(d_thr):
        key = f"iou_{d:g}"
        if n_images == 0 or cams.size == 0:
            result[key] = None
            result[f"{key}_cam_threshold"] = None
            curve[key] = []
            continue
        acc = correct[k] / n_images
        j = int(np.argmax(acc))
        result[key] = float(acc[j])
        result[f"{key}_cam_threshold"] = float(cams[j])
        curve[key] = [float(a) for a in acc]
        bests.append(float(acc[j]))
    result["mean"] = float(np.mean(bests)) if bests else None
    result["curve"] = curve
    return result


def localisation_metrics(
    pred_boxes: Sequence[Any],
    pred_scores: Sequence[Any],
    heatmaps: Sequence[np.ndarray] | None,
    gts: Sequence[Any],
    *,
    image_shapes: Sequence[tuple[int, int]] | None = None,
    pointing_tolerance_px: int = 0,
) -> dict[str, Any]:
    """Every localisation metric in one JSON-serialisable dict.

    Args:
        pred_boxes: Per image, predicted ``(Np, 4)`` boxes in the truth's coordinates.
        pred_scores: Per image, the ``(Np,)`` confidences.
        heatmaps: Per image the heatmap, or ``None`` to skip the heatmap-based metrics.
        gts: Per image, truth ``(Ng, 4)`` boxes.
        image_shapes: Per image ``(H0, W0)`` of the truth coordinates, when the heatmaps are at
            another resolution.
        pointing_tolerance_px: Tolerance of the pointing game, in truth pixels.

    Returns:
        ``rsna_map``, ``notebook_mean_iou``, ``pointing_game``, ``max_box_acc`` (the
        :func:`max_box_acc` summary without its curve), ``n_images``, ``n_with_truth``;
        undefined values are ``None``.
    """
    _check_same_length(pred_boxes, gts, "pred_boxes", "gts")
    _check_same_length(pred_scores, gts, "pred_scores", "gts")
    n_with_truth = sum(as_boxes(g).shape[0] > 0 for g in gts)
    out: dict[str, Any] = {
        "n_images": len(gts),
        "n_with_truth": int(n_with_truth),
        "rsna_map": _nan_to_none(rsna_map(list(zip(pred_boxes, pred_scores, strict=True)), gts)),
        "notebook_mean_iou": _nan_to_none(notebook_mean_iou(pred_boxes, gts)),
        "pointing_game": None,
        "max_box_acc": None,
    }
    if heatmaps is not None:
        out["pointing_game"] = _nan_to_none(
            pointing_game(heatmaps, gts, pointing_tolerance_px, image_shapes=image_shapes)
        )
        summary = max_box_acc(heatmaps, gts, image_shapes=image_shapes)
        summary.pop("curve")
        out["max_box_acc"] = summary
    return out


def _check_same_length(a: Sequence[Any], b: Sequence[Any], name_a: str, name_b: str) -> None:
    if len(a) != len(b):
        raise ValueError(f"{name_a} has {len(a)} images but {name_b} has {len(b)}")


def _check_heatmap(heatmap: np.ndarray, index: int) -> np.ndarray:
    hm = np.asarray(heatmap, dtype=np.float64)
    if hm.ndim != 2 or hm.size == 0:
        raise ValueError(f"heatmaps[{index}] must be a non-empty 2-D array, got shape {hm.shape}")
    if not np.all(np.isfinite(hm)):
        raise ValueError(f"heatmaps[{index}] contains NaN or infinite values")
    return hm


def _shapes_or_none(
    image_shapes: Sequence[tuple[int, int]] | None, n: int
) -> Sequence[tuple[int, int]] | None:
    if image_shapes is not None and len(image_shapes) != n:
        raise ValueError(f"image_shapes has {len(image_shapes)} entries for {n} images")
    return image_shapes


def _scale(hm_shape: tuple[int, ...], image_shape: tuple[int, int] | None) -> tuple[float, float]:
    """Per-axis factors ``(sy, sx)`` from heatmap pixels to truth-box pixels."""
    if image_shape is None:
        return 1.0, 1.0
    return image_shape[0] / hm_shape[0], image_shape[1] / hm_shape[1]


def _nan_to_none(x: float) -> float | None:
    return None if math.isnan(x) else float(x)
