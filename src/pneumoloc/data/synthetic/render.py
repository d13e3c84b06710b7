"""Opacity rendering and :func:`render_chest`, which puts one radiograph together.

:func:`render_chest` draws the background (:mod:`~pneumoloc.data.synthetic.background`), adds
one soft opacity per box (:func:`_opacity_profile`, scaled by :func:`_opacity_density`), then the
per-image exposure, the upsampling to full size and the noise.
"""

from __future__ import annotations

import math

import numpy as np

from pneumoloc.data.anatomy import Anatomy, sample_anatomy
from pneumoloc.data.synthetic.arrays import _resize, _smooth_noise
from pneumoloc.data.synthetic.background import _background, _field
from pneumoloc.data.synthetic.config import SynthConfig
from pneumoloc.data.synthetic.stats import OPACITY_RANGE, RENDER_BASE


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
