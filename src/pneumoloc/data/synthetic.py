"""Synthetic chest radiographs in the exact RSNA Kaggle layout, for the demo and the tests.

:func:`generate_rsna` writes ``stage_2_train_images/<patientId>.dcm`` (JPEG Baseline, 8-bit
MONOCHROME2), ``stage_2_train_labels.csv`` and ``stage_2_detailed_class_info.csv``, like the
real challenge files. The images only resemble a frontal chest X-ray at a coarse level (body,
dark lung fields, mediastinum, heart, diaphragm, ribs, clavicles, vessels, exposure variation,
noise); positives carry 1 to 3 soft opacities inside the lung fields, each filling most of its
box. Distractors that are not pneumonia (electrodes and wires, a small nodule, a side marker)
appear with the same probability in both classes, so "any bright spot" is not the answer.

Everything is drawn from one ``np.random.Generator`` per image, derived from ``(seed, index)``,
so an image depends neither on ``n`` nor on the images before it; the same seed gives
byte-identical files. Smooth structures are rendered at most at ``RENDER_BASE`` pixels and
upsampled; only the noise is drawn at full resolution.

Research tool, not a medical device: these images are not radiographs of anyone.
"""

from __future__ import annotations

import csv
import io
import logging
import math
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image, ImageDraw
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    UID,
    JPEGBaseline8Bit,
    SecondaryCaptureImageStorage,
    generate_uid,
)
from scipy.ndimage import gaussian_filter

from pneumoloc.data.anatomy import (
    SIDES,
    Anatomy,
    Side,
    anatomical_grid,
    diaphragm_line,
    lung_masks_on_grid,
    mask_bbox,
    mediastinum_halfwidth,
    sample_anatomy,
)
from pneumoloc.errors import ConfigError, DataError

logger = logging.getLogger(__name__)

LABELS_CSV = "stage_2_train_labels.csv"
CLASS_INFO_CSV = "stage_2_detailed_class_info.csv"
IMAGES_DIR = "stage_2_train_images"

# --- Statistics of the real RSNA labels -------------------------------------------------------
# Derived once from the full official /work/shared/data/rsna-pneumonia-sample/
# stage_2_train_labels.csv (26,684 patientIds, 6,012 positives, 9,555 boxes) and
# stage_2_detailed_class_info.csv; all lengths in pixels of the 1024 x 1024 originals.
# Boxes per positive image: 1: 2614 (43.5%), 2: 3266 (54.3%), 3: 119 (2.0%), 4: 13 (0.2%).
# The generator promises 1 to 3 boxes, so the 4-box share is folded into 3.
BOX_COUNT_PROBS: dict[int, float] = {1: 0.4348, 2: 0.5432, 3: 0.0220}
# Box width and height are log-normal: geometric means 209.9 x 291.1 px (medians 217 x 298),
# log-sd 0.291 (width) and 0.514 (height), correlation of the logs 0.611.
BOX_LOG_MEAN: tuple[float, float] = (math.log(209.9), math.log(291.1))
BOX_LOG_SD: tuple[float, float] = (0.291, 0.514)
BOX_LOG_CORR = 0.611
BOX_MIN_WH: tuple[float, float] = (40.0, 45.0)  # smallest real width and height
REFERENCE_SIZE = 1024
# 53.5% of boxes lie in the image-left half (the patient's right lung).
RIGHT_LUNG_FRACTION = 0.535
# 97.9% of 2-box images have one box in each lung.
TWO_BOX_BILATERAL_FRACTION = 0.979
# Box centres: y mean 0.52 x height, sd 0.11 (x: 0.31 / 0.70 of the width, sd 0.06 on each
# side). With the anatomy of pneumoloc.data.anatomy this is about 0.62 +- 0.19 of the lung height.
BOX_CENTRE_IN_LUNG: tuple[float, float] = (0.62, 0.19)
# Negatives: "Normal" 8,818 vs "No Lung Opacity / Not Normal" 11,787 patients -> 42.8% Normal.
NORMAL_FRACTION_OF_NEGATIVES = 0.428
# (Real prevalence is 22.5% positive; SynthConfig defaults to 30% for a friendlier demo.)

CLASS_POSITIVE = "Lung Opacity"
CLASS_NORMAL = "Normal"
CLASS_NOT_NORMAL = "No Lung Opacity / Not Normal"

# --- Rendering constants (density units: 0 = air black, 1 = dense bone white) ------------------
RENDER_BASE = 256  # smooth structures are drawn at most at this size, then upsampled
LUNG_DEPTH = 0.30  # how much darker aerated lung is than the chest wall
# The unit of SynthConfig.opacity_contrast: the full density scale (0 = air black, 1 = white),
# before the per-image exposure. Aerated lung sits at about 0.27 and the heart at about 0.69, so
# the default 0.25 brings an opacity's core about 60% of the way from lung to heart: a clear
# consolidation. (With the narrower lung-to-heart range, 0.42, as the unit, 0.25 is a faint haze
# that a small CNN trained on 400 images at 128 px only takes to AUROC ~0.85 in 4 epochs.)
OPACITY_RANGE = 1.0
_GOLDEN = 0.6180339887498949  # labels follow a golden-ratio sequence: see _is_positive
_UID_ROOT = "pneumoloc-synthetic-rsna"


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


# --- Small array helpers -----------------------------------------------------------------------


def _resize(a: np.ndarray, size: int) -> np.ndarray:
    """Bicubic resize of a float image to size x size (Pillow's float resampler is fast)."""
    if a.shape == (size, size):
        return a.astype(np.float32, copy=False)
    img = Image.fromarray(np.ascontiguousarray(a, dtype=np.float32))
    return np.asarray(img.resize((size, size), Image.Resampling.BICUBIC), dtype=np.float32)


def _soft(mask: np.ndarray, sigma: float) -> np.ndarray:
    """A binary mask with Gaussian-blurred edges, float32 in [0, 1].

    Wide blurs run on a subsampled mask (then resized back): same look, a fraction of the cost.
    """
    m = mask.astype(np.float32)
    f = int(sigma // 2)
    if f < 2 or min(m.shape) < 8 * f:
        return gaussian_filter(m, sigma=max(sigma, 1e-3), mode="nearest", truncate=3.0)
    h, w = m.shape
    small = np.asarray(Image.fromarray(m).resize((w // f, h // f), Image.Resampling.BOX))
    small = gaussian_filter(small, sigma=sigma / f, mode="nearest", truncate=3.0)
    return np.asarray(
        Image.fromarray(small).resize((w, h), Image.Resampling.BILINEAR), dtype=np.float32
    )


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], cells: int) -> np.ndarray:
    """Zero-mean, unit-sd smooth random field with about ``cells`` blobs across."""
    cells = max(2, cells)
    small = gaussian_filter(rng.standard_normal((cells + 2, cells + 2)), 0.8, mode="wrap")
    img = Image.fromarray(small.astype(np.float32))
    field = np.asarray(img.resize(shape[::-1], Image.Resampling.BICUBIC), dtype=np.float32)
    sd = float(field.std())
    return (field - field.mean()) / (sd if sd > 0 else 1.0)


def _smoothstep(t: np.ndarray) -> np.ndarray:
    t = np.clip(t, 0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)


def _bands(phase: np.ndarray, duty: float) -> np.ndarray:
    """Periodic rounded bands: 1 at integer ``phase``, covering ``duty`` of each period."""
    thr = math.cos(math.pi * duty)
    c = np.cos(2.0 * np.pi * phase)
    return np.sqrt(np.clip((c - thr) / (1.0 - thr), 0.0, 1.0))


# --- Anatomy rendering -------------------------------------------------------------------------


def _ribs(rng: np.random.Generator, u: np.ndarray, v: np.ndarray, anatomy: Anatomy) -> np.ndarray:
    """Posterior ribs (arcs rising then falling laterally) and fainter anterior ribs."""
    a = np.abs(u - anatomy.mid_x) / anatomy.body_hw  # 0 at the spine, 1 at the chest wall
    lung = anatomy.right_lung
    top = lung.cy - lung.ry + 0.01
    span = 2.0 * lung.ry
    post = (v - top - span * (-0.08 * a + 0.30 * a**2)) / span
    wobble = 0.12 * _smooth_noise(rng, u.shape, 5)
    n_post = 9.5 * np.clip(post, 0.0, 1.3) ** 0.85 + wobble
    post_w = _smoothstep((a - 0.07) / 0.08) * _smoothstep((post + 0.03) / 0.05)
    ribs = _bands(n_post, 0.42) * post_w
    ant = (v - top + 0.05 * span - span * 0.22 * (1.0 - a)) / span
    ant_w = _smoothstep((a - 0.3) / 0.2) * _smoothstep((ant + 0.02) / 0.05) * (ant < 1.0)
    ribs = ribs + 0.45 * _bands(6.0 * np.clip(ant, 0.0, 1.2) + 0.5, 0.33) * ant_w
    return ribs.astype(np.float32)


def _clavicles(u: np.ndarray, v: np.ndarray, anatomy: Anatomy) -> np.ndarray:
    """Clavicles: S-ish bands from the sternal notch out to the shoulders."""
    a = np.abs(u - anatomy.mid_x) / anatomy.body_hw
    y0 = anatomy.shoulder_y + (0.03 if anatomy.view == "AP" else 0.065)
    centre = y0 - 0.11 * a + 0.05 * a**2
    band = np.exp(-(((v - centre) / 0.011) ** 2))
    return (band * _smoothstep((a - 0.06) / 0.05) * _smoothstep((0.85 - a) / 0.1)).astype(
        np.float32
    )


def _vessels(rng: np.random.Generator, base: int, anatomy: Anatomy) -> np.ndarray:
    """Branching vascular markings radiating from the hila (drawn lines, then blurred)."""
    canvas = Image.new("F", (base, base), 0.0)
    draw = ImageDraw.Draw(canvas)
    for side in SIDES:
        lung = anatomy.lung(side)
        sign = -1.0 if side == "right" else 1.0
        hx, hy = anatomy.mid_x + sign * 0.075, lung.cy - 0.01
        for _ in range(22):
            angle = rng.uniform(-0.45 * math.pi, 0.5 * math.pi)  # 0 = lateral, +: downward
            x, y = hx, hy + rng.uniform(-0.06, 0.06)
            width = 2.2
            for _seg in range(3):
                length = rng.uniform(0.05, 0.1) * lung.ry / 0.3
                angle += rng.normal(0.0, 0.25)
                nx = x + sign * length * math.cos(angle)
                ny = y + length * math.sin(angle)
                draw.line(
                    [(x * base, y * base), (nx * base, ny * base)],
                    fill=1.0,
                    width=max(1, round(width * base / 256)),
                )
                x, y, width = nx, ny, width * 0.7
    return gaussian_filter(np.asarray(canvas), 1.0 * base / 256)


def _distractors(rng: np.random.Generator, base: int, anatomy: Anatomy) -> np.ndarray:
    """Things that are not pneumonia, same probability in both classes: electrodes with wires,
    a small nodule, a side marker. Returns additive density at ``base`` resolution."""
    canvas = Image.new("F", (base, base), 0.0)
    draw = ImageDraw.Draw(canvas)
    s = base
    if rng.random() < 0.35:  # ECG electrodes and their leads
        for _ in range(int(rng.integers(1, 5))):
            ex = anatomy.mid_x + rng.uniform(-0.9, 0.9) * anatomy.body_hw
            ey = rng.uniform(anatomy.shoulder_y + 0.05, 0.8)
            r = rng.uniform(0.010, 0.016) * s
            draw.ellipse([ex * s - r, ey * s - r, ex * s + r, ey * s + r], outline=0.45, width=2)
            draw.ellipse([ex * s - r / 3, ey * s - r / 3, ex * s + r / 3, ey * s + r / 3], 0.6)
            tx, ty = rng.uniform(0.0, 1.0), rng.choice([0.0, 1.0])
            if rng.random() < 0.5:
                tx, ty = ty, tx
            mx, my = rng.uniform(0.2, 0.8), rng.uniform(0.2, 0.8)
            t = np.linspace(0.0, 1.0, 24)
            px = (1 - t) ** 2 * ex + 2 * (1 - t) * t * mx + t**2 * tx
            py = (1 - t) ** 2 * ey + 2 * (1 - t) * t * my + t**2 * ty
            draw.line(list(zip(px * s, py * s, strict=True)), fill=0.3, width=max(1, s // 200))
    if rng.random() < 0.25:  # a small calcified nodule anywhere in the chest
        nx = anatomy.mid_x + rng.uniform(-0.8, 0.8) * anatomy.body_hw * 0.8
        ny = rng.uniform(0.25, 0.7)
        r = max(1.0, rng.uniform(0.005, 0.011) * s)
        draw.ellipse([nx * s - r, ny * s - r, nx * s + r, ny * s + r], fill=0.18)
    if rng.random() < 0.5:  # an "L" side marker in an upper corner
        x0 = rng.uniform(0.03, 0.1) if rng.random() < 0.5 else rng.uniform(0.86, 0.93)
        y0 = rng.uniform(0.03, 0.1)
        h, w, thick = 0.04 * s, 0.025 * s, max(1.0, 0.006 * s)
        draw.rectangle([x0 * s, y0 * s, x0 * s + thick, y0 * s + h], fill=0.9)
        draw.rectangle([x0 * s, y0 * s + h - thick, x0 * s + w, y0 * s + h], fill=0.9)
    return gaussian_filter(np.asarray(canvas), 0.5 * base / 256)


def _ramp(signed: np.ndarray, width: float) -> np.ndarray:
    """Soft inside-ness from a signed distance (positive inside, fraction of the image side).

    An analytic soft edge: much cheaper than blurring a binary mask, for shapes with a closed
    form.
    """
    return _smoothstep(signed / width + 0.5)


def _ellipse_ramp(
    u: np.ndarray,
    v: np.ndarray,
    centre: tuple[float, float],
    radii: tuple[float, float],
    width: float,
) -> np.ndarray:
    r = np.sqrt(((u - centre[0]) / radii[0]) ** 2 + ((v - centre[1]) / radii[1]) ** 2)
    return _ramp((1.0 - r) * (0.5 * (radii[0] + radii[1])), width)


@dataclass(frozen=True)
class _Field:
    """The anatomical grid of one render at base resolution, shared by its parts."""

    u: np.ndarray
    v: np.ndarray
    lungs: np.ndarray  # bool lung fields
    lung_soft: np.ndarray  # the same with soft edges


def _field(base: int, anatomy: Anatomy) -> _Field:
    u, v = anatomical_grid(base, anatomy)
    right, left = lung_masks_on_grid(u, v, anatomy)
    lungs = right | left
    return _Field(u, v, lungs, _soft(lungs, 1.6 * base / 256.0))


def _background(
    rng: np.random.Generator, field: _Field, anatomy: Anatomy, obscured: np.ndarray
) -> np.ndarray:
    """Density of a chest at base resolution, without the opacities' added density.

    ``obscured`` (0 to 1) is where opacities will lie: consolidation hides the fine lung
    texture there. Zero everywhere for a negative; the random draws do not depend on it.
    """
    u, v, lung_soft = field.u, field.v, field.lung_soft
    base = u.shape[0]
    ax = np.abs(u - anatomy.mid_x)
    rl, ll = anatomy.right_lung, anatomy.left_lung
    # torso: the neck, trapezius sloping down to the shoulders, slight taper toward the waist
    neck = 0.075
    hw = anatomy.body_hw * (1.0 - 0.08 * _smoothstep((v - rl.cy) / 0.5))
    reach = np.clip((ax - neck) / (anatomy.body_hw - neck), 0.0, 1.0)
    top_edge = anatomy.shoulder_y - 0.07 + 0.13 * reach**1.3
    body = _ramp(hw - ax, 0.03) * np.maximum(_ramp(v - top_edge, 0.03), _ramp(neck - ax, 0.03))

    d = np.full((base, base), 0.03, dtype=np.float32)
    d += body * (0.34 + 0.12 * np.clip(1.0 - (ax / hw) ** 4, 0.0, 1.0))
    # abdomen below the diaphragm domes; mediastinum, heart and aortic knob above it
    dia = np.where(u < anatomy.mid_x, diaphragm_line(u, rl), diaphragm_line(u, ll))
    abdomen = 0.17 * _ramp(v - dia, 0.03)
    top = anatomy.shoulder_y + 0.02
    centre = _ramp(mediastinum_halfwidth(v, anatomy) - ax, 0.025) * _ramp(v - top, 0.025)
    hx, hy, hrx, hry = anatomy.heart
    heart = _ellipse_ramp(u, v, (hx, hy), (hrx, hry), 0.025)
    knob = _ellipse_ramp(u, v, (anatomy.mid_x + 0.05, rl.cy - 0.1), (0.035, 0.035), 0.025)
    dense = 0.2 * np.maximum(np.maximum(centre, heart), knob) * _ramp(dia + 0.01 - v, 0.025)
    d += np.maximum(abdomen, dense) * body
    # spine with vertebral bodies; trachea (air) in the upper mediastinum
    spine = _ramp(0.03 - ax, 0.015) * (0.8 + 0.2 * np.cos(2 * np.pi * (v - rl.cy) / 0.05))
    d += 0.06 * spine * body
    trachea = (
        _ramp(0.014 - ax, 0.015)
        * _ramp(v - anatomy.shoulder_y + 0.15, 0.02)
        * _ramp(rl.cy - 0.12 - v, 0.02)
    )
    d -= 0.08 * trachea
    # aerated lungs: darkest in the upper lateral lung, brighter at the bases and hila
    shade = 1.0 - 0.3 * _smoothstep((v - rl.cy) / rl.ry + 0.3)
    d -= LUNG_DEPTH * lung_soft * shade
    for sign, lung in ((-1.0, rl), (1.0, ll)):
        hx, hy = anatomy.mid_x + sign * 0.085, lung.cy + 0.01
        d += 0.08 * np.exp(-(((u - hx) / 0.04) ** 2) - ((v - hy) / 0.07) ** 2) * lung_soft
    # bones: ribs over the rib cage (most visible over lung) and clavicles
    cage = np.clip(1.6 * _soft(field.lungs, 7.0 * base / 256.0), 0.0, 1.0)
    d += 0.065 * _ribs(rng, u, v, anatomy) * body * cage * (0.35 + 0.65 * lung_soft)
    d += 0.14 * _clavicles(u, v, anatomy) * body
    # vascular markings, soft-tissue texture, optional gastric bubble
    d += 0.07 * _vessels(rng, base, anatomy) * lung_soft
    d += 0.02 * _smooth_noise(rng, (base, base), 8) * body
    d += 0.015 * _smooth_noise(rng, (base, base), 24) * lung_soft * (1.0 - obscured)
    if rng.random() < 0.5:
        gx = ll.cx + rng.uniform(-0.02, 0.04)
        gy = ll.cy + ll.ry - ll.dome + 0.05  # under the top of the left dome
        d -= 0.12 * _ellipse_ramp(u, v, (gx, gy), (0.045, 0.028), 0.02) * body
    d += _distractors(rng, base, anatomy)
    return d.astype(np.float32)


def _opacity_profile(
    rng: np.random.Generator, box: np.ndarray, lung_soft: np.ndarray
) -> np.ndarray:
    """Shape (0 to 1) of one opacity filling most of ``box`` (xywh, base pixels).

    A union of 3 to 6 Gaussians spread over the box, made patchy by smooth noise and kept in the
    box by a soft rectangular window, so the box is a fair bounding box of the opacity; cut to
    the lung field.
    """
    base = lung_soft.shape[0]
    x, y, w, h = (float(t) for t in box)
    cx, cy, hw, hh = x + w / 2, y + h / 2, w / 2, h / 2
    x0, x1 = max(0, math.floor(x - 0.2 * w)), min(base, math.ceil(x + 1.2 * w))
    y0, y1 = max(0, math.floor(y - 0.2 * h)), min(base, math.ceil(y + 1.2 * h))
    out = np.zeros((base, base), dtype=np.float32)
    if x1 <= x0 or y1 <= y0:
        return out
    gx = (np.arange(x0, x1, dtype=np.float32) + 0.5)[None, :]
    gy = (np.arange(y0, y1, dtype=np.float32) + 0.5)[:, None]
    miss = np.ones((y1 - y0, x1 - x0), dtype=np.float32)
    for _ in range(int(rng.integers(3, 7))):
        mx, my = cx + hw * rng.uniform(-0.5, 0.5), cy + hh * rng.uniform(-0.5, 0.5)
        sx, sy = hw * rng.uniform(0.4, 0.65), hh * rng.uniform(0.4, 0.65)
        g = np.exp(-0.5 * (((gx - mx) / sx) ** 2 + ((gy - my) / sy) ** 2))
        miss *= 1.0 - rng.uniform(0.75, 1.0) * g
    p = 1.0 - miss
    # patchy, fluffy consolidation: coarse and fine blotches (2-3 and 6-8 across the box)
    coarse = _smooth_noise(rng, p.shape, int(rng.integers(2, 4)))
    fine = _smooth_noise(rng, p.shape, int(rng.integers(6, 9)))
    p *= np.clip(0.75 + 0.2 * coarse + 0.35 * fine, 0.1, 1.6)
    edge = max(0.4, 0.06 * min(w, h))
    win_x = 1.0 / (1.0 + np.exp(-(hw - np.abs(gx - cx)) / edge))
    win_y = 1.0 / (1.0 + np.exp(-(hh - np.abs(gy - cy)) / edge))
    p *= win_x * win_y
    peak = float(p.max())
    if peak > 0:
        out[y0:y1, x0:x1] = np.clip(1.2 * p / peak, 0.0, 1.0) * lung_soft[y0:y1, x0:x1]
    return out


def _opacity_density(profile: np.ndarray, contrast: float) -> np.ndarray:
    """Added density of an opacity: ``contrast * OPACITY_RANGE`` on average over its core (where
    the profile is above half its peak)."""
    peak = float(profile.max())
    if peak <= 0:
        return profile
    core = profile >= 0.5 * peak
    return profile * np.float32(contrast * OPACITY_RANGE / float(profile[core].mean()))


def render_chest(
    rng: np.random.Generator,
    size: int,
    boxes_xywh: np.ndarray,
    config: SynthConfig,
    anatomy: Anatomy | None = None,
) -> np.ndarray:
    """Render one synthetic frontal chest radiograph.

    The generator is split into independent streams for the background, the opacities and the
    noise, so the same ``rng`` state with and without boxes gives the same image outside the
    opacities (which is how the tests measure an opacity).

    Args:
        rng: Source of randomness; consumed.
        size: Image side in pixels.
        boxes_xywh: (k, 4) opacity boxes in pixels of this image; (0, 4) for a negative.
        config: Supplies ``opacity_contrast`` and ``noise``.
        anatomy: The anatomy the boxes were sampled in; drawn from ``rng`` when None.

    Returns:
        uint8 array (size, size), MONOCHROME2 (bright = dense).
    """
    # Child streams from the generator's *state* (Generator.spawn would use its SeedSequence
    # instead, so two generators in the same state would not give the same image).
    bg_rng, opacity_rng, noise_rng = (
        np.random.default_rng(int(s)) for s in rng.integers(0, 2**63, size=3, dtype=np.int64)
    )
    if anatomy is None:
        anatomy = sample_anatomy(bg_rng)
    base = min(size, RENDER_BASE)
    field = _field(base, anatomy)
    boxes = np.asarray(boxes_xywh, dtype=np.float64).reshape(-1, 4) * (base / size)
    profiles = [_opacity_profile(opacity_rng, box, field.lung_soft) for box in boxes]
    obscured = np.clip(sum(profiles, np.zeros((base, base), np.float32)), 0.0, 1.0)
    density = _background(bg_rng, field, anatomy, obscured)
    for profile in profiles:
        density = density + _opacity_density(profile, config.opacity_contrast)
    # exposure: per-image gain, gamma and offset (AP films are flatter), plus a heel gradient
    ap = anatomy.view == "AP"
    gain = bg_rng.uniform(1.05, 1.25) if ap else bg_rng.uniform(1.15, 1.4)
    gamma = bg_rng.uniform(0.8, 1.2)
    offset = bg_rng.uniform(0.0, 0.08) if ap else bg_rng.uniform(-0.04, 0.04)
    tilt_x, tilt_y = bg_rng.normal(0.0, 0.03, size=2)
    ramp = (np.arange(base, dtype=np.float32) + 0.5) / base - 0.5
    density = density + np.float32(tilt_x) * ramp[None, :] + np.float32(tilt_y) * ramp[:, None]
    img = gain * np.clip(density, 0.0, 1.0) ** gamma + offset
    img = _resize(img.astype(np.float32), size) * np.float32(255.0)
    if config.noise > 0:
        img += noise_rng.standard_normal((size, size), dtype=np.float32) * np.float32(
            config.noise * 255.0
        )
    return np.clip(img + 0.5, 0, 255).astype(np.uint8)


# --- Boxes -------------------------------------------------------------------------------------


def _box_count(rng: np.random.Generator) -> int:
    counts = list(BOX_COUNT_PROBS)
    probs = np.array([BOX_COUNT_PROBS[c] for c in counts])
    return int(counts[int(rng.choice(len(counts), p=probs / probs.sum()))])


def _box_sides(rng: np.random.Generator, k: int) -> list[Side]:
    """Which lung each of ``k`` boxes goes in (patient sides)."""
    first: Side = "right" if rng.random() < RIGHT_LUNG_FRACTION else "left"
    other: Side = "left" if first == "right" else "right"
    if k == 1:
        return [first]
    if k == 2:
        return [first, other] if rng.random() < TWO_BOX_BILATERAL_FRACTION else [first, first]
    return [first, first, other]


def _box_wh(rng: np.random.Generator, size: int) -> tuple[float, float]:
    """One (width, height) from the RSNA log-normal, scaled to ``size``."""
    z1, z2 = rng.standard_normal(2)
    lw = BOX_LOG_MEAN[0] + BOX_LOG_SD[0] * z1
    lh = BOX_LOG_MEAN[1] + BOX_LOG_SD[1] * (BOX_LOG_CORR * z1 + math.sqrt(1 - BOX_LOG_CORR**2) * z2)
    k = size / REFERENCE_SIZE
    return math.exp(lw) * k, math.exp(lh) * k


def _place_box(
    rng: np.random.Generator,
    region: tuple[float, float, float, float],
    mask: np.ndarray,
    size: int,
    y_prior: bool,
) -> np.ndarray:
    """An integer xywh box inside ``region`` (x0, y0, x1, y1, image pixels) whose centre lies
    in ``mask`` (a coarse lung mask) and which is mostly lung."""
    g = mask.shape[0]
    rx0, ry0, rx1, ry1 = region
    k = size / REFERENCE_SIZE
    min_w, min_h = max(3.0, BOX_MIN_WH[0] * k), max(3.0, BOX_MIN_WH[1] * k)
    for attempt in range(60):
        shrink = 0.85 ** (attempt // 12)
        bw, bh = _box_wh(rng, size)
        w = min(max(bw * shrink, min_w), 0.95 * (rx1 - rx0))
        h = min(max(bh * shrink, min_h), 0.95 * (ry1 - ry0))
        x = rng.uniform(rx0, rx1 - w)
        if y_prior:
            mu, sd = BOX_CENTRE_IN_LUNG
            cy = ry0 + (ry1 - ry0) * rng.normal(mu, sd)
            y = min(max(cy - h / 2, ry0), ry1 - h)
        else:
            y = rng.uniform(ry0, ry1 - h)
        xi, yi = math.ceil(x), math.ceil(y)
        wi, hi = math.floor(min(w, rx1 - xi)), math.floor(min(h, ry1 - yi))
        if wi < 2 or hi < 2:
            continue
        c0, c1 = int(xi * g / size), max(int(xi * g / size) + 1, round((xi + wi) * g / size))
        r0, r1 = int(yi * g / size), max(int(yi * g / size) + 1, round((yi + hi) * g / size))
        centre = mask[
            min(g - 1, int((yi + hi / 2) * g / size)), min(g - 1, int((xi + wi / 2) * g / size))
        ]
        if centre and mask[r0:r1, c0:c1].mean() >= 0.65:
            return np.array([xi, yi, wi, hi], dtype=np.float64)
    # Fallback (not seen in practice): a small box around the lung's centroid.
    rows, cols = np.nonzero(mask)
    cx, cy = (cols.mean() + 0.5) * size / g, (rows.mean() + 0.5) * size / g
    w, h = max(2.0, 0.15 * (rx1 - rx0)), max(2.0, 0.15 * (ry1 - ry0))
    return np.array([round(cx - w / 2), round(cy - h / 2), math.floor(w), math.floor(h)], float)


def sample_boxes(rng: np.random.Generator, anatomy: Anatomy, size: int) -> np.ndarray:
    """Draw the opacity boxes of one positive image, RSNA-like, inside its lung fields.

    The count follows :data:`BOX_COUNT_PROBS`, two boxes usually go one per lung, sizes follow
    the RSNA log-normal scaled to ``size``; every box lies inside the bounding box of its lung
    field, its centre is in the lung field and most of its area is lung. Two boxes in one lung
    go one in its upper and one in its lower half.

    Returns:
        (k, 4) float64 xywh in pixels (integer valued), 1 <= k <= 3.
    """
    g = min(size, RENDER_BASE)
    u, v = anatomical_grid(g, anatomy)
    masks = dict(zip(SIDES, lung_masks_on_grid(u, v, anatomy), strict=True))
    sides = _box_sides(rng, _box_count(rng))
    boxes = []
    for side in SIDES:
        n_here = sides.count(side)
        if n_here == 0:
            continue
        bbox = mask_bbox(masks[side])
        if bbox is None:  # not possible with sample_anatomy's ranges
            raise ConfigError(f"image_size={size} is too small to hold a {side} lung field")
        c0, r0, c1, r1 = bbox
        # shrink by one coarse pixel so the box is inside the lung bbox at full resolution too
        region = (
            (c0 + 1) * size / g,
            (r0 + 1) * size / g,
            (c1 - 1) * size / g,
            (r1 - 1) * size / g,
        )
        if n_here == 1:
            boxes.append(_place_box(rng, region, masks[side], size, y_prior=True))
        else:
            mid = (region[1] + region[3]) / 2
            upper = (region[0], region[1], region[2], mid)
            lower = (region[0], mid, region[2], region[3])
            boxes.append(_place_box(rng, upper, masks[side], size, y_prior=False))
            boxes.append(_place_box(rng, lower, masks[side], size, y_prior=False))
    return np.stack(boxes)


# --- Cases and files ---------------------------------------------------------------------------


def case_rng(seed: int, index: int) -> np.random.Generator:
    """The generator of image ``index``: depends on (seed, index) only, not on n."""
    return np.random.default_rng(np.random.SeedSequence(entropy=seed, spawn_key=(index,)))


def _is_positive(seed: int, index: int, prevalence: float) -> bool:
    """Label of image ``index``: a golden-ratio sequence with a seed-dependent start.

    Unlike independent coin flips, any prefix of n images holds n * prevalence positives to
    within about one, so a 10-image demo still has both classes; and the label depends on
    (seed, index) only.
    """
    start = int(np.random.SeedSequence(seed).generate_state(1, dtype=np.uint64)[0]) / 2.0**64
    return (start + (index + 1) * _GOLDEN) % 1.0 < prevalence


def make_case(config: SynthConfig, index: int) -> SynthCase:
    """Generate image ``index`` of the set described by ``config`` (without writing it)."""
    rng = case_rng(config.seed, index)
    patient_id = str(uuid.UUID(bytes=rng.bytes(16), version=4))
    sex: Literal["M", "F"] = "F" if rng.random() < 0.45 else "M"
    age = int(np.clip(round(rng.normal(48, 16)), 18, 90))
    target = int(_is_positive(config.seed, index, config.prevalence))
    normal = rng.random() < NORMAL_FRACTION_OF_NEGATIVES
    anatomy = sample_anatomy(rng)
    size = config.image_size
    boxes = sample_boxes(rng, anatomy, size) if target else np.zeros((0, 4), dtype=np.float64)
    image = render_chest(rng, size, boxes, config, anatomy=anatomy)
    class_name = CLASS_POSITIVE if target else (CLASS_NORMAL if normal else CLASS_NOT_NORMAL)
    return SynthCase(index, patient_id, target, class_name, boxes, image, anatomy, sex, age)


def encode_jpeg(image: np.ndarray, quality: int) -> bytes:
    """Baseline 8-bit greyscale JPEG of a uint8 image (Pillow writes baseline by default)."""
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def write_dicom(path: str | Path, case: SynthCase, config: SynthConfig) -> None:
    """Write ``case`` as a JPEG Baseline Secondary Capture DICOM like the RSNA files.

    UIDs are derived from (seed, patientId), so files are byte-identical across runs. The
    patient name is a fixed synthetic one: no real identity is ever written.
    """

    def uid(kind: str) -> UID:
        return generate_uid(entropy_srcs=[_UID_ROOT, str(config.seed), case.patient_id, kind])

    sop_uid = uid("sop")
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = JPEGBaseline8Bit
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds = Dataset()
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = sop_uid
    ds.StudyDate = "19010101"
    ds.StudyTime = "000000.00"
    ds.AccessionNumber = ""
    ds.Modality = "CR"
    ds.ConversionType = "WSD"
    ds.ReferringPhysicianName = ""
    ds.SeriesDescription = f"view: {case.anatomy.view}"
    ds.PatientName = "Anonymous^Synthetic"
    ds.PatientID = case.patient_id
    ds.PatientBirthDate = ""
    ds.PatientSex = case.sex
    ds.PatientAge = f"{case.age:03d}Y"
    ds.BodyPartExamined = "CHEST"
    ds.ViewPosition = case.anatomy.view
    ds.StudyInstanceUID = uid("study")
    ds.SeriesInstanceUID = uid("series")
    ds.StudyID = ""
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    ds.PatientOrientation = ""
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = case.image.shape
    spacing = round(0.143 * REFERENCE_SIZE / case.image.shape[0], 6)
    ds.PixelSpacing = [spacing, spacing]
    ds.BitsAllocated = 8
    ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    ds.LossyImageCompression = "01"
    ds.LossyImageCompressionMethod = "ISO_10918_1"
    ds.add_new(0x7FE00010, "OB", encapsulate([encode_jpeg(case.image, config.jpeg_quality)]))
    ds["PixelData"].is_undefined_length = True
    ds.save_as(path, enforce_file_format=True)


def _fmt(value: float) -> str:
    return f"{float(value):.1f}"


def generate_rsna(
    out_dir: str | Path, config: SynthConfig, *, overwrite: bool = False
) -> SynthSummary:
    """Write a synthetic data set in the exact RSNA Kaggle layout.

    Args:
        out_dir: Folder to write into (created if needed).
        config: What to generate.
        overwrite: Replace the DICOMs of an earlier run in ``out_dir/stage_2_train_images``
            (only ``*.dcm`` files there are deleted). Without it such files are an error, since
            stale images would disagree with the new CSVs.

    Returns:
        A summary of what was written.

    Raises:
        ConfigError: If ``config`` is invalid.
        DataError: If the images folder already holds DICOMs and ``overwrite`` is False.
    """
    validate_config(config)
    out = Path(out_dir)
    images = out / IMAGES_DIR
    stale = sorted(images.glob("*.dcm")) if images.is_dir() else []
    if stale and not overwrite:
        raise DataError(
            f"{images}: already holds {len(stale)} DICOM file(s); choose an empty folder or "
            "pass overwrite=True"
        )
    for f in stale:
        f.unlink()
    images.mkdir(parents=True, exist_ok=True)
    label_rows: list[list[str]] = []
    class_rows: list[list[str]] = []
    n_positive = n_boxes = 0
    for index in range(config.n):
        case = make_case(config, index)
        write_dicom(images / f"{case.patient_id}.dcm", case, config)
        if case.target:
            n_positive += 1
            n_boxes += len(case.boxes)
            for box in case.boxes:
                label_rows.append([case.patient_id, *(_fmt(t) for t in box), "1"])
                class_rows.append([case.patient_id, case.class_name])
        else:
            label_rows.append([case.patient_id, "", "", "", "", "0"])
            class_rows.append([case.patient_id, case.class_name])
    for name, header, rows in (
        (LABELS_CSV, ["patientId", "x", "y", "width", "height", "Target"], label_rows),
        (CLASS_INFO_CSV, ["patientId", "class"], class_rows),
    ):
        with (out / name).open("w", newline="", encoding="utf-8") as fh:
            writer = csv.writer(fh, lineterminator="\n")
            writer.writerow(header)
            writer.writerows(rows)
    logger.info(
        "synthetic RSNA set in %s: %d images, %d positive, %d boxes",
        out,
        config.n,
        n_positive,
        n_boxes,
    )
    return SynthSummary(out, config.n, n_positive, n_boxes)
