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

MEMBER_ROLES = ("both", "probability", "heatmap")
"""What an ensemble member gives: ``"both"`` (its probability and its heatmap are averaged
with the others', every ensemble before 0.4), ``"probability"`` (only its probability) or
``"heatmap"`` (only its heatmap): a classifier paired with a localiser."""


def member_roles(meta: dict[str, Any]) -> list[str]:
    """The role of each model of a checkpoint's metadata (``["both"]`` for a single model).

    Raises:
        CheckpointError: An unknown role, or no member giving a probability or a heatmap.
    """
    members = meta.get("members") or []
    if not members:
        return ["both"]
    roles = [str(m.get("role") or "both") for m in members]
    unknown = sorted(set(roles) - set(MEMBER_ROLES))
    if unknown:
        raise CheckpointError(f"ensemble member roles {unknown} unknown; use {list(MEMBER_ROLES)}")
    for need in ("probability", "heatmap"):
        if not any(r in ("both", need) for r in roles):
            raise CheckpointError(f"no ensemble member gives the {need} (roles {roles})")
    return roles


def role_mean(values: list[Any], roles: list[str], role: str) -> Any:
    """The mean of the ``values`` (tensors, one per member) whose member gives ``role``."""
    chosen = [v for v, r in zip(values, roles, strict=True) if r in ("both", role)]
    return torch.stack(chosen).mean(0)


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
    payload = load_checkpoint(source) if not isinstance(source, dict) else source
    if payload.get("members"):
        raise CheckpointError(
            f"{source if not isinstance(source, dict) else 'checkpoint'} is an ensemble of "
            f"{len(payload['members'])} models; load it with models_from_checkpoint"
        )
    model = _member_model(payload, source)
    model.to(device).eval()
    meta = {k: v for k, v in payload.items() if k not in ("state_dict", "training_state")}
    return model, meta


def models_from_checkpoint(
    source: str | Path | dict[str, Any], *, device: str | torch.device = "cpu"
) -> tuple[list[torch.nn.Module], dict[str, Any]]:
    """The models of a checkpoint: its members for an ensemble file, else its one model.

    Returns:
        The models in eval mode, and the checkpoint's metadata (the members' weights left out;
        ``meta["members"]`` keeps each member's own metadata).

    Raises:
        CheckpointError: Weights that do not fit, or members of different input sizes.
    """
    payload = load_checkpoint(source) if not isinstance(source, dict) else source
    members = payload.get("members") or []
    if not members:
        model, meta = model_from_checkpoint(payload, device=device)
        return [model], meta
    sizes = {int(m.get("image_size", payload["image_size"])) for m in members}
    if sizes != {int(payload["image_size"])}:
        raise CheckpointError(f"ensemble members have input sizes {sorted(sizes)}; need one")
    models = [_member_model(m, source).to(device).eval() for m in members]
    meta = {k: v for k, v in payload.items() if k not in ("state_dict", "training_state")}
    meta["members"] = [{k: v for k, v in m.items() if k != "state_dict"} for m in members]
    try:
        member_roles(meta)
    except CheckpointError as exc:
        where = source if not isinstance(source, dict) else "checkpoint"
        raise CheckpointError(f"{where}: {exc}") from None
    return models, meta


def _member_model(payload: dict[str, Any], source: str | Path | dict[str, Any]) -> torch.nn.Module:
    from pneumoloc.models import build_model

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
    return model
