"""Issue 14, defect 1: decoding takes bounded memory and time on every path.

A deflated DICOM, a compressed frame, native pixel data or a flood of elements is refused
before it can expand past what the declared image needs; the refusal is a typed error that
names the file, on the reader, ``predict`` and ``prepare`` paths alike. Each test here fails on
the code before issue 14 (wrong outcome, or memory or time far past the bound).
"""

from __future__ import annotations

import io
import time
import tracemalloc
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian

import fuzzing
from pneumoloc.data.cache import STATUS_FAILED, _decode_chunk
from pneumoloc.errors import ImageTooLargeError, TruncatedImageError
from pneumoloc.io import XrayImage, read_xray, read_xray_bytes
from pneumoloc.predict.inputs import read_input

Reader = Callable[[Path], XrayImage]


def _read_path(path: Path) -> XrayImage:
    return read_xray(path)


def _read_bytes(path: Path) -> XrayImage:
    return read_xray_bytes(path.read_bytes(), path.name)


both_readers = pytest.mark.parametrize("read", [_read_path, _read_bytes], ids=["path", "bytes"])


class _Peak:
    peak = 0


@pytest.fixture
def traced() -> Iterator[_Peak]:
    """The peak of Python-visible allocations (bytes, numpy arrays) during the test."""
    tracemalloc.start()
    result = _Peak()
    try:
        yield result
    finally:
        result.peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()


def _peak_now() -> int:
    return tracemalloc.get_traced_memory()[1]


def _write(tmp_path: Path, name: str, data: bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


# ---------------------------------------------------------------------------------------
# Deflated data sets
# ---------------------------------------------------------------------------------------


@both_readers
def test_defect_deflate_bomb_refused_before_inflating(
    read: Reader, tmp_path: Path, traced: _Peak
) -> None:
    # 256 kB that inflate to 256 MiB: pydicom alone would hold 256 MiB, and decode more.
    bomb = fuzzing.deflate_bomb(256 << 20, 1024, 1024)
    assert len(bomb) < 300_000
    path = _write(tmp_path, "bomb.dcm", bomb)
    with pytest.raises(ImageTooLargeError, match="inflates past") as info:
        read(path)
    assert "bomb.dcm" in str(info.value)
    assert _peak_now() < 16_000_000  # what the declared 1024 x 1024 x 8 bits need, and a bit


@both_readers
def test_defect_deflate_bomb_declaring_a_huge_image_refused_before_inflating(
    read: Reader, tmp_path: Path, traced: _Peak
) -> None:
    path = _write(tmp_path, "huge.dcm", fuzzing.deflate_bomb(64 << 20, 60000, 60000))
    with pytest.raises(ImageTooLargeError, match="60000 x 60000"):
        read(path)
    assert _peak_now() < 8_000_000


def test_defect_deflate_header_bomb_refused_before_inflating(traced: _Peak) -> None:
    # The element that inflates (256 MiB) comes before the pixel data.
    with pytest.raises(ImageTooLargeError, match="inflates past"):
        read_xray_bytes(fuzzing.deflate_header_bomb(), "header-bomb.dcm")
    assert _peak_now() < 40_000_000  # the header budget is 16 MiB


def test_deflated_dicoms_read_like_their_native_twins() -> None:
    """The bounded inflation changes nothing for honest deflated files (8 and 16 bits)."""
    img = fuzzing._chest_like(96, 80)
    for arr in (img, img.astype(np.uint16) * 16 + 3):
        native = fuzzing.dicom_bytes(fuzzing.image_dataset(arr, "MONOCHROME1"))
        deflated = fuzzing.dicom_bytes(
            fuzzing.image_dataset(arr, "MONOCHROME1", DeflatedExplicitVRLittleEndian)
        )
        a = read_xray_bytes(native, "native.dcm")
        b = read_xray_bytes(deflated, "deflated.dcm")
        assert np.array_equal(a.pixels, b.pixels)
        assert a.view_position == b.view_position == "PA"
        ds = pydicom.dcmread(io.BytesIO(deflated))
        assert ds.file_meta.TransferSyntaxUID == DeflatedExplicitVRLittleEndian


def test_deflated_dicom_at_the_pixel_limit_is_read() -> None:
    """A deflated image exactly at the limit is an image, not a bomb."""
    image = read_xray_bytes(fuzzing.deflate_at_limit(250_000), "blank.dcm", max_pixels=250_000)
    assert image.pixels.shape == (500, 500) and not image.pixels.any()


@pytest.mark.parametrize("cut", [0.3, 0.9])
def test_truncated_or_corrupt_deflate_stream_is_typed(cut: float) -> None:
    data = fuzzing.dicom_bytes(
        fuzzing.image_dataset(fuzzing._chest_like(96, 80), syntax=DeflatedExplicitVRLittleEndian)
    )
    with pytest.raises(TruncatedImageError, match=r"short\.dcm"):
        read_xray_bytes(data[: int(len(data) * cut)], "short.dcm")
    corrupt = bytearray(data)
    corrupt[-200:-100] = bytes(range(100))
    with pytest.raises(TruncatedImageError):
        read_xray_bytes(bytes(corrupt), "corrupt.dcm")


# ---------------------------------------------------------------------------------------
# Native pixel data, compressed frames, element floods, file sizes
# ---------------------------------------------------------------------------------------


def test_defect_native_pixel_data_longer_than_declared_refused_before_reading(
    tmp_path: Path, traced: _Peak
) -> None:
    # 64 x 64 declared, 32 MiB of pixel data really there: pydicom would read it all and
    # decode 8192 "extra frames".
    ds = fuzzing.image_dataset(np.zeros((64, 64), np.uint8))
    ds.PixelData = bytes(32 << 20)
    path = _write(tmp_path, "long.dcm", fuzzing.dicom_bytes(ds))
    del ds
    tracemalloc.reset_peak()
    with pytest.raises(ImageTooLargeError, match="needs 4096"):
        read_xray(path)
    assert _peak_now() < 8_000_000


@pytest.mark.parametrize("garbage", [b"", b"\x50\x66junk"], ids=["plain", "garbage-after-SOI"])
def test_defect_compressed_frame_larger_than_header_refused_before_decoding(
    traced: _Peak, garbage: bytes
) -> None:
    # A 64 x 64 DICOM whose JPEG frame declares 4096 x 4096: pylibjpeg would decode 16 MB
    # (libjpeg skips bytes between segments, so garbage must not hide the SOF either).
    data = fuzzing.frame_bomb(4096, 4096, garbage)
    tracemalloc.reset_peak()
    with pytest.raises(TruncatedImageError, match="refused before decoding") as info:
        read_xray_bytes(data, "frame.dcm")
    assert "4096 x 4096" in str(info.value)
    assert _peak_now() < 3 * len(data) + 4_000_000


def test_compressed_frame_without_a_readable_header_refused() -> None:
    data = bytearray(fuzzing.frame_bomb(64, 64))
    sof = data.index(b"\xff\xc0")
    data[sof + 1] = 0xC4  # the SOF becomes a (bogus) DHT: no frame header is left
    with pytest.raises(TruncatedImageError, match="no readable image header"):
        read_xray_bytes(bytes(data), "nosof.dcm")


@pytest.mark.timeout(60)
@pytest.mark.parametrize("bomb", ["element-flood.dcm", "sequence-flood.dcm"])
def test_defect_element_floods_refused_in_bounded_time(bomb: str) -> None:
    # 8 MB of empty elements or sequence items: pydicom parsed them for 10 to 40 s.
    data = dict(fuzzing.bombs())[bomb]
    started = time.perf_counter()
    with pytest.raises(TruncatedImageError, match="corrupt DICOM data set"):
        read_xray_bytes(data, bomb)
    assert time.perf_counter() - started < 5.0


def test_defect_malformed_value_length_is_a_typed_error() -> None:
    # Rows (US) holding 3 bytes: pydicom raises BytesLengthException, a bare Exception.
    data = fuzzing.dicom_bytes(fuzzing.image_dataset(np.zeros((8, 8), np.uint8)))
    at = data.index(b"\x28\x00\x10\x00US\x02\x00") + 6
    data = data[:at] + b"\x03\x00" + data[at + 2 : at + 4] + b"\x00" + data[at + 4 :]
    with pytest.raises(TruncatedImageError, match=r"rows\.dcm"):
        read_xray_bytes(data, "rows.dcm")


@pytest.mark.timeout(60)
def test_defect_file_larger_than_any_image_refused_before_reading(tmp_path: Path) -> None:
    # A sparse 68 MB file: a DICOM header, then zeros; the limit allows 1000 pixels.
    path = tmp_path / "big.dcm"
    head = fuzzing._meta_prefix(ExplicitVRLittleEndian) + fuzzing._header_elements(10, 10)
    with path.open("wb") as fp:
        fp.write(head)
        fp.truncate(68 << 20)
    started = time.perf_counter()
    with pytest.raises(ImageTooLargeError, match="refused before reading"):
        read_xray(path, max_pixels=1000)
    assert time.perf_counter() - started < 1.0


def test_png_text_chunk_bomb_is_refused_as_too_large() -> None:
    with pytest.raises(ImageTooLargeError, match="metadata inflates past"):
        read_xray_bytes(fuzzing.png_text_bomb(), "text.png")


# ---------------------------------------------------------------------------------------
# The predict and prepare paths
# ---------------------------------------------------------------------------------------


def test_defect_deflate_bomb_on_the_predict_path(tmp_path: Path, traced: _Peak) -> None:
    path = _write(tmp_path, "bomb.dcm", fuzzing.deflate_bomb(256 << 20, 1024, 1024))
    tracemalloc.reset_peak()
    result = read_input(path, 64, display=True)
    assert result.pixels is None and result.error is not None
    assert "inflates past" in result.error
    assert _peak_now() < 16_000_000


def test_defect_deflate_bomb_on_the_prepare_path(tmp_path: Path, traced: _Peak) -> None:
    images = tmp_path / "images.npy"
    np.save(images, np.zeros((2, 64, 64), np.uint8))
    good = _write(tmp_path, "good.png", fuzzing.pillow_bytes(fuzzing._chest_like(80, 80), "PNG"))
    bomb = _write(tmp_path, "bomb.dcm", fuzzing.deflate_bomb(256 << 20, 1024, 1024))
    tracemalloc.reset_peak()
    rows = _decode_chunk(str(images), 64, [0, 1], [str(good), str(bomb)])
    assert rows[0]["status"] != STATUS_FAILED
    assert rows[1]["status"] == STATUS_FAILED and "inflates past" in rows[1]["error"]
    assert _peak_now() < 16_000_000
