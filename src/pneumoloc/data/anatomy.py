"""Coarse frontal chest anatomy for the synthetic data: lung fields, heart, mediastinum, body.

All lengths are fractions of the image side, so one :class:`Anatomy` renders at any size. Shapes
are evaluated in an "anatomical frame": image coordinates rotated by the patient's tilt about the
image centre. Image left is the patient's right (radiological convention), so the patient's left
lung, narrowed by the heart, is on the right of the image.

The shapes are hand-written closed forms (superellipses, ellipses, bands) because no library
models a chest; they are cheap to evaluate on a grid with numpy.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np

Side = Literal["right", "left"]
"""Patient side: "right" is the image-left lung, "left" the image-right lung."""

SIDES: tuple[Side, Side] = ("right", "left")


@dataclass(frozen=True)
class Lung:
    """One lung field before the heart and mediastinum are cut out of it.

    Attributes:
        cx: Centre, horizontal, fraction of the image side.
        cy: Centre, vertical.
        rx: Half-width.
        ry: Half-height.
        p_top: Superellipse exponent of the upper half (2 = ellipse: a rounded apex).
        p_bottom: Exponent of the lower half (larger = boxier: deep costophrenic angles).
        dome: Height of the diaphragm dome cut into the base, fraction of the image side.
    """

    cx: float
    cy: float
    rx: float
    ry: float
    p_top: float
    p_bottom: float
    dome: float


@dataclass(frozen=True)
class Anatomy:
    """Per-image anatomy, drawn with jitter by :func:`sample_anatomy`.

    Attributes:
        mid_x: Midline (spine) position.
        tilt_deg: Rotation of the patient in the image plane, degrees.
        right_lung: The patient's right lung (image left).
        left_lung: The patient's left lung (image right).
        heart: (cx, cy, rx, ry) of the heart ellipse.
        mediastinum_hw: Half-width of the mediastinum at its top and at the diaphragm.
        body_hw: Half-width of the torso.
        shoulder_y: Vertical position of the shoulders (top of the torso).
        view: "PA" or "AP"; AP films show a larger heart and higher clavicles.
    """

    mid_x: float
    tilt_deg: float
    right_lung: Lung
    left_lung: Lung
    heart: tuple[float, float, float, float]
    mediastinum_hw: tuple[float, float]
    body_hw: float
    shoulder_y: float
    view: Literal["PA", "AP"]

    def lung(self, side: Side) -> Lung:
        """The lung on the patient's ``side``."""
        return self.right_lung if side == "right" else self.left_lung


def sample_anatomy(rng: np.random.Generator) -> Anatomy:
    """Draw one anatomy with plausible jitter of position, size, tilt and view.

    The lung centres were chosen so that boxes drawn inside them reproduce the RSNA box centres
    (mean x about 0.31 and 0.70 of the width, mean y about 0.52 of the height).
    """
    view: Literal["PA", "AP"] = "AP" if rng.random() < 0.5 else "PA"
    scale = float(rng.uniform(0.92, 1.06))
    mid = 0.5 + float(rng.normal(0.0, 0.015))
    cy = 0.46 + float(rng.normal(0.0, 0.015))
    sep = 0.19 * scale * float(rng.uniform(0.96, 1.04))
    right = Lung(
        cx=mid - sep,
        cy=cy,
        rx=0.145 * scale * float(rng.uniform(0.93, 1.07)),
        ry=0.30 * scale * float(rng.uniform(0.93, 1.05)),
        p_top=float(rng.uniform(1.9, 2.3)),
        p_bottom=float(rng.uniform(2.8, 3.6)),
        dome=float(rng.uniform(0.04, 0.08)),
    )
    left = Lung(
        cx=mid + sep,
        cy=cy + float(rng.uniform(0.005, 0.025)),  # the left hemidiaphragm sits lower
        rx=0.14 * scale * float(rng.uniform(0.93, 1.07)),
        ry=0.30 * scale * float(rng.uniform(0.93, 1.05)),
        p_top=float(rng.uniform(1.9, 2.3)),
        p_bottom=float(rng.uniform(2.8, 3.6)),
        dome=float(rng.uniform(0.03, 0.07)),
    )
    heart_scale = float(rng.uniform(1.05, 1.2)) if view == "AP" else float(rng.uniform(0.9, 1.05))
    heart = (
        mid + 0.055 * scale,
        cy + 0.26 * scale,
        0.14 * scale * heart_scale,
        0.17 * scale * heart_scale,
    )
    return Anatomy(
        mid_x=mid,
        tilt_deg=float(np.clip(rng.normal(0.0, 1.5), -4.0, 4.0)),
        right_lung=right,
        left_lung=left,
        heart=heart,
        mediastinum_hw=(0.045 * scale, 0.075 * scale),
        body_hw=float(rng.uniform(0.38, 0.47)) * scale,
        shoulder_y=cy - 0.33 * scale + float(rng.normal(0.0, 0.01)),
        view=view,
    )


def anatomical_grid(size: int, anatomy: Anatomy) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates of a ``size`` x ``size`` image in the anatomical frame.

    Returns:
        (u, v), float32 arrays of shape (size, size): horizontal and vertical positions as
        fractions of the image side, rotated by ``-anatomy.tilt_deg`` about the image centre.
    """
    c = (np.arange(size, dtype=np.float32) + 0.5) / size - 0.5
    x, y = c[None, :], c[:, None]
    t = math.radians(anatomy.tilt_deg)
    cos, sin = np.float32(math.cos(t)), np.float32(math.sin(t))
    u = 0.5 + cos * x + sin * y
    v = 0.5 - sin * x + cos * y
    return u.astype(np.float32), v.astype(np.float32)


def mediastinum_halfwidth(v: np.ndarray, anatomy: Anatomy) -> np.ndarray:
    """Half-width of the mediastinum at vertical position ``v`` (widens toward the diaphragm)."""
    top, bottom = anatomy.mediastinum_hw
    lung = anatomy.right_lung
    t = np.clip((v - (lung.cy - lung.ry)) / (2 * lung.ry), 0.0, 1.0)
    return top + (bottom - top) * t


def heart_mask(u: np.ndarray, v: np.ndarray, anatomy: Anatomy) -> np.ndarray:
    """Inside of the heart ellipse."""
    hx, hy, hrx, hry = anatomy.heart
    return ((u - hx) / hrx) ** 2 + ((v - hy) / hry) ** 2 <= 1.0


def raw_lung_mask(u: np.ndarray, v: np.ndarray, lung: Lung) -> np.ndarray:
    """Superellipse lung with the diaphragm dome cut from its base (heart not removed)."""
    dy = (v - lung.cy) / lung.ry
    # narrower at the apex, widest at the base: the lateral border curves out going down
    dx = (u - lung.cx) / (lung.rx * (0.86 + 0.2 * np.clip(dy, -1.0, 1.0)))
    p = np.where(dy < 0, np.float32(lung.p_top), np.float32(lung.p_bottom))
    inside = np.abs(dx) ** p + np.abs(dy) ** p <= 1.0
    return inside & (v <= diaphragm_line(u, lung))


def diaphragm_line(u: np.ndarray, lung: Lung) -> np.ndarray:
    """Vertical position of the diaphragm under ``lung``: a dome, highest under its centre."""
    dx = np.clip((u - lung.cx) / lung.rx, -1.0, 1.0)
    return lung.cy + lung.ry - lung.dome * (1.0 - dx**2)


def lung_masks_on_grid(
    u: np.ndarray, v: np.ndarray, anatomy: Anatomy
) -> tuple[np.ndarray, np.ndarray]:
    """(right, left) lung-field masks on an anatomical grid, heart and mediastinum removed."""
    centre = np.abs(u - anatomy.mid_x) < mediastinum_halfwidth(v, anatomy)
    heart = heart_mask(u, v, anatomy)
    right = raw_lung_mask(u, v, anatomy.right_lung) & ~centre & ~heart & (u < anatomy.mid_x)
    left = raw_lung_mask(u, v, anatomy.left_lung) & ~centre & ~heart & (u > anatomy.mid_x)
    return right, left


def lung_field_mask(size: int, anatomy: Anatomy, side: Side | None = None) -> np.ndarray:
    """Boolean mask of the lung fields of ``anatomy`` in a ``size`` x ``size`` image.

    Args:
        size: Image side in pixels.
        anatomy: The anatomy the image was rendered with.
        side: "right" or "left" (the patient's) for one lung; None for both.

    Returns:
        bool array of shape (size, size).
    """
    u, v = anatomical_grid(size, anatomy)
    right, left = lung_masks_on_grid(u, v, anatomy)
    if side == "right":
        return right
    if side == "left":
        return left
    return right | left


def mask_bbox(mask: np.ndarray) -> tuple[int, int, int, int] | None:
    """Tight bounding box (x0, y0, x1, y1) of a mask, ends exclusive; None if it is empty."""
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        return None
    return int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1
