"""Typed training configuration: YAML defaults, CLI overrides on top, resolved copy in the run."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from pneumoloc.errors import ConfigError
from pneumoloc.training.augment import AugmentConfig


@dataclass
class TrainConfig:
    """Everything a training run depends on. Saved as ``config.yaml`` in the run folder.

    ``data`` is the primary labelled source; ``extra_data`` adds labelled sources (each split by
    patient in its own cache, validated separately; checkpoints are selected on the mean of the
    sources' validation AUROCs). ``unlabelled`` with ``teacher`` adds the teacher's confident
    pseudo-labels of an unlabelled folder as one more training source (noisy student). With
    several sources each gets a share of every epoch (``source_weights``, default equal;
    ``samples_per_epoch`` items, default the number of sources times the smallest's size).
    ``calibrate`` fits a temperature on the validation split(s) into ``best.pt`` at the end.
    """

    data: str = ""
    out: str = "runs/train"
    model: str = "resnet18"
    pretrained: str | None = None
    image_size: int = 256
    epochs: int = 20
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 1e-4
    warmup_epochs: float = 1.0
    loss: str = "bce"
    focal_gamma: float = 2.0
    pos_weight: str | float = "auto"
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    amp: str = "auto"
    channels_last: bool = True
    compile: bool = False
    seed: int = 0
    patience: int = 6
    device: str = "auto"
    workers: int = 0
    data_on_device: str = "auto"
    output_stride: int | None = None
    pool: str = "avg"
    decoder: str | None = None
    decoder_drop: float = 0.0
    outside_lung_loss: float = 0.0
    drop_rate: float = 0.0
    split_seed: int = 0
    tensorboard: bool = False
    max_steps_per_epoch: int | None = None
    progress: bool = True
    # More sources, unlabelled images, calibration (see pneumoloc.training.sampling / .pseudo).
    extra_data: list[str] = field(default_factory=list)
    source_weights: list[float] | None = None
    samples_per_epoch: int | None = None
    unlabelled: str | None = None
    teacher: str | None = None
    pseudo_fraction: float = 0.5
    calibrate: bool = True

    def validate(self) -> None:
        """Raise ConfigError on values that cannot work."""
        checks = [
            (self.epochs >= 1, "epochs must be >= 1"),
            (self.batch_size >= 1, "batch_size must be >= 1"),
            (self.lr > 0, "lr must be > 0"),
            (self.image_size >= 16, "image_size must be >= 16"),
            (self.loss in ("bce", "focal"), f"loss must be 'bce' or 'focal', not {self.loss!r}"),
            (self.amp in ("auto", "bf16", "fp16", "off"), "amp must be auto, bf16, fp16 or off"),
            (
                self.data_on_device in ("auto", "yes", "no"),
                "data_on_device must be auto, yes or no",
            ),
            (bool(self.data), "data is required (a data folder or a cache folder)"),
            (
                (self.unlabelled is None) == (self.teacher is None),
                "unlabelled images need a teacher checkpoint (noisy student) and vice versa",
            ),
            (0.0 < self.pseudo_fraction <= 1.0, "pseudo_fraction must be in (0, 1]"),
            (0.0 <= self.decoder_drop < 1.0, "decoder_drop must be in [0, 1)"),
            (
                self.decoder_drop == 0.0 or self.decoder is not None,
                "decoder_drop (top-down drop) needs a decoder (--decoder pylon)",
            ),
            (
                math.isfinite(self.outside_lung_loss) and self.outside_lung_loss >= 0.0,
                "outside_lung_loss must be a finite weight >= 0",
            ),
            (
                self.samples_per_epoch is None or self.samples_per_epoch >= 1,
                "samples_per_epoch must be >= 1",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)
        if isinstance(self.pos_weight, str) and self.pos_weight != "auto":
            try:
                self.pos_weight = float(self.pos_weight)
            except ValueError:
                raise ConfigError(
                    f"pos_weight must be 'auto' or a number, not {self.pos_weight!r}"
                ) from None

    def to_dict(self) -> dict[str, Any]:
        """Plain, YAML/JSON-ready dict."""
        return dataclasses.asdict(self)


def _merge(config: TrainConfig, values: dict[str, Any], source: str) -> TrainConfig:
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    for key, value in values.items():
        if key not in known:
            raise ConfigError(f"{source}: unknown setting {key!r}; known: {sorted(known)}")
        if key == "augment":
            if isinstance(value, bool):
                value = (
                    AugmentConfig()
                    if value
                    else AugmentConfig(**{k: 0.0 for k in vars(AugmentConfig())})
                )
            elif isinstance(value, dict):
                try:
                    value = dataclasses.replace(config.augment, **value)
                except TypeError as exc:
                    raise ConfigError(f"{source}: augment: {exc}") from None
        setattr(config, key, value)
    return config


def load_train_config(
    path: str | Path | None = None, overrides: dict[str, Any] | None = None
) -> TrainConfig:
    """Defaults, then a YAML file, then overrides (from the command line), validated."""
    config = TrainConfig()
    if path is not None:
        path = Path(path)
        try:
            values = yaml.safe_load(path.read_text()) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise ConfigError(f"{path}: cannot read config: {exc}") from None
        if not isinstance(values, dict):
            raise ConfigError(f"{path}: a config file must be a mapping of settings")
        _merge(config, values, str(path))
    _merge(config, {k: v for k, v in (overrides or {}).items() if v is not None}, "command line")
    config.validate()
    return config


def save_train_config(config: TrainConfig, path: str | Path) -> None:
    """Write the resolved config as YAML."""
    Path(path).write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
