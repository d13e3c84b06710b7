"""``pneumoloc ensemble``: several checkpoints as one model file.

The members must take the same input size and should come from the same training cache (their
validation split is then the same images, none of them seen in training). The ensemble's
probability is the mean of its members' probabilities, its heatmap the mean of their heatmaps
(each scaled to its maximum first); its decision threshold (Youden's J), box threshold (F1) and
temperature are chosen on that validation split, as ``train`` does for one model. The file is a
pneumoloc checkpoint (``members`` holds each member's weights and metadata), so ``evaluate``,
``predict``, ``submit``, ``serve`` and ``export`` take it like any checkpoint.

With ``--localiser`` the file pairs models by role instead (``member["role"]``,
:data:`pneumoloc.models.checkpoint.MEMBER_ROLES`): the probability is the mean of the
positional checkpoints' probabilities alone, the heatmap the mean of the localisers' heatmaps
alone, and the inference recipe is the first localiser's. A classifier chosen for its AUROC
then keeps its decisions exactly while a model chosen for its maps draws the boxes (the
shipped default since issue 13: docs/model_card.md).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pneumoloc.errors import ConfigError
from pneumoloc.inference.recipe import InferenceRecipe

logger = logging.getLogger(__name__)

__all__ = ["EnsembleResult", "build_ensemble"]

# Metadata of each member kept in the ensemble file (what a model card needs about it).
_MEMBER_FIELDS = (
    "model",
    "init",
    "state_dict",
    "image_size",
    "threshold",
    "box_threshold",
    "temperature",
    "calibration",
    "cam_layer",
    "config",
    "data",
    "metrics",
    "epoch",
    "intensity",
    "label_names",
    "pneumoloc_version",
)


@dataclass(frozen=True)
class EnsembleResult:
    """What :func:`build_ensemble` wrote."""

    path: Path
    n_members: int
    threshold: float
    temperature: float
    val_metrics: dict[str, Any]


def _members(
    checkpoints: list[Path], half: bool, roles: list[str] | None = None
) -> list[dict[str, Any]]:
    from pneumoloc.models.checkpoint import load_checkpoint

    members = []
    for i, path in enumerate(checkpoints):
        payload = load_checkpoint(path)
        if payload.get("members"):
            raise ConfigError(f"{path}: is already an ensemble; give its members instead")
        keep = (*_MEMBER_FIELDS, *InferenceRecipe.field_names())
        member = {k: payload[k] for k in keep if k in payload}
        if half:
            member["state_dict"] = {
                k: v.half() if v.is_floating_point() else v for k, v in member["state_dict"].items()
            }
        member["source_file"] = path.name
        member["role"] = roles[i] if roles else "both"
        members.append(member)
    sizes = {int(m["image_size"]) for m in members}
    if len(sizes) != 1:
        raise ConfigError(f"members take input sizes {sorted(sizes)}; an ensemble needs one")
    return members


def build_ensemble(
    checkpoints: list[str | Path],
    data: str | Path | list[str | Path] | None,
    out: str | Path,
    *,
    device: str = "auto",
    batch_size: int = 16,
    half: bool = False,
    localisers: list[str | Path] | None = None,
) -> EnsembleResult:
    """Write an ensemble of ``checkpoints`` with threshold and temperature chosen on the
    validation split of ``data`` (the cache the members were trained on).

    Args:
        checkpoints: Two or more checkpoint files.
        data: The training cache (or data folder) of the members, or several (the members'
            sources): then one threshold maximises the mean of the sources' Youden J and the
            temperature weights each source equally; ``metrics["val"]`` is the first source's,
            ``metrics["val"]["sources"]`` every source's.
        out: The ensemble file to write.
        device: Where to run the members for the validation pass.
        batch_size: Images per forward pass.
        half: Store the members' weights in float16 (half the size; loaded as float32).
        localisers: Checkpoints whose heatmaps alone make the ensemble's heatmap; then
            ``checkpoints`` give the probability alone (one is enough) and the recipe is the
            first localiser's. With one such classifier, its probability is the ensemble's
            unchanged, so its own threshold, box threshold, temperature and validation metrics
            are kept as they are (no validation pass; ``data`` may be None).

    Raises:
        ConfigError: Fewer than two members, different input sizes, a member that is an
            ensemble, or a cache the members were not trained on.
    """
    from pneumoloc import __version__
    from pneumoloc.data.cache import resolve_cache
    from pneumoloc.inference.recipe import DEFAULT_INFERENCE_RECIPE
    from pneumoloc.inference.torch_backend import Predictor
    from pneumoloc.metrics.classification import (
        classification_metrics,
        f1_threshold,
        youden_threshold,
    )
    from pneumoloc.models.checkpoint import models_from_checkpoint, save_checkpoint
    from pneumoloc.training.calibration import (
        calibrate_payload,
        check_same_data,
        split_probabilities,
    )
    from pneumoloc.training.sources import balanced_weights, pooled_thresholds, source_name

    paths = [Path(p) for p in checkpoints]
    heat_paths = [Path(p) for p in localisers or []]
    roles = ["probability"] * len(paths) + ["heatmap"] * len(heat_paths) if heat_paths else None
    paths += heat_paths
    if len(paths) < 2:
        raise ConfigError(f"an ensemble needs at least two checkpoints, got {len(paths)}")
    members = _members(paths, half, roles)
    first = members[0]
    recipe_from = members[len(paths) - len(heat_paths)] if heat_paths else first
    payload: dict[str, Any] = {
        "model": {
            "name": "ensemble",
            "kwargs": {},
            "members": [m["model"]["name"] for m in members],
        },
        "state_dict": {},
        "members": members,
        "image_size": int(first["image_size"]),
        "threshold": 0.5,
        "intensity": first.get("intensity"),
        "label_names": first.get("label_names", ["no pneumonia", "pneumonia"]),
        "data": first.get("data"),
        "built_by": f"pneumoloc {__version__} ensemble",
        **InferenceRecipe.from_meta(
            DEFAULT_INFERENCE_RECIPE.to_meta(), **_recipe(recipe_from)
        ).to_meta(),
    }
    if heat_paths and len(paths) - len(heat_paths) == 1:
        # One classifier: the ensemble's probability is its own, so are its decisions.
        for key in ("threshold", "box_threshold", "temperature", "calibration", "metrics"):
            if first.get(key) is not None:
                payload[key] = first[key]
        models_from_checkpoint(payload, device="cpu")  # the roles and weights load
        save_checkpoint(out, payload)
        logger.info(
            "%s: %s's decisions, heatmaps of %d localiser(s)", out, paths[0], len(heat_paths)
        )
        return EnsembleResult(
            Path(out),
            len(members),
            float(payload["threshold"]),
            float(payload.get("temperature", 1.0)),
            payload.get("metrics") or {},
        )
    if data is None:
        raise ConfigError("an ensemble's threshold is chosen on validation data: give its cache")
    models, meta = models_from_checkpoint(payload, device=device)
    predictor = Predictor(model=models[0], members=models, meta=meta, batch_size=batch_size)
    caches = [
        resolve_cache(d, size=predictor.image_size)
        for d in ([data] if isinstance(data, str | Path) else data)
    ]
    per_source = []
    for cache in caches:
        for path, member in zip(paths, members, strict=True):
            check_same_data(member, cache, str(path))
        per_source.append(split_probabilities(predictor, cache))
    all_probs = [p for p, _ in per_source]
    all_labels = [y for _, y in per_source]
    probs, labels = np.concatenate(all_probs), np.concatenate(all_labels)
    if len(caches) == 1:
        payload["threshold"] = youden_threshold(labels, probs)
        payload["box_threshold"] = f1_threshold(labels, probs)
    else:  # one threshold for several populations, each counting equally
        payload["threshold"], payload["box_threshold"] = pooled_thresholds(all_labels, all_probs)
    payload["metrics"] = {
        "val": classification_metrics(all_labels[0], all_probs[0], payload["threshold"], n_boot=0)
    }
    if len(caches) > 1:
        payload["metrics"]["val"]["sources"] = {
            source_name(c): classification_metrics(y, p, payload["threshold"], n_boot=0)
            for c, (p, y) in zip(caches, per_source, strict=True)
        }
    try:
        payload = calibrate_payload(
            payload,
            probs,
            labels,
            split="val",
            fingerprint=caches[0].fingerprint,
            weights=balanced_weights(all_labels) if len(caches) > 1 else None,
        )
    except ConfigError as exc:
        logger.warning("%s: not calibrated: %s", out, exc)
    save_checkpoint(out, payload)
    logger.info(
        "%s: %d members, val AUROC %.4f, threshold %.4f, temperature %.3f",
        out,
        len(members),
        payload["metrics"]["val"].get("auroc", float("nan")),
        payload["threshold"],
        payload.get("temperature", 1.0),
    )
    return EnsembleResult(
        Path(out),
        len(members),
        payload["threshold"],
        float(payload.get("temperature", 1.0)),
        payload["metrics"],
    )


def _recipe(member: dict[str, Any]) -> dict[str, Any]:
    """A member's stored recipe settings (the ensemble uses the first's, or the first
    localiser's)."""
    return {k: member[k] for k in InferenceRecipe.field_names() if member.get(k) is not None}
