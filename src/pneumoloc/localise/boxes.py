"""Class activation map -> scored bounding boxes (``cam_to_boxes``).

Pipeline for one image:

1. Gate: no box at all when the classifier's probability is below its threshold (a min-max
   normalised CAM always has a hot spot, even on a normal radiograph).
2. Min-max normalise the heatmap to ``[0, 1]`` (a constant map gives no box); zero it outside
   the lungs when a lung mask is given.
3. Binarise with a rule from :data:`BOX_RULES` (``"peak"``, ``"notebook"``, ``"otsu"``).
4. Binary closing with a square element (bridges small gaps), optional split at the vertical
   midline (pneumonia is reported per lung), 8-connected components, drop small ones.
5. Score each component ``probability * mean(normalised heatmap inside it)``: the image-level
   confidence times how strongly the CAM supports this region relative to the image's peak,
   so weak secondary regions rank below the main one and every score stays in ``[0, 1]``.
6. Bounding box of each component, optional padding, scaling to the original image's pixels,
   greedy non-maximum suppression, keep the ``max_boxes`` best.

The ``"multi"`` rule replaces steps 3 to 5: components at several thresholds, one box per mode
of the map, each mode's threshold chosen from the map (:mod:`pneumoloc.localise.multithreshold`).

Boxes are ``(x, y, width, height)`` in pixels like the RSNA labels; a component covering pixel
columns ``c0 .. c1`` gives ``x = c0, width = c1 - c0 + 1`` in heatmap pixels.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

from pneumoloc.errors import ConfigError
from pneumoloc.localise.components import close_mask, label_components
from pneumoloc.localise.geometry import min_max, nms, otsu_threshold, xyxy_to_xywh
from pneumoloc.localise.multithreshold import multi_threshold_boxes

__all__ = [
    "BOX_RULES",
    "BoxConfig",
    "ScoredBoxes",
    "cam_to_boxes",
    "cam_to_boxes_batch",
    "detector_boxes",
    "nms",
]


@dataclass(frozen=True)
class BoxConfig:
    """How a heatmap becomes boxes. Validated on creation (:class:`ConfigError`).

    Attributes:
        rule: Key of :data:`BOX_RULES`: ``"notebook"``, ``"peak"``, ``"otsu"`` or ``"multi"``.
        peak_fraction: ``"peak"`` keeps pixels ``>= peak_fraction * max`` of the normalised map.
        notebook_std: ``"notebook"`` keeps pixels ``> mean + notebook_std * std``.
        closing: Side of the square structuring element of the binary closing; 0 disables it.
        min_area_fraction: Components with fewer pixels than this fraction of the heatmap's
            are dropped.
        max_boxes: Most boxes returned per image.
        nms_iou: Non-maximum suppression drops a box whose IoU with a better one exceeds this.
        pad_fraction: Grows each box (shrinks if negative) by this fraction of its width and
            height, keeping its centre.
        smooth_fraction: Gaussian smoothing of the heatmap before thresholding, sigma as a
            fraction of its side (0 = none); evens out the grid pattern of dilated backbones.
        split_midline: Cut components at the vertical midline of the image into left and right
            parts.
        multi_fractions: ``"multi"`` thresholds the map at each of these fractions of its
            maximum (sorted on creation; a list, as JSON gives it back, becomes a tuple).
    """

    rule: str = "peak"
    peak_fraction: float = 0.5
    notebook_std: float = 0.5
    closing: int = 3
    min_area_fraction: float = 0.005
    max_boxes: int = 3
    nms_iou: float = 0.3
    pad_fraction: float = 0.0
    split_midline: bool = False
    smooth_fraction: float = 0.0
    multi_fractions: tuple[float, ...] = (0.3, 0.5, 0.7)

    def __post_init__(self) -> None:
        try:
            fractions = tuple(sorted(float(f) for f in self.multi_fractions))
        except (TypeError, ValueError):
            raise ConfigError(
                f"BoxConfig: multi_fractions must be numbers, got {self.multi_fractions!r}"
            ) from None
        object.__setattr__(self, "multi_fractions", fractions)
        if self.rule not in BOX_RULES:
            raise ConfigError(
                f"box rule {self.rule!r} is unknown; valid rules: {', '.join(sorted(BOX_RULES))}"
            )
        checks = [
            (0.0 < self.peak_fraction <= 1.0, "peak_fraction must be in (0, 1]"),
            (math.isfinite(self.notebook_std), "notebook_std must be finite"),
            (self.closing >= 0, "closing must be >= 0"),
            (0.0 <= self.min_area_fraction < 1.0, "min_area_fraction must be in [0, 1)"),
            (self.max_boxes >= 1, "max_boxes must be >= 1"),
            (0.0 <= self.nms_iou <= 1.0, "nms_iou must be in [0, 1]"),
            (self.pad_fraction > -1.0, "pad_fraction must be > -1"),
            (0.0 <= self.smooth_fraction < 0.5, "smooth_fraction must be in [0, 0.5)"),
            (
                len(fractions) > 0
                and len(set(fractions)) == len(fractions)
                and all(0.0 < f <= 1.0 for f in fractions),
                "multi_fractions must be distinct values in (0, 1]",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(f"BoxConfig: {message}, got {self!r}")


@dataclass(frozen=True, eq=False)
class ScoredBoxes:
    """Boxes of one image with their confidences, best first.

    Attributes:
        boxes: ``(N, 4)`` xywh boxes in output (original image) pixels.
        scores: ``(N,)`` confidences in ``[0, 1]``.
    """

    boxes: np.ndarray = field(default_factory=lambda: np.zeros((0, 4)))
    scores: np.ndarray = field(default_factory=lambda: np.zeros(0))

    def __len__(self) -> int:
        return int(self.boxes.shape[0])


def _rule_peak(heatmap: np.ndarray, config: BoxConfig) -> np.ndarray:
    return heatmap >= config.peak_fraction * heatmap.max()


def _rule_notebook(heatmap: np.ndarray, config: BoxConfig) -> np.ndarray:
    # The original notebook's rule; mean and std over the whole (lung-masked) map.
    return heatmap > heatmap.mean() + config.notebook_std * heatmap.std()


def _rule_otsu(heatmap: np.ndarray, config: BoxConfig) -> np.ndarray:
    # Pixels zeroed by the lung mask are left out of the histogram so the large zero
    # background does not drag the threshold down.
    values = heatmap[heatmap > 0]
    if values.size < 2 or values.min() == values.max():
        return heatmap >= heatmap.max()
    return heatmap > otsu_threshold(values, bins=256)


def _rule_multi(heatmap: np.ndarray, config: BoxConfig) -> np.ndarray:
    # The mask at the lowest threshold; cam_to_boxes draws "multi" boxes from every threshold.
    return heatmap >= config.multi_fractions[0] * heatmap.max()


#: Heatmap (normalised, lung-masked) -> binary mask. Keys are the CLI's choices. ``"multi"``
#: gives its lowest-threshold mask here; :func:`cam_to_boxes` uses all its thresholds.
BOX_RULES: dict[str, Callable[[np.ndarray, BoxConfig], np.ndarray]] = {
    "multi": _rule_multi,
    "notebook": _rule_notebook,
    "otsu": _rule_otsu,
    "peak": _rule_peak,
}


def _check_heatmap(heatmap: np.ndarray) -> np.ndarray:
    hm = np.asarray(heatmap)
    if hm.ndim != 2 or hm.size == 0:
        raise ValueError(f"heatmap must be a non-empty 2-D (H, W) array, got shape {hm.shape}")
    if not np.issubdtype(hm.dtype, np.number) or np.iscomplexobj(hm):
        raise ValueError(f"heatmap must be real-valued, got dtype {hm.dtype}")
    hm = hm.astype(np.float64)
    if np.isnan(hm).any():
        raise ValueError("heatmap contains NaN values")
    if np.isinf(hm).any():
        raise ValueError("heatmap contains infinite values")
    return hm


def _resize_mask(mask: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize of a 2-D boolean mask (pixel centres mapped)."""
    m = np.asarray(mask)
    if m.ndim != 2 or m.size == 0:
        raise ValueError(f"lung_mask must be a non-empty 2-D array, got shape {m.shape}")
    m = m.astype(bool)
    if m.shape == shape:
        return m
    rows = np.minimum(
        ((np.arange(shape[0]) + 0.5) * m.shape[0] / shape[0]).astype(int), m.shape[0] - 1
    )
    cols = np.minimum(
        ((np.arange(shape[1]) + 0.5) * m.shape[1] / shape[1]).astype(int), m.shape[1] - 1
    )
    return m[np.ix_(rows, cols)]


def cam_to_boxes(
    heatmap: np.ndarray,
    probability: float,
    *,
    threshold: float,
    config: BoxConfig = BoxConfig(),
    lung_mask: np.ndarray | None = None,
    out_shape: tuple[int, int] | None = None,
) -> ScoredBoxes:
    """Boxes around the hot regions of a class activation map.

    Args:
        heatmap: ``(H, W)`` CAM, any real scale.
        probability: The classifier's pneumonia probability for the image.
        threshold: The classifier's operating threshold; below it, no boxes.
        config: Binarisation and post-processing settings.
        lung_mask: Boolean lung mask, same shape as the heatmap or any shape (resized by
            nearest neighbour); the heatmap is zeroed outside it.
        out_shape: ``(H0, W0)`` of the original image; boxes are scaled per axis from heatmap
            pixels to it and clipped inside it. Default: heatmap pixels.

    Returns:
        The boxes (original pixels) and scores ``probability * mean CAM inside the component``
        (``"multi"``: ``probability * mean * coverage``), best first, at most
        ``config.max_boxes``.

    Raises:
        ValueError: The heatmap is not 2-D or has NaN/inf; the probability is not in [0, 1];
            ``out_shape`` is not two positive sizes.
    """
    hm = _check_heatmap(heatmap)
    if not (math.isfinite(probability) and 0.0 <= probability <= 1.0):
        raise ValueError(f"probability must be in [0, 1], got {probability}")
    if out_shape is not None and (len(out_shape) != 2 or min(out_shape) <= 0):
        raise ValueError(f"out_shape must be (height, width) > 0, got {out_shape}")
    if probability < threshold:
        return ScoredBoxes()
    h, w = hm.shape
    if config.smooth_fraction > 0:
        hm = ndimage.gaussian_filter(hm, sigma=config.smooth_fraction * min(h, w))
    if float(hm.max()) <= float(hm.min()):
        return ScoredBoxes()
    norm = min_max(hm)
    lung = None if lung_mask is None else _resize_mask(lung_mask, (h, w))
    if lung is not None:
        norm = np.where(lung, norm, 0.0)
        if norm.max() <= 0.0:
            return ScoredBoxes()
    min_area = max(config.min_area_fraction * h * w, 1.0)
    if config.rule == "multi":
        box_arr, support = multi_threshold_boxes(
            norm,
            fractions=config.multi_fractions,
            closing=config.closing,
            lung=lung,
            split_midline=config.split_midline,
            min_area=min_area,
            nms_iou=config.nms_iou,
            max_boxes=config.max_boxes,
        )
    else:
        box_arr, support = _single_threshold_boxes(norm, config, lung, min_area)
    if len(box_arr) == 0:
        return ScoredBoxes()
    score_arr = np.clip(float(probability) * support, 0.0, 1.0)
    box_arr = _pad(box_arr, config.pad_fraction)
    box_arr = _scale_and_clip(box_arr, (h, w), out_shape or (h, w))
    valid = (box_arr[:, 2] > 0) & (box_arr[:, 3] > 0)
    box_arr, score_arr = box_arr[valid], score_arr[valid]
    keep = nms(box_arr, score_arr, config.nms_iou)[: config.max_boxes]
    return ScoredBoxes(boxes=box_arr[keep], scores=score_arr[keep])


def _single_threshold_boxes(
    norm: np.ndarray, config: BoxConfig, lung: np.ndarray | None, min_area: float
) -> tuple[np.ndarray, np.ndarray]:
    """Steps 3 to 5 for the one-threshold rules: boxes (heatmap pixels) and mean-CAM support."""
    mask = np.asarray(BOX_RULES[config.rule](norm, config), dtype=bool)
    mask = close_mask(mask, config.closing)
    if lung is not None:
        mask &= lung
    labels, n = label_components(mask, config.split_midline)
    if n == 0:
        return np.zeros((0, 4)), np.zeros(0)
    index = np.arange(1, n + 1)
    areas = ndimage.sum_labels(np.ones_like(norm), labels, index)
    means = ndimage.mean(norm, labels, index)
    boxes, support = [], []
    for k, sl in enumerate(ndimage.find_objects(labels)):
        if sl is None or areas[k] < min_area:
            continue
        rows, cols = sl
        boxes.append((cols.start, rows.start, cols.stop - cols.start, rows.stop - rows.start))
        support.append(float(means[k]))
    return np.asarray(boxes, dtype=np.float64).reshape(-1, 4), np.asarray(support)


def _pad(boxes: np.ndarray, fraction: float) -> np.ndarray:
    if fraction == 0.0:
        return boxes
    out = boxes.copy()
    out[:, 0] -= boxes[:, 2] * fraction / 2
    out[:, 1] -= boxes[:, 3] * fraction / 2
    out[:, 2:] *= 1.0 + fraction
    return out


def _scale_and_clip(boxes: np.ndarray, src: tuple[int, int], dst: tuple[int, int]) -> np.ndarray:
    sy, sx = dst[0] / src[0], dst[1] / src[1]
    x1 = np.clip(boxes[:, 0] * sx, 0, dst[1])
    y1 = np.clip(boxes[:, 1] * sy, 0, dst[0])
    x2 = np.clip((boxes[:, 0] + boxes[:, 2]) * sx, 0, dst[1])
    y2 = np.clip((boxes[:, 1] + boxes[:, 3]) * sy, 0, dst[0])
    return np.stack([x1, y1, x2 - x1, y2 - y1], axis=1)


def cam_to_boxes_batch(
    heatmaps: Sequence[np.ndarray] | np.ndarray,
    probabilities: Sequence[float] | np.ndarray,
    *,
    threshold: float,
    config: BoxConfig = BoxConfig(),
    lung_masks: Sequence[np.ndarray | None] | None = None,
    out_shapes: Sequence[tuple[int, int] | None] | None = None,
) -> list[ScoredBoxes]:
    """:func:`cam_to_boxes` over a batch.

    Args:
        heatmaps: ``N`` heatmaps (a list, or an ``(N, H, W)`` array).
        probabilities: ``N`` probabilities.
        threshold: The classifier's operating threshold.
        config: Shared settings.
        lung_masks: Optional per-image lung masks (entries may be ``None``).
        out_shapes: Optional per-image ``(H0, W0)`` (entries may be ``None``).

    Returns:
        One :class:`ScoredBoxes` per image.

    Raises:
        ValueError: When the per-image sequences differ in length.
    """
    n = len(heatmaps)
    probs = np.asarray(probabilities, dtype=np.float64).reshape(-1)
    if probs.size != n:
        raise ValueError(f"{n} heatmaps but {probs.size} probabilities")
    for name, seq in (("lung_masks", lung_masks), ("out_shapes", out_shapes)):
        if seq is not None and len(seq) != n:
            raise ValueError(f"{n} heatmaps but {len(seq)} {name}")
    return [
        cam_to_boxes(
            heatmaps[i],
            float(probs[i]),
            threshold=threshold,
            config=config,
            lung_mask=None if lung_masks is None else lung_masks[i],
            out_shape=None if out_shapes is None else out_shapes[i],
        )
        for i in range(n)
    ]


def detector_boxes(
    detections: Sequence[tuple[np.ndarray, np.ndarray]],
    probabilities: np.ndarray,
    *,
    threshold: float,
    input_size: int,
    out_shapes: Sequence[tuple[int, int]],
    fallback: Sequence[ScoredBoxes] | None = None,
) -> list[ScoredBoxes]:
    """Final boxes: detector boxes of classifier-positive images, scaled to original pixels.

    Confidence = classifier probability x detector score, so boxes rank across images by both.
    Negative images get none; a positive image without detections gets ``fallback`` (the CAM
    boxes) when given.
    """
    result = []
    for i, (boxes, scores) in enumerate(detections):
        if probabilities[i] < threshold:
            result.append(ScoredBoxes())
            continue
        if len(boxes) == 0:
            result.append(fallback[i] if fallback is not None else ScoredBoxes())
            continue
        h, w = out_shapes[i]
        xywh = xyxy_to_xywh(boxes, scale=(h / input_size, w / input_size))
        result.append(ScoredBoxes(boxes=xywh, scores=scores * float(probabilities[i])))
    return result
