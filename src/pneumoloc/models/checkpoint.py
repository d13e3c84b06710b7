"""Checkpoints that describe themselves (weights + everything needed to use them).

A checkpoint is a plain dict saved with ``torch.save`` and loaded with ``weights_only=True``:
tensors, numbers, strings, lists and dicts only. Whole modules are never pickled.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import torch

from pneumoloc import __version__
from pneumoloc.errors import CheckpointError

CHECKPOINT_FORMAT = 1
CHECKPOINT_KIND = "pneumoloc-classifier"


def save_checkpoint(path: str | Path, payload: dict[str, Any]) -> None:
    """Write a checkpoint atomically (a crash mid-write never leaves a truncated file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "kind": CHECKPOINT_KIND,
        "format": CHECKPOINT_FORMAT,
        "saved_at": time.time(),
        "pneumoloc_version": __version__,
        **payload,
    }
    tmp = path.with_name(path.name + ".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)


def load_checkpoint(
    path: str | Path, *, map_location: str | torch.device = "cpu"
) -> dict[str, Any]:
    """Load and check a checkpoint.

    Raises:
        CheckpointError: If the file is missing, corrupt, or not a pneumoloc checkpoint.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:
        raise CheckpointError(
            f"{path}: not a readable checkpoint ({type(exc).__name__}: {exc})"
        ) from None
    if not isinstance(payload, dict) or payload.get("kind") != CHECKPOINT_KIND:
        raise CheckpointError(f"{path}: not a pneumoloc checkpoint")
    if payload.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(
            f"{path}: checkpoint format {payload.get('format')} is not supported "
            f"by pneumoloc {__version__}"
        )
    for key in ("model", "state_dict", "image_size", "threshold"):
        if key not in payload:
            raise CheckpointError(f"{path}: checkpoint lacks {key!r}")
    return payload


def model_from_checkpoint(
    source: str | Path | dict[str, Any], *, device: str | torch.device = "cpu"
) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Rebuild the model a checkpoint describes and load its weights.

    Args:
        source: A checkpoint path, or an already loaded checkpoint dict.
        device: Where to put the model.

    Returns:
        The model in eval mode, and the checkpoint's metadata (everything but the weights).

    Raises:
        CheckpointError: If the weights do not fit the described model.
    """
    from pneumoloc.models import build_model

    payload = load_checkpoint(source) if not isinstance(source, dict) else source
    spec = payload["model"]
    model = build_model(spec["name"], **spec.get("kwargs", {}))
    try:
        model.load_state_dict(payload["state_dict"])
    except RuntimeError as exc:
        first = str(exc).splitlines()[0]
        raise CheckpointError(
            f"{source if not isinstance(source, dict) else 'checkpoint'}: weights do not fit model "
            f"{spec['name']!r}: {first}"
        ) from None
    model.to(device).eval()
    meta = {k: v for k, v in payload.items() if k not in ("state_dict", "training_state")}
    return model, meta
