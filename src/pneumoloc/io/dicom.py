"""DICOM decoding: header checks, transfer syntaxes, pixel decoders and the LUTs.

:func:`_read_dicom` parses the data set with pydicom, validates what decoding needs
(pixel data present, single grayscale MONOCHROME1/MONOCHROME2 frame, 8 or 16 bits, declared
size within the limit) before touching pixel data, and checks that a decoder exists for the
transfer syntax. JPEG Baseline frames (all of RSNA) are decoded with Pillow, at 1/2, 1/4 or
1/8 resolution when ``min_size`` allows; every other syntax goes through pydicom and its
pylibjpeg plugins at full resolution.

Memory stays bounded by the declared image, checked before it is spent:

* a deflated data set (Deflated Explicit VR Little Endian) is inflated in bounded chunks by
  :mod:`pneumoloc.io.deflate`, never past what its declared rows x columns x bits need
  (pydicom would inflate it whole inside ``dcmread``);
* native pixel data longer than the declared image needs is refused before it is read;
* a compressed frame whose own header (:mod:`pneumoloc.io.codestream`) declares more samples
  than the DICOM header is refused before any decoder allocates them.

Intensity rules (see :mod:`pneumoloc.io.reader`): 8-bit unsigned data with an identity
modality LUT and no VOI LUT applied passes through exactly; everything else is min-max
scaled from the actual values after the LUTs. MONOCHROME1 is inverted last, as ``255 - v``.
"""

from __future__ import annotations

import io
import logging
import math
from typing import BinaryIO, NamedTuple

import numpy as np
from PIL import Image
from pydicom.dataset import Dataset, FileDataset, FileMetaDataset
from pydicom.encaps import get_frame
from pydicom.filereader import _read_file_meta_info, read_partial, read_preamble
from pydicom.pixels import apply_modality_lut, get_decoder
from pydicom.pixels import apply_voi_lut as _pydicom_apply_voi_lut
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000TransferSyntaxes,
    JPEGBaseline8Bit,
    JPEGLSTransferSyntaxes,
    JPEGTransferSyntaxes,
)

from pneumoloc.errors import (
    ImageReadError,
    ImageTooLargeError,
    NoPixelDataError,
    NotAnImageError,
    TruncatedImageError,
    UnsupportedImageError,
)
from pneumoloc.io.codestream import frame_size
from pneumoloc.io.deflate import TRAILER_BYTES, read_deflated
from pneumoloc.io.guards import ElementGuard, ReadBudget
from pneumoloc.io.image import (
    _DECODE_ERRORS,
    XrayImage,
    _describe,
    _minmax_to_uint8,
    _Options,
)

logger = logging.getLogger(__name__)

# Syntaxes whose frames declare their own size (read by pneumoloc.io.codestream).
_SIZED_CODESTREAMS = frozenset(
    [*JPEGTransferSyntaxes, *JPEGLSTransferSyntaxes, *JPEG2000TransferSyntaxes]
)

# Elements larger than this are not read while parsing the header; pydicom reads them on
# first access. A huge DICOM refused for its declared size is thus never read in full.
_DEFER_SIZE = 1 << 20


class _DicomHeader(NamedTuple):
    rows: int
    cols: int
    photometric: str
    bits_allocated: int
    bits_stored: int
    signed: bool


def _read_dicom(fp: BinaryIO, name: str, options: _Options, *, has_prefix: bool) -> XrayImage:
    """Read a DICOM; ``has_prefix`` says whether it had the "DICM" prefix or was sniffed."""
    ds = _parse_dicom(fp, name, options)
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
    if transfer_syntax.is_encapsulated:
        frame = _first_frame(ds, name, header, transfer_syntax, options.max_pixels)
        fast = (
            transfer_syntax == JPEGBaseline8Bit and header.bits_allocated == 8 and not header.signed
        )
        if fast:
            stored = _decode_jpeg_baseline_frame(frame, ds, name, header, options.min_size)
        del frame
    else:
        _check_native_length(ds, name, header)
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


def _parse_dicom(fp: BinaryIO, name: str, options: _Options) -> FileDataset:
    """The data set in ``fp``, large elements deferred; a deflated one inflated with a budget."""
    start = fp.tell()
    try:
        preamble = read_preamble(fp, force=True)
        # pydicom's own file meta reader (private, but it is what read_partial uses), so that
        # the transfer syntax seen here is the one read_partial would act on.
        file_meta: FileMetaDataset | None = _read_file_meta_info(fp)
        deflated = file_meta is not None and (
            file_meta.get("TransferSyntaxUID") == DeflatedExplicitVRLittleEndian
        )
    except _DECODE_ERRORS:
        file_meta, deflated = None, False  # read_partial below reports the problem
    if deflated and file_meta is not None:

        def allowed_bytes(head: Dataset) -> int:
            try:
                return _pixel_bytes(_check_image_header(head, name, options.max_pixels))
            except _DECODE_ERRORS as exc:
                raise TruncatedImageError(
                    name, f"corrupt DICOM header element ({_describe(exc, head)})"
                ) from exc

        try:
            return read_deflated(fp, name, preamble, file_meta, allowed_bytes)
        except ImageReadError:
            raise
        except _DECODE_ERRORS as exc:
            raise TruncatedImageError(
                name, f"unreadable deflated DICOM (truncated or corrupt: {_describe(exc)})"
            ) from exc
    fp.seek(start)
    budget = ReadBudget(fp, name)
    try:
        # dcmread's own reader, with guards against floods of elements and items.
        return read_partial(budget, ElementGuard(name), defer_size=_DEFER_SIZE, force=True)  # type: ignore[arg-type]
    except _DECODE_ERRORS as exc:
        if budget.error is not None:  # pydicom turned the refusal into an OSError
            raise budget.error from None
        raise TruncatedImageError(
            name, f"unreadable DICOM (truncated or corrupt header: {_describe(exc)})"
        ) from exc


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
    return _check_image_header(ds, name, max_pixels)


def _check_image_header(ds: Dataset, name: str, max_pixels: int) -> _DicomHeader:
    """The checks of :func:`_check_dicom_header` that do not need the pixel data element.

    The declared rows x columns x frames is compared with ``max_pixels``, and only one
    sample per pixel of 8 or 16 bits is accepted, so the pixel data may take at most
    ``2 * max_pixels`` bytes.
    """
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


def _pixel_bytes(header: _DicomHeader) -> int:
    """Bytes of the declared single-frame, one-sample pixel data (native encoding)."""
    return header.rows * header.cols * header.bits_allocated // 8


def _check_native_length(ds: Dataset, name: str, header: _DicomHeader) -> None:
    """Refuse native pixel data much longer than the declared image, before reading it.

    pydicom would read all of it and decode the excess as extra frames.
    """
    element = ds.get_item("PixelData", keep_deferred=True)  # a deferred value stays unread
    length = getattr(element, "length", None)
    if length is None:
        value = getattr(element, "value", None)
        length = len(value) if isinstance(value, bytes | bytearray) else None
    if length is None or length == 0xFFFFFFFF:
        return  # undefined length: pydicom refuses native data encapsulated by mistake
    needed = _pixel_bytes(header)
    if length > needed + TRAILER_BYTES:
        raise ImageTooLargeError(
            name,
            f"the pixel data element declares {length} bytes, but the declared {header.rows} x "
            f"{header.cols} image needs {needed}; refused before reading it",
        )


def _first_frame(
    ds: Dataset, name: str, header: _DicomHeader, syntax: UID, max_pixels: int
) -> bytes:
    """The single encapsulated frame, refused when its own header declares a larger image
    (or, for the JPEG family, declares none that can be found)."""
    try:
        frame = get_frame(ds.PixelData, 0, number_of_frames=1)
    except _DECODE_ERRORS as exc:
        raise TruncatedImageError(
            name, f"truncated or corrupt encapsulated pixel data ({_describe(exc, ds)})"
        ) from exc
    size = frame_size(frame)
    if size is None:
        if syntax in _SIZED_CODESTREAMS:
            raise TruncatedImageError(
                name, "the compressed frame has no readable image header (SOF or SIZ segment)"
            )
        return frame  # RLE, or a codestream we do not parse: decoded to the header's size
    if size.rows == 0:
        raise UnsupportedImageError(
            name, "the compressed frame does not declare its height (JPEG DNL segment)"
        )
    if size.samples > header.rows * header.cols:
        text = f"{size.rows} x {size.cols} x {size.components} component(s)"
        if size.rows * size.cols > max_pixels:
            raise ImageTooLargeError(
                name,
                f"the compressed frame declares {text}, more than the limit of {max_pixels} "
                "pixels; refused before decoding",
            )
        raise TruncatedImageError(
            name,
            f"the compressed frame declares {text}, more than the DICOM header's "
            f"{header.rows} x {header.cols}; refused before decoding",
        )
    return frame


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
    frame: bytes, ds: Dataset, name: str, header: _DicomHeader, min_size: int | None
) -> np.ndarray | None:
    """Fast path: decode the single JPEG Baseline frame with Pillow, maybe at reduced size.

    Returns None when Pillow does not recognise the frame as a plain 8-bit grayscale JPEG of
    the declared size, so that pydicom's general path (pylibjpeg) handles it.
    """
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
    identity = _modality_lut_is_identity(ds, name)
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


def _modality_lut_is_identity(ds: Dataset, name: str = "DICOM") -> bool:
    if "ModalityLUTSequence" in ds:
        return False
    try:
        slope = float(ds.get("RescaleSlope", 1) or 1)
        intercept = float(ds.get("RescaleIntercept", 0) or 0)
        if not (math.isfinite(slope) and math.isfinite(intercept) and slope != 0):
            raise ValueError("not finite, or a zero slope")
    except (TypeError, ValueError) as exc:
        # unusable rescale values (pydicom would fail on them too): ignored, but not silently
        logger.warning(
            "%s: malformed RescaleSlope/RescaleIntercept ignored (%s); the stored values are "
            "used as they are",
            name,
            _describe(exc, ds),
        )
        return True
    return slope == 1.0 and intercept == 0.0
