"""The ``"multi"`` box rule: components at several thresholds, one box per mode of the map.

For one normalised (and lung-masked) heatmap:

1. Threshold at each fraction of ``BoxConfig.multi_fractions`` of the peak; close, label and
   drop small components as the single-threshold rules do. A component at a higher threshold
   lies inside exactly one component at the next lower one, so the components form a tree.
2. Its leaves (components with nothing above them) are the **modes** of the map: the map
   supports at most that many boxes.
3. Every component that holds exactly one mode is a candidate box for that mode (a component
   that merges two modes is not). Its confidence is ``mean(map inside) * coverage``, where
   coverage is the share of its root's heat (``sum`` of the map over the lowest-threshold
   component containing it) that it holds: the mean prefers tight boxes around the peak, the
   coverage prefers boxes that keep the mode's heat, so each mode's box grows or shrinks to the
   threshold where that product is largest, from the map alone (no labels, no tuning).
4. Best first: a candidate is kept when its mode has no box yet and its IoU with every kept
   box is at most ``nms_iou``; at most ``max_boxes``.

Confidences lie in ``[0, 1]``; :func:`~pneumoloc.localise.boxes.cam_to_boxes` multiplies them
by the classifier's probability like every other rule's.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from pneumoloc.localise.components import close_mask, label_components
from pneumoloc.localise.geometry import iou_matrix

__all__ = ["multi_threshold_boxes"]


@dataclass
class _Component:
    level: int
    box: tuple[int, int, int, int]  # xywh, heatmap pixels
    mass: float
    mean: float
    parent: int | None  # index into the previous level's components
    children: list[int]
    index: int  # position in the flat list of all components


def _levels(
    norm: np.ndarray,
    fractions: tuple[float, ...],
    *,
    closing: int,
    lung: np.ndarray | None,
    split_midline: bool,
    min_area: float,
) -> list[_Component]:
    """Every kept component at every threshold, lowest threshold first, parents linked."""
    peak = float(norm.max())
    comps: list[_Component] = []
    previous: dict[int, int] = {}  # label at the previous level -> flat index
    previous_labels: np.ndarray | None = None
    ones = np.ones_like(norm)
    for level, fraction in enumerate(sorted(fractions)):
        mask = close_mask(norm >= fraction * peak, closing)
        if lung is not None:
            mask &= lung
        labels, n = label_components(mask, split_midline)
        current: dict[int, int] = {}
        if n:
            index = np.arange(1, n + 1)
            areas = ndimage.sum_labels(ones, labels, index)
            masses = ndimage.sum_labels(norm, labels, index)
            for k, sl in enumerate(ndimage.find_objects(labels)):
                if sl is None or areas[k] < min_area:
                    continue
                rows, cols = sl
                parent = None
                if previous_labels is not None:
                    # any pixel of the component: the one below it holds all of them
                    inside = np.argwhere(labels[sl] == k + 1)[0]
                    below = int(previous_labels[rows.start + inside[0], cols.start + inside[1]])
                    parent = previous.get(below)
                comp = _Component(
                    level=level,
                    box=(cols.start, rows.start, cols.stop - cols.start, rows.stop - rows.start),
                    mass=float(masses[k]),
                    mean=float(masses[k] / areas[k]),
                    parent=parent,
                    children=[],
                    index=len(comps),
                )
                if parent is not None:
                    comps[parent].children.append(comp.index)
                current[k + 1] = comp.index
                comps.append(comp)
        previous, previous_labels = current, labels
    return comps


def multi_threshold_boxes(
    norm: np.ndarray,
    *,
    fractions: tuple[float, ...],
    closing: int,
    lung: np.ndarray | None,
    split_midline: bool,
    min_area: float,
    nms_iou: float,
    max_boxes: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Boxes (xywh, heatmap pixels) and confidences in ``[0, 1]`` of a normalised heatmap,
    best first; see the module docstring.

    Args:
        norm: ``(H, W)`` map in ``[0, 1]`` with a positive maximum, zero outside the lungs.
        fractions: Thresholds as fractions of the map's maximum.
        closing: Side of the square closing element (0: none).
        lung: Boolean lung mask of the map's shape, or None.
        split_midline: Cut components at the vertical midline.
        min_area: Components with fewer pixels are dropped (and are not modes).
        nms_iou: A candidate overlapping a kept box by more than this IoU is dropped.
        max_boxes: Most boxes returned.
    """
    comps = _levels(
        norm,
        fractions,
        closing=closing,
        lung=lung,
        split_midline=split_midline,
        min_area=min_area,
    )
    if not comps:
        return np.zeros((0, 4)), np.zeros(0)
    # the mode (leaf) under each component, or -1 when it holds several
    modes: list[int] = [-1] * len(comps)
    for comp in reversed(comps):  # children come after their parents
        if not comp.children:
            modes[comp.index] = comp.index
        elif len(comp.children) == 1:
            modes[comp.index] = modes[comp.children[0]]
    candidates = []
    for comp in comps:
        if modes[comp.index] < 0:
            continue
        root = comp
        while root.parent is not None:
            root = comps[root.parent]
        coverage = comp.mass / root.mass if root.mass > 0 else 0.0
        candidates.append((comp.mean * coverage, comp))
    candidates.sort(key=lambda sc: (-sc[0], -sc[1].level))
    boxes: list[tuple[int, int, int, int]] = []
    scores: list[float] = []
    taken: set[int] = set()
    for score, comp in candidates:
        if len(boxes) >= max_boxes:
            break
        if modes[comp.index] in taken:
            continue
        if boxes and float(iou_matrix(np.asarray([comp.box]), np.asarray(boxes)).max()) > nms_iou:
            continue
        taken.add(modes[comp.index])
        boxes.append(comp.box)
        scores.append(float(np.clip(score, 0.0, 1.0)))
    return np.asarray(boxes, dtype=np.float64).reshape(-1, 4), np.asarray(scores)
