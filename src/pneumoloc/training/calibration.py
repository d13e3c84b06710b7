"""Choosing what a trained model says on its validation split: temperature, shared checks.

Used by ``pneumoloc calibrate`` (one checkpoint) and ``pneumoloc ensemble`` (several). The
fitting itself is :mod:`pneumoloc.inference.calibration`.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from pneumoloc.errors import ConfigError
from pneumoloc.inference.calibration import apply_temperature, fit_temperature, map_threshold
from pneumoloc.metrics.classification import expected_calibration_error

__all__ = ["MIN_PER_CLASS", "calibrate_payload", "check_same_data", "split_probabilities"]

_HEADER_KEYS = ("kind", "format", "saved_at", "pneumoloc_version")

MIN_PER_CLASS = 5
"""Fewer validation images of a class than this and no temperature is fitted (one number
fitted on a handful of images moves every probability the model gives)."""


def split_probabilities(
    predictor: Any, cache: Any, split: str = "val"
) -> tuple[np.ndarray, np.ndarray]:
    """The network's uncalibrated probabilities and the labels of one split of a cache."""
    rows = cache.split.part(split)
    if len(rows) == 0:
        raise ConfigError(f"{cache.root}: the {split!r} split is empty")
    probs, _, _ = predictor.network(np.asarray(cache.images[rows]))
    return np.asarray(probs, np.float64), np.asarray(cache.labels[rows])


def check_same_data(payload: dict[str, Any], cache: Any, what: str) -> None:
    """Refuse a cache other than the one a checkpoint was trained on (its val split could hold
    the model's training images)."""
    data = payload.get("data") or {}
    trained = {data.get("fingerprint")} | {s.get("fingerprint") for s in data.get("sources", [])}
    trained.discard(None)
    if trained and cache.fingerprint not in trained:
        raise ConfigError(
            f"{cache.root}: not the cache {what} was trained on "
            f"(fingerprint {cache.fingerprint}, "
            f"trained on {sorted(str(t) for t in trained)}); "
            "its validation split may hold training images"
        )


def calibrate_payload(
    payload: dict[str, Any],
    probs: np.ndarray,
    labels: np.ndarray,
    *,
    split: str,
    fingerprint: str,
    weights: np.ndarray | None = None,
) -> dict[str, Any]:
    """The checkpoint dict with a temperature fitted on ``probs`` (uncalibrated) and its
    thresholds mapped so that every decision stays the same. ``weights`` weight the images of
    the fit (several sources: each source counts equally); ECE is reported unweighted."""
    old = float(payload.get("temperature") or 1.0)
    counts = np.bincount(np.asarray(labels, dtype=np.int64), minlength=2)
    if counts.min() < MIN_PER_CLASS:
        raise ConfigError(
            f"calibration needs at least {MIN_PER_CLASS} validation images of each class, got "
            f"{counts[0]} negative and {counts[1]} positive; the checkpoint is left uncalibrated"
        )
    temperature = fit_temperature(probs, labels, weights=weights)
    # The file header (kind, format, saved_at, version) is written afresh by save_checkpoint.
    out = {k: v for k, v in payload.items() if k not in _HEADER_KEYS}
    for key in ("threshold", "box_threshold"):
        if out.get(key) is not None:
            raw = map_threshold(float(out[key]), 1.0 / old)
            out[key] = map_threshold(raw, temperature)
    out["temperature"] = temperature
    out["calibration"] = {
        "method": "temperature scaling (Guo et al. 2017)",
        "split": split,
        "n_images": len(labels),
        "data_fingerprint": fingerprint,
        "ece_before": expected_calibration_error(labels, probs),
        "ece_after": expected_calibration_error(labels, apply_temperature(probs, temperature)),
        "note": "fitted on the validation split; report ECE on a test split (pneumoloc evaluate)",
    }
    return out
