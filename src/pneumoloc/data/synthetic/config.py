"""What the generator is asked for and what it gives back.

:class:`SynthConfig` (what to generate) and :func:`validate_config` (its checks),
:class:`SynthCase` (one generated image with its ground truth) and :class:`SynthSummary` (what
:func:`~pneumoloc.data.synthetic.generate_rsna` wrote).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from pneumoloc.data.anatomy import Anatomy
from pneumoloc.errors import ConfigError


@dataclass(frozen=True)
class SynthConfig:
    """What to generate.

    Attributes:
        n: Number of images.
        seed: Non-negative seed; the same seed gives identical files.
        image_size: Side of the square images in pixels (RSNA: 1024).
        prevalence: Fraction of positive images.
        opacity_contrast: Difficulty knob: mean brightness added inside an opacity's core, as a
            fraction of the density scale (see ``OPACITY_RANGE``): 0.25 takes the core about 60%
            of the way from aerated lung to the heart's brightness; 0.1 is a faint haze.
        noise: Difficulty knob: standard deviation of the additive noise, fraction of 255.
        jpeg_quality: JPEG quality of the DICOM pixel data (1 to 95).
    """

    n: int = 200
    seed: int = 0
    image_size: int = 1024
    prevalence: float = 0.3
    opacity_contrast: float = 0.25
    noise: float = 0.04
    jpeg_quality: int = 90


@dataclass(frozen=True)
class SynthSummary:
    """What :func:`generate_rsna` wrote."""

    out_dir: Path
    n_images: int
    n_positive: int
    n_boxes: int


@dataclass(frozen=True)
class SynthCase:
    """One generated image with its ground truth.

    Attributes:
        index: Position in the generated set.
        patient_id: UUID4 string, the file stem.
        target: 1 for pneumonia (opacities), 0 otherwise.
        class_name: The detailed class, as in ``stage_2_detailed_class_info.csv``.
        boxes: (k, 4) float64 xywh boxes in pixels, integer valued; empty for negatives.
        image: uint8 (image_size, image_size).
        anatomy: The anatomy the image was rendered with.
        sex: "M" or "F".
        age: Age in years.
    """

    index: int
    patient_id: str
    target: int
    class_name: str
    boxes: np.ndarray
    image: np.ndarray
    anatomy: Anatomy
    sex: Literal["M", "F"]
    age: int


def validate_config(config: SynthConfig) -> None:
    """Raise :class:`ConfigError` naming the first invalid field of ``config``."""
    checks = [
        ("n", config.n >= 0, "must be >= 0"),
        ("seed", config.seed >= 0, "must be >= 0"),
        ("image_size", 32 <= config.image_size <= 4096, "must be between 32 and 4096"),
        ("prevalence", 0.0 <= config.prevalence <= 1.0, "must be between 0 and 1"),
        ("opacity_contrast", 0.0 <= config.opacity_contrast <= 2.0, "must be between 0 and 2"),
        ("noise", 0.0 <= config.noise <= 1.0, "must be between 0 and 1"),
        ("jpeg_quality", 1 <= config.jpeg_quality <= 95, "must be between 1 and 95"),
    ]
    for name, ok, why in checks:
        if not ok:
            raise ConfigError(f"SynthConfig.{name}={getattr(config, name)!r}: {why}")
