"""Noisy-student pseudo-labels (Xie et al., CVPR 2020) for unlabelled X-rays.

A teacher (a trained pneumoloc checkpoint) scores every unlabelled image without noise (no
augmentation, eval mode) and labels it by its own decision threshold. As in Noisy Student, only
the most confident images of each predicted class are kept: ``fraction`` of the images predicted
positive (those furthest above the threshold in logit units) and ``fraction`` of those predicted
negative (furthest below it). Ranking within each class keeps both classes whatever the
teacher's probability scale. The student is then trained with noise (the training
augmentations, dropout) on the labelled images plus these, as one more training source with its
own share of every epoch (:class:`pneumoloc.training.sampling.SourceBalancedSampler`). The
unlabelled images never enter validation or test, and a folder that holds any validation or
test image of the labelled data is refused.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pneumoloc.errors import ConfigError, DataError

logger = logging.getLogger(__name__)

__all__ = ["PseudoLabels", "check_disjoint", "pseudo_label"]


@dataclass(frozen=True)
class PseudoLabels:
    """The teacher's confident labels of an unlabelled cache.

    Attributes:
        rows: Cache rows kept (confident).
        labels: Their hard labels (0/1), same length.
        probabilities: The teacher's calibrated probability of every scored row.
        summary: What a checkpoint records (teacher, threshold, counts).
    """

    rows: np.ndarray
    labels: np.ndarray
    probabilities: np.ndarray
    summary: dict[str, Any]


def check_disjoint(unlabelled: Any, labelled: list[Any]) -> None:
    """Refuse unlabelled images that are validation or test images of a labelled source.

    Files are compared by resolved path and by image name (an RSNA DICOM is named by its
    patientId, so a copy elsewhere is caught too).

    Raises:
        DataError: Some unlabelled file is a validation or test image (the count is given).
    """
    table = unlabelled.table
    paths = {str(Path(p).resolve()) for p in table["path"]}
    names = {Path(p).stem for p in table["path"]}
    for cache in labelled:
        rows = np.concatenate([cache.split.part("val"), cache.split.part("test")])
        held = cache.table.iloc[rows]
        clash = sum(str(Path(p).resolve()) in paths or Path(p).stem in names for p in held["path"])
        if clash:
            raise DataError(
                f"{unlabelled.root}: {clash} unlabelled images are validation or test images of "
                f"{cache.root}; unlabelled images must never reach evaluation"
            )


def pseudo_label(
    teacher: str | Path,
    cache: Any,
    *,
    fraction: float,
    device: str = "auto",
    batch_size: int = 32,
) -> PseudoLabels:
    """Label the most confident images of each predicted class with a teacher checkpoint.

    Raises:
        ConfigError: ``fraction`` not in (0, 1], or the teacher's input size differs from the
            cache's. DataError: No image would be kept.
    """
    from pneumoloc.inference import Predictor
    from pneumoloc.inference.calibration import logit

    if not 0.0 < fraction <= 1.0:
        raise ConfigError(f"pseudo-label fraction must be in (0, 1], got {fraction}")
    predictor = Predictor.from_checkpoint(teacher, device=device, batch_size=batch_size)
    if predictor.image_size != cache.size:
        raise ConfigError(
            f"teacher {teacher} takes {predictor.image_size} px, the unlabelled cache is "
            f"{cache.size} px"
        )
    rows = cache.split.part("all")
    probs = np.zeros(0, np.float64)
    if len(rows):
        probs = np.concatenate(
            [
                predictor.probabilities(np.asarray(cache.images[rows[i : i + 256]]))
                for i in range(0, len(rows), 256)
            ]
        )
    margin = logit(probs) - logit(predictor.threshold)
    predicted = margin >= 0
    keep = np.zeros(len(probs), dtype=bool)
    for side in (True, False):
        members = np.flatnonzero(predicted == side)
        k = round(fraction * len(members))
        order = members[np.argsort(-np.abs(margin[members]), kind="stable")]
        keep[order[:k]] = True
    positive, negative = keep & predicted, keep & ~predicted
    if not keep.any():
        raise DataError(f"teacher {teacher}: no unlabelled image kept (of {len(rows)})")
    summary = {
        "method": "noisy student (Xie et al. 2020): hard labels of the teacher's most confident "
        "predictions per class",
        "teacher": Path(teacher).name,
        "teacher_model_id": predictor.model_id,
        "teacher_temperature": predictor.temperature,
        "teacher_threshold": predictor.threshold,
        "fraction": fraction,
        "source": cache.manifest.get("source"),
        "fingerprint": cache.fingerprint,
        "n_unlabelled": len(rows),
        "n_positive": int(positive.sum()),
        "n_negative": int(negative.sum()),
    }
    logger.info(
        "pseudo-labels from %s: %d positive, %d negative of %d unlabelled images",
        teacher,
        summary["n_positive"],
        summary["n_negative"],
        len(rows),
    )
    return PseudoLabels(rows[keep], positive[keep].astype(np.int64), probs, summary)
