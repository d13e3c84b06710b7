"""The one X-ray reader: DICOM, PNG and JPEG in, an 8-bit grayscale array out.

Every path in pneumoloc (training cache, CLI, web upload) reads images through
:func:`read_xray` or :func:`read_xray_bytes`, so they all share one intensity convention:
``uint8`` of shape ``(H, W)`` where 0 is black (air) and 255 is white (bone).

Intensity rules:

* 8-bit unsigned grayscale data with an identity modality LUT (and no VOI LUT applied) is
  passed through exactly; MONOCHROME1 is inverted as ``255 - v`` so that an image and its
  MONOCHROME1 twin give the same pixels.
* Everything else (16-bit, signed, rescaled, VOI-windowed) is scaled linearly from the
  minimum and maximum of the *actual* values after the LUTs, never from the nominal
  ``BitsStored`` range, which would crush the contrast of a 12-bit image stored in 16 bits.
  A constant image becomes all zeros. MONOCHROME1 is inverted after scaling.

JPEG Baseline DICOMs (all of RSNA) and plain JPEG files are decoded with Pillow; when
``min_size`` is given, libjpeg's DCT scaling decodes at 1/2, 1/4 or 1/8 resolution while
both sides stay at least ``min_size``. Other DICOM transfer syntaxes go through pydicom and
its pylibjpeg plugins at full resolution.

Every failure the user can cause with a file is raised as a subclass of
:class:`pneumoloc.errors.ImageReadError` that names the file; identifying DICOM values are
never logged or put into messages.

This module holds the public entry points and the format sniffing; the work is done in
:mod:`pneumoloc.io.image` (:class:`XrayImage`, limits, shared helpers),
:mod:`pneumoloc.io.dicom` (DICOM) and :mod:`pneumoloc.io.raster` (PNG/JPEG).
"""

from __future__ import annotations

import io
import os
import struct
from pathlib import Path
from typing import BinaryIO

from pneumoloc.errors import ImageTooLargeError, NotAnImageError
from pneumoloc.io.dicom import _read_dicom
from pneumoloc.io.image import (
    DEFAULT_MAX_PIXELS,
    SUPPORTED_SUFFIXES,
    XrayImage,
    _make_options,
    _Options,
)
from pneumoloc.io.raster import _read_pillow

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "SUPPORTED_SUFFIXES",
    "XrayImage",
    "is_supported_file",
    "read_xray",
    "read_xray_bytes",
]

_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_JPEG_MAGIC = b"\xff\xd8\xff"
_DICM_OFFSET = 128
_DICM_MAGIC = b"DICM"
_HEADER_ROOM = 64 << 20  # bytes allowed beyond the pixels: DICOM headers, PNG/JPEG metadata


def is_supported_file(path: str | Path) -> bool:
    """Say whether a file looks like one pneumoloc reads, by its suffix (case-insensitive).

    This is a cheap filter for listing folders; :func:`read_xray` still checks the content.

    Args:
        path: File name or path.

    Returns:
        True when the suffix is one of :data:`SUPPORTED_SUFFIXES`.
    """
    return Path(path).suffix.lower() in SUPPORTED_SUFFIXES


def read_xray(
    path: str | Path,
    *,
    min_size: int | None = None,
    apply_voi_lut: bool = False,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> XrayImage:
    """Read a DICOM, PNG or JPEG chest X-ray as 8-bit grayscale.

    The format is detected from the content, not the suffix.

    Args:
        path: The file to read.
        min_size: When given, JPEG data (plain JPEG files and JPEG Baseline DICOMs) may be
            decoded at 1/2, 1/4 or 1/8 resolution, keeping both sides at least ``min_size``.
            Other formats are decoded at full resolution; the caller resizes.
        apply_voi_lut: Apply the DICOM VOI LUT (window centre/width or VOI LUT Sequence)
            before scaling to 8 bits. Off by default: the full range is kept.
        max_pixels: Refuse images whose declared rows x columns (x frames) exceed this,
            before decoding anything.

    Returns:
        The decoded image.

    Raises:
        NotAnImageError: Empty file, or content that is neither DICOM, PNG nor JPEG.
        NoPixelDataError: A DICOM without pixel data.
        UnsupportedImageError: Colour or multi-frame DICOM, unsupported bit depth or syntax.
        TruncatedImageError: The file is cut short or its compressed stream is corrupt.
        ImageTooLargeError: The declared dimensions exceed ``max_pixels``, the file is larger
            than such an image can be, or its compressed data (a deflated DICOM, a
            compressed frame) expands past what its declared size needs.
        OSError: The file cannot be opened (missing, a directory, no permission).
        ValueError: ``min_size`` or ``max_pixels`` is not a positive integer.
    """
    options = _make_options(min_size, apply_voi_lut, max_pixels)
    path = Path(path)
    with path.open("rb") as fp:
        _check_file_size(os.fstat(fp.fileno()).st_size, str(path), options)
        return _read(fp, str(path), options)


def read_xray_bytes(
    data: bytes,
    name: str,
    *,
    min_size: int | None = None,
    apply_voi_lut: bool = False,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> XrayImage:
    """Read an X-ray held in memory (a web upload, for instance).

    Same behaviour and errors as :func:`read_xray`; the format is detected from the content.

    Args:
        data: The file's bytes.
        name: The file name, used in error messages.
        min_size: See :func:`read_xray`.
        apply_voi_lut: See :func:`read_xray`.
        max_pixels: See :func:`read_xray`.

    Returns:
        The decoded image.
    """
    options = _make_options(min_size, apply_voi_lut, max_pixels)
    _check_file_size(len(data), name, options)
    return _read(io.BytesIO(bytes(data)), name, options)


def _check_file_size(size: int, name: str, options: _Options) -> None:
    """Refuse a file larger than any supported image within the pixel limit could be.

    Every supported image takes at most 4 bytes per pixel uncompressed (16-bit grey with
    alpha, 8-bit RGBA), plus room for headers; a larger file is refused before a byte of it
    is parsed, so no path ever reads a huge file into memory.
    """
    limit = 4 * options.max_pixels + _HEADER_ROOM
    if size > limit:
        raise ImageTooLargeError(
            name,
            f"the file is {size} bytes, more than any image within the limit of "
            f"{options.max_pixels} pixels can take ({limit} bytes); refused before reading",
        )


def _read(fp: BinaryIO, name: str, options: _Options) -> XrayImage:
    """Sniff the content of ``fp`` and dispatch to the matching decoder."""
    head = fp.read(_DICM_OFFSET + len(_DICM_MAGIC))
    fp.seek(0)
    if not head:
        raise NotAnImageError(name, "the file is empty")
    # The DICM check comes first: a DICOM preamble is free-form and may hold other magic.
    if head[_DICM_OFFSET:] == _DICM_MAGIC:
        return _read_dicom(fp, name, options, has_prefix=True)
    if head.startswith(_PNG_MAGIC):
        return _read_pillow(fp, name, "png", options)
    if head.startswith(_JPEG_MAGIC):
        return _read_pillow(fp, name, "jpeg", options)
    if _looks_like_raw_dicom(head):
        return _read_dicom(fp, name, options, has_prefix=False)
    raise NotAnImageError(name, "not a DICOM, PNG or JPEG file (content not recognised)")


def _looks_like_raw_dicom(head: bytes) -> bool:
    """Say whether ``head`` may start a DICOM data set written without preamble and prefix.

    pydicom's ``force=True`` accepts almost any bytes, so we only use it when the first tag
    belongs to group 0002 (file meta) or 0008 (identification), as in every such file seen in
    practice, in either byte order. Hand-written because pydicom offers no such sniffing.
    """
    if len(head) < 8:
        return False
    group_le, element_le = struct.unpack("<HH", head[:4])
    group_be, element_be = struct.unpack(">HH", head[:4])
    return (group_le in (0x0002, 0x0008) and element_le < 0x0100) or (
        group_be in (0x0002, 0x0008) and element_be < 0x0100
    )
