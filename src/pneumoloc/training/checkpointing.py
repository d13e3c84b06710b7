"""What a training checkpoint holds, and how a run resumes from one exactly.

A checkpoint is the model's weights plus everything needed to use them (see
:mod:`pneumoloc.models.checkpoint`). A resumable one (``last.pt``) also carries a
``training_state``: optimiser, schedule and scaler states, every random state, where the run
stands (epoch and step) and its history, so a resumed run continues bit for bit.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from pneumoloc.data.cache import Cache
from pneumoloc.data.records import LABEL_NAMES
from pneumoloc.errors import CheckpointError
from pneumoloc.inference.recipe import DEFAULT_INFERENCE_RECIPE
from pneumoloc.io.preprocess import INTENSITY_CONVENTION
from pneumoloc.models.checkpoint import load_checkpoint
from pneumoloc.training.config import TrainConfig

if TYPE_CHECKING:
    from pneumoloc.training.state import TrainState


def rng_states(device: torch.device, aug: torch.Generator | None) -> dict[str, Any]:
    """The global CPU (and CUDA) random states and the augmentation generator's, now."""
    return {
        "torch_rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
        "aug_rng": aug.get_state() if aug is not None else None,
    }


def training_snapshot(
    state: TrainState,
    epoch: int,
    step: int,
    rngs: dict[str, Any],
    *,
    epoch_seen: int = 0,
    epoch_loss_sum: float = 0.0,
) -> dict[str, Any]:
    """The ``training_state`` of a checkpoint that resumes at ``epoch``, ``step``; mid-epoch,
    with the images seen and the loss summed over that epoch's completed steps."""
    return {
        "epoch_seen": epoch_seen,
        "epoch_loss_sum": epoch_loss_sum,
        "optimizer": state.optimizer.state_dict(),
        "scheduler": state.scheduler.state_dict(),
        "scaler": state.scaler.state_dict(),
        **rngs,
        "epoch": epoch,
        "step_in_epoch": step,
        "best_metric": state.best_metric,
        "best_epoch": state.best_epoch,
        "stale": state.stale,
        "history": state.history,
    }


def data_summary(cache: Cache, n_train: int, n_val: int) -> dict[str, Any]:
    """Which data a model was trained on (the checkpoint's ``data``)."""
    return {
        "fingerprint": cache.fingerprint,
        "source": cache.manifest.get("source"),
        "kind": cache.manifest.get("kind"),
        "n_train": n_train,
        "n_val": n_val,
    }


def checkpoint_payload(
    state: TrainState,
    config: TrainConfig,
    data: dict[str, Any],
    metrics: dict[str, Any],
    *,
    threshold: float,
    epoch: int,
    training_state: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """A self-describing checkpoint of the model now (resumable with ``training_state``)."""
    out = {
        "model": state.spec,
        "init": state.init,
        "state_dict": state.model.state_dict(),
        "image_size": config.image_size,
        "intensity": INTENSITY_CONVENTION,
        "label_names": list(LABEL_NAMES),
        "threshold": threshold,
        "box_threshold": metrics.get("box_threshold", threshold),
        "cam_layer": state.cam_layer,
        "config": config.to_dict(),
        "data": data,
        "metrics": {"val": metrics},
        "epoch": epoch,
        **DEFAULT_INFERENCE_RECIPE.to_meta(),
    }
    if training_state is not None:
        out["training_state"] = training_state
    return out


def restore_training_state(state: TrainState, path: str | Path) -> None:
    """Continue from a resumable checkpoint: weights, optimiser, schedule, random states, progress.

    Raises:
        CheckpointError: A missing or corrupt file, one for another model, or one that cannot
            resume (no training state).
    """
    saved = load_checkpoint(path, map_location="cpu")
    if saved.get("model") != state.spec:
        raise CheckpointError(
            f"{path}: checkpoint is for model {saved.get('model')}, not {state.spec}"
        )
    if "training_state" not in saved:
        raise CheckpointError(f"{path}: not a resumable checkpoint (no training state)")
    ts = saved["training_state"]
    state.model.load_state_dict(saved["state_dict"])
    state.optimizer.load_state_dict(ts["optimizer"])
    state.scheduler.load_state_dict(ts["scheduler"])
    state.scaler.load_state_dict(ts["scaler"])
    torch.set_rng_state(ts["torch_rng"])
    if state.device.type == "cuda" and ts.get("cuda_rng") is not None:
        torch.cuda.set_rng_state(ts["cuda_rng"], state.device)
    state.start_epoch, state.start_step = int(ts["epoch"]), int(ts["step_in_epoch"])
    state.best_metric = float(ts["best_metric"])
    state.best_epoch = int(ts["best_epoch"])
    state.stale = int(ts["stale"])
    state.history = list(ts["history"])
    state.aug_state = ts.get("aug_rng")
    if state.start_step == 0:
        state.resumed_loss = (0, 0.0)
    elif "epoch_loss_sum" in ts:  # written by pneumoloc >= this change
        state.resumed_loss = (int(ts["epoch_seen"]), float(ts["epoch_loss_sum"]))
    else:
        state.resumed_loss = None
