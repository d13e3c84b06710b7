"""Anatomy rendering: the density of a chest without its opacities.

:func:`_field` lays the anatomical grid and the lung fields of one render at base resolution
(at most ``RENDER_BASE`` pixels); :func:`_background` draws the body, mediastinum, heart,
diaphragm, aerated lungs, ribs, clavicles, vessels, soft-tissue texture and the distractors on
it, in density units (0 = air black, 1 = dense bone white).
:mod:`~pneumoloc.data.synthetic.render` adds the opacities, the exposure and the noise.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw
from scipy.ndimage import gaussian_filter

from pneumoloc.data.anatomy import (
    SIDES,
    Anatomy,
    anatomical_grid,
    diaphragm_line,
    lung_masks_on_grid,
    mediastinum_halfwidth,
)
from pneumoloc.data.synthetic.arrays import (
    _bands,
    _ellipse_ramp,
    _ramp,
    _smooth_noise,
    _smoothstep,
    _soft,
)
from pneumoloc.data.synthetic.stats import LUNG_DEPTH


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
