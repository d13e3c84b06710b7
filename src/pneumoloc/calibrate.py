"""``pneumoloc calibrate``: fit a checkpoint's temperature on its validation split.

The checkpoint's decisions do not change: its decision and box thresholds are mapped to the
calibrated scale (temperature scaling is monotone). Only the split the model was validated on is
used, read from the cache it was trained on (the cache's fingerprint must match the one stored
in the checkpoint, so the "val" rows are the model's own validation images and never its
training images). See :mod:`pneumoloc.inference.calibration`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

__all__ = ["CalibrationResult", "calibrate"]


@dataclass(frozen=True)
class CalibrationResult:
    """What :func:`calibrate` wrote: the file, the temperature, ECE before/after on val."""

    path: Path
    temperature: float
    ece_before: float
    ece_after: float
    n_images: int


def calibrate(
    checkpoint: str | Path | None,
    data: str | Path,
    out: str | Path,
    *,
    device: str = "auto",
    batch_size: int = 16,
) -> CalibrationResult:
    """Fit ``checkpoint``'s temperature on the validation split of ``data``; write ``out``.

    Raises:
        ConfigError: ``data`` is not the cache the model was trained on, or its val split is
            empty. CheckpointError, CacheError: unreadable inputs.
    """
    from pneumoloc.data.cache import resolve_cache
    from pneumoloc.inference import Predictor, resolve_checkpoint
    from pneumoloc.models.checkpoint import load_checkpoint, save_checkpoint
    from pneumoloc.training.calibration import (
        calibrate_payload,
        check_same_data,
        split_probabilities,
    )

    path = resolve_checkpoint(checkpoint)
    payload = load_checkpoint(path)
    predictor = Predictor.from_checkpoint(path, device=device, batch_size=batch_size)
    cache = resolve_cache(data, size=predictor.image_size)
    check_same_data(payload, cache, str(path))
    probs, labels = split_probabilities(predictor, cache)
    calibrated = calibrate_payload(
        payload, probs, labels, split="val", fingerprint=cache.fingerprint
    )
    save_checkpoint(out, calibrated)
    info = calibrated["calibration"]
    logger.info(
        "%s: temperature %.3f, val ECE %.3f -> %.3f (%d images)",
        out,
        calibrated["temperature"],
        info["ece_before"],
        info["ece_after"],
        len(labels),
    )
    return CalibrationResult(
        Path(out), calibrated["temperature"], info["ece_before"], info["ece_after"], len(labels)
    )
