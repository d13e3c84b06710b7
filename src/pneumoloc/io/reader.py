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
"""

from __future__ import annotations

import io
import logging
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, NamedTuple

import numpy as np
import pydicom
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.encaps import get_frame
from pydicom.errors import InvalidDicomError
from pydicom.pixels import apply_modality_lut, get_decoder
from pydicom.pixels import apply_voi_lut as _pydicom_apply_voi_lut
from pydicom.uid import (
    UID,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEGBaseline8Bit,
)

from pneumoloc.errors import (
    ImageTooLargeError,
    NoPixelDataError,
    NotAnImageError,
    TruncatedImageError,
    UnsupportedImageError,
)

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "SUPPORTED_SUFFIXES",
    "XrayImage",
    "is_supported_file",
    "read_xray",
    "read_xray_bytes",
]

logger = logging.getLogger(__name__)

SUPPORTED_SUFFIXES: tuple[str, ...] = (".dcm", ".dicom", ".png", ".jpg", ".jpeg")
"""File suffixes (lower case) that :func:`is_supported_file` accepts."""

DEFAULT_MAX_PIXELS = 64_000_000
"""Default refusal threshold on the declared number of pixels (rows x columns x frames)."""

_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_JPEG_MAGIC = b"\xff\xd8\xff"
_DICM_OFFSET = 128
_DICM_MAGIC = b"DICM"
# Elements larger than this are not read while parsing the header; pydicom reads them on
# first access. A huge DICOM refused for its declared size is thus never read in full.
_DEFER_SIZE = 1 << 20
# Longest wrapped library message kept in our errors.
_MAX_REASON_CHARS = 300

# Exceptions that pydicom, Pillow, numpy and the pylibjpeg plugins raise on malformed input.
# They are caught only around calls that parse or decode file content, and re-raised as our
# typed errors. (pydicom's InvalidDicomError is an Exception subclass, not in this tuple.)
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


class _DicomHeader(NamedTuple):
    rows: int
    cols: int
    photometric: str
    bits_allocated: int
    bits_stored: int
    signed: bool


@dataclass(frozen=True)
class _Options:
    min_size: int | None
    apply_voi_lut: bool
    max_pixels: int


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
        ImageTooLargeError: The declared dimensions exceed ``max_pixels``.
        OSError: The file cannot be opened (missing, a directory, no permission).
        ValueError: ``min_size`` or ``max_pixels`` is not a positive integer.
    """
    options = _make_options(min_size, apply_voi_lut, max_pixels)
    path = Path(path)
    with path.open("rb") as fp:
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
    return _read(io.BytesIO(bytes(data)), name, options)


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


# --------------------------------------------------------------------------------------
# DICOM
# --------------------------------------------------------------------------------------


def _read_dicom(fp: BinaryIO, name: str, options: _Options, *, has_prefix: bool) -> XrayImage:
    """Read a DICOM; ``has_prefix`` says whether it had the "DICM" prefix or was sniffed."""
    try:
        ds = pydicom.dcmread(fp, defer_size=_DEFER_SIZE, force=True)
    except _DECODE_ERRORS as exc:
        raise TruncatedImageError(
            name, f"unreadable DICOM (truncated or corrupt header: {_describe(exc)})"
        ) from exc
    if len(ds) == 0:
        # pydicom gives up silently (with a warning) on a stream cut inside a data element.
        if has_prefix:
            raise TruncatedImageError(
                name, "DICOM file is truncated or corrupt: no data element could be read whole"
            )
        raise NotAnImageError(name, "not a DICOM, PNG or JPEG file (no DICOM elements found)")

    try:
        header = _check_dicom_header(ds, name, options.max_pixels)
        transfer_syntax = _transfer_syntax(ds, name)
    except _DECODE_ERRORS as exc:  # pydicom failed to convert a malformed element value
        raise TruncatedImageError(
            name, f"corrupt DICOM header element ({_describe(exc, ds)})"
        ) from exc

    stored: np.ndarray | None = None
    fast = transfer_syntax == JPEGBaseline8Bit and header.bits_allocated == 8 and not header.signed
    if fast:
        stored = _decode_jpeg_baseline_frame(ds, name, header, options.min_size)
    if stored is None:
        stored = _decode_with_pydicom(ds, name, header)
    logger.debug("read %s: DICOM %s, decoded %s", name, transfer_syntax.name, stored.shape)

    pixels = _dicom_to_uint8(ds, name, stored, header.bits_stored, options.apply_voi_lut)
    if header.photometric == "MONOCHROME1":
        pixels = 255 - pixels
    return XrayImage(
        pixels=pixels,
        original_shape=(header.rows, header.cols),
        source_format="dicom",
        view_position=_view_position(ds),
        photometric=header.photometric,
    )


def _view_position(ds: Dataset) -> str | None:
    """DICOM ViewPosition ("PA", "AP", ...), or None when absent, empty or unreadable."""
    try:
        view = ds.get("ViewPosition")
    except _DECODE_ERRORS:
        return None
    if view is None:
        return None
    return str(view).strip().upper() or None


def _check_dicom_header(ds: Dataset, name: str, max_pixels: int) -> _DicomHeader:
    """Validate, before touching pixel data, what decoding needs; return it.

    Raises:
        NoPixelDataError, UnsupportedImageError, ImageTooLargeError.
    """
    if "PixelData" not in ds:
        if "FloatPixelData" in ds or "DoubleFloatPixelData" in ds:
            raise UnsupportedImageError(name, "DICOM float pixel data is not supported")
        raise NoPixelDataError(
            name, "DICOM file has no pixel data (a report or other non-image object?)"
        )
    rows = _int_element(ds, "Rows", name)
    cols = _int_element(ds, "Columns", name)
    frames = _int_element(ds, "NumberOfFrames", name, default=1)
    if rows is None or cols is None or rows < 1 or cols < 1:
        raise UnsupportedImageError(name, "DICOM lacks valid Rows/Columns")
    frames = max(frames or 1, 1)
    declared = rows * cols * frames
    if declared > max_pixels:
        frames_text = f" x {frames} frames" if frames > 1 else ""
        raise ImageTooLargeError(
            name,
            f"declared size {rows} x {cols}{frames_text} = {declared} pixels exceeds "
            f"the limit of {max_pixels}; refused before decoding",
        )
    if frames > 1:
        raise UnsupportedImageError(
            name, f"multi-frame DICOM ({frames} frames); only single-frame X-rays are supported"
        )
    photometric = str(ds.get("PhotometricInterpretation", "")).strip().upper()
    samples = _int_element(ds, "SamplesPerPixel", name, default=1)
    if photometric not in ("MONOCHROME1", "MONOCHROME2") or samples != 1:
        shown = photometric or "missing"
        raise UnsupportedImageError(
            name,
            f"photometric interpretation {shown!r} with {samples} sample(s) per pixel is not "
            "supported; only grayscale MONOCHROME1/MONOCHROME2 DICOMs are",
        )
    bits_allocated = _int_element(ds, "BitsAllocated", name)
    if bits_allocated not in (8, 16):
        raise UnsupportedImageError(
            name, f"BitsAllocated {bits_allocated} is not supported (only 8 or 16)"
        )
    bits_stored = _int_element(ds, "BitsStored", name, default=bits_allocated) or bits_allocated
    if not 1 <= bits_stored <= bits_allocated:
        raise UnsupportedImageError(
            name, f"BitsStored {bits_stored} is inconsistent with BitsAllocated {bits_allocated}"
        )
    signed = _int_element(ds, "PixelRepresentation", name, default=0) == 1
    return _DicomHeader(rows, cols, photometric, bits_allocated, bits_stored, signed)


def _int_element(ds: Dataset, keyword: str, name: str, default: int | None = None) -> int | None:
    value = ds.get(keyword)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except (TypeError, ValueError) as exc:
        raise UnsupportedImageError(name, f"DICOM {keyword} is not a valid integer") from exc


def _transfer_syntax(ds: Dataset, name: str) -> UID:
    """Return the transfer syntax, inferring it for files without file meta; check a decoder."""
    uid = ds.file_meta.get("TransferSyntaxUID")  # dcmread always sets file_meta
    if uid is None:
        is_implicit, is_little = ds.original_encoding
        if is_implicit:
            uid = ImplicitVRLittleEndian
        elif is_little:
            uid = ExplicitVRLittleEndian
        else:
            uid = ExplicitVRBigEndian
        ds.file_meta.TransferSyntaxUID = uid
    uid = UID(str(uid))
    try:
        decoder = get_decoder(uid)
    except NotImplementedError as exc:
        raise UnsupportedImageError(
            name, f"DICOM transfer syntax {uid.name or str(uid)!r} cannot be decoded"
        ) from exc
    if not decoder.is_available:
        missing = "; ".join(decoder.missing_dependencies)
        raise UnsupportedImageError(
            name, f"no decoder installed for DICOM transfer syntax {uid.name!r} ({missing})"
        )
    return uid


def _decode_jpeg_baseline_frame(
    ds: Dataset, name: str, header: _DicomHeader, min_size: int | None
) -> np.ndarray | None:
    """Fast path: decode the single JPEG Baseline frame with Pillow, maybe at reduced size.

    Returns None when Pillow does not recognise the frame as a plain 8-bit grayscale JPEG of
    the declared size, so that pydicom's general path (pylibjpeg) handles it.
    """
    try:
        frame = get_frame(ds.PixelData, 0, number_of_frames=1)
    except _DECODE_ERRORS as exc:
        raise TruncatedImageError(
            name, f"truncated or corrupt encapsulated pixel data ({_describe(exc, ds)})"
        ) from exc
    try:
        img = Image.open(io.BytesIO(frame), formats=("JPEG",))
    except Image.DecompressionBombError as exc:
        raise ImageTooLargeError(name, _describe(exc, ds)) from exc
    except _DECODE_ERRORS as exc:  # includes UnidentifiedImageError (an OSError)
        logger.debug("%s: Pillow cannot open the JPEG frame (%s)", name, _describe(exc, ds))
        return None
    try:
        with img:
            if img.mode != "L" or img.size != (header.cols, header.rows):
                return None
            if min_size is not None:
                img.draft("L", (min_size, min_size))
            img.load()
            return np.array(img)
    except Image.DecompressionBombError as exc:
        raise ImageTooLargeError(name, _describe(exc, ds)) from exc
    except _DECODE_ERRORS as exc:  # includes UnidentifiedImageError (an OSError)
        raise TruncatedImageError(
            name, f"truncated or corrupt JPEG pixel data ({_describe(exc, ds)})"
        ) from exc


def _decode_with_pydicom(ds: Dataset, name: str, header: _DicomHeader) -> np.ndarray:
    try:
        arr = ds.pixel_array
    except _DECODE_ERRORS as exc:
        raise TruncatedImageError(
            name, f"could not decode the pixel data ({_describe(exc, ds)})"
        ) from exc
    expected = (header.rows, header.cols)
    if arr.shape != expected:
        raise TruncatedImageError(
            name, f"decoded pixel data has shape {arr.shape}, expected {expected}"
        )
    return arr


def _dicom_to_uint8(
    ds: Dataset, name: str, stored: np.ndarray, bits_stored: int, apply_voi: bool
) -> np.ndarray:
    """Apply the modality LUT (and the VOI LUT if asked), then map to uint8."""
    identity = _modality_lut_is_identity(ds)
    values: np.ndarray = stored
    try:
        if not identity:
            values = apply_modality_lut(values, ds)
        voi_applied = apply_voi and (
            "VOILUTSequence" in ds or ("WindowCenter" in ds and "WindowWidth" in ds)
        )
        if voi_applied:
            values = _pydicom_apply_voi_lut(values, ds, index=0, prefer_lut=True)
    except _DECODE_ERRORS as exc:
        raise UnsupportedImageError(
            name, f"could not apply the DICOM modality/VOI LUT ({_describe(exc, ds)})"
        ) from exc
    if identity and not voi_applied and values.dtype == np.uint8 and bits_stored == 8:
        return np.ascontiguousarray(values)
    return _minmax_to_uint8(values)


def _modality_lut_is_identity(ds: Dataset) -> bool:
    if "ModalityLUTSequence" in ds:
        return False
    try:
        slope = float(ds.get("RescaleSlope", 1) or 1)
        intercept = float(ds.get("RescaleIntercept", 0) or 0)
    except (TypeError, ValueError):
        return True  # unusable rescale values: pydicom would fail on them too; ignore them
    return slope == 1.0 and intercept == 0.0


def _minmax_to_uint8(values: np.ndarray) -> np.ndarray:
    """Scale the actual value range linearly onto 0..255; a constant image gives zeros."""
    lo = float(values.min())
    hi = float(values.max())
    if not (np.isfinite(lo) and np.isfinite(hi)) or hi <= lo:
        return np.zeros(values.shape, dtype=np.uint8)
    # Multiply before dividing so that integer inputs land on exact halves where they should.
    scaled = (values.astype(np.float64) - lo) * 255.0
    scaled /= hi - lo
    return np.rint(scaled).astype(np.uint8)


# --------------------------------------------------------------------------------------
# PNG / JPEG
# --------------------------------------------------------------------------------------


def _read_pillow(fp: BinaryIO, name: str, fmt: str, options: _Options) -> XrayImage:
    label = fmt.upper()
    try:
        img = Image.open(fp, formats=("PNG",) if fmt == "png" else ("JPEG", "MPO"))
    except Image.DecompressionBombError as exc:
        raise ImageTooLargeError(name, f"declared {label} size is absurd ({exc})") from exc
    except _DECODE_ERRORS as exc:  # includes UnidentifiedImageError (an OSError)
        raise TruncatedImageError(
            name, f"truncated or corrupt {label} header ({_describe(exc)})"
        ) from exc
    with img:
        width, height = img.size
        if width * height > options.max_pixels:
            raise ImageTooLargeError(
                name,
                f"declared size {height} x {width} = {width * height} pixels exceeds the "
                f"limit of {options.max_pixels}; refused before decoding",
            )
        if fmt == "jpeg":
            # Asking for "L" also makes libjpeg emit luma only for colour JPEGs (cheaper than
            # decoding RGB and converting); the size request enables DCT scaling.
            target = (options.min_size, options.min_size) if options.min_size else img.size
            img.draft("L", target)
        try:
            img.load()
            pixels = _pillow_to_uint8(img)
        except Image.DecompressionBombError as exc:
            raise ImageTooLargeError(name, str(exc)) from exc
        except _DECODE_ERRORS as exc:
            raise TruncatedImageError(
                name, f"truncated or corrupt {label} data ({_describe(exc)})"
            ) from exc
    return XrayImage(
        pixels=pixels,
        original_shape=(height, width),
        source_format=fmt,
        view_position=None,
        photometric=None,
    )


def _pillow_to_uint8(img: Image.Image) -> np.ndarray:
    """8-bit grayscale passes through; 16/32-bit grayscale is min-max scaled; colour -> L."""
    if img.mode == "L":
        return np.array(img)
    if img.mode.startswith("I") or img.mode == "F":
        return _minmax_to_uint8(np.array(img))
    # RGB, RGBA, LA, P, 1, CMYK, YCbCr: Pillow's ITU-R 601-2 luma, what users expect for
    # X-rays saved in colour.
    return np.array(img.convert("L"))


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
