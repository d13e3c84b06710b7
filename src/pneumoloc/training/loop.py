"""One epoch of training: the loss, where batches come from, one optimiser step, one pass.

Batches are drawn by a :class:`~torch.utils.data.DistributedSampler` (one process is a world of
one), gathered from the cache's images or from a copy of the whole training set on the device,
augmented on the device with a per-epoch generator, and stepped with mixed precision where the
device supports it. Nothing here writes files or logs: the training command does.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DistributedSampler

from pneumoloc.data.datasets import ImageLabelDataset, SourcesDataset
from pneumoloc.io.preprocess import standardise
from pneumoloc.training.anatomy_loss import outside_lung_loss
from pneumoloc.training.augment import augment_batch
from pneumoloc.training.checkpointing import rng_states
from pneumoloc.training.config import TrainConfig
from pneumoloc.training.distributed import DistContext
from pneumoloc.training.sampling import SourceBalancedSampler
from pneumoloc.training.state import ResumePoint, TrainState

StepCallback = Callable[[int, int], None]  # (epoch, step_in_epoch) after each optimiser step


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


@dataclass
class TrainBatches:
    """This rank's training batches: sampler order, and the images on the device if they fit."""

    dataset: ImageLabelDataset | SourcesDataset
    sampler: Any  # DistributedSampler, or SourceBalancedSampler for several sources
    batch_size: int
    steps_per_epoch: int
    images: torch.Tensor | None = None  # the whole training set, uint8 on the device
    labels: torch.Tensor | None = None

    def epoch_positions(self, epoch: int) -> np.ndarray:
        """Dataset positions in this rank's order for ``epoch``."""
        self.sampler.set_epoch(epoch)
        return np.fromiter(iter(self.sampler), dtype=np.int64)

    def batch(
        self, positions: np.ndarray, step: int, device: torch.device
    ) -> tuple[np.ndarray, torch.Tensor, torch.Tensor]:
        """Step ``step``'s positions, uint8 images (B, 1, H, W) and float labels, on ``device``."""
        batch_pos = positions[step * self.batch_size : (step + 1) * self.batch_size]
        if self.images is not None and self.labels is not None:
            idx = torch.from_numpy(batch_pos).to(device)
            return batch_pos, self.images[idx], self.labels[idx]
        images, targets = self.dataset.gather(batch_pos)
        images = images.to(device, non_blocking=True)
        return batch_pos, images, targets.to(device, non_blocking=True)

    def load_onto(self, device: torch.device) -> None:
        """Copy the whole training set to ``device``: batches are then gathered there."""
        images, labels = self.dataset.gather(np.arange(len(self.dataset)))
        self.images, self.labels = images.to(device), labels.to(device)


def plan_batches(
    config: TrainConfig, ctx: DistContext, dataset: ImageLabelDataset | SourcesDataset
) -> TrainBatches:
    """A shuffling sampler over this rank's share and the number of steps an epoch takes.

    Several sources are drawn with fixed shares of each epoch (``SourceBalancedSampler``).
    """
    sampler: Any
    if isinstance(dataset, SourcesDataset):
        sampler = SourceBalancedSampler(
            dataset,
            config.source_weights,
            num_samples=config.samples_per_epoch,
            num_replicas=ctx.world_size,
            rank=ctx.rank,
            seed=config.seed,
        )
    else:
        sampler = DistributedSampler(
            dataset,
            num_replicas=ctx.world_size,
            rank=ctx.rank,
            shuffle=True,
            seed=config.seed,
            drop_last=False,
        )
    steps_per_epoch = math.ceil(len(sampler) / config.batch_size)
    if config.max_steps_per_epoch:
        steps_per_epoch = min(steps_per_epoch, config.max_steps_per_epoch)
    return TrainBatches(dataset, sampler, config.batch_size, steps_per_epoch)


def data_fits_on_device(config: TrainConfig, device: torch.device, n_images: int) -> bool:
    """Whether the training set goes on the device as uint8 (asked for, or under 1/4 of it)."""
    return config.data_on_device == "yes" or (
        config.data_on_device == "auto"
        and device.type == "cuda"
        and n_images * config.image_size**2
        < 0.25 * torch.cuda.get_device_properties(device).total_memory
    )


def train_step(
    state: TrainState,
    images: torch.Tensor,
    targets: torch.Tensor,
    config: TrainConfig,
    generator: torch.Generator,
    pos_weight: float,
) -> torch.Tensor:
    """Augment, forward, loss, backward, optimiser and schedule step; the (undetached) loss."""
    augmented = augment_batch(images.float() / 255.0, config.augment, generator)
    x = standardise(augmented)
    if config.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    device, amp_dtype = state.device, state.amp_dtype
    anatomy = config.outside_lung_loss > 0
    with torch.autocast(
        device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None
    ):
        out = state.step_model(x, with_cam=True) if anatomy else state.step_model(x)
    logits, cam = out if anatomy else (out, None)
    loss = bce_or_focal(
        logits, targets, pos_weight=pos_weight, loss=config.loss, gamma=config.focal_gamma
    )
    if cam is not None:
        loss = loss + config.outside_lung_loss * outside_lung_loss(cam, augmented)
    state.optimizer.zero_grad(set_to_none=True)
    state.scaler.scale(loss).backward()
    state.scaler.step(state.optimizer)
    state.scaler.update()
    state.scheduler.step()
    return loss


def epoch_generator(
    config: TrainConfig, ctx: DistContext, state: TrainState, epoch: int, first_step: int
) -> torch.Generator:
    """The augmentation generator of an epoch on this rank (its saved state on a resumed one)."""
    generator = torch.Generator(device=state.device)
    generator.manual_seed(config.seed * 1_000_003 + epoch * 7919 + ctx.rank)
    if first_step and state.aug_state is not None:
        generator.set_state(state.aug_state)
    return generator


@dataclass(frozen=True)
class EpochStats:
    """What one epoch of training measured on this rank.

    ``seen`` and ``loss_sum`` cover every step of the epoch, those done before an interruption
    included; ``partial`` is True when a resumed epoch's earlier steps are unknown (a checkpoint
    that did not record them), so the loss covers the steps after the restart only.
    """

    seen: int
    loss_sum: float
    elapsed: float
    partial: bool = False
    timed: int | None = None  # images processed in ``elapsed`` (default: ``seen``)

    @property
    def train_loss(self) -> float:
        """Mean training loss per image."""
        return self.loss_sum / max(self.seen, 1)

    def images_per_s(self, world_size: int) -> float | None:
        """Throughput of all ranks together (None when no time was measured)."""
        timed = self.seen if self.timed is None else self.timed
        return timed * world_size / self.elapsed if self.elapsed > 0 else None


def train_epoch(
    state: TrainState,
    batches: TrainBatches,
    config: TrainConfig,
    ctx: DistContext,
    epoch: int,
    *,
    pos_weight: float,
    step_callback: StepCallback | None = None,
) -> EpochStats:
    """One pass over this rank's share, from the saved step on a resumed epoch.

    ``state.resume_point`` follows every completed step, so an interrupted run can save it.
    """
    from tqdm.auto import tqdm

    state.train_model.train()
    positions = batches.epoch_positions(epoch)
    first = state.start_step if epoch == state.start_epoch else 0
    generator = epoch_generator(config, ctx, state, epoch, first)
    seen, loss_sum, partial = 0, 0.0, False
    if first:  # a resumed epoch: count the steps done before the interruption too
        partial = state.resumed_loss is None
        seen, loss_sum = state.resumed_loss or (0, 0.0)
    state.resume_point = ResumePoint(
        epoch, first, rng_states(state.device, generator), seen, loss_sum
    )
    seen_before, started = seen, time.perf_counter()
    bar = tqdm(
        total=batches.steps_per_epoch,
        initial=first,
        desc=f"epoch {epoch + 1}/{config.epochs}",
        disable=not (config.progress and ctx.is_main),
        leave=False,
    )
    for step in range(first, batches.steps_per_epoch):
        batch_pos, images, targets = batches.batch(positions, step, state.device)
        loss = train_step(state, images, targets, config, generator, pos_weight)
        loss_value = float(loss.detach())
        if not math.isfinite(loss_value):
            raise FloatingPointError(
                f"training loss is {loss_value} at epoch {epoch + 1} step {step}"
            )
        seen += len(batch_pos)
        loss_sum += loss_value * len(batch_pos)
        state.resume_point = ResumePoint(
            epoch, step + 1, rng_states(state.device, generator), seen, loss_sum
        )
        bar.set_postfix(loss=f"{loss_value:.4f}")
        bar.update(1)
        if step_callback is not None:
            step_callback(epoch, step)
    bar.close()
    return EpochStats(
        seen=seen,
        loss_sum=loss_sum,
        elapsed=time.perf_counter() - started,
        partial=partial,
        timed=seen - seen_before,
    )
