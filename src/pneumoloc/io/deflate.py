"""Deflated DICOM data sets, inflated with bounded memory.

In the Deflated Explicit VR Little Endian transfer syntax (1.2.840.10008.1.2.1.99) everything
after the file meta group is one raw deflate stream. pydicom inflates that stream whole inside
``dcmread``, before any size can be checked, so a 1 MB file that inflates to 1 GiB costs 1 GiB
(and more in copies). Here the stream is inflated lazily, in bounded chunks
(``zlib.decompressobj().decompress(data, max_length)``), behind a small file-like object that
pydicom parses from, in two passes:

1. the elements before the pixel data, with at most :data:`MAX_HEADER_BYTES` inflated;
2. once ``allowed_bytes(header)`` (the caller's check of the declared rows, columns, frames,
   samples and bits against the pixel limit) has said how large the pixel data may be, the
   whole data set, with at most the header, the declared pixel data and
   :data:`TRAILER_BYTES` inflated.

A stream that would inflate past its budget is refused with
:class:`~pneumoloc.errors.ImageTooLargeError` as soon as it passes it; nothing larger than the
budget (plus one chunk) is ever held.
"""

from __future__ import annotations

import io
import zlib
from collections.abc import Callable
from typing import BinaryIO

from pydicom.dataset import Dataset, FileDataset, FileMetaDataset
from pydicom.filereader import read_dataset

from pneumoloc.errors import ImageReadError, ImageTooLargeError, TruncatedImageError
from pneumoloc.io.guards import PIXEL_TAGS, ElementGuard, ReadBudget

__all__ = ["MAX_HEADER_BYTES", "TRAILER_BYTES", "read_deflated"]

MAX_HEADER_BYTES = 16 << 20
"""Largest inflated size of the elements before the pixel data (real headers: kilobytes)."""

TRAILER_BYTES = 1 << 20
"""Room after the declared pixel data for trailing elements (padding, signatures)."""

_COMPRESSED_CHUNK = 64 << 10  # compressed bytes read from the file at a time
_INFLATED_CHUNK = 1 << 20  # most bytes inflated by one call of the inflater


class _InflatingReader:
    """A read-only, seekable view of a deflate stream, inflated only as far as it is read.

    Everything inflated is kept (pydicom seeks back a few bytes now and then), so the memory
    held is what was read, never more than ``limit`` plus one chunk.
    """

    def __init__(self, source: BinaryIO, name: str, limit: int) -> None:
        self.name = name
        self.limit = limit
        self.error: ImageReadError | None = None  # the refusal, if one was raised
        self.truncated = False  # the file ended before the deflate stream did
        self._source = source
        self._inflater = zlib.decompressobj(-zlib.MAX_WBITS)
        self._sink = io.BytesIO()
        self._size = 0
        self._pos = 0
        self._done = False

    # ---- the file-like protocol pydicom uses

    def read(self, size: int | None = -1) -> bytes:
        if size is None or size < 0:
            self._fill(None)
            end = self._size
        else:
            self._fill(self._pos + size)
            end = min(self._pos + size, self._size)
        if end <= self._pos:
            return b""
        self._sink.seek(self._pos)
        data = self._sink.read(end - self._pos)
        self._pos = end
        return data

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        if whence == io.SEEK_SET:
            target = offset
        elif whence == io.SEEK_CUR:
            target = self._pos + offset
        else:
            self._fill(None)
            target = self._size + offset
        if target < 0:
            raise OSError("negative seek position")
        self._pos = target
        return target

    def tell(self) -> int:
        return self._pos

    # ---- inflation

    @property
    def inflated(self) -> int:
        """Bytes inflated so far."""
        return self._size

    def _fill(self, wanted: int | None) -> None:
        """Inflate until ``wanted`` bytes are held (None: all) or the stream ends."""
        while not self._done and (wanted is None or self._size < wanted):
            room = self.limit - self._size + 1  # one byte past the limit proves the excess
            step = min(_INFLATED_CHUNK, room)
            pending = self._inflater.unconsumed_tail
            if not pending:
                pending = self._source.read(_COMPRESSED_CHUNK)
                if not pending:
                    self._done = True
                    self.truncated = not self._inflater.eof
                    break
            try:
                data = self._inflater.decompress(pending, step)
            except zlib.error as exc:
                self._refuse(
                    TruncatedImageError(self.name, f"corrupt deflate stream in the DICOM ({exc})")
                )
            if data:
                self._sink.seek(0, io.SEEK_END)
                self._sink.write(data)
                self._size += len(data)
            if self._size > self.limit:
                self._refuse(
                    ImageTooLargeError(
                        self.name,
                        f"deflated DICOM data set inflates past {self.limit} bytes, more than its "
                        "declared image needs; refused before inflating further",
                    )
                )
            if self._inflater.eof:
                self._done = True

    def _refuse(self, error: ImageReadError) -> None:
        """Raise ``error``, remembering it (pydicom turns some exceptions into OSError)."""
        self.error = error
        self.release()
        raise error

    def release(self) -> None:
        """Drop what was inflated."""
        self._sink = io.BytesIO()
        self._size = 0
        self._done = True


def _parse(reader: _InflatingReader, **kwargs: object) -> Dataset:
    """pydicom's ``read_dataset`` on the inflated stream, within a read budget; our own
    refusals win over the errors pydicom makes of them."""
    budget = ReadBudget(reader, reader.name)  # type: ignore[arg-type]
    try:
        return read_dataset(budget, is_implicit_VR=False, is_little_endian=True, **kwargs)  # type: ignore[arg-type]
    except Exception:
        for error in (reader.error, budget.error):
            if error is not None:
                raise error from None
        raise


def read_deflated(
    fp: BinaryIO,
    name: str,
    preamble: bytes | None,
    file_meta: FileMetaDataset,
    allowed_bytes: Callable[[Dataset], int],
) -> FileDataset:
    """Parse the deflated data set that follows the file meta in ``fp``, with bounded memory.

    Args:
        fp: Positioned at the first byte after the file meta group.
        name: The file name, for errors.
        preamble: The 128-byte preamble, if the file had one.
        file_meta: The file meta group (its transfer syntax is the deflated one).
        allowed_bytes: Given the elements before the pixel data, the most bytes the pixel
            data may take; raises (a typed error) when the declared image is refused.

    Returns:
        The data set, as ``dcmread`` would have returned it.

    Raises:
        ImageTooLargeError: The stream inflates past the header budget or past what the
            declared image needs.
        TruncatedImageError: The deflate stream is corrupt or ends early.
    """
    reader = _InflatingReader(fp, name, MAX_HEADER_BYTES)
    head = _parse(reader, stop_when=ElementGuard(name, stop_at_pixels=True))
    pixel_offset = reader.tell()
    if _tag_at(reader) in PIXEL_TAGS:
        # Tag, VR, reserved and a 4-byte length precede the value; then an odd-length pad.
        reader.limit = pixel_offset + 12 + allowed_bytes(head) + 1 + TRAILER_BYTES
        reader.seek(0)
        dataset = _parse(reader, stop_when=ElementGuard(name))
    else:
        dataset = head  # no pixel data: the caller says so
    if reader.truncated:
        reader.release()
        raise TruncatedImageError(name, "the deflated DICOM data set ends before its stream does")
    reader.release()
    ds = FileDataset(io.BytesIO(), dataset, preamble, file_meta, False, True)
    ds.set_original_encoding(False, True, dataset._character_set)
    return ds


def _tag_at(reader: _InflatingReader) -> int | None:
    """The tag at the reader's position (None at the end), without moving it."""
    start = reader.tell()
    raw = reader.read(4)
    reader.seek(start)
    if len(raw) < 4:
        return None
    return (int.from_bytes(raw[:2], "little") << 16) | int.from_bytes(raw[2:], "little")
