"""Guards on pydicom's parse: a flood of data elements is refused, not parsed for minutes.

Bytes that are not a data set (zeros after a corrupted length, say) parse as millions of
empty 8-byte elements: 16 MB took pydicom 20 s. DICOM requires ascending tags at each level,
so :class:`ElementGuard`, given to pydicom as its ``stop_when`` callback for the top-level
data set, refuses a data set once it has seen more than :data:`MAX_DISORDER` tags that do not
ascend (a few slips in real files are tolerated) or more than :data:`MAX_ELEMENTS` elements
(real headers have a few hundred). :class:`ReadBudget` bounds the parse at every depth,
nested sequence items included.
"""

from __future__ import annotations

from typing import BinaryIO

from pydicom.tag import BaseTag

from pneumoloc.errors import TruncatedImageError

__all__ = ["MAX_DISORDER", "MAX_ELEMENTS", "MAX_READS", "PIXEL_TAGS", "ElementGuard", "ReadBudget"]

MAX_ELEMENTS = 20_000
"""Most top-level data elements accepted in one data set."""

MAX_DISORDER = 16
"""Most top-level tags accepted that are not greater than the one before."""

PIXEL_TAGS = frozenset({0x7FE00010, 0x7FE00008, 0x7FE00009})
"""(Float, double float) pixel data."""


class ElementGuard:
    """pydicom's ``stop_when(tag, vr, length)`` callback that refuses element floods.

    Args:
        name: The file, for the error.
        stop_at_pixels: Also stop (return True) at the pixel data, as
            ``dcmread(stop_before_pixels=True)`` does.
    """

    def __init__(self, name: str, *, stop_at_pixels: bool = False) -> None:
        self.name = name
        self.stop_at_pixels = stop_at_pixels
        self.count = 0
        self.disorder = 0
        self._last = -1

    def __call__(self, tag: BaseTag, vr: str | None, length: int) -> bool:
        value = int(tag)
        self.count += 1
        if value <= self._last:
            self.disorder += 1
        self._last = value
        if self.disorder > MAX_DISORDER or self.count > MAX_ELEMENTS:
            what = (
                f"more than {MAX_DISORDER} data elements out of order"
                if self.disorder > MAX_DISORDER
                else f"more than {MAX_ELEMENTS} data elements"
            )
            raise TruncatedImageError(
                self.name, f"corrupt DICOM data set ({what}); refused before parsing further"
            )
        return self.stop_at_pixels and value in PIXEL_TAGS


MAX_READS = 20_000
"""Most reads pydicom may make while parsing one data set: an RSNA file needs ~150, the
largest file shipped with pydicom (an ECG waveform) 3,600."""


class ReadBudget:
    """A file-like wrapper that refuses a parse needing more than :data:`MAX_READS` reads.

    Nested sequences are parsed eagerly by pydicom, a ``stop_when`` callback does not see
    their items, and each empty item costs about 100 us: 16 MB of them took 84 s. Every
    element costs a few reads, so counting reads bounds the parse, at every depth, to about
    a second.

    Args:
        fp: The stream pydicom parses.
        name: The file, for the error.
        max_reads: The budget.
    """

    def __init__(self, fp: BinaryIO, name: str, max_reads: int = MAX_READS) -> None:
        self._fp = fp
        self._name = name
        self.max_reads = max_reads
        self.reads = 0
        self.error: TruncatedImageError | None = None  # remembered: pydicom rewraps some errors

    def read(self, size: int | None = -1) -> bytes:
        self.reads += 1
        if self.reads > self.max_reads:
            self.error = TruncatedImageError(
                self._name,
                f"corrupt DICOM data set (more than {self.max_reads} reads to parse its "
                "elements and sequence items); refused before parsing further",
            )
            raise self.error
        return self._fp.read(-1 if size is None else size)

    def seek(self, offset: int, whence: int = 0) -> int:
        return self._fp.seek(offset, whence)

    def tell(self) -> int:
        return self._fp.tell()

    @property
    def closed(self) -> bool:
        return bool(getattr(self._fp, "closed", False))
