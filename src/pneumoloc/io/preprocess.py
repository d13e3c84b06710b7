"""From decoded pixels to the network's input: the one resize and the one intensity convention.

Every path (cache, ``predict``, ``submit``, ``serve``, training and inference) goes through these
functions, so a model always sees the pixels it was trained on:

* :func:`load_resized`: ``read_xray(path, min_size=size)`` then :func:`resize_square` (the decode
  and resize of the cache, of ``predict`` and of ``submit``);
* :func:`resize_square`: Pillow's antialiased bilinear resize of a uint8 image to ``size x size``;
* :func:`to_model_input`: uint8 ``[0, 255]`` -> standardised float (``/ 255``, then
  :func:`standardise`); :func:`standardise` is the second half, for images already in ``[0, 1]``
  (training augments in ``[0, 1]``).

The torch functions only call tensor methods, so importing this module does not import torch.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

if TYPE_CHECKING:
    import torch

    from pneumoloc.io.reader import XrayImage

__all__ = [
    "INTENSITY_CONVENTION",
    "INTENSITY_MEAN",
    "INTENSITY_STD",
    "load_resized",
    "resize_square",
    "standardise",
    "to_model_input",
]

# The one intensity convention of every model pneumoloc trains: uint8 -> [0, 1] -> standardised.
INTENSITY_MEAN = 0.5
INTENSITY_STD = 0.25
INTENSITY_CONVENTION: dict[str, Any] = {
    "input": "uint8 grayscale, 0 = black (air), 255 = white (bone)",
    "scale": 1 / 255,
    "mean": INTENSITY_MEAN,
    "std": INTENSITY_STD,
}


def standardise(x: torch.Tensor) -> torch.Tensor:
    """Images already scaled to [0, 1] -> the standardised model input."""
    return (x - INTENSITY_MEAN) / INTENSITY_STD


def to_model_input(images: torch.Tensor) -> torch.Tensor:
    """uint8 (or [0, 255] float) images (B, 1, H, W) -> standardised float32."""
    return standardise(images.float() / 255.0)


def resize_square(pixels: np.ndarray, size: int) -> np.ndarray:
    """Resize a uint8 image to (size, size) with Pillow's antialiased bilinear filter."""
    if pixels.shape == (size, size):
        return pixels
    image = Image.fromarray(pixels).resize((size, size), Image.Resampling.BILINEAR)
    return np.asarray(image, dtype=np.uint8)


def load_resized(path: str | Path, size: int) -> tuple[np.ndarray, XrayImage]:
    """Decode a file and resize it for a model of input side ``size``.

    Returns:
        The uint8 ``(size, size)`` pixels and the decoded image (original shape, view, ...).

    Raises:
        ImageReadError: The file cannot be read as an X-ray (the message names it).
    """
    from pneumoloc.io.reader import read_xray

    image = read_xray(path, min_size=size)
    return resize_square(image.pixels, size), image
