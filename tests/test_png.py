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


def test_deflate_level_is_checked_and_every_level_is_lossless() -> None:
    pixels = np.random.default_rng(3).integers(0, 256, (40, 30, 3), dtype=np.uint8)
    for level in range(4):
        with Image.open(io.BytesIO(encode_png(pixels, level=level))) as img:
            assert np.array_equal(np.asarray(img), pixels)
    with pytest.raises(ValueError, match="level"):
        encode_png(pixels, level=9)


def test_standard_zlib_fallback_writes_the_same_pixels(monkeypatch: pytest.MonkeyPatch) -> None:
    """Where python-isal is missing, the standard library's zlib encodes (same format)."""
    import zlib

    import pneumoloc.io.png as png

    pixels = np.random.default_rng(4).integers(0, 256, (50, 20), dtype=np.uint8)
    monkeypatch.setattr(png, "_compress", zlib.compress)
    with Image.open(io.BytesIO(png.encode_png(pixels))) as img:
        assert np.array_equal(np.asarray(img), pixels)
