"""Weakly supervised training of a pneumonia classifier from image-level labels.

A plain loop that reads top to bottom: AdamW with warm-up and cosine decay, BCE with a
positive-class weight (or focal loss), mixed precision where the device supports it,
channels-last, batched augmentations on the device, validation each epoch (loss, AUROC, AUPRC,
accuracy), best checkpoint and early stopping on validation AUROC, the Youden threshold stored.
``torchrun`` runs the same loop under DDP with a DistributedSampler.

The steps live in :mod:`pneumoloc.training` (:mod:`~pneumoloc.training.state`,
:mod:`~pneumoloc.training.loop`, :mod:`~pneumoloc.training.validation`,
:mod:`~pneumoloc.training.checkpointing`); this command opens the data, writes the run folder
(config, metrics, checkpoints, TensorBoard) and runs the epochs.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pneumoloc._runtime import resolve_device
from pneumoloc.data.cache import Cache, resolve_cache
from pneumoloc.data.datasets import ImageLabelDataset, training_dataset
from pneumoloc.data.records import LABEL_NAMES
from pneumoloc.errors import ConfigError, DataError
from pneumoloc.models.checkpoint import save_checkpoint
from pneumoloc.training.checkpointing import (
    checkpoint_payload,
    data_summary,
    restore_training_state,
    rng_states,
    training_snapshot,
)
from pneumoloc.training.config import TrainConfig, save_train_config
from pneumoloc.training.distributed import DistContext, init_distributed, shutdown_distributed
from pneumoloc.training.loop import (
    StepCallback,
    TrainBatches,
    bce_or_focal,
    data_fits_on_device,
    plan_batches,
    train_epoch,
)
from pneumoloc.training.state import ResumePoint, TrainState, build_train_state, lr_factor
from pneumoloc.training.validation import (
    monitored_value,
    predict_probabilities,
    validate,
    validation_metrics,
)

__all__ = [
    "StepCallback",
    "TrainResult",
    "bce_or_focal",
    "lr_factor",
    "predict_probabilities",
    "train",
    "validation_metrics",
]

logger = logging.getLogger(__name__)


@dataclass
class TrainResult:
    """What a finished run produced."""

    run_dir: Path
    best_checkpoint: Path
    best_epoch: int
    best_metrics: dict[str, Any]
    history: list[dict[str, Any]]


@dataclass
class TrainData:
    """The opened cache, its training and validation splits, and what the loss needs of them."""

    cache: Cache
    train_set: ImageLabelDataset
    val_set: ImageLabelDataset
    pos_weight: float

    @property
    def summary(self) -> dict[str, Any]:
        """The checkpoints' ``data``: which data the model was trained on."""
        return data_summary(self.cache, len(self.train_set), len(self.val_set))


@dataclass(frozen=True)
class RunFiles:
    """Where a run writes: its folder, TensorBoard writer (rank 0 only) and checkpoints."""

    run_dir: Path
    writer: Any = None

    @property
    def last(self) -> Path:
        """The resumable checkpoint of the latest epoch (or interruption)."""
        return self.run_dir / "last.pt"

    @property
    def best(self) -> Path:
        """The checkpoint of the best validation epoch."""
        return self.run_dir / "best.pt"


def train(
    config: TrainConfig,
    *,
    step_callback: StepCallback | None = None,
    resume: str | Path | None = None,
    cache: Cache | None = None,
) -> TrainResult:
    """Train a classifier as ``config`` says, resuming from a checkpoint if asked.

    Args:
        config: The resolved configuration.
        step_callback: Called after every optimiser step (tests use it to interrupt a run).
        resume: A checkpoint written by an earlier, interrupted run of the same config.
        cache: An already opened cache (otherwise ``config.data`` is opened or prepared).

    Raises:
        DataError: Unusable data (empty or single-class training split, wrong image size).
        CheckpointError: A resume checkpoint that is missing, corrupt or from another model.
    """
    from pneumoloc.models import build_model

    config.validate()
    ctx = init_distributed(config.device)
    try:
        return _train(config, ctx, build_model, step_callback, resume, cache)
    finally:
        shutdown_distributed(ctx)


def _train(
    config: TrainConfig,
    ctx: DistContext,
    build_model: Callable[..., torch.nn.Module],
    step_callback: StepCallback | None,
    resume: str | Path | None,
    cache: Cache | None,
) -> TrainResult:
    device = resolve_device(config.device, ctx.local_rank)
    data = _open_data(config, ctx, cache)
    batches = plan_batches(config, ctx, data.train_set)
    state = build_train_state(config, ctx, device, build_model, batches.steps_per_epoch)
    # Whole training set on the GPU as uint8 when it fits: batches are gathered on the device.
    if data_fits_on_device(config, device, len(data.train_set)):
        batches.load_onto(device)
    if resume is not None:
        restore_training_state(state, resume)
        logger.info(
            "resumed from %s at epoch %d step %d", resume, state.start_epoch, state.start_step
        )
    files = RunFiles(Path(config.out), _open_writer(config, ctx))
    state.resume_point = ResumePoint(state.start_epoch, state.start_step, rng_states(device, None))
    state.last_val = state.history[-1]["val"] if state.history else {}
    try:
        _run_epochs(config, ctx, state, data, batches, files, step_callback)
    except KeyboardInterrupt:
        if ctx.is_main:
            _save_interrupted(config, state, data, batches, files)
        raise
    finally:
        if files.writer is not None:
            files.writer.close()
    return _result(state, files)


def _open_data(config: TrainConfig, ctx: DistContext, cache: Cache | None) -> TrainData:
    """Open (rank 0 prepares if needed) the cache, check it, and start the run folder."""
    if cache is None:
        if ctx.is_main:
            cache = resolve_cache(
                config.data,
                size=config.image_size,
                split_seed=config.split_seed,
                progress=config.progress,
            )
        ctx.barrier()
        if cache is None:
            cache = resolve_cache(config.data, size=config.image_size)
    train_set = training_dataset(cache, "train")
    val_set = training_dataset(cache, "val")
    _check_training_data(cache, train_set, config)
    if ctx.is_main:
        run_dir = Path(config.out)
        run_dir.mkdir(parents=True, exist_ok=True)
        save_train_config(config, run_dir / "config.yaml")
    n_pos = float(train_set.labels.sum())
    pos_weight = (
        (len(train_set) - n_pos) / n_pos
        if config.pos_weight == "auto"
        else float(config.pos_weight)
    )
    return TrainData(cache, train_set, val_set, pos_weight)


def _check_training_data(cache: Cache, train: ImageLabelDataset, config: TrainConfig) -> None:
    if cache.size != config.image_size:
        raise DataError(
            f"{cache.root}: cache images are {cache.size} px but the model is trained at "
            f"{config.image_size} px; prepare a cache with --size {config.image_size}"
        )
    if len(train) == 0:
        raise DataError(f"{cache.root}: the training split is empty")
    present = set(np.unique(train.labels).astype(int).tolist())
    if present != {0, 1}:
        missing = LABEL_NAMES[1 - next(iter(present))]
        raise DataError(
            f"{cache.root}: the training split has a single class (no {missing!r} images); "
            "a classifier needs both"
        )


def _open_writer(config: TrainConfig, ctx: DistContext) -> Any:
    """A TensorBoard writer on rank 0 when asked for, else None."""
    if not (config.tensorboard and ctx.is_main):
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise ConfigError(
            "--tensorboard needs the tensorboard package: pip install tensorboard"
        ) from None
    return SummaryWriter(str(Path(config.out) / "tensorboard"))


def _run_epochs(
    config: TrainConfig,
    ctx: DistContext,
    state: TrainState,
    data: TrainData,
    batches: TrainBatches,
    files: RunFiles,
    step_callback: StepCallback | None,
) -> None:
    """Train, validate, log and checkpoint each epoch until the last one or early stopping."""
    for epoch in range(state.start_epoch, config.epochs):
        stats = train_epoch(
            state,
            batches,
            config,
            ctx,
            epoch,
            pos_weight=data.pos_weight,
            step_callback=step_callback,
        )
        # Validation: every rank scores its share, rank 0 sees them all.
        state.last_val = validate(
            state,
            data.val_set,
            ctx,
            pos_weight=data.pos_weight,
            channels_last=config.channels_last,
        )
        improved = state.update_best(monitored_value(state.last_val), epoch)
        record = {
            "epoch": epoch + 1,
            "train_loss": stats.train_loss,
            "lr": state.scheduler.get_last_lr()[0],
            "train_images_per_s": stats.images_per_s(ctx.world_size),
            "val": state.last_val,
            "best": improved,
        }
        state.history.append(record)
        if ctx.is_main:
            _log_epoch(record, files.run_dir, files.writer)
            _save_epoch_checkpoints(config, state, data, files, epoch, improved)
        ctx.barrier()
        if state.stale >= config.patience:
            logger.info("early stop: validation AUROC has not improved for %d epochs", state.stale)
            break


def _save_epoch_checkpoints(
    config: TrainConfig,
    state: TrainState,
    data: TrainData,
    files: RunFiles,
    epoch: int,
    improved: bool,
) -> None:
    """best.pt when the epoch improved; last.pt (resumable at the next epoch) always."""
    val = state.last_val
    threshold = float(val["threshold"])
    if improved:
        best = checkpoint_payload(
            state, config, data.summary, val, threshold=threshold, epoch=epoch + 1
        )
        save_checkpoint(files.best, best)
    snapshot = training_snapshot(state, epoch + 1, 0, rng_states(state.device, None))
    last = checkpoint_payload(
        state,
        config,
        data.summary,
        val,
        threshold=threshold,
        epoch=epoch + 1,
        training_state=snapshot,
    )
    save_checkpoint(files.last, last)


def _save_interrupted(
    config: TrainConfig, state: TrainState, data: TrainData, batches: TrainBatches, files: RunFiles
) -> None:
    """last.pt resumable at the last completed step (rank 0, on KeyboardInterrupt)."""
    point = state.resume_point
    assert point is not None  # set before the first epoch starts
    if point.step_in_epoch >= batches.steps_per_epoch:
        # interrupted after an epoch's last step, before its checkpoint
        logger.warning("interrupted during validation: resuming repeats that epoch's validation")
    snapshot = training_snapshot(state, point.epoch, point.step_in_epoch, point.rngs)
    payload = checkpoint_payload(
        state,
        config,
        data.summary,
        state.last_val,
        threshold=float(state.last_val.get("threshold", 0.5)),
        epoch=point.epoch,
        training_state=snapshot,
    )
    save_checkpoint(files.last, payload)
    logger.warning(
        "interrupted: resumable checkpoint saved to %s (continue with --resume)", files.last
    )


def _result(state: TrainState, files: RunFiles) -> TrainResult:
    history, best_epoch = state.history, state.best_epoch
    best = history[best_epoch]["val"] if 0 <= best_epoch < len(history) else {}
    return TrainResult(
        run_dir=files.run_dir,
        best_checkpoint=files.best,
        best_epoch=best_epoch + 1,
        best_metrics=best,
        history=history,
    )


def _log_epoch(record: dict[str, Any], run_dir: Path, writer: Any) -> None:
    val = record["val"]
    auroc = "n/a" if val["auroc"] is None else f"{val['auroc']:.4f}"
    logger.info(
        "epoch %d: train loss %.4f | val loss %s AUROC %s accuracy %s%s",
        record["epoch"],
        record["train_loss"],
        "n/a" if val["loss"] is None else f"{val['loss']:.4f}",
        auroc,
        "n/a" if val["accuracy"] is None else f"{val['accuracy']:.3f}",
        " (best)" if record["best"] else "",
    )
    with (run_dir / "metrics.jsonl").open("a") as fh:
        fh.write(json.dumps(record) + "\n")
    if writer is not None:
        writer.add_scalar("train/loss", record["train_loss"], record["epoch"])
        for key in ("loss", "auroc", "auprc", "accuracy"):
            if val.get(key) is not None:
                writer.add_scalar(f"val/{key}", val[key], record["epoch"])
