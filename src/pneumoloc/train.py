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
from pneumoloc.data.datasets import ImageLabelDataset, SourcesDataset, training_dataset
from pneumoloc.data.records import LABEL_NAMES
from pneumoloc.errors import ConfigError, DataError
from pneumoloc.models.checkpoint import save_checkpoint
from pneumoloc.training.calibration import calibrate_payload
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
from pneumoloc.training.pseudo import check_disjoint, pseudo_label
from pneumoloc.training.sources import (
    TrainSources,
    balanced_weights,
    build_sources,
    validate_sources,
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
    """The opened cache, its training and validation splits, and what the loss needs of them.

    With more than one source (``extra_data``, or pseudo-labelled ``unlabelled`` images),
    ``sources`` holds them all and ``train_set`` is their :class:`SourcesDataset`; ``cache`` and
    ``val_set`` are the primary source's.
    """

    cache: Cache
    train_set: ImageLabelDataset | SourcesDataset
    val_set: ImageLabelDataset
    pos_weight: float
    sources: TrainSources | None = None

    @property
    def summary(self) -> dict[str, Any]:
        """The checkpoints' ``data``: which data the model was trained on."""
        out = data_summary(self.cache, len(self.train_set), len(self.val_set))
        if self.sources is not None:
            out["sources"] = self.sources.summaries
            out["n_val"] = sum(len(v) for v in self.sources.val.values())
        return out

    @property
    def per_source_validation(self) -> bool:
        """Whether validation scores several labelled sources separately."""
        return self.sources is not None and len(self.sources.val) > 1


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


RUN_OUTPUTS = (
    "best.pt",
    "last.pt",
    "best.pt.tmp",
    "last.pt.tmp",
    "metrics.jsonl",
    "config.yaml",
    "tensorboard",
)
"""What a run writes into its folder (``--overwrite`` removes exactly these first)."""


def train(
    config: TrainConfig,
    *,
    step_callback: StepCallback | None = None,
    resume: str | Path | None = None,
    cache: Cache | None = None,
    overwrite: bool = False,
) -> TrainResult:
    """Train a classifier as ``config`` says, resuming from a checkpoint if asked.

    A fresh run refuses a run folder (``config.out``) that is not empty: it would replace
    ``best.pt`` and ``last.pt`` and append to ``metrics.jsonl``. Give ``resume`` to continue
    the run there, or ``overwrite=True`` to start again (the files of :data:`RUN_OUTPUTS` are
    removed first; anything else in the folder is left alone).

    Args:
        config: The resolved configuration.
        step_callback: Called after every optimiser step (tests use it to interrupt a run).
        resume: A checkpoint written by an earlier, interrupted run of the same config.
        cache: An already opened cache (otherwise ``config.data`` is opened or prepared).
        overwrite: Start a fresh run in a run folder that holds an earlier one.

    Raises:
        ConfigError: A non-empty run folder without ``resume`` or ``overwrite``, or both.
        DataError: Unusable data (empty or single-class training split, wrong image size).
        CheckpointError: A resume checkpoint that is missing, corrupt or from another model.
    """
    from pneumoloc.models import build_model

    config.validate()
    ctx = init_distributed(config.device)
    try:
        # Every rank checks before any rank writes (the first write follows a barrier).
        _claim_run_folder(Path(config.out), resume=resume, overwrite=overwrite, ctx=ctx)
        return _train(config, ctx, build_model, step_callback, resume, cache)
    finally:
        shutdown_distributed(ctx)


def _claim_run_folder(
    run_dir: Path, *, resume: str | Path | None, overwrite: bool, ctx: DistContext
) -> None:
    """Refuse a non-empty run folder for a fresh run; with ``overwrite``, clear its outputs."""
    if resume is not None and overwrite:
        raise ConfigError("--resume and --overwrite exclude each other")
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"{run_dir}: --out must be a folder, and this is a file")
    if resume is not None or not run_dir.is_dir():
        return
    present = sorted(p.name for p in run_dir.iterdir())
    if not present:
        return
    if not overwrite:
        shown = ", ".join(present[:4]) + (", ..." if len(present) > 4 else "")
        raise ConfigError(
            f"{run_dir}: the run folder is not empty ({shown}); a fresh run would replace its "
            "checkpoints and mix its metrics.jsonl with another run's. Continue that run with "
            "--resume, start again there with --overwrite, or choose another --out"
        )
    if ctx.is_main:
        import shutil

        for name in RUN_OUTPUTS:
            path = run_dir / name
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink(missing_ok=True)
        logger.info("--overwrite: removed the earlier run's outputs from %s", run_dir)


def _train(
    config: TrainConfig,
    ctx: DistContext,
    build_model: Callable[..., torch.nn.Module],
    step_callback: StepCallback | None,
    resume: str | Path | None,
    cache: Cache | None,
) -> TrainResult:
    device = resolve_device(config.device, ctx.local_rank)
    data = _open_data(config, ctx, cache, device)
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
        if config.calibrate and ctx.is_main and files.best.is_file():
            _calibrate_best(config, data, files.best, device)
    except KeyboardInterrupt:
        if ctx.is_main:
            _save_interrupted(config, state, data, batches, files)
        raise
    finally:
        if files.writer is not None:
            files.writer.close()
    return _result(state, files)


def _open_cache(
    path: str, config: TrainConfig, ctx: DistContext, *, unlabelled: bool = False
) -> Cache:
    """Open a cache, or prepare it (rank 0 only; the others wait, then open it)."""
    cache = None
    if ctx.is_main:
        cache = resolve_cache(
            path,
            size=config.image_size,
            split_seed=config.split_seed,
            progress=config.progress,
            unlabelled=unlabelled,
        )
    ctx.barrier()
    if cache is None:
        cache = resolve_cache(path, size=config.image_size, unlabelled=unlabelled)
    return cache


def _open_data(
    config: TrainConfig, ctx: DistContext, cache: Cache | None, device: torch.device
) -> TrainData:
    """Open (rank 0 prepares if needed) the caches, check them, and start the run folder."""
    if cache is None:
        cache = _open_cache(config.data, config, ctx)
    train_set = training_dataset(cache, "train")
    val_set = training_dataset(cache, "val")
    _check_training_data(cache, train_set, config)
    if ctx.is_main:
        run_dir = Path(config.out)
        run_dir.mkdir(parents=True, exist_ok=True)
        save_train_config(config, run_dir / "config.yaml")
    if config.extra_data or config.unlabelled:
        sources = _open_sources(config, ctx, cache, device)
        positive = sources.positive_fraction()
        pos_weight = (
            (1 - positive) / positive if config.pos_weight == "auto" else float(config.pos_weight)
        )
        return TrainData(cache, sources.train, val_set, pos_weight, sources)
    n_pos = float(train_set.labels.sum())
    pos_weight = (
        (len(train_set) - n_pos) / n_pos
        if config.pos_weight == "auto"
        else float(config.pos_weight)
    )
    return TrainData(cache, train_set, val_set, pos_weight)


def _open_sources(
    config: TrainConfig, ctx: DistContext, primary: Cache, device: torch.device
) -> TrainSources:
    """The extra labelled caches and the pseudo-labelled unlabelled cache, as sources."""
    caches = [primary]
    for path in config.extra_data:
        extra = _open_cache(path, config, ctx)
        _check_training_data(extra, training_dataset(extra, "train"), config)
        caches.append(extra)
    pseudo = None
    if config.unlabelled is not None and config.teacher is not None:
        unlabelled = _open_cache(config.unlabelled, config, ctx, unlabelled=True)
        if unlabelled.manifest.get("kind") != "unlabelled":
            raise DataError(
                f"{unlabelled.root}: a labelled cache was given as unlabelled images; give it "
                "as a source (--data A B) instead"
            )
        check_disjoint(unlabelled, caches)
        labels = pseudo_label(
            config.teacher, unlabelled, fraction=config.pseudo_fraction, device=str(device)
        )
        pseudo = (unlabelled, labels)
    sources = build_sources(caches, config.source_weights, pseudo)
    logger.info(
        "training sources %s, %d items per epoch",
        sources.train.sizes(),
        config.samples_per_epoch or len(sources.train.parts) * min(sources.train.sizes().values()),
    )
    return sources


def _check_training_data(cache: Cache, train: ImageLabelDataset, config: TrainConfig) -> None:
    if cache.manifest.get("kind") == "unlabelled":
        raise DataError(
            f"{cache.root}: an unlabelled cache cannot be a labelled source; pass it with "
            "--unlabelled (and a --teacher)"
        )
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
        if data.per_source_validation and data.sources is not None:
            state.last_val = validate_sources(
                state,
                data.sources.val,
                ctx,
                pos_weight=data.pos_weight,
                channels_last=config.channels_last,
            )
        else:
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
        if stats.partial:
            record["train_loss_partial"] = True  # the steps before a restart are unknown
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
    snapshot = training_snapshot(
        state,
        point.epoch,
        point.step_in_epoch,
        point.rngs,
        epoch_seen=point.seen,
        epoch_loss_sum=point.loss_sum,
    )
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


def _calibrate_best(config: TrainConfig, data: TrainData, path: Path, device: torch.device) -> None:
    """Fit ``best.pt``'s temperature on the validation split(s); thresholds mapped, decisions
    unchanged (see ``pneumoloc calibrate``)."""
    from pneumoloc.models.checkpoint import load_checkpoint, model_from_checkpoint

    vals = data.sources.val if data.per_source_validation and data.sources else {"": data.val_set}
    vals = {k: v for k, v in vals.items() if len(v)}
    if not vals:
        return
    payload = load_checkpoint(path)
    model, _ = model_from_checkpoint(payload, device=device)
    probs = [predict_probabilities(model, v, device=device) for v in vals.values()]
    labels = [v.labels for v in vals.values()]
    try:
        calibrated = calibrate_payload(
            payload,
            np.concatenate(probs),
            np.concatenate(labels),
            split="val",
            fingerprint=data.cache.fingerprint,
            weights=balanced_weights(labels),
        )
    except ConfigError as exc:
        logger.warning("%s: not calibrated: %s", path, exc)
        return
    save_checkpoint(path, calibrated)
    info = calibrated["calibration"]
    logger.info(
        "calibrated %s: temperature %.3f, validation ECE %.4f -> %.4f",
        path,
        calibrated["temperature"],
        info["ece_before"],
        info["ece_after"],
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
