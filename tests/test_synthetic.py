"""Tests of the synthetic RSNA-layout generator (small images, small n)."""

from __future__ import annotations

import csv
import uuid
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import JPEGBaseline8Bit, SecondaryCaptureImageStorage

from pneumoloc.data.anatomy import (
    SIDES,
    anatomical_grid,
    heart_mask,
    lung_field_mask,
    mask_bbox,
    sample_anatomy,
)
from pneumoloc.data.synthetic import (
    CLASS_INFO_CSV,
    CLASS_NORMAL,
    CLASS_NOT_NORMAL,
    CLASS_POSITIVE,
    IMAGES_DIR,
    LABELS_CSV,
    SynthConfig,
    case_rng,
    encode_jpeg,
    generate_rsna,
    make_case,
    render_chest,
    sample_boxes,
)
from pneumoloc.errors import ConfigError, DataError


def _read_csv(path: Path) -> tuple[list[str], list[list[str]]]:
    with path.open(newline="", encoding="utf-8") as fh:
        rows = list(csv.reader(fh))
    return rows[0], rows[1:]


@pytest.fixture(scope="module")
def small_set(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, SynthConfig]:
    out = tmp_path_factory.mktemp("synth")
    config = SynthConfig(n=16, seed=11, image_size=64, prevalence=0.5)
    generate_rsna(out, config)
    return out, config


def test_layout_and_csvs_are_consistent(small_set: tuple[Path, SynthConfig]) -> None:
    out, config = small_set
    assert sorted(p.name for p in out.iterdir()) == sorted([IMAGES_DIR, LABELS_CSV, CLASS_INFO_CSV])
    files = {p.stem for p in (out / IMAGES_DIR).iterdir()}
    assert all(p.suffix == ".dcm" for p in (out / IMAGES_DIR).iterdir())

    header, rows = _read_csv(out / LABELS_CSV)
    assert header == ["patientId", "x", "y", "width", "height", "Target"]
    boxes: dict[str, list[list[float]]] = {}
    targets: dict[str, str] = {}
    for pid, *xywh, target in rows:
        assert targets.setdefault(pid, target) == target  # one label per patient
        if target == "1":
            assert all(v.endswith(".0") for v in xywh)  # "264.0" style, like the real file
            boxes.setdefault(pid, []).append([float(v) for v in xywh])
        else:
            assert target == "0" and xywh == ["", "", "", ""]
            assert pid not in boxes
            boxes[pid] = []
    assert set(targets) == files and len(files) == config.n
    negatives = [p for p, t in targets.items() if t == "0"]
    assert len([r for r in rows if r[0] in negatives]) == len(negatives)  # one row each
    for pid, t in targets.items():
        if t == "1":
            assert 1 <= len(boxes[pid]) <= 3
    assert all(uuid.UUID(pid).version == 4 and str(uuid.UUID(pid)) == pid for pid in files)

    header, class_rows = _read_csv(out / CLASS_INFO_CSV)
    assert header == ["patientId", "class"]
    per_patient: dict[str, list[str]] = {}
    for pid, cls in class_rows:
        per_patient.setdefault(pid, []).append(cls)
    assert set(per_patient) == files
    for pid, classes in per_patient.items():
        if targets[pid] == "1":
            assert classes == [CLASS_POSITIVE] * len(boxes[pid])  # one row per box
        else:
            assert len(classes) == 1 and classes[0] in (CLASS_NORMAL, CLASS_NOT_NORMAL)


def test_dicoms_are_jpeg_baseline_with_expected_tags(small_set: tuple[Path, SynthConfig]) -> None:
    out, config = small_set
    for path in sorted((out / IMAGES_DIR).iterdir()):
        ds = pydicom.dcmread(path)
        assert ds.file_meta.TransferSyntaxUID == JPEGBaseline8Bit
        assert ds.SOPClassUID == SecondaryCaptureImageStorage
        assert ds.Modality == "CR" and ds.BodyPartExamined == "CHEST"
        assert ds.ViewPosition in ("PA", "AP")
        assert ds.PhotometricInterpretation == "MONOCHROME2"
        assert (ds.SamplesPerPixel, ds.BitsAllocated, ds.BitsStored, ds.HighBit) == (1, 8, 8, 7)
        assert ds.PixelRepresentation == 0
        assert (ds.Rows, ds.Columns) == (config.image_size, config.image_size)
        assert ds.PatientID == path.stem
        assert ds.PatientSex in ("M", "F")
        assert 18 <= int(ds.PatientAge.rstrip("Y")) <= 90
        # never a real identity
        assert str(ds.PatientName) == "Anonymous^Synthetic"
        assert ds.PatientBirthDate == ""
        pixels = ds.pixel_array
        assert pixels.shape == (config.image_size, config.image_size)
        assert pixels.dtype == np.uint8
        assert "NumberOfFrames" not in ds


def test_dicom_pixels_match_the_rendered_image(tmp_path: Path) -> None:
    config = SynthConfig(n=2, seed=4, image_size=96, prevalence=1.0)
    generate_rsna(tmp_path, config)
    case = make_case(config, 1)
    ds = pydicom.dcmread(tmp_path / IMAGES_DIR / f"{case.patient_id}.dcm")
    err = np.abs(ds.pixel_array.astype(float) - case.image.astype(float))
    assert err.mean() < 6.0  # JPEG at quality 90 on a noisy image


def test_jpeg_stream_is_baseline() -> None:
    image = np.random.default_rng(0).integers(0, 256, (32, 32), dtype=np.uint8)
    data = encode_jpeg(image, 90)
    assert data[:2] == b"\xff\xd8"
    assert b"\xff\xc0" in data  # SOF0, baseline
    assert b"\xff\xc2" not in data  # not progressive


@pytest.mark.parametrize("size", [64, 128])
def test_boxes_inside_image_and_lung_fields(size: int) -> None:
    counts = []
    for i in range(40):
        rng = case_rng(2, i)
        anatomy = sample_anatomy(rng)
        boxes = sample_boxes(rng, anatomy, size)
        counts.append(len(boxes))
        assert 1 <= len(boxes) <= 3
        masks = {side: lung_field_mask(size, anatomy, side) for side in SIDES}
        for x, y, w, h in boxes:
            assert float(x).is_integer() and float(w).is_integer()
            assert x >= 0 and y >= 0 and w >= 2 and h >= 2
            assert x + w <= size and y + h <= size
            x0, y0, x1, y1 = int(x), int(y), int(x + w), int(y + h)
            inside = []
            for side, mask in masks.items():
                bbox = mask_bbox(mask)
                assert bbox is not None, side
                bx0, by0, bx1, by1 = bbox
                if bx0 <= x0 and by0 <= y0 and x1 <= bx1 and y1 <= by1:
                    inside.append(side)
            assert len(inside) == 1  # in the bounding region of exactly one lung
            mask = masks[inside[0]]
            assert mask[(y0 + y1) // 2, (x0 + x1) // 2]  # centred on lung
            assert mask[y0:y1, x0:x1].mean() > 0.5  # mostly lung
    assert counts.count(2) > 10  # two boxes are common, as in RSNA


def test_two_boxes_usually_one_per_lung() -> None:
    size, bilateral, two = 128, 0, 0
    for i in range(60):
        rng = case_rng(8, i)
        anatomy = sample_anatomy(rng)
        boxes = sample_boxes(rng, anatomy, size)
        if len(boxes) != 2:
            continue
        two += 1
        mask = lung_field_mask(size, anatomy, "left")
        sides = {bool(mask[int(y + h / 2), int(x + w / 2)]) for x, y, w, h in boxes}
        bilateral += len(sides) == 2
    assert two > 15 and bilateral >= two - 2


def _render_pair(
    size: int, contrast: float, noise: float = 0.04, index: int = 0
) -> tuple[np.ndarray, ...]:
    config = SynthConfig(image_size=size, opacity_contrast=contrast, noise=noise)
    rng = case_rng(21, index)
    anatomy = sample_anatomy(rng)
    boxes = sample_boxes(rng, anatomy, size)
    state = rng.bit_generator.state
    with_op = render_chest(rng, size, boxes, config, anatomy=anatomy)
    rng.bit_generator.state = state
    without = render_chest(rng, size, np.zeros((0, 4)), config, anatomy=anatomy)
    return with_op.astype(float), without.astype(float), boxes


@pytest.mark.parametrize(("size", "index"), [(64, 0), (64, 1), (128, 0), (128, 2), (128, 3)])
def test_opacity_lies_in_its_box(size: int, index: int) -> None:
    with_op, without, boxes = _render_pair(size, 0.25, index=index)
    diff = with_op - without
    in_boxes = np.zeros(diff.shape, dtype=bool)
    for i, (x, y, w, h) in enumerate(boxes.astype(int)):
        in_boxes[y : y + h, x : x + w] = True
        assert diff[y : y + h, x : x + w].mean() > 8.0  # noticeably brighter than without
        # this box holds its opacity: little of it spills into the box's surroundings
        own = diff.clip(min=0)
        for j, (ox, oy, ow, oh) in enumerate(boxes.astype(int)):
            if j != i:  # leave out the other opacities
                own[
                    max(0, oy - oh // 2) : oy + oh + oh // 2,
                    max(0, ox - ow // 2) : ox + ow + ow // 2,
                ] = 0
        near = own[max(0, y - h) : y + 2 * h, max(0, x - w) : x + 2 * w].sum()
        assert own[y : y + h, x : x + w].sum() / near > 0.85
    assert diff.sum() > 0
    assert diff[in_boxes].sum() / diff.sum() > 0.85  # the box holds the opacity's mass
    # the same rng state gives the same image away from the opacities
    far = ~in_boxes
    for x, y, w, h in boxes.astype(int):
        far[max(0, y - h // 3) : y + h + h // 3, max(0, x - w // 3) : x + w + w // 3] = False
    assert np.abs(diff[far]).max() <= 1.0


def test_opacity_contrast_is_a_difficulty_knob() -> None:
    means = []
    for contrast in (0.1, 0.25, 0.5):
        with_op, without, boxes = _render_pair(128, contrast, noise=0.0)
        x, y, w, h = boxes[0].astype(int)
        means.append((with_op - without)[y : y + h, x : x + w].mean())
    assert means[0] < means[1] < means[2]
    assert means[2] > 2 * means[0]


def test_render_looks_like_a_chest() -> None:
    size = 128
    config = SynthConfig(image_size=size, noise=0.0)
    for i in range(5):
        rng = case_rng(6, i)
        anatomy = sample_anatomy(rng)
        image = render_chest(rng, size, np.zeros((0, 4)), config, anatomy=anatomy).astype(float)
        lungs = lung_field_mask(size, anatomy)
        u, v = anatomical_grid(size, anatomy)
        heart = heart_mask(u, v, anatomy) & ~lungs & (v < anatomy.left_lung.cy + 0.15)
        lung_mean = np.median(image[lungs])
        assert np.median(image[heart]) > lung_mean + 40  # dark lungs, bright heart
        assert np.median(image[:10, :10]) < lung_mean  # air outside the body
        assert np.median(image[-15:, size // 2 - 20 : size // 2 + 20]) > lung_mean + 40
    right = lung_field_mask(size, anatomy, "right")
    left = lung_field_mask(size, anatomy, "left")
    assert not (right & left).any()
    assert left.sum() < right.sum()  # the heart takes part of the left lung


def test_left_lung_smaller_on_average() -> None:
    ratios = []
    for i in range(20):
        anatomy = sample_anatomy(case_rng(1, i))
        ratios.append(
            lung_field_mask(64, anatomy, "left").sum() / lung_field_mask(64, anatomy, "right").sum()
        )
    assert 0.5 < np.mean(ratios) < 0.95


def test_same_seed_identical_different_seed_differs(tmp_path: Path) -> None:
    config = SynthConfig(n=6, seed=5, image_size=64, prevalence=0.5)
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    generate_rsna(a, config)
    generate_rsna(b, config)
    generate_rsna(c, SynthConfig(n=6, seed=6, image_size=64, prevalence=0.5))
    for name in (LABELS_CSV, CLASS_INFO_CSV):
        assert (a / name).read_bytes() == (b / name).read_bytes()
        assert (a / name).read_bytes() != (c / name).read_bytes()
    files_a = sorted((a / IMAGES_DIR).iterdir())
    assert [p.name for p in files_a] == sorted(p.name for p in (b / IMAGES_DIR).iterdir())
    for p in files_a:
        assert p.read_bytes() == (b / IMAGES_DIR / p.name).read_bytes()
    assert not {p.name for p in files_a} & {p.name for p in (c / IMAGES_DIR).iterdir()}
    first_a = make_case(config, 0).image
    assert np.array_equal(first_a, make_case(config, 0).image)
    assert not np.array_equal(first_a, make_case(SynthConfig(n=6, seed=6, image_size=64), 0).image)


def test_images_do_not_depend_on_n(tmp_path: Path) -> None:
    small = generate_rsna(tmp_path / "s", SynthConfig(n=3, seed=9, image_size=64))
    large = generate_rsna(tmp_path / "l", SynthConfig(n=7, seed=9, image_size=64))
    assert (small.n_images, large.n_images) == (3, 7)
    for p in (small.out_dir / IMAGES_DIR).iterdir():
        assert p.read_bytes() == (large.out_dir / IMAGES_DIR / p.name).read_bytes()


@pytest.mark.parametrize("prevalence", [0.3, 0.5])
def test_prevalence_is_honoured(tmp_path: Path, prevalence: float) -> None:
    config = SynthConfig(n=200, seed=3, image_size=32, prevalence=prevalence)
    summary = generate_rsna(tmp_path, config)
    assert abs(summary.n_positive / 200 - prevalence) <= 0.03
    assert summary.n_positive <= summary.n_boxes <= 3 * summary.n_positive
    _, rows = _read_csv(tmp_path / LABELS_CSV)
    assert sum(r[-1] == "1" for r in rows) == summary.n_boxes
    # small sets still get both classes
    tiny = [
        make_case(SynthConfig(seed=s, image_size=32), i).target for s in range(3) for i in range(5)
    ]
    assert 0 < sum(tiny) < len(tiny)


def test_invalid_config_is_refused(tmp_path: Path) -> None:
    for bad in (
        SynthConfig(n=-1),
        SynthConfig(prevalence=1.5),
        SynthConfig(image_size=8),
        SynthConfig(jpeg_quality=0),
        SynthConfig(noise=-0.1),
    ):
        with pytest.raises(ConfigError, match="SynthConfig"):
            generate_rsna(tmp_path, bad)


def test_existing_images_need_overwrite(tmp_path: Path) -> None:
    config = SynthConfig(n=3, seed=1, image_size=32)
    generate_rsna(tmp_path, config)
    with pytest.raises(DataError, match="already holds 3 DICOM"):
        generate_rsna(tmp_path, SynthConfig(n=2, seed=2, image_size=32))
    summary = generate_rsna(tmp_path, SynthConfig(n=2, seed=2, image_size=32), overwrite=True)
    assert len(list((tmp_path / IMAGES_DIR).iterdir())) == summary.n_images == 2
