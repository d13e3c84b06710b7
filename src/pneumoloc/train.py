"""Weakly supervised training of a pneumonia classifier from image-level labels.

A plain loop that reads top to bottom: AdamW with warm-up and cosine decay, BCE with a
positive-class weight (or focal loss), mixed precision where the device supports it,
channels-last, batched augmentations on the device, validation each epoch (loss, AUROC, AUPRC,
accuracy), best checkpoint and early stopping on validation AUROC, the Youden threshold stored.
``torchrun`` runs the same loop under DDP with a DistributedSampler.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DistributedSampler

from pneumoloc._runtime import resolve_device
from pneumoloc.data.cache import Cache, resolve_cache
from pneumoloc.data.datasets import ImageLabelDataset, training_dataset
from pneumoloc.data.records import LABEL_NAMES
from pneumoloc.errors import CheckpointError, ConfigError, DataError
from pneumoloc.inference.recipe import DEFAULT_INFERENCE_RECIPE
from pneumoloc.io.preprocess import INTENSITY_CONVENTION, standardise, to_model_input
from pneumoloc.models.checkpoint import load_checkpoint, save_checkpoint
from pneumoloc.training.augment import augment_batch
from pneumoloc.training.config import TrainConfig, save_train_config
from pneumoloc.training.distributed import DistContext, init_distributed, shutdown_distributed

logger = logging.getLogger(__name__)

StepCallback = Callable[[int, int], None]  # (epoch, step_in_epoch) after each optimiser step


@dataclass
class TrainResult:
    """What a finished run produced."""

    run_dir: Path
    best_checkpoint: Path
    best_epoch: int
    best_metrics: dict[str, Any]
    history: list[dict[str, Any]]


def _amp_dtype(setting: str, device: torch.device) -> torch.dtype | None:
    if setting == "off" or device.type != "cuda":
        return None
    if setting == "fp16":
        return torch.float16
    if setting == "bf16" or torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float16


def bce_or_focal(
    logits: torch.Tensor, targets: torch.Tensor, *, pos_weight: float, loss: str, gamma: float
) -> torch.Tensor:
    """Mean BCE-with-logits with a positive-class weight, or the focal loss (Lin et al. 2017)."""
    weight = torch.tensor(pos_weight, device=logits.device, dtype=torch.float32)
    bce = F.binary_cross_entropy_with_logits(
        logits.float(), targets, pos_weight=weight, reduction="none"
    )
    if loss == "focal":
        p = torch.sigmoid(logits.float())
        p_t = p * targets + (1 - p) * (1 - targets)
        bce = bce * (1 - p_t) ** gamma
    return bce.mean()


def lr_factor(step: int, *, warmup_steps: int, total_steps: int) -> float:
    """Linear warm-up then cosine decay to 1% of the base rate."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


@torch.no_grad()
def predict_probabilities(
    model: torch.nn.Module,
    dataset: ImageLabelDataset,
    *,
    device: torch.device,
    batch_size: int = 64,
    amp_dtype: torch.dtype | None = None,
    channels_last: bool = False,
) -> np.ndarray:
    """Probabilities for every item of a dataset, in order. Restores the model's mode."""
    was_training = model.training
    model.eval()
    probs = []
    for start in range(0, len(dataset), batch_size):
        images, _ = dataset.gather(np.arange(start, min(start + batch_size, len(dataset))))
        x = to_model_input(images.to(device, non_blocking=True))
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(
            device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None
        ):
            logits = model(x)
        probs.append(torch.sigmoid(logits.float()).cpu())
    model.train(was_training)
    return torch.cat(probs).numpy() if probs else np.zeros(0, np.float32)


def validation_metrics(labels: np.ndarray, probs: np.ndarray, pos_weight: float) -> dict[str, Any]:
    """Loss, AUROC, AUPRC, accuracy at 0.5 and at the Youden threshold (chosen here), and the
    F1-optimal threshold that gates boxes (``box_threshold``)."""
    from sklearn.metrics import average_precision_score, roc_auc_score

    from pneumoloc.metrics.classification import f1_threshold, youden_threshold

    p = np.clip(probs.astype(np.float64), 1e-7, 1 - 1e-7)
    y = labels.astype(np.float64)
    loss = float(np.mean(-(pos_weight * y * np.log(p) + (1 - y) * np.log(1 - p))))
    two_classes = len(np.unique(y)) == 2
    threshold = float(youden_threshold(y, p)) if two_classes else 0.5
    return {
        "loss": loss,
        "auroc": float(roc_auc_score(y, p)) if two_classes else None,
        "auprc": float(average_precision_score(y, p)) if two_classes else None,
        "accuracy": float(np.mean((p >= 0.5) == y)),
        "threshold": threshold,
        "accuracy_at_threshold": float(np.mean((p >= threshold) == y)),
        "box_threshold": float(f1_threshold(y, p)) if two_classes else threshold,
    }


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


def _cam_layer_name(model: torch.nn.Module) -> str:
    target = getattr(model, "cam_target_layer", None)
    for name, module in model.named_modules():
        if module is target:
            return name
    return ""


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
    run_dir = Path(config.out)
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
        run_dir.mkdir(parents=True, exist_ok=True)
        save_train_config(config, run_dir / "config.yaml")

    n_pos = float(train_set.labels.sum())
    pos_weight = (
        (len(train_set) - n_pos) / n_pos
        if config.pos_weight == "auto"
        else float(config.pos_weight)
    )
    amp_dtype = _amp_dtype(config.amp, device)

    # Weight initialisation (timm, torch.nn.init) draws from the global generator: seed it so a
    # run is a function of its config. Everything else random uses explicit generators.
    torch.manual_seed(config.seed)
    model = build_model(
        config.model,
        pretrained=config.pretrained,
        drop_rate=config.drop_rate,
        output_stride=config.output_stride,
        pool=config.pool,
    ).to(device)
    spec = dict(model.spec)  # type: ignore[arg-type]
    cam_layer = _cam_layer_name(model)
    if config.channels_last:
        model = model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    train_model: torch.nn.Module = model
    if ctx.enabled:
        train_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    step_model = torch.compile(train_model) if config.compile else train_model

    sampler: DistributedSampler[Any] = DistributedSampler(
        train_set,
        num_replicas=ctx.world_size,
        rank=ctx.rank,
        shuffle=True,
        seed=config.seed,
        drop_last=False,
    )
    steps_per_epoch = math.ceil(len(sampler) / config.batch_size)
    if config.max_steps_per_epoch:
        steps_per_epoch = min(steps_per_epoch, config.max_steps_per_epoch)
    total_steps = steps_per_epoch * config.epochs
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=config.lr, weight_decay=config.weight_decay
    )
    warmup = int(config.warmup_epochs * steps_per_epoch)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, warmup_steps=warmup, total_steps=total_steps)
    )
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)

    # Whole training set on the GPU as uint8 when it fits: batches are gathered on the device.
    on_device = config.data_on_device == "yes" or (
        config.data_on_device == "auto"
        and device.type == "cuda"
        and len(train_set) * config.image_size**2
        < 0.25 * torch.cuda.get_device_properties(device).total_memory
    )
    train_images = train_labels = None
    if on_device:
        images, labels = train_set.gather(np.arange(len(train_set)))
        train_images, train_labels = images.to(device), labels.to(device)

    start_epoch, start_step = 0, 0
    best_metric, best_epoch, stale = -math.inf, -1, 0
    history: list[dict[str, Any]] = []
    aug_state: torch.Tensor | None = None
    if resume is not None:
        state = load_checkpoint(resume, map_location="cpu")
        if state.get("model") != spec:
            raise CheckpointError(
                f"{resume}: checkpoint is for model {state.get('model')}, not {spec}"
            )
        if "training_state" not in state:
            raise CheckpointError(f"{resume}: not a resumable checkpoint (no training state)")
        ts = state["training_state"]
        model.load_state_dict(state["state_dict"])
        optimizer.load_state_dict(ts["optimizer"])
        scheduler.load_state_dict(ts["scheduler"])
        scaler.load_state_dict(ts["scaler"])
        torch.set_rng_state(ts["torch_rng"])
        if device.type == "cuda" and ts.get("cuda_rng") is not None:
            torch.cuda.set_rng_state(ts["cuda_rng"], device)
        start_epoch, start_step = int(ts["epoch"]), int(ts["step_in_epoch"])
        best_metric, best_epoch, stale = (
            float(ts["best_metric"]),
            int(ts["best_epoch"]),
            int(ts["stale"]),
        )
        history = list(ts["history"])
        aug_state = ts.get("aug_rng")
        logger.info("resumed from %s at epoch %d step %d", resume, start_epoch, start_step)

    writer = None
    if config.tensorboard and ctx.is_main:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise ConfigError(
                "--tensorboard needs the tensorboard package: pip install tensorboard"
            ) from None
        writer = SummaryWriter(str(run_dir / "tensorboard"))

    def rng_states(aug: torch.Generator | None) -> dict[str, Any]:
        return {
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
            "aug_rng": aug.get_state() if aug is not None else None,
        }

    def snapshot(epoch: int, step: int, rngs: dict[str, Any]) -> dict[str, Any]:
        return {
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict(),
            **rngs,
            "epoch": epoch,
            "step_in_epoch": step,
            "best_metric": best_metric,
            "best_epoch": best_epoch,
            "stale": stale,
            "history": history,
        }

    def payload(
        metrics: dict[str, Any], threshold: float, epoch: int, training_state: dict | None
    ) -> dict:
        out = {
            "model": spec,
            "state_dict": model.state_dict(),
            "image_size": config.image_size,
            "intensity": INTENSITY_CONVENTION,
            "label_names": list(LABEL_NAMES),
            "threshold": threshold,
            "box_threshold": metrics.get("box_threshold", threshold),
            "cam_layer": cam_layer,
            "config": config.to_dict(),
            "data": {
                "fingerprint": cache.fingerprint,
                "source": cache.manifest.get("source"),
                "kind": cache.manifest.get("kind"),
                "n_train": len(train_set),
                "n_val": len(val_set),
            },
            "metrics": {"val": metrics},
            "epoch": epoch,
            **DEFAULT_INFERENCE_RECIPE.to_meta(),
        }
        if training_state is not None:
            out["training_state"] = training_state
        return out

    from tqdm.auto import tqdm

    last_path, best_path = run_dir / "last.pt", run_dir / "best.pt"
    epoch, step = start_epoch, start_step
    aug_gen: torch.Generator | None = None
    # Where an interrupted run resumes: the last completed step and the random states after it.
    resume_point: tuple[int, int, dict[str, Any]] = (epoch, step, rng_states(None))
    last_val: dict[str, Any] = history[-1]["val"] if history else {}
    try:
        for epoch in range(start_epoch, config.epochs):
            train_model.train()
            sampler.set_epoch(epoch)
            positions = np.fromiter(iter(sampler), dtype=np.int64)
            aug_gen = torch.Generator(device=device)
            aug_gen.manual_seed(config.seed * 1_000_003 + epoch * 7919 + ctx.rank)
            first = start_step if epoch == start_epoch else 0
            if first and aug_state is not None:
                aug_gen.set_state(aug_state)
            resume_point = (epoch, first, rng_states(aug_gen))
            seen, loss_sum, started = 0, 0.0, time.perf_counter()
            bar = tqdm(
                total=steps_per_epoch,
                initial=first,
                desc=f"epoch {epoch + 1}/{config.epochs}",
                disable=not (config.progress and ctx.is_main),
                leave=False,
            )
            for step in range(first, steps_per_epoch):
                batch_pos = positions[step * config.batch_size : (step + 1) * config.batch_size]
                if train_images is not None and train_labels is not None:
                    idx = torch.from_numpy(batch_pos).to(device)
                    images, targets = train_images[idx], train_labels[idx]
                else:
                    images, targets = train_set.gather(batch_pos)
                    images = images.to(device, non_blocking=True)
                    targets = targets.to(device, non_blocking=True)
                x = standardise(augment_batch(images.float() / 255.0, config.augment, aug_gen))
                if config.channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                with torch.autocast(
                    device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None
                ):
                    logits = step_model(x)
                loss = bce_or_focal(
                    logits,
                    targets,
                    pos_weight=pos_weight,
                    loss=config.loss,
                    gamma=config.focal_gamma,
                )
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
                scheduler.step()
                resume_point = (epoch, step + 1, rng_states(aug_gen))
                loss_value = float(loss.detach())
                if not math.isfinite(loss_value):
                    raise FloatingPointError(
                        f"training loss is {loss_value} at epoch {epoch + 1} step {step}"
                    )
                seen += len(batch_pos)
                loss_sum += loss_value * len(batch_pos)
                bar.set_postfix(loss=f"{loss_value:.4f}")
                bar.update(1)
                if step_callback is not None:
                    step_callback(epoch, step)
            bar.close()
            step = steps_per_epoch
            elapsed = time.perf_counter() - started
            train_loss = loss_sum / max(seen, 1)

            # Validation: every rank scores its share, rank 0 sees them all.
            val_probs = _gather_predictions(
                model, val_set, ctx, device, amp_dtype, config.channels_last
            )
            if len(val_set):
                last_val = validation_metrics(val_set.labels, val_probs, pos_weight)
            else:
                last_val = {
                    "loss": None,
                    "auroc": None,
                    "auprc": None,
                    "accuracy": None,
                    "threshold": 0.5,
                }
            monitor = (
                last_val["auroc"] if last_val["auroc"] is not None else -(last_val["loss"] or 0.0)
            )
            improved = monitor > best_metric
            if improved:
                best_metric, best_epoch, stale = monitor, epoch, 0
            else:
                stale += 1
            record = {
                "epoch": epoch + 1,
                "train_loss": train_loss,
                "lr": scheduler.get_last_lr()[0],
                "train_images_per_s": seen * ctx.world_size / elapsed if elapsed > 0 else None,
                "val": last_val,
                "best": improved,
            }
            history.append(record)
            if ctx.is_main:
                _log_epoch(record, run_dir, writer)
                threshold = float(last_val["threshold"])
                if improved:
                    save_checkpoint(best_path, payload(last_val, threshold, epoch + 1, None))
                save_checkpoint(
                    last_path,
                    payload(
                        last_val, threshold, epoch + 1, snapshot(epoch + 1, 0, rng_states(None))
                    ),
                )
            ctx.barrier()
            if stale >= config.patience:
                logger.info("early stop: validation AUROC has not improved for %d epochs", stale)
                break
    except KeyboardInterrupt:
        if ctx.is_main:
            r_epoch, r_step, r_rngs = resume_point
            if (
                r_step >= steps_per_epoch
            ):  # interrupted after an epoch's last step, before its checkpoint
                logger.warning(
                    "interrupted during validation: resuming repeats that epoch's validation"
                )
            save_checkpoint(
                last_path,
                payload(
                    last_val,
                    float(last_val.get("threshold", 0.5)),
                    r_epoch,
                    snapshot(r_epoch, r_step, r_rngs),
                ),
            )
            logger.warning(
                "interrupted: resumable checkpoint saved to %s (continue with --resume)", last_path
            )
        raise
    finally:
        if writer is not None:
            writer.close()
    best = history[best_epoch]["val"] if 0 <= best_epoch < len(history) else {}
    return TrainResult(
        run_dir=run_dir,
        best_checkpoint=best_path,
        best_epoch=best_epoch + 1,
        best_metrics=best,
        history=history,
    )


def _gather_predictions(
    model: torch.nn.Module,
    dataset: ImageLabelDataset,
    ctx: DistContext,
    device: torch.device,
    amp_dtype: torch.dtype | None,
    channels_last: bool,
) -> np.ndarray:
    if not ctx.enabled:
        return predict_probabilities(
            model, dataset, device=device, amp_dtype=amp_dtype, channels_last=channels_last
        )
    share = np.arange(ctx.rank, len(dataset), ctx.world_size)
    sub = ImageLabelDataset(
        dataset._images, np.zeros(dataset._images.shape[0]), dataset._indices[share]
    )
    probs = predict_probabilities(
        model, sub, device=device, amp_dtype=amp_dtype, channels_last=channels_last
    )
    out = np.zeros(len(dataset), dtype=np.float32)
    for positions, values in ctx.gather_objects((share, probs)):
        out[positions] = values
    return out


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
