"""Label-free agreement of a self-trained detector's boxes with the CAM boxes it learnt from.

docs/localisation.md round 3h: detectors self-trained on CAM pseudo-boxes are bimodal over
seeds. Those whose top box kept most of the area of the CAM box it learnt from scored above the
CAM boxes; those whose boxes shrank to under half of it collapsed to near zero. Both figures
here need no label and no truth box: the detector's boxes and the teacher's boxes on the same
images (ones the teacher flags), so they can pick a seed (``pneumoloc selftrain
--candidates``) without touching validation boxes.

Hand-written: a median of two per-image ratios, nothing a library offers.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from pneumoloc.localise.geometry import iou_matrix, xyxy_area, xyxy_to_xywh

__all__ = ["BoxAgreement", "box_agreement"]


@dataclass(frozen=True)
class BoxAgreement:
    """How a detector's boxes compare with reference (CAM) boxes on the same images.

    Attributes:
        n_images: Images with at least one reference box (the others are skipped).
        n_with_detection: Of those, images where the detector drew a box.
        iou_median: Median over those of the IoU of the detector's top box with its best
            matching reference box; None when the detector drew nothing.
        area_ratio_median: Median of the top box's area over the largest reference box's;
            None when the detector drew nothing.
    """

    n_images: int
    n_with_detection: int
    iou_median: float | None
    area_ratio_median: float | None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return asdict(self)

    @property
    def score(self) -> float:
        """What ``--candidates`` ranks seeds by: the median area ratio (-inf when None)."""
        return -np.inf if self.area_ratio_median is None else self.area_ratio_median


def box_agreement(detected: Sequence[Any], reference: Sequence[Any]) -> BoxAgreement:
    """Median IoU and area ratio of the detector's top box against the reference boxes.

    Args:
        detected: Per image, the detector's ``(N, 4)`` xyxy boxes, best first.
        reference: Per image, the reference ``(M, 4)`` xyxy boxes (e.g. the teacher's CAM
            boxes), same images and pixel frame.

    Raises:
        ValueError: When the two sequences differ in length.
    """
    if len(detected) != len(reference):
        raise ValueError(
            f"box agreement: {len(detected)} detections for {len(reference)} reference images"
        )
    ious, ratios = [], []
    n_images = 0
    for found, ref in zip(detected, reference, strict=True):
        ref = np.asarray(ref, np.float64).reshape(-1, 4)
        if not len(ref):
            continue
        n_images += 1
        found = np.asarray(found, np.float64).reshape(-1, 4)
        if not len(found):
            continue
        top = found[:1]
        ious.append(float(iou_matrix(xyxy_to_xywh(top), xyxy_to_xywh(ref)).max()))
        largest = float(xyxy_area(ref).max())
        ratios.append(float(xyxy_area(top)[0]) / largest if largest > 0 else 0.0)
    return BoxAgreement(
        n_images=n_images,
        n_with_detection=len(ious),
        iou_median=float(np.median(ious)) if ious else None,
        area_ratio_median=float(np.median(ratios)) if ratios else None,
    )
