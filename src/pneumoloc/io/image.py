"""The decoded X-ray and what every decoder in :mod:`pneumoloc.io` shares.

Holds :class:`XrayImage`, the supported suffixes and the default size limit, the validated
read options, the tuple of library exceptions that mean "malformed input", the min-max
mapping onto ``uint8`` and :func:`_describe`, which shortens a wrapped library message and
removes identifying DICOM values from it. Decoders live in :mod:`pneumoloc.io.dicom` and
:mod:`pneumoloc.io.raster`; :mod:`pneumoloc.io.reader` dispatches between them.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass
from typing import Any

import numpy as np
from pydicom.dataset import Dataset
from pydicom.errors import BytesLengthException, InvalidDicomError

SUPPORTED_SUFFIXES: tuple[str, ...] = (".dcm", ".dicom", ".png", ".jpg", ".jpeg")
"""File suffixes (lower case) that :func:`pneumoloc.io.is_supported_file` accepts."""

DEFAULT_MAX_PIXELS = 64_000_000
"""Default refusal threshold on the declared number of pixels (rows x columns x frames)."""

# Longest wrapped library message kept in our errors.
_MAX_REASON_CHARS = 300

# Pixels scaled at a time by _minmax_to_uint8 (8 MB of float64 temporaries).
_MINMAX_BLOCK = 1 << 20

# Exceptions that pydicom, Pillow, numpy and the pylibjpeg plugins raise on malformed input.
# They are caught only around calls that parse or decode file content, and re-raised as our
# typed errors. (pydicom's InvalidDicomError and BytesLengthException are plain Exception
# subclasses, hence listed.)
_DECODE_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    EOFError,
    ValueError,
    TypeError,
    KeyError,
    IndexError,
    AttributeError,
    NotImplementedError,
    RuntimeError,
    SyntaxError,
    struct.error,
    zlib.error,
    InvalidDicomError,
    BytesLengthException,  # pydicom: a value's length is no multiple of its VR's size
)

# DICOM keywords whose values may identify a person or a visit; scrubbed from any library
# message we wrap (pydicom messages rarely echo values, but we do not rely on that).
_IDENTIFYING_KEYWORDS = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientBirthName",
    "PatientMotherBirthName",
    "OtherPatientNames",
    "OtherPatientIDs",
    "PatientAddress",
    "PatientTelephoneNumbers",
    "AccessionNumber",
    "InstitutionName",
    "InstitutionAddress",
    "ReferringPhysicianName",
    "PerformingPhysicianName",
    "OperatorsName",
    "StudyID",
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "SOPInstanceUID",
    "StudyDate",
    "StudyTime",
)


@dataclass(frozen=True)
class XrayImage:
    """A decoded X-ray.

    Attributes:
        pixels: ``uint8`` array of shape ``(H, W)``; 0 is black (air), 255 white (bone).
            Smaller than ``original_shape`` when a reduced-resolution decode was used.
        original_shape: ``(rows, cols)`` of the stored image, before any reduced decode.
        source_format: ``"dicom"``, ``"png"`` or ``"jpeg"``.
        view_position: DICOM ViewPosition (``"PA"``, ``"AP"``, ...) when present, else None.
        photometric: DICOM PhotometricInterpretation, or None for PNG/JPEG.
    """

    pixels: np.ndarray
    original_shape: tuple[int, int]
    source_format: str
    view_position: str | None
    photometric: str | None


@dataclass(frozen=True)
class _Options:
    min_size: int | None
    apply_voi_lut: bool
    max_pixels: int


def _make_options(min_size: int | None, apply_voi_lut: bool, max_pixels: int) -> _Options:
    if min_size is not None and (isinstance(min_size, bool) or int(min_size) < 1):
        raise ValueError(f"min_size must be a positive integer or None, got {min_size!r}")
    if int(max_pixels) < 1:
        raise ValueError(f"max_pixels must be a positive integer, got {max_pixels!r}")
    return _Options(
        min_size=None if min_size is None else int(min_size),
        apply_voi_lut=bool(apply_voi_lut),
        max_pixels=int(max_pixels),
    )


def _minmax_to_uint8(values: np.ndarray) -> np.ndarray:
    """Scale the actual value range linearly onto 0..255; a constant image gives zeros."""
    lo = float(values.min())
    hi = float(values.max())
    if not (np.isfinite(lo) and np.isfinite(hi)) or hi <= lo:
        return np.zeros(values.shape, dtype=np.uint8)
    # In blocks, so the float64 temporaries stay small whatever the image size (a 64 Mpx
    # image would otherwise need two 512 MB copies); the arithmetic per pixel is unchanged.
    flat = values.reshape(-1)
    out = np.empty(flat.shape, dtype=np.uint8)
    for start in range(0, flat.size, _MINMAX_BLOCK):
        # Multiply before dividing so that integer inputs land on exact halves where they should.
        scaled = (flat[start : start + _MINMAX_BLOCK].astype(np.float64) - lo) * 255.0
        scaled /= hi - lo
        out[start : start + _MINMAX_BLOCK] = np.rint(scaled)
    return out.reshape(values.shape)


def _describe(exc: BaseException, ds: Dataset | None = None) -> str:
    """A short description of a library exception, with identifying DICOM values removed."""
    text = f"{type(exc).__name__}: {exc}"
    if ds is not None:
        text = _scrub(text, ds)
    if len(text) > _MAX_REASON_CHARS:
        text = text[: _MAX_REASON_CHARS - 3] + "..."
    return text


def _scrub(text: str, ds: Dataset) -> str:
    for keyword in _IDENTIFYING_KEYWORDS:
        try:
            value: Any = ds.get(keyword)
        except _DECODE_ERRORS:
            continue
        if value is None:
            continue
        values = value if isinstance(value, list | tuple) else [value]
        for item in values:
            full = str(item).strip()
            parts = [full, *full.split("^")] if "^" in full else [full]
            for part in parts:
                part = part.strip()
                if len(part) >= 2 and part in text:
                    text = text.replace(part, "<redacted>")
    return text
