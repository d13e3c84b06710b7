"""``pneumoloc.io.png``: the hand-written encoder gives back exactly the pixels, per Pillow."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from pneumoloc.io.png import encode_png


@pytest.mark.parametrize(
    "shape", [(1, 1), (7, 5), (64, 48), (300, 200), (5, 9, 3), (609, 512, 3), (33, 17, 4)]
)
def test_pillow_reads_back_the_same_pixels(shape: tuple[int, ...]) -> None:
    rng = np.random.default_rng(len(shape) * 100 + shape[0])
    pixels = rng.integers(0, 256, shape, dtype=np.uint8)
    pixels[..., : shape[1] // 2] //= 7  # some smooth, some noisy content
    with Image.open(io.BytesIO(encode_png(pixels))) as img:
        img.load()
        assert img.mode == ("L" if len(shape) == 2 else {3: "RGB", 4: "RGBA"}[shape[2]])
        back = np.asarray(img)
    assert back.shape == pixels.shape and np.array_equal(back, pixels)


def test_refuses_what_it_cannot_write() -> None:
    with pytest.raises(ValueError, match="uint8"):
        encode_png(np.zeros((4, 4), np.float32))
    with pytest.raises(ValueError, match="channels"):
        encode_png(np.zeros((4, 4, 2), np.uint8))
    with pytest.raises(ValueError, match="non-empty"):
        encode_png(np.zeros((0, 4), np.uint8))
