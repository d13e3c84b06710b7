"""Load ImageNet-style backbone weights from a local file into a 1-channel backbone.

Accepts timm or torchvision state dicts (.pth/.pt/.bin via ``torch.load(weights_only=True)``,
or .safetensors), optionally wrapped in ``{"state_dict": ...}`` / ``{"model": ...}``. The
classifier is dropped, a 3-channel stem is summed to 1 channel with
``timm.models.adapt_input_conv``, and the rest is loaded non-strictly with every skipped key
logged.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from pneumoloc.errors import CheckpointError

logger = logging.getLogger(__name__)

WRAPPER_PREFIXES = ("module.", "model.")
"""Prefixes stripped when every key carries them (DDP, Lightning-style wrappers)."""

CLASSIFIER_PREFIXES = ("fc.", "classifier.", "head.fc.")
"""ImageNet classifier weights: never loaded (our head is a new Linear(C, 1))."""

MIN_MATCHED_FRACTION = 0.5
"""Below this share of the backbone's tensors loaded, the file is the wrong architecture."""


@dataclass
class LoadReport:
    """What a pretrained load did.

    Attributes:
        loaded: Keys copied into the backbone (including adapted stems).
        adapted: Keys whose 3-channel input conv was summed to 1 channel.
        missing: Backbone keys the file did not provide (left at their initial values).
        unexpected: File keys the backbone has no use for.
        mismatched: File keys whose shape does not fit the backbone's tensor.
        dropped: Classifier keys dropped on purpose.
    """

    loaded: list[str] = field(default_factory=list)
    adapted: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)


def read_state_dict(path: str | Path) -> dict[str, Tensor]:
    """Read a state dict from a local weights file, unwrapped and with wrapper prefixes removed.

    Raises:
        CheckpointError: The file is missing, unreadable, or holds no tensors.
    """
    from timm.models import load_state_dict  # lazy: timm is slow to import

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(
            f"{path}: pretrained weights file not found "
            "(give a local .pth/.pt/.bin/.safetensors file, or 'imagenet' to download)"
        )
    try:
        raw = load_state_dict(str(path), use_ema=True, device="cpu", weights_only=True)
    except Exception as exc:  # torch.load / safetensors raise many types for bad files
        raise CheckpointError(f"{path}: cannot read weights ({type(exc).__name__}: {exc})") from exc
    if isinstance(raw, dict) and isinstance(raw.get("model_state_dict"), dict):
        raw = raw["model_state_dict"]
    state = {k: v for k, v in raw.items() if isinstance(k, str) and isinstance(v, Tensor)}
    if not state:
        raise CheckpointError(f"{path}: no tensors found; not a state dict")
    for prefix in WRAPPER_PREFIXES:
        if all(k.startswith(prefix) for k in state):
            state = {k.removeprefix(prefix): v for k, v in state.items()}
    return state


def load_pretrained_backbone(
    backbone: nn.Module,
    path: str | Path | Mapping[str, Tensor],
    *,
    input_std: float | None = None,
    strict: bool = False,
) -> LoadReport:
    """Load a local ImageNet-style state dict into ``backbone`` (logged).

    A 3-channel stem becomes a 1-channel one as timm does (``adapt_input_conv`` sums the
    channels: a grey image is R = G = B). When the weights' input standard deviation is known
    (``input_std``, for inputs centred at 0.5 like pneumoloc's), the stem is also multiplied by
    ``INTENSITY_STD / input_std``, so a grey X-ray in pneumoloc's intensity convention gives the
    stem the activations the weights were trained on.

    Args:
        backbone: The 1-channel feature extractor (a timm model without classifier, or
            smallcamnet's ``nn.Sequential``).
        path: The weights file, or an already converted state dict.
        input_std: Per-channel input std the weights expect (None: leave the stem's scale).
        strict: Every backbone tensor must be loaded (else :class:`CheckpointError`).

    Returns:
        What was loaded, adapted and skipped.

    Raises:
        CheckpointError: The file cannot be read, or fewer than half of the backbone's
            tensors match it by name and shape (it is another architecture), or with
            ``strict`` any tensor is missing or mismatched.
    """
    from timm.models import adapt_input_conv  # lazy: timm is slow to import

    from pneumoloc.io.preprocess import INTENSITY_STD

    state = dict(path) if isinstance(path, Mapping) else read_state_dict(path)
    path = "converted weights" if isinstance(path, Mapping) else path
    target = backbone.state_dict()
    report = LoadReport()
    to_load: dict[str, Tensor] = {}
    for key, value in state.items():
        if key.startswith(CLASSIFIER_PREFIXES) and key not in target:
            report.dropped.append(key)
            continue
        if key not in target:
            report.unexpected.append(key)
            continue
        want = target[key]
        if value.shape == want.shape:
            to_load[key] = value
        elif (
            value.ndim == 4
            and want.ndim == 4
            and value.shape[1] == 3
            and want.shape[1] == 1
            and value.shape[0] == want.shape[0]
            and value.shape[2:] == want.shape[2:]
        ):
            stem = adapt_input_conv(1, value)
            to_load[key] = stem * (INTENSITY_STD / input_std) if input_std else stem
            report.adapted.append(key)
        else:
            report.mismatched.append(key)
            continue
        report.loaded.append(key)
    report.missing = [k for k in target if k not in to_load]

    if len(to_load) < MIN_MATCHED_FRACTION * len(target):
        raise CheckpointError(
            f"{path}: only {len(to_load)} of the backbone's {len(target)} tensors match this "
            f"file by name and shape; it is probably another architecture "
            f"(e.g. unexpected {report.unexpected[:3]}, mismatched {report.mismatched[:3]}, "
            f"missing {report.missing[:3]})"
        )
    if strict and (report.missing or report.mismatched):
        raise CheckpointError(
            f"{path}: {len(report.missing)} backbone tensors missing and "
            f"{len(report.mismatched)} mismatched (e.g. {(report.missing + report.mismatched)[:3]})"
        )
    with torch.no_grad():
        backbone.load_state_dict(to_load, strict=False)
    logger.info(
        "%s: loaded %d/%d backbone tensors (stem adapted to 1 channel: %s; classifier dropped: %d)",
        path,
        len(report.loaded),
        len(target),
        report.adapted or "none",
        len(report.dropped),
    )
    for kind in ("missing", "unexpected", "mismatched"):
        keys = getattr(report, kind)
        if keys:
            logger.warning("%s: %d %s keys: %s", path, len(keys), kind, ", ".join(keys))
    return report
