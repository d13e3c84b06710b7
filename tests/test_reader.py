"""Tests for pneumoloc.io.reader: formats, intensity rules, reduced decode and typed errors."""

from __future__ import annotations

import io
import struct
import tracemalloc
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import (
    JPEG2000,
    UID,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGLosslessSV1,
    RLELossless,
    SecondaryCaptureImageStorage,
)

import pneumoloc.io.dicom as dicom_module
import pneumoloc.io.image as image_module
from conftest import crafted_png
from pneumoloc.errors import (
    ImageReadError,
    ImageTooLargeError,
    NoPixelDataError,
    NotAnImageError,
    TruncatedImageError,
    UnsupportedImageError,
)
from pneumoloc.io import (
    SUPPORTED_SUFFIXES,
    XrayImage,
    is_supported_file,
    read_xray,
    read_xray_bytes,
)

RSNA_DIR = (
    Path(__file__).resolve().parents[2]
    / "shared"
    / "data"
    / "rsna-pneumonia-sample"
    / "stage_2_train_images"
)
PATIENT_NAME = "Doe^Jane"

# ---------------------------------------------------------------------------------------
# Builders
# ---------------------------------------------------------------------------------------


def make_ds(
    arr: np.ndarray,
    photometric: str = "MONOCHROME2",
    bits_stored: int | None = None,
    **elements: object,
) -> Dataset:
    """A minimal secondary-capture DICOM holding ``arr`` uncompressed."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = "1.2.826.0.1.3680043.8.498.1"
    ds.PatientName = PATIENT_NAME
    ds.PatientID = "DOE-123456"
    ds.set_pixel_data(
        arr, photometric, bits_stored or arr.dtype.itemsize * 8, generate_instance_uid=False
    )
    for keyword, value in elements.items():
        setattr(ds, keyword, value)
    return ds


def save(ds: Dataset, path: Path) -> Path:
    ds.save_as(path, enforce_file_format=True)
    return path


def dicom_bytes(ds: Dataset) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def encapsulated(ds: Dataset, frame: bytes, transfer_syntax: str) -> Dataset:
    """Replace the native pixel data of ``ds`` by one encapsulated frame."""
    ds.PixelData = encapsulate([frame])
    ds["PixelData"].VR = "OB"
    ds.file_meta.TransferSyntaxUID = UID(transfer_syntax)
    return ds


def pillow_bytes(arr: np.ndarray, fmt: str, **kwargs: object) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def encode_lossless_jpeg(arr: np.ndarray, precision: int) -> bytes:
    """Encode grayscale ``arr`` as JPEG Lossless, process 14, selection value 1 (ITU T.81 H).

    Hand-written because no installed library encodes this DICOM syntax (pydicom has no
    encoder for it and Pillow does not write lossless JPEG). One Huffman table gives every
    difference category 0..16 a 5-bit code; the predictor is the left neighbour, the upper
    one at the start of each line, and 2**(P-1) for the first pixel.
    """
    rows, cols = arr.shape
    values = arr.astype(np.int64)
    out = bytearray()
    acc, nbits = 0, 0

    def put(code: int, length: int) -> None:
        nonlocal acc, nbits
        acc = (acc << length) | (code & ((1 << length) - 1))
        nbits += length
        while nbits >= 8:
            byte = (acc >> (nbits - 8)) & 0xFF
            out.append(byte)
            if byte == 0xFF:
                out.append(0x00)  # byte stuffing
            nbits -= 8

    for r in range(rows):
        for c in range(cols):
            if r == 0 and c == 0:
                pred = 1 << (precision - 1)
            elif c == 0:
                pred = int(values[r - 1, 0])
            else:
                pred = int(values[r, c - 1])
            diff = (int(values[r, c]) - pred) & 0xFFFF
            if diff >= 0x8000:
                diff -= 0x10000
            ssss = abs(diff).bit_length()
            put(ssss, 5)
            if 0 < ssss < 16:
                put(diff if diff > 0 else diff + (1 << ssss) - 1, ssss)
    if nbits:
        put((1 << (8 - nbits)) - 1, 8 - nbits)  # pad with 1-bits

    bits = [0] * 16
    bits[4] = 17  # seventeen codes of length 5
    sof = struct.pack(">BHHBBBB", precision, rows, cols, 1, 1, 0x11, 0)
    dht = bytes([0x00]) + bytes(bits) + bytes(range(17))
    sos = bytes([1, 1, 0x00, 1, 0, 0])  # Ns, Cs, Td/Ta, Ss = predictor 1, Se, Ah/Al
    return (
        b"\xff\xd8"
        + b"\xff\xc3"
        + struct.pack(">H", len(sof) + 2)
        + sof
        + b"\xff\xc4"
        + struct.pack(">H", len(dht) + 2)
        + dht
        + b"\xff\xda"
        + struct.pack(">H", len(sos) + 2)
        + sos
        + bytes(out)
        + b"\xff\xd9"
    )


def smooth_u8(rows: int, cols: int) -> np.ndarray:
    yy, xx = np.mgrid[0:rows, 0:cols]
    return (40 + 150 * (xx + yy) / (rows + cols - 2)).astype(np.uint8)


def shipped(name: str) -> str:
    path = get_testdata_file(name, download=False)
    assert path is not None, f"{name} should ship with the installed pydicom wheel"
    return str(path)


Reader = Callable[..., XrayImage]


def read_path(path: Path, **kwargs: object) -> XrayImage:
    return read_xray(path, **kwargs)  # type: ignore[arg-type]


def read_bytes(path: Path, **kwargs: object) -> XrayImage:
    return read_xray_bytes(path.read_bytes(), path.name, **kwargs)  # type: ignore[arg-type]


both_readers = pytest.mark.parametrize("read", [read_path, read_bytes], ids=["path", "bytes"])


# ---------------------------------------------------------------------------------------
# Suffixes
# ---------------------------------------------------------------------------------------


def test_supported_suffixes_case_insensitive() -> None:
    assert SUPPORTED_SUFFIXES == (".dcm", ".dicom", ".png", ".jpg", ".jpeg")
    assert is_supported_file("a/b/IMG.DCM")
    assert is_supported_file(Path("x.Jpeg"))
    assert is_supported_file("scan.dicom")
    assert not is_supported_file("notes.txt")
    assert not is_supported_file("noext")


# ---------------------------------------------------------------------------------------
# DICOM intensity rules
# ---------------------------------------------------------------------------------------


@both_readers
def test_monochrome2_8bit_passes_through_exactly(read: Reader, tmp_path: Path) -> None:
    arr = np.random.default_rng(0).integers(3, 251, (20, 30), dtype=np.uint8)
    path = save(make_ds(arr, PatientName=PATIENT_NAME, ViewPosition="PA"), tmp_path / "a.dcm")
    img = read(path)
    assert img.pixels.dtype == np.uint8
    np.testing.assert_array_equal(img.pixels, arr)  # not stretched to 0..255
    assert img.original_shape == (20, 30)
    assert img.source_format == "dicom"
    assert img.photometric == "MONOCHROME2"
    assert img.view_position == "PA"


def test_monochrome1_16bit_is_inverted(tmp_path: Path) -> None:
    stored = np.array([[0, 1600], [3200, 4080]], dtype=np.uint16)  # 4080 = 16 * 255
    img = read_xray(save(make_ds(stored, "MONOCHROME1", 12), tmp_path / "m1.dcm"))
    np.testing.assert_array_equal(img.pixels, [[255, 155], [55, 0]])
    assert img.photometric == "MONOCHROME1"


def test_monochrome1_8bit_equals_its_monochrome2_twin(tmp_path: Path) -> None:
    arr = np.random.default_rng(1).integers(10, 200, (8, 9), dtype=np.uint8)
    mono2 = read_xray(save(make_ds(arr), tmp_path / "m2.dcm"))
    mono1 = read_xray(save(make_ds(255 - arr, "MONOCHROME1"), tmp_path / "m1.dcm"))
    np.testing.assert_array_equal(mono1.pixels, mono2.pixels)
    np.testing.assert_array_equal(mono1.pixels, arr)


def test_16bit_scaled_by_actual_range_not_bits_stored(tmp_path: Path) -> None:
    # A 12-bit image that only uses 100..300: scaling by 4095 would make it nearly black.
    stored = np.array([[100, 140], [180, 300]], dtype=np.uint16)
    img = read_xray(save(make_ds(stored, bits_stored=12), tmp_path / "a.dcm"))
    np.testing.assert_array_equal(img.pixels, [[0, 51], [102, 255]])


def test_negative_rescale_slope_reverses_order(tmp_path: Path) -> None:
    stored = np.array([[0, 1600], [3200, 4080]], dtype=np.uint16)
    ds = make_ds(stored, bits_stored=12, RescaleSlope=-1, RescaleIntercept=0)
    img = read_xray(save(ds, tmp_path / "a.dcm"))
    np.testing.assert_array_equal(img.pixels, [[255, 155], [55, 0]])


def test_rescale_intercept_disables_8bit_passthrough(tmp_path: Path) -> None:
    stored = np.array([[10, 20], [30, 40]], dtype=np.uint8)
    ds = make_ds(stored, RescaleSlope=1, RescaleIntercept=-1024)
    img = read_xray(save(ds, tmp_path / "a.dcm"))
    np.testing.assert_array_equal(img.pixels, [[0, 85], [170, 255]])


def test_modality_lut_sequence_is_applied(tmp_path: Path) -> None:
    stored = np.array([[0, 1], [2, 3]], dtype=np.uint16)
    ds = make_ds(stored, bits_stored=16)
    item = Dataset()
    item.LUTDescriptor = [4, 0, 16]
    item.ModalityLUTType = "US"
    item.add_new("LUTData", "US", [1000, 0, 3000, 2000])  # non-monotonic on purpose
    ds.ModalityLUTSequence = [item]
    img = read_xray(save(ds, tmp_path / "a.dcm"))
    np.testing.assert_array_equal(img.pixels, [[85, 0], [255, 170]])


def test_signed_pixels(tmp_path: Path) -> None:
    stored = np.array([[-1000, 600], [1400, 3000]], dtype=np.int16)
    ds = make_ds(stored, bits_stored=16)
    assert ds.PixelRepresentation == 1
    img = read_xray(save(ds, tmp_path / "s.dcm"))
    np.testing.assert_array_equal(img.pixels, [[0, 102], [153, 255]])


def test_constant_image_maps_to_zeros(tmp_path: Path) -> None:
    stored = np.full((5, 7), 1234, dtype=np.uint16)
    img = read_xray(save(make_ds(stored), tmp_path / "c.dcm"))
    assert img.pixels.shape == (5, 7)
    assert not img.pixels.any()


def test_voi_window_only_when_asked(tmp_path: Path) -> None:
    stored = np.array([[500, 950], [1050, 3000], [0, 4000]], dtype=np.uint16)
    ds = make_ds(stored, bits_stored=12, WindowCenter=1000, WindowWidth=200)
    path = save(ds, tmp_path / "w.dcm")
    plain = read_xray(path).pixels
    windowed = read_xray(path, apply_voi_lut=True).pixels
    # Without VOI: min-max of 0..4000.
    np.testing.assert_array_equal(plain, np.rint(stored / 4000 * 255).astype(np.uint8))
    # With the window 900..1100: clipped outside, ~linear inside.
    assert windowed[0, 0] == 0 and windowed[2, 0] == 0
    assert windowed[1, 1] == 255 and windowed[2, 1] == 255
    assert 40 < windowed[0, 1] < 90 < 165 < windowed[1, 0] < 215


def test_voi_on_shipped_mr_differs(tmp_path: Path) -> None:
    path = shipped("MR_small.dcm")  # carries WindowCenter 600 / WindowWidth 1600
    plain = read_xray(path).pixels
    windowed = read_xray(path, apply_voi_lut=True).pixels
    assert plain.shape == windowed.shape == (64, 64)
    assert (windowed == 255).sum() > (plain == 255).sum()


def test_shipped_monochrome1_cr_is_inverted() -> None:
    # A real 12-bit MONOCHROME1 CR with RescaleSlope 0.684 shipped with pydicom.
    path = get_testdata_file("dicomdirtests/77654033/CR1/6154", download=False)
    if path is None:
        pytest.skip("this pydicom wheel does not ship the dicomdirtests CR image")
    ds = pydicom.dcmread(str(path))
    img = read_xray(str(path))
    stored = ds.pixel_array.astype(np.float64)
    expected = 255 - np.rint((stored - stored.min()) / (stored.max() - stored.min()) * 255)
    np.testing.assert_array_equal(img.pixels, expected.astype(np.uint8))


def test_dicom_without_preamble_is_sniffed(tmp_path: Path) -> None:
    arr = np.arange(64, dtype=np.uint16).reshape(8, 8) * 50
    ds = Dataset()
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.set_pixel_data(arr, "MONOCHROME2", 12, generate_instance_uid=False)
    del ds.file_meta
    path = tmp_path / "raw"
    pydicom.dcmwrite(path, ds, implicit_vr=True, little_endian=True)
    assert path.read_bytes()[128:132] != b"DICM"
    img = read_xray(path)
    np.testing.assert_array_equal(img.pixels, np.rint(arr / arr.max() * 255).astype(np.uint8))


# ---------------------------------------------------------------------------------------
# Compressed transfer syntaxes
# ---------------------------------------------------------------------------------------


def test_lossless_syntaxes_match_uncompressed(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    arr = (rng.integers(0, 4096, (32, 40)) // 3).astype(np.uint16)
    reference = read_xray(save(make_ds(arr, bits_stored=12), tmp_path / "native.dcm")).pixels

    rle = make_ds(arr, bits_stored=12)
    rle.compress(RLELossless, generate_instance_uid=False)
    j2k = make_ds(arr, bits_stored=12)
    j2k.compress(JPEG2000Lossless, generate_instance_uid=False)
    ljpeg = encapsulated(
        make_ds(arr, bits_stored=12), encode_lossless_jpeg(arr, 12), JPEGLosslessSV1
    )
    for label, ds in (("rle", rle), ("j2k", j2k), ("ljpeg", ljpeg)):
        img = read_xray(save(ds, tmp_path / f"{label}.dcm"))
        np.testing.assert_array_equal(img.pixels, reference, err_msg=label)


def test_lossless_jpeg_8bit_passthrough(tmp_path: Path) -> None:
    arr = np.random.default_rng(3).integers(0, 256, (12, 10), dtype=np.uint8)
    ds = encapsulated(make_ds(arr), encode_lossless_jpeg(arr, 8), JPEGLosslessSV1)
    np.testing.assert_array_equal(read_xray(save(ds, tmp_path / "l.dcm")).pixels, arr)


def test_lossy_jpeg2000_close_to_uncompressed(tmp_path: Path) -> None:
    arr = smooth_u8(64, 64).astype(np.uint16) * 16
    reference = read_xray(save(make_ds(arr, bits_stored=12), tmp_path / "n.dcm")).pixels
    ds = make_ds(arr, bits_stored=12)
    ds.compress(JPEG2000, j2k_cr=[10], generate_instance_uid=False)
    img = read_xray(save(ds, tmp_path / "j.dcm")).pixels
    diff = np.abs(img.astype(int) - reference)
    assert 0 < diff.mean() < 2.0  # lossy, yet close (measured 1.05)


@pytest.mark.parametrize(
    "name", ["MR_small_RLE.dcm", "MR_small_jp2klossless.dcm", "MR_small_jpeg_ls_lossless.dcm"]
)
def test_shipped_lossless_variants_match_mr_small(name: str) -> None:
    reference = read_xray(shipped("MR_small.dcm")).pixels
    np.testing.assert_array_equal(read_xray(shipped(name)).pixels, reference)


@pytest.mark.parametrize("name", ["MR_small_implicit.dcm", "MR_small_bigendian.dcm"])
def test_shipped_native_variants_match_mr_small(name: str) -> None:
    reference = read_xray(shipped("MR_small.dcm")).pixels
    np.testing.assert_array_equal(read_xray(shipped(name)).pixels, reference)


def test_shipped_jpeg2000_decodes() -> None:
    img = read_xray(shipped("JPEG2000.dcm"))
    assert img.pixels.shape == img.original_shape == (1024, 256)
    assert img.pixels.min() == 0 and img.pixels.max() == 255


def test_jpeg_baseline_dicom_fast_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    arr = smooth_u8(48, 64)
    frame = pillow_bytes(arr, "JPEG", quality=90)
    path = save(encapsulated(make_ds(arr), frame, JPEGBaseline8Bit), tmp_path / "jb.dcm")

    pydicom_pixels = pydicom.dcmread(path).pixel_array

    def no_pydicom(*args: object, **kwargs: object) -> np.ndarray:
        raise AssertionError("JPEG Baseline must not go through pydicom's pixel_array")

    monkeypatch.setattr(dicom_module, "_decode_with_pydicom", no_pydicom)
    img = read_xray(path)
    # Exactly what Pillow decodes from the frame; close to pydicom's decode and the original.
    np.testing.assert_array_equal(img.pixels, np.array(Image.open(io.BytesIO(frame))))
    assert np.abs(img.pixels.astype(int) - pydicom_pixels).max() <= 2
    assert np.abs(img.pixels.astype(int) - arr).mean() < 2.0
    assert img.original_shape == (48, 64)


@pytest.mark.parametrize("min_size", [8, 20, 30, 60, 500])
def test_jpeg_baseline_dicom_reduced_decode(tmp_path: Path, min_size: int) -> None:
    arr = smooth_u8(240, 130)
    frame = pillow_bytes(arr, "JPEG", quality=90)
    path = save(encapsulated(make_ds(arr), frame, JPEGBaseline8Bit), tmp_path / "jb.dcm")
    img = read_xray(path, min_size=min_size)
    rows, cols = img.pixels.shape
    assert img.original_shape == (240, 130)
    assert min(rows, cols) >= min(min_size, 130)
    scale = {8: 8, 20: 4, 30: 4, 60: 2, 500: 1}[min_size]  # largest of 8/4/2/1 that fits
    assert (rows, cols) == (-(-240 // scale), -(-130 // scale))


@both_readers
def test_large_native_pixel_data_read_after_header(read: Reader, tmp_path: Path) -> None:
    # 1.2 MB of pixel data: above the reader's defer size, so pydicom reads it on access.
    arr = (np.arange(1000 * 600, dtype=np.uint32).reshape(1000, 600) % 4001).astype(np.uint16)
    img = read(save(make_ds(arr, bits_stored=12), tmp_path / "big.dcm"))
    np.testing.assert_array_equal(img.pixels, np.rint(arr / 4000 * 255).astype(np.uint8))


def test_min_size_leaves_other_syntaxes_at_full_size(tmp_path: Path) -> None:
    arr = np.arange(64 * 64, dtype=np.uint16).reshape(64, 64)
    img = read_xray(save(make_ds(arr), tmp_path / "n.dcm"), min_size=16)
    assert img.pixels.shape == img.original_shape == (64, 64)


# ---------------------------------------------------------------------------------------
# PNG and JPEG files
# ---------------------------------------------------------------------------------------


@both_readers
def test_png_8bit_passthrough(read: Reader, tmp_path: Path) -> None:
    arr = np.random.default_rng(4).integers(5, 250, (17, 23), dtype=np.uint8)
    path = tmp_path / "a.png"
    path.write_bytes(pillow_bytes(arr, "PNG"))
    img = read(path)
    np.testing.assert_array_equal(img.pixels, arr)
    assert img.original_shape == (17, 23)
    assert (img.source_format, img.photometric, img.view_position) == ("png", None, None)


def test_png_16bit_min_max(tmp_path: Path) -> None:
    arr = np.array([[0, 1600], [3200, 4080]], dtype=np.uint16) + 7
    path = tmp_path / "a.png"
    path.write_bytes(pillow_bytes(arr, "PNG"))
    assert Image.open(path).mode == "I;16"
    np.testing.assert_array_equal(read_xray(path).pixels, [[0, 100], [200, 255]])


def test_rgb_png_converted_to_luma(tmp_path: Path) -> None:
    yy, xx = np.mgrid[0:16, 0:16]
    rgb = np.stack([xx * 16, yy * 16, 255 - xx * 8], axis=-1).astype(np.uint8)
    path = tmp_path / "c.png"
    path.write_bytes(pillow_bytes(rgb, "PNG"))
    expected = np.array(Image.fromarray(rgb).convert("L"))
    np.testing.assert_array_equal(read_xray(path).pixels, expected)


@both_readers
def test_jpeg_grayscale(read: Reader, tmp_path: Path) -> None:
    arr = smooth_u8(40, 50)
    data = pillow_bytes(arr, "JPEG", quality=95)
    path = tmp_path / "a.jpg"
    path.write_bytes(data)
    img = read(path)
    np.testing.assert_array_equal(img.pixels, np.array(Image.open(io.BytesIO(data))))
    assert np.abs(img.pixels.astype(int) - arr).mean() < 2.0
    assert (img.source_format, img.original_shape) == ("jpeg", (40, 50))


def test_rgb_jpeg_converted_to_luma(tmp_path: Path) -> None:
    yy, xx = np.mgrid[0:64, 0:64]
    rgb = np.stack([xx * 4, yy * 4, (xx + yy) * 2], axis=-1).astype(np.uint8)
    data = pillow_bytes(rgb, "JPEG", quality=95)
    img = read_xray_bytes(data, "colour.jpeg")
    assert img.pixels.shape == (64, 64) and img.pixels.dtype == np.uint8
    expected = np.array(Image.open(io.BytesIO(data)).convert("L"))
    assert np.abs(img.pixels.astype(int) - expected).max() <= 1


def test_jpeg_reduced_decode(tmp_path: Path) -> None:
    data = pillow_bytes(smooth_u8(200, 320), "JPEG")
    img = read_xray_bytes(data, "big.jpg", min_size=50)
    assert img.original_shape == (200, 320)
    assert img.pixels.shape == (50, 80)  # 1/4 scale keeps both sides >= 50


def test_format_detected_by_content_not_suffix(tmp_path: Path) -> None:
    arr = smooth_u8(8, 8)
    path = tmp_path / "really_a_png.dcm"
    path.write_bytes(pillow_bytes(arr, "PNG"))
    assert read_xray(path).source_format == "png"
    dcm = save(make_ds(arr), tmp_path / "really_a_dicom.jpg")
    assert read_xray(dcm).source_format == "dicom"


# ---------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------


def expect_error(
    read: Reader, path: Path, error: type[ImageReadError], **kwargs: object
) -> ImageReadError:
    with pytest.raises(error) as info:
        read(path, **kwargs)
    message = str(info.value)
    assert path.name in message
    assert "Doe" not in message and "Jane" not in message and "DOE-123456" not in message
    return info.value


@both_readers
@pytest.mark.parametrize(
    ("filename", "content"),
    [
        ("random.dcm", np.random.default_rng(5).integers(0, 256, 1000, dtype=np.uint8).tobytes()),
        ("empty.png", b""),
        ("notes.dcm", b"Patient Doe^Jane was seen today.\n" * 20),
        ("short.jpg", b"\x00\x01"),
    ],
)
def test_not_an_image(read: Reader, tmp_path: Path, filename: str, content: bytes) -> None:
    path = tmp_path / filename
    path.write_bytes(content)
    expect_error(read, path, NotAnImageError)


@both_readers
def test_dicom_without_pixel_data(read: Reader, tmp_path: Path) -> None:
    ds = make_ds(np.zeros((4, 4), np.uint8))
    del ds.PixelData
    expect_error(read, save(ds, tmp_path / "report.dcm"), NoPixelDataError)


def test_shipped_structured_report_has_no_pixel_data(tmp_path: Path) -> None:
    path = tmp_path / "sr.dcm"
    path.write_bytes(Path(shipped("test-SR.dcm")).read_bytes())
    expect_error(read_path, path, NoPixelDataError)


@both_readers
@pytest.mark.parametrize("photometric", ["RGB", "YBR_FULL"])
def test_colour_dicom_unsupported(read: Reader, tmp_path: Path, photometric: str) -> None:
    arr = np.zeros((4, 4, 3), np.uint8)
    error = expect_error(
        read, save(make_ds(arr, photometric), tmp_path / "c.dcm"), UnsupportedImageError
    )
    assert photometric in str(error)


@pytest.mark.parametrize(
    "name",
    [
        "SC_rgb_small_odd.dcm",  # RGB, native
        "SC_rgb_jpeg_dcmtk.dcm",  # YBR_FULL, JPEG Baseline
        "examples_palette.dcm",  # PALETTE COLOR
        "examples_ybr_color.dcm",  # multi-frame colour
        "rtdose_1frame.dcm",  # BitsAllocated 32
        "liver_1frame.dcm",  # BitsAllocated 1
    ],
)
def test_shipped_unsupported_files(tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    path.write_bytes(Path(shipped(name)).read_bytes())
    expect_error(read_path, path, UnsupportedImageError)


@both_readers
def test_multi_frame_unsupported(read: Reader, tmp_path: Path) -> None:
    arr = np.zeros((3, 4, 4), np.uint16)
    error = expect_error(read, save(make_ds(arr), tmp_path / "mf.dcm"), UnsupportedImageError)
    assert "3 frames" in str(error)


@both_readers
@pytest.mark.parametrize("keep", [0.5, 0.9])
def test_truncated_native_dicom(read: Reader, tmp_path: Path, keep: float) -> None:
    data = dicom_bytes(make_ds(np.ones((64, 64), np.uint16), bits_stored=12))
    path = tmp_path / "cut.dcm"
    path.write_bytes(data[: int(len(data) * keep)])
    expect_error(read, path, TruncatedImageError)


@pytest.mark.filterwarnings("ignore:End of file reached before delimiter:UserWarning")
@both_readers
@pytest.mark.parametrize("keep", [0.5, 0.97])
def test_truncated_jpeg_baseline_dicom(read: Reader, tmp_path: Path, keep: float) -> None:
    arr = smooth_u8(64, 64)
    ds = encapsulated(make_ds(arr), pillow_bytes(arr, "JPEG"), JPEGBaseline8Bit)
    data = dicom_bytes(ds)
    path = tmp_path / "cut.dcm"
    path.write_bytes(data[: int(len(data) * keep)])
    expect_error(read, path, TruncatedImageError)


def test_corrupt_jpeg_frame_in_dicom(tmp_path: Path) -> None:
    arr = smooth_u8(64, 64)
    frame = pillow_bytes(arr, "JPEG")
    broken = frame[: len(frame) // 2] + b"\xff\xd9"  # stream ends early, EOI present
    path = save(encapsulated(make_ds(arr), broken, JPEGBaseline8Bit), tmp_path / "bad.dcm")
    expect_error(read_path, path, TruncatedImageError)


def test_shipped_truncated_mr(tmp_path: Path) -> None:
    path = tmp_path / "MR_truncated.dcm"
    path.write_bytes(Path(shipped("MR_truncated.dcm")).read_bytes())
    expect_error(read_path, path, TruncatedImageError)


@both_readers
@pytest.mark.parametrize(("fmt", "suffix"), [("PNG", ".png"), ("JPEG", ".jpg")])
@pytest.mark.parametrize("keep", [0.1, 0.6])
def test_truncated_png_jpeg(
    read: Reader, tmp_path: Path, fmt: str, suffix: str, keep: float
) -> None:
    arr = np.random.default_rng(6).integers(0, 256, (64, 64), dtype=np.uint8)
    data = pillow_bytes(arr, fmt)
    path = tmp_path / f"cut{suffix}"
    path.write_bytes(data[: int(len(data) * keep)])
    expect_error(read, path, TruncatedImageError)


@both_readers
def test_huge_dicom_refused_before_decoding(read: Reader, tmp_path: Path) -> None:
    ds = make_ds(np.zeros((2, 2), np.uint8))
    ds.Rows = 60000
    ds.Columns = 60000
    path = save(ds, tmp_path / "huge.dcm")
    tracemalloc.start()
    try:
        error = expect_error(read, path, ImageTooLargeError)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert "60000 x 60000" in str(error)
    assert peak < 20_000_000  # decoding would need 3.6 GB


@both_readers
@pytest.mark.parametrize(("width", "height"), [(100_000, 100_000), (9000, 8000)])
def test_huge_png_refused_before_decoding(
    read: Reader, tmp_path: Path, width: int, height: int
) -> None:
    path = tmp_path / "huge.png"
    path.write_bytes(crafted_png(width, height))
    tracemalloc.start()
    try:
        expect_error(read, path, ImageTooLargeError)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 20_000_000


def test_huge_jpeg_header_refused(tmp_path: Path) -> None:
    data = bytearray(pillow_bytes(smooth_u8(16, 16), "JPEG"))
    sof = data.index(b"\xff\xc0")
    data[sof + 5 : sof + 9] = struct.pack(">HH", 60000, 60000)  # height, width
    path = tmp_path / "huge.jpg"
    path.write_bytes(bytes(data))
    expect_error(read_path, path, ImageTooLargeError)


def test_max_pixels_is_honoured(tmp_path: Path) -> None:
    arr = np.zeros((10, 10), np.uint8)
    png = tmp_path / "small.png"
    png.write_bytes(pillow_bytes(arr, "PNG"))
    dcm = save(make_ds(arr), tmp_path / "small.dcm")
    for path in (png, dcm):
        expect_error(read_path, path, ImageTooLargeError, max_pixels=99)
        assert read_xray(path, max_pixels=100).pixels.shape == (10, 10)


def test_patient_name_never_in_messages(tmp_path: Path) -> None:
    """Every DICOM failure above carries PatientName Doe^Jane; check the messages again."""
    cases: list[tuple[Dataset, type[ImageReadError]]] = []
    no_pixels = make_ds(np.zeros((4, 4), np.uint8))
    del no_pixels.PixelData
    cases.append((no_pixels, NoPixelDataError))
    cases.append((make_ds(np.zeros((4, 4, 3), np.uint8), "RGB"), UnsupportedImageError))
    bad_frame = encapsulated(
        make_ds(smooth_u8(32, 32)), b"\xff\xd8\xff" + b"Doe^Jane", JPEGBaseline8Bit
    )
    cases.append((bad_frame, TruncatedImageError))
    for index, (ds, error) in enumerate(cases):
        assert str(ds.PatientName) == PATIENT_NAME
        path = save(ds, tmp_path / f"case{index}.dcm")
        expect_error(read_path, path, error)


def test_wrapped_library_messages_are_scrubbed() -> None:
    ds = make_ds(np.zeros((2, 2), np.uint8))
    text = image_module._describe(ValueError(f"bad value {PATIENT_NAME} / DOE-123456"), ds)
    assert text.startswith("ValueError: bad value")
    assert "Doe" not in text and "Jane" not in text and "DOE-123456" not in text


def test_invalid_options() -> None:
    with pytest.raises(ValueError, match="min_size"):
        read_xray_bytes(b"", "x.png", min_size=0)
    with pytest.raises(ValueError, match="max_pixels"):
        read_xray_bytes(b"", "x.png", max_pixels=0)


def test_missing_file_raises_oserror(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        read_xray(tmp_path / "absent.dcm")


def test_native_syntax_default_is_explicit_little_endian(tmp_path: Path) -> None:
    path = save(make_ds(np.zeros((2, 2), np.uint8)), tmp_path / "a.dcm")
    assert pydicom.dcmread(path).file_meta.TransferSyntaxUID == ExplicitVRLittleEndian


# ---------------------------------------------------------------------------------------
# Real RSNA data (skipped when the shared sample is absent)
# ---------------------------------------------------------------------------------------


def rsna_files(count: int) -> list[Path]:
    if not RSNA_DIR.is_dir():
        pytest.skip(f"RSNA sample not found at {RSNA_DIR}")
    files = sorted(RSNA_DIR.glob("*.dcm"))[:count]
    if not files:
        pytest.skip(f"no DICOM files in {RSNA_DIR}")
    return files


def test_rsna_fast_path_matches_pydicom() -> None:
    # Measured on all 636 sample files: Pillow (libjpeg-turbo) vs pydicom's default decoder
    # (pylibjpeg) differ by at most 1 grey level, mean |diff| at most 0.033.
    for path in rsna_files(5):
        img = read_xray(path)
        reference = pydicom.dcmread(path).pixel_array
        assert img.pixels.shape == img.original_shape == (1024, 1024)
        assert img.pixels.dtype == np.uint8
        assert img.photometric == "MONOCHROME2"
        assert img.view_position in ("PA", "AP")
        diff = np.abs(img.pixels.astype(np.int16) - reference)
        assert diff.mean() < 0.2 and diff.max() <= 2, path.name


def test_rsna_reduced_decode() -> None:
    path = rsna_files(1)[0]
    full = read_xray(path).pixels
    small = read_xray(path, min_size=256)
    assert small.pixels.shape == (256, 256)
    assert small.original_shape == (1024, 1024)
    # The DCT-scaled decode is close to a 4x4 box average of the full decode.
    box = full.reshape(256, 4, 256, 4).mean(axis=(1, 3))
    assert np.abs(small.pixels - box).mean() < 2.0
