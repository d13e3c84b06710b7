"""The non-chest and unusable images of ``benchmarks/input_check_eval.py``, made on the spot.

Every image is ``uint8`` grey (H, W), deterministic per seed, in one of these categories:

* ``blank``: constant images (black, grey, white, at several sizes) and near-constant ones
  (one grey level plus noise of 1-2 levels);
* ``noise``: white Gaussian, uniform and salt-and-pepper noise, low-pass (blurred) noise and
  1/f ("pink") noise;
* ``gradient``: linear ramps at several angles, radial ramps, ramps with a little noise;
* ``photograph``: the pictures scikit-image ships in ``skimage.data`` (no download: only those
  stored in the wheel), each as is, mirrored, and a centre crop; plus faces of its LFW subset;
* ``rotated_90`` / ``rotated_180`` / ``rotated_270`` / ``inverted``: real films (given by the
  caller, from the TEST splits) turned a quarter, half or three quarters, or with their grey
  levels inverted;
* ``lateral_like``: synthetic renderings of a lateral chest view (one lung field, the spine
  along one side, the sternum along the other, the heart in front, the arms raised). Drawn by
  hand with numpy: no real lateral film is in ../shared/data.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

__all__ = ["Negative", "derived_negatives", "synthetic_negatives"]


@dataclass(frozen=True)
class Negative:
    """One image that must be refused."""

    category: str
    name: str
    pixels: np.ndarray


def _u8(values: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(values), 0, 255).astype(np.uint8)


def _blank(rng: np.random.Generator) -> Iterator[Negative]:
    for level in (0, 1, 30, 64, 100, 128, 160, 200, 240, 255):
        for side in (256, 1024):
            yield Negative(
                "blank", f"constant-{level}-{side}", np.full((side, side), level, np.uint8)
            )
    for i, level in enumerate(rng.integers(10, 245, size=10)):
        sigma = 1.0 + (i % 2)
        noisy = level + rng.normal(0, sigma, (512, 512))
        yield Negative("blank", f"near-constant-{level}-sd{sigma:g}", _u8(noisy))


def _noise(rng: np.random.Generator) -> Iterator[Negative]:
    side = 512
    for sd in (10, 30, 60, 90):
        for mean in (64, 128):
            yield Negative(
                "noise", f"gaussian-m{mean}-sd{sd}", _u8(rng.normal(mean, sd, (side, side)))
            )
    for k in range(4):
        lo = int(rng.integers(0, 100))
        yield Negative("noise", f"uniform-{k}", _u8(rng.uniform(lo, 255, (side, side))))
    for k, amount in enumerate((0.05, 0.2, 0.5, 0.9)):
        base = np.full((side, side), 128.0)
        mask = rng.random((side, side)) < amount
        base[mask] = rng.choice([0.0, 255.0], size=int(mask.sum()))
        yield Negative("noise", f"salt-pepper-{k}", _u8(base))
    for sigma in (1, 2, 4, 8, 16, 32):
        for k in range(2):
            smooth = ndimage.gaussian_filter(rng.normal(0, 1, (side, side)), sigma)
            smooth = (smooth - smooth.mean()) / (smooth.std() + 1e-9)
            yield Negative("noise", f"blurred-s{sigma}-{k}", _u8(128 + 50 * smooth))
    freq_y = np.fft.fftfreq(side)[:, None]
    freq_x = np.fft.fftfreq(side)[None, :]
    radius = np.hypot(freq_y, freq_x)
    radius[0, 0] = 1.0
    for k, power in enumerate((0.5, 1.0, 1.5, 2.0)):
        spectrum = np.fft.fft2(rng.normal(0, 1, (side, side))) / radius**power
        field = np.real(np.fft.ifft2(spectrum))
        field = (field - field.mean()) / (field.std() + 1e-9)
        yield Negative("noise", f"pink-{power:g}-{k}", _u8(128 + 45 * field))


def _gradient(rng: np.random.Generator) -> Iterator[Negative]:
    side = 512
    yy, xx = np.mgrid[0:side, 0:side] / (side - 1)
    for angle in range(0, 360, 30):
        t = np.deg2rad(angle)
        ramp = np.cos(t) * xx + np.sin(t) * yy
        ramp = (ramp - ramp.min()) / (np.ptp(ramp) + 1e-9)
        yield Negative("gradient", f"linear-{angle}", _u8(255 * ramp))
    for k in range(8):
        cy, cx = rng.uniform(0.2, 0.8, 2)
        r = np.hypot(yy - cy, xx - cx)
        r = r / r.max()
        ramp = r if k % 2 == 0 else 1 - r
        yield Negative("gradient", f"radial-{k}", _u8(255 * ramp))
    for k in range(10):
        t = rng.uniform(0, 2 * np.pi)
        ramp = np.cos(t) * xx + np.sin(t) * yy
        ramp = (ramp - ramp.min()) / (np.ptp(ramp) + 1e-9)
        lo, hi = sorted(rng.uniform(0, 255, 2))
        noisy = lo + (hi - lo) * ramp + rng.normal(0, 4, (side, side))
        yield Negative("gradient", f"noisy-linear-{k}", _u8(noisy))


_PHOTOS = (
    "astronaut",
    "brick",
    "camera",
    "cat",
    "cell",
    "checkerboard",
    "chelsea",
    "clock",
    "coffee",
    "coins",
    "colorwheel",
    "grass",
    "gravel",
    "horse",
    "hubble_deep_field",
    "immunohistochemistry",
    "logo",
    "microaneurysms",
    "moon",
    "page",
    "retina",
    "rocket",
    "shepp_logan_phantom",
    "text",
    "binary_blobs",
)


def _to_grey(image: np.ndarray) -> np.ndarray:
    """What pneumoloc's reader makes of a colour PNG: Pillow's ITU-R 601-2 luma."""
    from PIL import Image

    array = np.asarray(image)
    if array.dtype == bool:
        array = array.astype(np.uint8) * 255
    elif array.dtype != np.uint8:
        array = _u8(255 * (array - array.min()) / (np.ptp(array) + 1e-9))
    if array.ndim == 3:
        mode = "RGBA" if array.shape[2] == 4 else "RGB"
        return np.asarray(Image.fromarray(array, mode=mode).convert("L"))
    return array


def _photographs(rng: np.random.Generator) -> Iterator[Negative]:
    from skimage import data

    for name in _PHOTOS:
        grey = _to_grey(getattr(data, name)())
        yield Negative("photograph", name, grey)
        yield Negative("photograph", f"{name}-mirrored", np.ascontiguousarray(grey[:, ::-1]))
        h, w = grey.shape
        yield Negative("photograph", f"{name}-crop", grey[h // 6 : h - h // 6, w // 6 : w - w // 6])
    faces = data.lfw_subset()
    for k in rng.choice(len(faces), size=20, replace=False):
        yield Negative("photograph", f"lfw-face-{k}", _to_grey(faces[k]))


def _lateral(rng: np.random.Generator, side: int = 512) -> np.ndarray:
    """A hand-drawn lateral chest view: one lung field, spine behind, sternum in front."""
    yy, xx = np.mgrid[0:side, 0:side] / side
    image = np.full((side, side), 15.0)
    # torso in profile: a tall ellipse, brighter towards the back
    cx, cy = rng.uniform(0.46, 0.54), rng.uniform(0.52, 0.6)
    rx, ry = rng.uniform(0.33, 0.4), rng.uniform(0.45, 0.55)
    torso = ((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2 < 1
    image[torso] = rng.uniform(140, 170)
    # one lung field, a rounded triangle filling most of the chest
    lx, ly = cx + rng.uniform(-0.04, 0.04), cy - rng.uniform(0.05, 0.12)
    lrx, lry = rx * rng.uniform(0.65, 0.8), ry * rng.uniform(0.55, 0.7)
    lung = ((xx - lx) / lrx) ** 2 + (np.maximum(yy - ly, 0) / lry) ** 4 + (
        np.minimum(yy - ly, 0) / (lry * 1.1)
    ) ** 2 < 1
    image[lung] = rng.uniform(50, 85)
    # the spine: a bright column of vertebrae along the back (right), discs darker
    spine_x = cx + rx * rng.uniform(0.55, 0.7)
    spine = (np.abs(xx - spine_x) < 0.045) & torso
    discs = (np.sin(yy * side / rng.uniform(14, 20)) > 0.7) & spine
    image[spine] = rng.uniform(185, 215)
    image[discs] -= 35
    # sternum: a thin bright line at the front (left)
    sternum = (np.abs(xx - (cx - rx * 0.8) - 0.05 * (yy - cy)) < 0.012) & torso & (yy < cy + 0.2)
    image[sternum] = rng.uniform(170, 200)
    # the heart: a bright oval in front of the lower lung
    heart = ((xx - (cx - rx * 0.25)) / (rx * 0.35)) ** 2 + (
        (yy - (ly + lry * 0.5)) / (ry * 0.22)
    ) ** 2 < 1
    image[heart & torso] = rng.uniform(120, 150)
    # diaphragm and abdomen below the lung
    image[(yy > ly + lry * 0.85) & torso] = rng.uniform(160, 185)
    # raised arms over the top
    for dx in (-0.06, 0.06):
        arm = (np.abs(xx - cx - dx - 0.25 * (yy - 0.1)) < 0.05) & (yy < cy - ry * 0.6)
        image[arm] = rng.uniform(130, 170)
    image = ndimage.gaussian_filter(image, side / 120)
    image += ndimage.gaussian_filter(rng.normal(0, 25, image.shape), 1.2)
    if rng.random() < 0.5:
        image = image[:, ::-1]
    return _u8(image)


def _laterals(rng: np.random.Generator, n: int = 30) -> Iterator[Negative]:
    for k in range(n):
        yield Negative("lateral_like", f"lateral-{k}", _lateral(rng))


def synthetic_negatives(seed: int = 0) -> list[Negative]:
    """Blanks, noise, gradients, photographs and lateral-like renderings."""
    rng = np.random.default_rng(seed)
    out: list[Negative] = []
    for make in (_blank, _noise, _gradient, _photographs, _laterals):
        out.extend(make(rng))
    return out


def derived_negatives(films: Sequence[tuple[str, np.ndarray]]) -> list[Negative]:
    """Each real film turned 90, 180 or 270 degrees, or inverted, in turn (one each)."""
    ops = (
        ("rotated_90", lambda a: np.rot90(a, 1)),
        ("rotated_180", lambda a: np.rot90(a, 2)),
        ("rotated_270", lambda a: np.rot90(a, 3)),
        ("inverted", lambda a: 255 - a),
    )
    out = []
    for i, (name, pixels) in enumerate(films):
        category, op = ops[i % len(ops)]
        out.append(Negative(category, f"{category}-{name}", np.ascontiguousarray(op(pixels))))
    return out
