"""Hostile inputs for the one reader: seed files, bombs and seeded mutations.

Shared by ``tests/test_fuzz.py`` (a few hundred cases, seconds) and
``benchmarks/fuzz_inputs.py`` (10,000 cases or more). A case is a byte string built from a
seed file (synthetic DICOMs, PNGs and JPEGs written here, plus real RSNA and Kermany files
from ``../shared/data`` when present) or a bomb (deflate, JPEG, PNG, compressed-frame and
declared-size bombs), then maybe mutated (truncated, bits flipped, integers overwritten with
huge values, slices duplicated or cut). Every case must end in a typed pneumoloc error or a
valid :class:`~pneumoloc.io.XrayImage`: :func:`run_case` says which, and lets any other
exception through.
"""

from __future__ import annotations

import io
import struct
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import numpy as np
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset, write_file_meta_info
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEGBaseline8Bit,
    RLELossless,
    SecondaryCaptureImageStorage,
)

from pneumoloc.errors import PneumolocError
from pneumoloc.io import XrayImage, read_xray_bytes

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
RSNA_IMAGES = SHARED_DATA / "rsna-pneumonia-sample" / "stage_2_train_images"
KERMANY = SHARED_DATA / "kermany-pediatric" / "train"

FUZZ_MAX_PIXELS = 4_000_000
"""The pixel limit the fuzz cases are read with: bombs "at the limit" stay cheap to decode."""

OK = "ok"


# ---------------------------------------------------------------------------------------
# Seed files
# ---------------------------------------------------------------------------------------


def _chest_like(rows: int, cols: int, seed: int = 0) -> np.ndarray:
    """A smooth grey image with two darker "lungs" and a little noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:rows, 0:cols] / max(rows, cols)
    img = 170 - 60 * np.exp(-(((xx - 0.3) / 0.15) ** 2 + ((yy - 0.5) / 0.3) ** 2))
    img -= 60 * np.exp(-(((xx - 0.7) / 0.15) ** 2 + ((yy - 0.5) / 0.3) ** 2))
    return np.clip(img + rng.normal(0, 4, img.shape), 0, 255).astype(np.uint8)


def image_dataset(
    arr: np.ndarray, photometric: str = "MONOCHROME2", syntax: UID = ExplicitVRLittleEndian
) -> Dataset:
    """A minimal secondary-capture DICOM of ``arr`` (native), with a tagged patient."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = "1.2.826.0.1.3680043.8.498.14"
    ds.PatientName = "Fuzz^Case"
    ds.PatientID = "FUZZ-1"
    ds.Modality = "CR"
    ds.ViewPosition = "PA"
    ds.set_pixel_data(arr, photometric, arr.dtype.itemsize * 8, generate_instance_uid=False)
    ds.file_meta.TransferSyntaxUID = syntax
    return ds


def dicom_bytes(ds: Dataset) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def pillow_bytes(arr: np.ndarray, fmt: str, **kwargs: object) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def _jpeg_dicom(arr: np.ndarray) -> bytes:
    ds = image_dataset(arr)
    ds.PixelData = encapsulate([pillow_bytes(arr, "JPEG", quality=90)])
    ds["PixelData"].VR = "OB"
    ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    return dicom_bytes(ds)


def _rle_dicom(arr: np.ndarray) -> bytes:
    ds = image_dataset(arr)
    ds.compress(RLELossless, generate_instance_uid=False)
    return dicom_bytes(ds)


@cache
def synthetic_seeds() -> tuple[tuple[str, bytes], ...]:
    """Small valid files in every format and syntax the reader supports."""
    img = _chest_like(96, 80)
    wide = (img.astype(np.uint16) * 16 + 7).astype(np.uint16)  # 12 bits in 16
    rgb = np.stack([img, img // 2, 255 - img], axis=-1)
    return (
        ("native8.dcm", dicom_bytes(image_dataset(img))),
        ("native16-mono1.dcm", dicom_bytes(image_dataset(wide, "MONOCHROME1"))),
        ("implicit.dcm", dicom_bytes(image_dataset(img, syntax=ImplicitVRLittleEndian))),
        ("deflated.dcm", dicom_bytes(image_dataset(img, syntax=DeflatedExplicitVRLittleEndian))),
        ("deflated16.dcm", dicom_bytes(image_dataset(wide, syntax=DeflatedExplicitVRLittleEndian))),
        ("jpeg.dcm", _jpeg_dicom(img)),
        ("rle.dcm", _rle_dicom(img)),
        ("gray.png", pillow_bytes(img, "PNG")),
        ("gray16.png", pillow_bytes(wide, "PNG")),
        ("rgb.png", pillow_bytes(rgb, "PNG")),
        ("gray.jpg", pillow_bytes(img, "JPEG")),
        ("progressive.jpg", pillow_bytes(img, "JPEG", progressive=True)),
        ("rgb.jpg", pillow_bytes(rgb, "JPEG")),
    )


def real_seeds(limit: int = 2) -> tuple[tuple[str, bytes], ...]:
    """Up to ``limit`` real RSNA DICOMs and Kermany JPEGs from ../shared/data (none if absent)."""
    found: list[tuple[str, bytes]] = []
    if RSNA_IMAGES.is_dir():
        found += [(p.name, p.read_bytes()) for p in sorted(RSNA_IMAGES.glob("*.dcm"))[:limit]]
    for cls in ("NORMAL", "PNEUMONIA"):
        folder = KERMANY / cls
        if folder.is_dir():
            found += [(p.name, p.read_bytes()) for p in sorted(folder.glob("*.jpeg"))[:limit]]
    return tuple(found)


# ---------------------------------------------------------------------------------------
# Bombs
# ---------------------------------------------------------------------------------------


def _meta_prefix(syntax: UID) -> bytes:
    """Preamble, "DICM" and a file meta group declaring ``syntax``."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = "1.2.826.0.1.3680043.8.498.14"
    meta.TransferSyntaxUID = syntax
    buf = DicomBytesIO()
    buf.is_little_endian, buf.is_implicit_VR = True, False
    write_file_meta_info(buf, meta, enforce_standard=True)
    return bytes(128) + b"DICM" + buf.getvalue()


def _header_elements(rows: int, cols: int, bits: int = 8) -> bytes:
    """The image-description elements, Explicit VR Little Endian, without pixel data."""
    ds = image_dataset(np.zeros((2, 2), np.uint8 if bits == 8 else np.uint16))
    del ds.PixelData
    ds.Rows, ds.Columns = rows, cols
    buf = DicomBytesIO()
    buf.is_little_endian, buf.is_implicit_VR = True, False
    write_dataset(buf, ds)
    return buf.getvalue()


_ZERO_CHUNK = 1 << 22


def _deflate_zeros(head: bytes, zeros: int, tail: bytes = b"") -> bytes:
    """Raw deflate of ``head``, ``zeros`` zero bytes and ``tail``, in milliseconds.

    Compressing 1 GiB of zeros takes zlib 12 s; but once the 32 kB window holds only zeros,
    a sync-flushed chunk of zeros compresses to the same bytes every time and decodes to
    zeros wherever it is repeated, so it is compressed once and repeated.
    """
    comp = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    parts = [comp.compress(head)]
    left = zeros
    if left >= 2 * _ZERO_CHUNK:
        zero_chunk = bytes(_ZERO_CHUNK)
        parts.append(comp.compress(zero_chunk) + comp.flush(zlib.Z_SYNC_FLUSH))
        repeated = comp.compress(zero_chunk) + comp.flush(zlib.Z_SYNC_FLUSH)
        count = left // _ZERO_CHUNK - 1
        parts += [repeated] * count
        left -= _ZERO_CHUNK * (count + 1)
    parts.append(comp.compress(bytes(left)))
    parts.append(comp.compress(tail))
    parts.append(comp.flush())
    return b"".join(parts)


@cache
def deflate_bomb(inflated: int = 1 << 30, rows: int = 1024, cols: int = 1024) -> bytes:
    """A deflated DICOM declaring ``rows`` x ``cols`` 8-bit pixels whose pixel data element
    inflates to ``inflated`` zero bytes (1 GiB from about 1 MB by default)."""
    head = _header_elements(rows, cols) + struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OB", 0, inflated)
    return _meta_prefix(DeflatedExplicitVRLittleEndian) + _deflate_zeros(head, inflated)


@cache
def deflate_header_bomb(inflated: int = 256 << 20) -> bytes:
    """A deflated DICOM whose private element before the pixel data inflates to ``inflated``."""
    private = struct.pack("<HH2sHI", 0x0009, 0x1010, b"OB", 0, inflated)
    head = _header_elements(64, 64) + private
    pixel = struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OB", 0, 64 * 64) + bytes(64 * 64)
    return _meta_prefix(DeflatedExplicitVRLittleEndian) + _deflate_zeros(head, inflated, pixel)


@cache
def deflate_at_limit(max_pixels: int = FUZZ_MAX_PIXELS) -> bytes:
    """A deflated 16-bit DICOM of exactly ``max_pixels`` zero pixels: a valid (blank) image."""
    side = int(max_pixels**0.5)
    nbytes = side * side * 2
    head = _header_elements(side, side, bits=16) + struct.pack(
        "<HH2sHI", 0x7FE0, 0x0010, b"OW", 0, nbytes
    )
    return _meta_prefix(DeflatedExplicitVRLittleEndian) + _deflate_zeros(head, nbytes)


def native_overlong(rows: int = 64, cols: int = 64, extra: int = 64 << 20) -> bytes:
    """A native DICOM whose pixel data element claims ``extra`` more bytes than it holds."""
    data = bytearray(dicom_bytes(image_dataset(np.zeros((rows, cols), np.uint8))))
    at = data.rindex(b"\xe0\x7f\x10\x00")
    data[at + 8 : at + 12] = struct.pack("<I", rows * cols + extra)
    return bytes(data)


@cache
def frame_bomb(width: int = 8000, height: int = 8000, garbage: bytes = b"") -> bytes:
    """A JPEG Baseline DICOM declaring 64 x 64 whose frame declares ``height`` x ``width``
    (with ``garbage`` after its SOI marker, which libjpeg skips)."""
    frame = pillow_bytes(np.full((height, width), 128, np.uint8), "JPEG", quality=10)
    frame = frame[:2] + garbage + frame[2:]
    ds = image_dataset(np.zeros((64, 64), np.uint8))
    ds.PixelData = encapsulate([frame])
    ds["PixelData"].VR = "OB"
    ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    return dicom_bytes(ds)


def declared_dicom(rows: int, cols: int) -> bytes:
    """A native DICOM declaring ``rows`` x ``cols`` with 4 pixels of data."""
    ds = image_dataset(np.zeros((2, 2), np.uint8))
    ds.Rows, ds.Columns = rows, cols
    return dicom_bytes(ds)


def element_flood(zeros: int = 8 << 20) -> bytes:
    """A native DICOM header followed by ``zeros`` zero bytes: a million empty elements."""
    return _meta_prefix(ExplicitVRLittleEndian) + _header_elements(64, 64) + bytes(zeros)


def sequence_flood(items: int = 1_000_000) -> bytes:
    """A native DICOM whose first element is a sequence of ``items`` empty items (8 MB)."""
    sq = struct.pack("<HH2sHI", 0x0008, 0x1140, b"SQ", 0, 0xFFFFFFFF)
    sq += struct.pack("<HHI", 0xFFFE, 0xE000, 0) * items + struct.pack("<HHI", 0xFFFE, 0xE0DD, 0)
    pixels = struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OB", 0, 64 * 64) + bytes(64 * 64)
    return _meta_prefix(ExplicitVRLittleEndian) + sq + _header_elements(64, 64) + pixels


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    crc = zlib.crc32(kind + data) & 0xFFFFFFFF
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)


def png_declaring(width: int, height: int, depth: int = 8, colour: int = 0) -> bytes:
    """A PNG whose IHDR declares ``width`` x ``height`` over a tiny IDAT."""
    ihdr = struct.pack(">IIBBBBB", width, height, depth, colour, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", ihdr)
        + _png_chunk(b"IDAT", zlib.compress(b"\x00" * 16))
        + _png_chunk(b"IEND", b"")
    )


@cache
def png_bomb_at_limit(max_pixels: int = FUZZ_MAX_PIXELS) -> bytes:
    """A real PNG of ``max_pixels`` black pixels (a few kB): valid, decoded at the limit."""
    side = int(max_pixels**0.5)
    rows = b"".join(b"\x00" + bytes(side) for _ in range(side))
    ihdr = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", ihdr)
        + _png_chunk(b"IDAT", zlib.compress(rows, 9))
        + _png_chunk(b"IEND", b"")
    )


@cache
def png_text_bomb(inflated: int = 16 << 20) -> bytes:
    """A small valid PNG with a zTXt chunk inflating to ``inflated`` bytes."""
    png = pillow_bytes(_chest_like(32, 32), "PNG")
    ztxt = _png_chunk(b"zTXt", b"Comment\x00\x00" + zlib.compress(bytes(inflated), 9))
    return png[:33] + ztxt + png[33:]


def jpeg_declaring(width: int, height: int) -> bytes:
    """A small JPEG whose SOF is patched to declare ``height`` x ``width``."""
    data = bytearray(pillow_bytes(_chest_like(16, 16), "JPEG"))
    sof = data.index(b"\xff\xc0")
    data[sof + 5 : sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def bombs() -> tuple[tuple[str, bytes], ...]:
    """Every bomb, each meant to be refused (or, at the limit, read) with bounded memory."""
    return (
        ("deflate-bomb-1GiB.dcm", deflate_bomb()),
        ("deflate-bomb-small-header.dcm", deflate_bomb(256 << 20, 16, 16)),
        ("deflate-bomb-huge-declared.dcm", deflate_bomb(64 << 20, 60000, 60000)),
        ("deflate-header-bomb.dcm", deflate_header_bomb()),
        ("deflate-at-limit.dcm", deflate_at_limit()),
        ("native-overlong.dcm", native_overlong()),
        ("frame-bomb.dcm", frame_bomb()),
        ("element-flood.dcm", element_flood()),
        ("sequence-flood.dcm", sequence_flood()),
        ("declared-60000.dcm", declared_dicom(60000, 60000)),
        ("declared-65535x1.dcm", declared_dicom(65535, 1)),
        ("png-100000.png", png_declaring(100_000, 100_000)),
        ("png-16bit-rgba-limit.png", png_declaring(2000, 2000, 16, 6)),
        ("png-at-limit.png", png_bomb_at_limit()),
        ("png-ztxt-bomb.png", png_text_bomb()),
        ("jpeg-65500.jpg", jpeg_declaring(65500, 65500)),
        ("jpeg-zero-height.jpg", jpeg_declaring(64, 0)),
    )


# ---------------------------------------------------------------------------------------
# Mutations
# ---------------------------------------------------------------------------------------

_HUGE = (0xFFFFFFFF, 0xFFFFFFFE, 0x7FFFFFFF, 0x80000000, 0x10000, 0xFFFF, 0x8000, 0)


def _span(rng: np.random.Generator, n: int, head_bias: bool) -> int:
    """A position in ``range(n)``; half the time within the first 1 kB, where headers are."""
    if head_bias and rng.random() < 0.5:
        return int(rng.integers(0, min(n, 1024)))
    return int(rng.integers(0, n))


def truncate(data: bytes, rng: np.random.Generator) -> bytes:
    return data[: _span(rng, len(data), head_bias=True)]


def flip_bits(data: bytes, rng: np.random.Generator) -> bytes:
    out = bytearray(data)
    for _ in range(int(rng.integers(1, 9))):
        at = _span(rng, len(out), head_bias=True)
        out[at] ^= 1 << int(rng.integers(0, 8))
    return bytes(out)


def random_bytes(data: bytes, rng: np.random.Generator) -> bytes:
    out = bytearray(data)
    at = _span(rng, len(out), head_bias=True)
    n = int(rng.integers(1, 33))
    out[at : at + n] = rng.bytes(n)
    return bytes(out)


def huge_integer(data: bytes, rng: np.random.Generator) -> bytes:
    """Overwrite 2 or 4 bytes with a huge or edge value (lengths, sizes, dimensions)."""
    out = bytearray(data)
    value = _HUGE[int(rng.integers(0, len(_HUGE)))]
    width = 4 if rng.random() < 0.6 else 2
    order = "<" if rng.random() < 0.7 else ">"
    packed = struct.pack(order + ("I" if width == 4 else "H"), value & ((1 << (8 * width)) - 1))
    at = _span(rng, max(len(out) - width, 1), head_bias=True)
    out[at : at + width] = packed
    return bytes(out)


def huge_declared_size(data: bytes, rng: np.random.Generator) -> bytes:
    """Patch the declared image size where the format keeps it (DICOM, PNG IHDR, JPEG SOF)."""
    out = bytearray(data)
    rows, cols = (int(v) for v in rng.choice([1, 65535, 60000, 30000, 8192, 2047], size=2))
    dicom_rows = out.find(b"\x28\x00\x10\x00US")
    if dicom_rows >= 0:  # (0028,0010) Rows then (0028,0011) Columns, Explicit VR LE
        out[dicom_rows + 8 : dicom_rows + 10] = struct.pack("<H", rows)
        cols_at = out.find(b"\x28\x00\x11\x00US", dicom_rows)
        if cols_at >= 0:
            out[cols_at + 8 : cols_at + 10] = struct.pack("<H", cols)
        return bytes(out)
    if out.startswith(b"\x89PNG"):
        out[16:24] = struct.pack(">II", cols * 7, rows * 7)
        out[29:33] = struct.pack(">I", zlib.crc32(bytes(out[12:29])) & 0xFFFFFFFF)
        return bytes(out)
    sof = out.find(b"\xff\xc0")
    if sof < 0:
        sof = out.find(b"\xff\xc2")
    if sof >= 0:
        out[sof + 5 : sof + 9] = struct.pack(">HH", rows, cols)
        return bytes(out)
    return huge_integer(data, rng)


def splice(data: bytes, rng: np.random.Generator) -> bytes:
    """Duplicate or delete a slice (chunks and elements repeated or lost)."""
    n = len(data)
    a = _span(rng, n, head_bias=True)
    b = min(n, a + int(rng.integers(1, 4096)))
    if rng.random() < 0.5:
        return data[:b] + data[a:b] + data[b:]
    return data[:a] + data[b:]


def unchanged(data: bytes, rng: np.random.Generator) -> bytes:
    return data


MUTATIONS: dict[str, Callable[[bytes, np.random.Generator], bytes]] = {
    "none": unchanged,
    "truncate": truncate,
    "flip_bits": flip_bits,
    "random_bytes": random_bytes,
    "huge_integer": huge_integer,
    "huge_declared_size": huge_declared_size,
    "splice": splice,
}


# ---------------------------------------------------------------------------------------
# Cases and their outcome
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    index: int
    seed_name: str
    mutation: str
    data: bytes

    @property
    def label(self) -> str:
        return f"#{self.index} {self.mutation}({self.seed_name})"


def all_seeds(real_limit: int = 2) -> tuple[tuple[str, bytes], ...]:
    return synthetic_seeds() + real_seeds(real_limit) + bombs()


def cases(n: int, seed: int = 0, real_limit: int = 2) -> Iterator[Case]:
    """``n`` cases, reproducible from ``seed``: case ``i`` depends on (seed, i) only.

    The first cases are every seed file unchanged (so every bomb is tried as built), then
    random (seed file, mutation) pairs.
    """
    seeds = all_seeds(real_limit)
    names = list(MUTATIONS)
    for i in range(n):
        rng = np.random.default_rng([seed, i])
        if i < len(seeds):
            name, data = seeds[i]
            mutation = "none"
        else:
            name, data = seeds[int(rng.integers(0, len(seeds)))]
            mutation = names[int(rng.integers(1, len(names)))]
        yield Case(i, name, mutation, MUTATIONS[mutation](data, rng))


def check_image(image: XrayImage) -> None:
    """Raise AssertionError unless ``image`` is a valid decoded X-ray."""
    pixels = image.pixels
    assert isinstance(pixels, np.ndarray) and pixels.dtype == np.uint8 and pixels.ndim == 2
    assert pixels.size > 0
    rows, cols = image.original_shape
    assert rows >= 1 and cols >= 1
    assert image.source_format in ("dicom", "png", "jpeg")


def run_case(case: Case, *, max_pixels: int = FUZZ_MAX_PIXELS, min_size: int | None = 64) -> str:
    """``"ok"`` for a valid image, else the name of the typed pneumoloc error raised.

    Any other exception (a crash) is let through; an invalid image raises AssertionError.
    """
    try:
        image = read_xray_bytes(case.data, case.seed_name, min_size=min_size, max_pixels=max_pixels)
    except PneumolocError as exc:
        message = str(exc)
        assert case.seed_name in message, f"{case.label}: the error does not name the file"
        return type(exc).__name__
    check_image(image)
    return OK
