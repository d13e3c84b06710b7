"""PNG encoding of uint8 pictures (overlays, the web page's images), ten times as fast as Pillow's.

Written by hand, in a dozen lines of the PNG specification, because encoding was the largest
single cost of an overlay: Pillow's encoder (``compress_level=1``) took ~20 ms for a 512 x 609
RGB overlay on this machine. This one applies one filter to every row ("Up": each byte minus the
byte above, computed by numpy in one pass, where Pillow tries filters row by row), and compresses
with Intel's ISA-L (``python-isal``, ``isal_zlib`` level 1: a standard zlib stream, ~1.8 ms for
that overlay and a slightly smaller file, 213 vs 217 kB) or, where ``isal`` is not installed,
the standard library's zlib at level 1 (~7.7 ms). The pixels are the same: PNG is lossless, and
``tests/test_png.py`` decodes every output with Pillow and compares.
"""

from __future__ import annotations

import struct
import zlib

import numpy as np

try:  # ISA-L's deflate: the same zlib format, about four times as fast at level 1
    from isal.isal_zlib import compress as _compress
except ImportError:  # pragma: no cover - a platform without python-isal's wheels
    from zlib import compress as _compress

__all__ = ["encode_png"]

_COLOUR_TYPES = {1: 0, 3: 2, 4: 6}  # grey, RGB, RGBA
_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _chunk(kind: bytes, data: bytes) -> bytes:
    crc = zlib.crc32(kind + data) & 0xFFFFFFFF
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)


def encode_png(pixels: np.ndarray, level: int = 1) -> bytes:
    """The PNG file of a uint8 picture: (H, W) grey, (H, W, 3) RGB or (H, W, 4) RGBA.

    ``level`` is the deflate level, 0 to 3 (ISA-L's range; 1 is the fast default).

    No text or other ancillary chunk is written: nothing but pixels leaves through the file.

    Raises:
        ValueError: Not uint8, an empty picture, or another number of channels.
    """
    arr = np.ascontiguousarray(pixels)
    if arr.dtype != np.uint8 or arr.ndim not in (2, 3) or arr.size == 0:
        raise ValueError(
            f"expected a non-empty uint8 (H, W[, C]) picture, got {arr.dtype} {arr.shape}"
        )
    h, w = arr.shape[:2]
    channels = 1 if arr.ndim == 2 else arr.shape[2]
    if channels not in _COLOUR_TYPES:
        raise ValueError(f"expected 1, 3 or 4 channels, got {channels}")
    if not 0 <= level <= 3:
        raise ValueError(f"level must be 0 to 3, got {level}")
    rows = arr.reshape(h, w * channels)
    filtered = np.empty((h, w * channels + 1), np.uint8)
    filtered[:, 0] = 2  # filter type "Up" on every row (the first row's "above" is zeros)
    filtered[0, 1:] = rows[0]
    np.subtract(rows[1:], rows[:-1], out=filtered[1:, 1:], dtype=np.uint8, casting="unsafe")
    header = struct.pack(">IIBBBBB", w, h, 8, _COLOUR_TYPES[channels], 0, 0, 0)
    return b"".join(
        (
            _SIGNATURE,
            _chunk(b"IHDR", header),
            _chunk(b"IDAT", _compress(filtered.tobytes(), level)),
            _chunk(b"IEND", b""),
        )
    )
