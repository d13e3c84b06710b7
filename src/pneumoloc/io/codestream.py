"""The image size a compressed DICOM frame declares, read from its own header.

A decoder allocates what the codestream declares, not what the DICOM header says: a frame in
a file that declares 64 x 64 may itself declare 65535 x 65535 x 4 components, and pylibjpeg
would allocate gigabytes before pydicom compares the result with the header. So the frame's
own size is read here (JPEG and JPEG-LS: the SOF segment; JPEG 2000 and HTJ2K: the SIZ
segment, also inside a JP2 wrapper) and compared with the header before any decoder runs.
Hand-written because neither pydicom nor Pillow exposes this for every syntax; it reads at
most the segments before the first scan.
"""

from __future__ import annotations

import struct
from typing import NamedTuple

__all__ = ["FrameSize", "frame_size"]

# SOF0-SOF15 but DHT (C4), JPG (C8) and DAC (CC); F7 is JPEG-LS's SOF55.
_SOF_MARKERS = frozenset({*range(0xC0, 0xD0)} - {0xC4, 0xC8, 0xCC} | {0xF7})
_STANDALONE = frozenset({0x01, *range(0xD0, 0xD8)})  # TEM and RSTn: no length field
_SOS, _EOI = 0xDA, 0xD9
_J2K_SOC_SIZ = b"\xff\x4f\xff\x51"
_JP2_SEARCH = 1 << 16  # a JP2 wrapper's boxes before the codestream are small


class FrameSize(NamedTuple):
    """What a codestream declares: rows, columns and components (samples per pixel)."""

    rows: int
    cols: int
    components: int

    @property
    def samples(self) -> int:
        return self.rows * self.cols * self.components


def frame_size(frame: bytes) -> FrameSize | None:
    """The size declared by a JPEG, JPEG-LS or JPEG 2000 frame; None when not found (the
    caller refuses such a frame when its transfer syntax says it is one of these).

    A JPEG whose SOF declares zero rows (the height comes later, in a DNL segment) gives
    ``rows == 0``: its size is unknown until the whole scan is decoded.
    """
    if frame[:2] == b"\xff\xd8":
        return _jpeg_size(frame)
    start = frame.find(_J2K_SOC_SIZ, 0, _JP2_SEARCH)
    if start >= 0:
        return _j2k_size(frame, start + 4)
    return None


def _jpeg_size(data: bytes) -> FrameSize | None:
    """The SOF of a JPEG or JPEG-LS stream. Bytes between segments are skipped, as libjpeg
    skips them ("extraneous bytes before marker"), so that garbage cannot hide a SOF from
    this check that a decoder would still find."""
    pos = 2
    n = len(data)
    while pos + 4 <= n:
        if data[pos] != 0xFF:
            pos = data.find(b"\xff", pos)
            if pos < 0:
                return None
            continue
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker == 0x00 or marker in _STANDALONE:  # stuffed zero (garbage here), TEM, RSTn
            pos += 2
            continue
        if marker in (_SOS, _EOI):
            return None  # a scan before any frame header
        (length,) = struct.unpack_from(">H", data, pos + 2)
        if marker in _SOF_MARKERS:
            if pos + 10 > n:
                return None
            rows, cols = struct.unpack_from(">HH", data, pos + 5)
            return FrameSize(rows, cols, data[pos + 9])
        pos += 2 + max(length, 2)
    return None


def _j2k_size(data: bytes, siz: int) -> FrameSize | None:
    # SIZ: Lsiz Rsiz (2 bytes each), Xsiz Ysiz XOsiz YOsiz XTsiz YTsiz XTOsiz YTOsiz (4), Csiz (2)
    if siz + 38 > len(data):
        return None
    xsiz, ysiz, xo, yo = struct.unpack_from(">IIII", data, siz + 4)
    (csiz,) = struct.unpack_from(">H", data, siz + 36)
    return FrameSize(max(ysiz - yo, 0), max(xsiz - xo, 0), csiz)
