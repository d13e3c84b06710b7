"""Box and threshold geometry shared by every layer above: IoU, NMS, conversions, Otsu.

Plain NumPy on purpose: ``pneumoloc.localise.boxes`` (and the ONNX backend) must not pay for
torch, scikit-learn or pandas to handle a handful of boxes per image. Boxes are
``(x, y, width, height)`` in pixels unless a name says ``xyxy``.
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = [
    "as_boxes",
    "iou_matrix",
    "min_max",
    "nms",
    "otsu_threshold",
    "xywh_to_xyxy",
    "xyxy_area",
    "xyxy_to_xywh",
]


def as_boxes(boxes: Any, *, name: str = "boxes") -> np.ndarray:
    """Converts anything array-like to a float ``(N, 4)`` xywh array, checking it.

    Args:
        boxes: ``None``, an empty sequence, or ``N`` rows of ``(x, y, width, height)``.
        name: What to call the argument in error messages.

    Returns:
        A float64 array of shape ``(N, 4)``; ``(0, 4)`` when there are no boxes.

    Raises:
        ValueError: When the shape is not ``(N, 4)``, a value is not finite, or a width or
            height is negative.
    """
    if boxes is None:
        return np.zeros((0, 4), dtype=np.float64)
    arr = np.asarray(boxes, dtype=np.float64)
    if arr.size == 0:
        return np.zeros((0, 4), dtype=np.float64)
    if arr.ndim == 1 and arr.shape[0] == 4:
        arr = arr[None, :]
    if arr.ndim != 2 or arr.shape[1] != 4:
        raise ValueError(f"{name} must have shape (N, 4) as (x, y, width, height), got {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} contains NaN or infinite values")
    if np.any(arr[:, 2:] < 0):
        raise ValueError(f"{name} has a negative width or height")
    return arr


def iou_matrix(a: Any, b: Any) -> np.ndarray:
    """Intersection over union of every box in ``a`` with every box in ``b``.

    Args:
        a: ``(Na, 4)`` xywh boxes.
        b: ``(Nb, 4)`` xywh boxes.

    Returns:
        ``(Na, Nb)`` float array; 0 where the union has no area.
    """
    a = as_boxes(a, name="a")
    b = as_boxes(b, name="b")
    ax1, ay1 = a[:, 0:1], a[:, 1:2]
    ax2, ay2 = ax1 + a[:, 2:3], ay1 + a[:, 3:4]
    bx1, by1 = b[:, 0], b[:, 1]
    bx2, by2 = bx1 + b[:, 2], by1 + b[:, 3]
    iw = np.clip(np.minimum(ax2, bx2) - np.maximum(ax1, bx1), 0.0, None)
    ih = np.clip(np.minimum(ay2, by2) - np.maximum(ay1, by1), 0.0, None)
    inter = iw * ih
    union = (a[:, 2:3] * a[:, 3:4]) + (b[:, 2] * b[:, 3]) - inter
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = np.where(union > 0, inter / np.where(union > 0, union, 1.0), 0.0)
    return iou


def nms(boxes: np.ndarray, scores: np.ndarray, iou_threshold: float) -> np.ndarray:
    """Greedy non-maximum suppression.

    Hand-written rather than ``torchvision.ops.nms`` so this NumPy module does not import
    torch for a handful of boxes per image.

    Args:
        boxes: ``(N, 4)`` xywh boxes.
        scores: ``(N,)`` scores.
        iou_threshold: A box is dropped when its IoU with a kept, better box exceeds this.

    Returns:
        Indices of the kept boxes, by descending score (ties keep input order).
    """
    order = np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")
    ious = iou_matrix(boxes, boxes)
    keep: list[int] = []
    for i in order:
        if all(ious[i, k] <= iou_threshold for k in keep):
            keep.append(int(i))
    return np.asarray(keep, dtype=np.int64)


def xywh_to_xyxy(boxes: np.ndarray) -> np.ndarray:
    """``(N, 4)`` xywh -> float32 ``(N, 4)`` corners ``(x1, y1, x2, y2)``."""
    out = np.asarray(boxes, np.float32).reshape(-1, 4).copy()
    out[:, 2] += out[:, 0]
    out[:, 3] += out[:, 1]
    return out


def xyxy_area(boxes: Any) -> np.ndarray:
    """Areas of ``(N, 4)`` corner boxes (0 where a corner pair is inverted)."""
    b = np.asarray(boxes, np.float64).reshape(-1, 4)
    return np.clip(b[:, 2] - b[:, 0], 0.0, None) * np.clip(b[:, 3] - b[:, 1], 0.0, None)


def xyxy_to_xywh(boxes: np.ndarray, *, scale: tuple[float, float] = (1.0, 1.0)) -> np.ndarray:
    """``(N, 4)`` corners -> xywh, each axis multiplied by ``scale = (sy, sx)``."""
    b = np.asarray(boxes).reshape(-1, 4)
    sy, sx = scale
    return np.stack(
        [b[:, 0] * sx, b[:, 1] * sy, (b[:, 2] - b[:, 0]) * sx, (b[:, 3] - b[:, 1]) * sy], axis=1
    )


def min_max(values: np.ndarray) -> np.ndarray:
    """Rescale to ``[0, 1]`` by the array's own minimum and maximum (a constant array -> 0)."""
    lo, hi = float(values.min()), float(values.max())
    if hi <= lo:
        return np.zeros_like(values)
    return (values - lo) / (hi - lo)


def otsu_threshold(values: np.ndarray, bins: int = 256) -> float:
    """Otsu's (1979) threshold of ``values`` on a ``bins``-bin histogram: the bin centre that
    maximises the between-class variance (values above it form the bright class).

    Hand-written: scikit-image is not a dependency and this is a dozen lines of NumPy. A
    single-valued input returns that value.
    """
    hist, edges = np.histogram(values, bins=bins)
    centres = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(hist)[:-1].astype(np.float64)
    w1 = values.size - w0
    s0 = np.cumsum(hist * centres)[:-1]
    m0 = s0 / np.maximum(w0, 1)
    m1 = (float((hist * centres).sum()) - s0) / np.maximum(w1, 1)
    between = w0 * w1 * (m0 - m1) ** 2
    return float(centres[int(np.argmax(between))]) if between.size else float(centres[0])
