"""Metrics by patient subgroup (view position, sex, age band), with bootstrap intervals.

For every attribute and each of its groups: the counts, AUROC, sensitivity and specificity at
the model's threshold and, where there are truth boxes, the RSNA challenge score, each with a
95% percentile bootstrap interval (images resampled within the group). Only aggregates leave
this module: no image's group is ever written.

A group's metric is None where it is undefined (AUROC with one class, sensitivity without
positives, the RSNA score without a scorable image); its interval is None too, and also when
the group is too small to resample meaningfully (fewer than :data:`MIN_BOOTSTRAP` images).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from pneumoloc.metrics.classification import bootstrap_auroc_ci, classification_metrics
from pneumoloc.metrics.localisation import rsna_image_score

__all__ = ["ATTRIBUTE_NAMES", "MIN_BOOTSTRAP", "bootstrap_ratio_ci", "subgroup_metrics"]

ATTRIBUTE_NAMES = {
    "view": "View position (DICOM ViewPosition)",
    "sex": "Patient sex (DICOM PatientSex)",
    "age_band": "Age band (DICOM PatientAge)",
}
MIN_BOOTSTRAP = 10
"""Groups with fewer images get no bootstrap interval."""

_BLOCK = 100


def bootstrap_ratio_ci(
    numerator: np.ndarray,
    denominator: np.ndarray,
    *,
    n_boot: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
) -> tuple[float | None, float | None]:
    """Percentile bootstrap interval of ``sum(numerator) / sum(denominator)`` over images.

    Sensitivity is ``numerator = positive & predicted``, ``denominator = positive``; a mean
    score over scorable images is ``numerator = score``, ``denominator = scorable``. Images
    are resampled with replacement; resamples whose denominator is 0 are skipped.

    Returns:
        ``(low, high)``, or ``(None, None)`` when no resample is defined.
    """
    num = np.asarray(numerator, dtype=np.float64).reshape(-1)
    den = np.asarray(denominator, dtype=np.float64).reshape(-1)
    n = num.size
    if n == 0 or n_boot < 1 or den.sum() == 0:
        return None, None
    rng = np.random.default_rng(seed)
    values = []
    for start in range(0, n_boot, _BLOCK):
        b = min(_BLOCK, n_boot - start)
        draws = rng.integers(0, n, size=(b, n))
        flat = (draws + (np.arange(b) * n)[:, None]).ravel()
        counts = np.bincount(flat, minlength=b * n).reshape(b, n).astype(np.float64)
        top, bottom = counts @ num, counts @ den
        values.append(top[bottom > 0] / bottom[bottom > 0])
    found = np.concatenate(values)
    if found.size == 0:
        return None, None
    low, high = np.percentile(found, [100 * alpha / 2, 100 * (1 - alpha / 2)])
    return float(low), float(high)


def _none(x: float | None) -> float | None:
    return None if x is None or not math.isfinite(x) else float(x)


def _group_metrics(
    y: np.ndarray,
    p: np.ndarray,
    threshold: float,
    rsna: np.ndarray | None,
    n_boot: int,
    seed: int,
) -> dict[str, Any]:
    m = classification_metrics(y, p, threshold, n_boot=0)
    boot = n_boot if y.size >= MIN_BOOTSTRAP else 0
    pred = p >= threshold
    pos, neg = y == 1, y == 0
    out: dict[str, Any] = {
        "n": m["n"],
        "n_positive": m["n_positive"],
        "prevalence": m["prevalence"],
        "auroc": m["auroc"],
        "auroc_ci": [None, None],
        "sensitivity": m["sensitivity"],
        "sensitivity_ci": [None, None],
        "specificity": m["specificity"],
        "specificity_ci": [None, None],
    }
    if boot and m["auroc"] is not None:
        low, high = bootstrap_auroc_ci(y, p, n_boot=boot, seed=seed)
        out["auroc_ci"] = [_none(low), _none(high)]
    if boot and pos.any():
        out["sensitivity_ci"] = list(bootstrap_ratio_ci(pos & pred, pos, n_boot=boot, seed=seed))
    if boot and neg.any():
        out["specificity_ci"] = list(bootstrap_ratio_ci(neg & ~pred, neg, n_boot=boot, seed=seed))
    if rsna is not None:
        scorable = ~np.isnan(rsna)
        out["n_rsna_scored"] = int(scorable.sum())
        out["rsna_map"] = float(rsna[scorable].mean()) if scorable.any() else None
        out["rsna_map_ci"] = (
            list(
                bootstrap_ratio_ci(np.where(scorable, rsna, 0.0), scorable, n_boot=boot, seed=seed)
            )
            if boot and scorable.any()
            else [None, None]
        )
    return out


def subgroup_metrics(
    y_true: Any,
    prob: Any,
    attributes: Mapping[str, Sequence[str] | np.ndarray],
    threshold: float,
    *,
    boxes: Sequence[tuple[Any, Any]] | None = None,
    gts: Sequence[Any] | None = None,
    n_boot: int = 1000,
    seed: int = 0,
) -> dict[str, Any] | None:
    """Metrics within each group of each attribute.

    Args:
        y_true: 0/1 labels (N,).
        prob: Probabilities (N,).
        attributes: Attribute name ("view", "sex", "age_band") -> the group of each image (N,).
            An attribute whose every image is "unknown" is left out.
        threshold: The decision threshold.
        boxes: Per image the predicted ``(boxes, scores)``, with ``gts``: adds the RSNA score.
        gts: Per image the truth boxes.
        n_boot: Bootstrap resamples per interval (0: no intervals).
        seed: Bootstrap seed (the same for every group).

    Returns:
        ``{"attributes": {name: {"label", "groups": {group: metrics}}}, "n_boot", "confidence",
        "threshold"}``, groups sorted by name with "unknown" last; None when no attribute is
        known for any image.
    """
    y = np.asarray(y_true).reshape(-1).astype(np.int64)
    p = np.asarray(prob, dtype=np.float64).reshape(-1)
    if y.shape != p.shape:
        raise ValueError(f"y_true has {y.size} values but prob has {p.size}")
    rsna: np.ndarray | None = None
    if boxes is not None and gts is not None:
        if len(boxes) != y.size or len(gts) != y.size:
            raise ValueError("boxes and gts must have one entry per image")
        scores = [rsna_image_score(b, s, g) for (b, s), g in zip(boxes, gts, strict=True)]
        rsna = np.array([math.nan if s is None else s for s in scores], dtype=np.float64)
    out: dict[str, Any] = {}
    for name, values in attributes.items():
        groups = np.asarray(values, dtype=object).reshape(-1).astype(str)
        if groups.shape != y.shape:
            raise ValueError(f"attribute {name!r} has {groups.size} values for {y.size} images")
        if y.size == 0 or np.all(groups == "unknown"):
            continue
        names = sorted(set(groups.tolist()), key=lambda g: (g == "unknown", g))
        out[name] = {
            "label": ATTRIBUTE_NAMES.get(name, name),
            "groups": {
                g: _group_metrics(
                    y[groups == g],
                    p[groups == g],
                    threshold,
                    None if rsna is None else rsna[groups == g],
                    n_boot,
                    seed,
                )
                for g in names
            },
        }
    if not out:
        return None
    return {
        "attributes": out,
        "threshold": float(threshold),
        "n_boot": int(n_boot),
        "confidence": 0.95,
        "min_bootstrap": MIN_BOOTSTRAP,
        "rsna_scored": rsna is not None,
    }
