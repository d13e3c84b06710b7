"""The state of a training run: the model, its optimiser and where the run stands.

:func:`build_train_state` sets up a :class:`TrainState` the same way every time (seeded weight
initialisation, channels-last, DDP and ``torch.compile`` wrappers, AdamW with warm-up and cosine
decay, the gradient scaler), so a run is a function of its configuration.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from pneumoloc.training.config import TrainConfig
from pneumoloc.training.distributed import DistContext


def amp_dtype(setting: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype an ``amp`` setting means on ``device`` (None: full precision)."""
    if setting == "off" or device.type != "cuda":
        return None
    if setting == "fp16":
        return torch.float16
    if setting == "bf16" or torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float16


def lr_factor(step: int, *, warmup_steps: int, total_steps: int) -> float:
    """Linear warm-up then cosine decay to 1% of the base rate."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


@dataclass
class ResumePoint:
    """Where an interrupted run resumes: the last completed step and the random states after it,
    and the images seen and the loss summed over that epoch's completed steps (so the resumed
    epoch's training loss is the mean over all its steps, not only those after the restart)."""

    epoch: int
    step_in_epoch: int
    rngs: dict[str, Any]
    seen: int = 0
    loss_sum: float = 0.0


@dataclass
class TrainState:
    """Everything a training run changes as it goes, plus the fixed pieces it works with.

    ``model`` is the bare network (checkpoints, validation); ``train_model`` is it wrapped in
    DDP when distributed (its mode is switched each epoch); ``step_model`` is ``train_model``
    compiled when asked (the forward pass of a step).
    """

    model: torch.nn.Module
    train_model: torch.nn.Module
    step_model: torch.nn.Module
    spec: dict[str, Any]
    init: dict[str, Any]
    cam_layer: str
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler
    device: torch.device
    amp_dtype: torch.dtype | None
    start_epoch: int = 0
    start_step: int = 0
    best_metric: float = -math.inf
    best_epoch: int = -1
    stale: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    aug_state: torch.Tensor | None = None  # the augmentation generator's state on resume
    # (images seen, loss sum) of the resumed epoch's steps before the interruption; None when
    # the checkpoint did not record them (the epoch's loss then covers the later steps only)
    resumed_loss: tuple[int, float] | None = None
    resume_point: ResumePoint | None = None
    last_val: dict[str, Any] = field(default_factory=dict)

    def update_best(self, monitor: float, epoch: int) -> bool:
        """Record an epoch's monitored value; True when it is the best so far."""
        improved = monitor > self.best_metric
        if improved:
            self.best_metric, self.best_epoch, self.stale = monitor, epoch, 0
        else:
            self.stale += 1
        return improved


def cam_layer_name(model: torch.nn.Module) -> str:
    """The dotted name of the model's CAM target layer ("" when it has none)."""
    target = getattr(model, "cam_target_layer", None)
    for name, module in model.named_modules():
        if module is target:
            return name
    return ""


def build_model_on_device(
    config: TrainConfig, device: torch.device, build_model: Callable[..., torch.nn.Module]
) -> torch.nn.Module:
    """The configured network on ``device``, its initial weights a function of ``config.seed``.

    Weight initialisation (timm, torch.nn.init) draws from the global generator: it is seeded
    here so a run is a function of its config. Everything else random uses explicit generators.
    """
    torch.manual_seed(config.seed)
    extra: dict[str, Any] = {"decoder": config.decoder} if config.decoder is not None else {}
    if config.decoder_drop:
        extra["decoder_drop"] = config.decoder_drop
    return build_model(
        config.model,
        pretrained=config.pretrained,
        drop_rate=config.drop_rate,
        output_stride=config.output_stride,
        pool=config.pool,
        **extra,
    ).to(device)


def build_train_state(
    config: TrainConfig,
    ctx: DistContext,
    device: torch.device,
    build_model: Callable[..., torch.nn.Module],
    steps_per_epoch: int,
) -> TrainState:
    """Model, wrappers, optimiser, learning-rate schedule and gradient scaler, all fresh."""
    dtype = amp_dtype(config.amp, device)
    model = build_model_on_device(config, device, build_model)
    spec = dict(model.spec)  # type: ignore[arg-type]
    cam_layer = cam_layer_name(model)
    if config.channels_last:
        model = model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    train_model: torch.nn.Module = model
    if ctx.enabled:
        train_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    step_model = torch.compile(train_model) if config.compile else train_model
    total_steps = steps_per_epoch * config.epochs
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=config.lr, weight_decay=config.weight_decay
    )
    warmup = int(config.warmup_epochs * steps_per_epoch)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, warmup_steps=warmup, total_steps=total_steps)
    )
    return TrainState(
        model=model,
        train_model=train_model,
        step_model=step_model,  # type: ignore[arg-type]
        spec=spec,
        init=dict(getattr(model, "init", {"kind": "random"})),
        cam_layer=cam_layer,
        optimizer=optimizer,
        scheduler=scheduler,
        scaler=torch.amp.GradScaler(device.type, enabled=dtype == torch.float16),
        device=device,
        amp_dtype=dtype,
    )
