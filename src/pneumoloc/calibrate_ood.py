"""``pneumoloc calibrate-ood``: fit a checkpoint's statistics of real films' features.

For each cache given (one per source: adults' and children's films differ), the classifier's
pooled features of the TRAINING split are summarised (mean and low-rank covariance) and the
VALIDATION split sets the threshold (:func:`pneumoloc.inference.ood.fit_ood_model`). The result
is written beside the checkpoint as ``<checkpoint>.ood.safetensors`` (for ``default``:
``pneumoloc/weights/default.ood.safetensors``), tied to the checkpoint's weights by their
SHA-256, so a re-issued model never uses statistics of another. ``predict`` and ``serve`` then
use it in the input check; without it they check on image evidence alone.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)

__all__ = ["OodCalibrationResult", "calibrate_ood"]


@dataclass(frozen=True)
class OodCalibrationResult:
    """What :func:`calibrate_ood` wrote: the file and, per source, the films used."""

    path: Path
    sources: dict[str, dict[str, float]]


def _features(predictor, images: np.ndarray, batch_size: int) -> np.ndarray:  # type: ignore[no-untyped-def]
    out = []
    for start in range(0, len(images), batch_size):
        batch = np.array(images[start : start + batch_size])  # a writable copy of the map
        feats = predictor.network_with_features(batch)[3]
        out.append(feats)
    return np.concatenate(out)


def calibrate_ood(
    checkpoint: str | Path | None,
    data: Sequence[str | Path],
    out: str | Path | None = None,
    *,
    device: str = "auto",
    batch_size: int = 8,
    max_per_split: int | None = None,
    seed: int = 0,
) -> OodCalibrationResult:
    """Fit ``checkpoint``'s feature statistics on the caches ``data``; write them.

    Args:
        checkpoint: A checkpoint, or None / "default".
        data: Caches (or data folders, prepared at the model's size), one per source.
        out: Where to write (default: beside the checkpoint, see
            :func:`pneumoloc.inference.ood.ood_path`).
        device: "auto", "cpu" or "cuda".
        batch_size: Images per forward pass.
        max_per_split: Use at most this many films of each split (a random, seeded subset).
        seed: Of that subset.

    Raises:
        ConfigError: A cache without training or validation films.
    """
    from pneumoloc.data.cache import resolve_cache
    from pneumoloc.errors import ConfigError
    from pneumoloc.inference import Predictor, resolve_checkpoint
    from pneumoloc.inference.ood import fit_ood_model, ood_path

    path = resolve_checkpoint(checkpoint)
    predictor = Predictor.from_checkpoint(path, device=device, batch_size=batch_size)
    rng = np.random.default_rng(seed)
    sources: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for item in data:
        cache = resolve_cache(item, size=predictor.image_size)
        rows = {}
        for split in ("train", "val"):
            idx = np.asarray(getattr(cache.split, split))
            if max_per_split is not None and len(idx) > max_per_split:
                idx = np.sort(rng.choice(idx, size=max_per_split, replace=False))
            if len(idx) == 0:
                raise ConfigError(f"{cache.root}: its {split} split is empty")
            rows[split] = idx
        name = Path(str(cache.manifest.get("source") or cache.root)).name or str(item)
        if name in sources:
            name = f"{name}-{len(sources)}"
        logger.info(
            "%s: features of %d training and %d validation films",
            name,
            len(rows["train"]),
            len(rows["val"]),
        )
        sources[name] = (
            _features(predictor, cache.images[rows["train"]], batch_size),
            _features(predictor, cache.images[rows["val"]], batch_size),
        )
    try:
        model = fit_ood_model(
            sources,
            weights_sha256=predictor.weights_sha256,
            info={"checkpoint": path.name, "model_id": predictor.model_id},
        )
    except ValueError as exc:
        raise ConfigError(f"cannot fit the feature statistics: {exc}") from None
    target = Path(out) if out is not None else ood_path(path)
    model.save(target)
    return OodCalibrationResult(path=target, sources=model.info["sources"])
