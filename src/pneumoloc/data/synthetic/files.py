"""Cases and files: one image per (seed, index), its DICOM, and the whole RSNA-layout set.

:func:`make_case` generates image ``index`` from its own generator (:func:`case_rng`),
:func:`write_dicom` writes it as a JPEG Baseline DICOM (:func:`encode_jpeg`), and
:func:`generate_rsna` writes the images folder and both labels CSVs. The RSNA file names come
from :mod:`pneumoloc.data.rsna`, which reads what this writes.
"""

from __future__ import annotations

import csv
import io
import logging
import uuid
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    UID,
    JPEGBaseline8Bit,
    SecondaryCaptureImageStorage,
    generate_uid,
)

from pneumoloc.data.anatomy import sample_anatomy
from pneumoloc.data.rsna import CLASS_INFO_CSV, IMAGES_DIR, LABELS_CSV
from pneumoloc.data.synthetic.boxes import sample_boxes
from pneumoloc.data.synthetic.config import SynthCase, SynthConfig, SynthSummary, validate_config
from pneumoloc.data.synthetic.render import render_chest
from pneumoloc.data.synthetic.stats import (
    CLASS_NORMAL,
    CLASS_NOT_NORMAL,
    CLASS_POSITIVE,
    NORMAL_FRACTION_OF_NEGATIVES,
    REFERENCE_SIZE,
)
from pneumoloc.errors import DataError

# The package's name, as before the split into modules: log records keep their logger name.
logger = logging.getLogger(__package__)

_GOLDEN = 0.6180339887498949  # labels follow a golden-ratio sequence: see _is_positive
_UID_ROOT = "pneumoloc-synthetic-rsna"


def case_rng(seed: int, index: int) -> np.random.Generator:
    """The generator of image ``index``: depends on (seed, index) only, not on n."""
    return np.random.default_rng(np.random.SeedSequence(entropy=seed, spawn_key=(index,)))


def _is_positive(seed: int, index: int, prevalence: float) -> bool:
    """Label of image ``index``: a golden-ratio sequence with a seed-dependent start.

    Unlike independent coin flips, any prefix of n images holds n * prevalence positives to
    within about one, so a 10-image demo still has both classes; and the label depends on
    (seed, index) only.
    """
    start = int(np.random.SeedSequence(seed).generate_state(1, dtype=np.uint64)[0]) / 2.0**64
    return (start + (index + 1) * _GOLDEN) % 1.0 < prevalence


def make_case(config: SynthConfig, index: int) -> SynthCase:
    """Generate image ``index`` of the set described by ``config`` (without writing it)."""
    rng = case_rng(config.seed, index)
    patient_id = str(uuid.UUID(bytes=rng.bytes(16), version=4))
    sex: Literal["M", "F"] = "F" if rng.random() < 0.45 else "M"
    age = int(np.clip(round(rng.normal(48, 16)), 18, 90))
    target = int(_is_positive(config.seed, index, config.prevalence))
    normal = rng.random() < NORMAL_FRACTION_OF_NEGATIVES
    anatomy = sample_anatomy(rng)
    size = config.image_size
    boxes = sample_boxes(rng, anatomy, size) if target else np.zeros((0, 4), dtype=np.float64)
    image = render_chest(rng, size, boxes, config, anatomy=anatomy)
    class_name = CLASS_POSITIVE if target else (CLASS_NORMAL if normal else CLASS_NOT_NORMAL)
    return SynthCase(index, patient_id, target, class_name, boxes, image, anatomy, sex, age)


def encode_jpeg(image: np.ndarray, quality: int) -> bytes:
    """Baseline 8-bit greyscale JPEG of a uint8 image (Pillow writes baseline by default)."""
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def write_dicom(path: str | Path, case: SynthCase, config: SynthConfig) -> None:
    """Write ``case`` as a JPEG Baseline Secondary Capture DICOM like the RSNA files.

    UIDs are derived from (seed, patientId), so files are byte-identical across runs. The
    patient name is a fixed synthetic one: no real identity is ever written.
    """

    def uid(kind: str) -> UID:
        return generate_uid(entropy_srcs=[_UID_ROOT, str(config.seed), case.patient_id, kind])

    sop_uid = uid("sop")
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = JPEGBaseline8Bit
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds = Dataset()
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = sop_uid
    ds.StudyDate = "19010101"
    ds.StudyTime = "000000.00"
    ds.AccessionNumber = ""
    ds.Modality = "CR"
    ds.ConversionType = "WSD"
    ds.ReferringPhysicianName = ""
    ds.SeriesDescription = f"view: {case.anatomy.view}"
    ds.PatientName = "Anonymous^Synthetic"
    ds.PatientID = case.patient_id
    ds.PatientBirthDate = ""
    ds.PatientSex = case.sex
    ds.PatientAge = f"{case.age:03d}Y"
    ds.BodyPartExamined = "CHEST"
    ds.ViewPosition = case.anatomy.view
    ds.StudyInstanceUID = uid("study")
    ds.SeriesInstanceUID = uid("series")
    ds.StudyID = ""
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    ds.PatientOrientation = ""
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = case.image.shape
    spacing = round(0.143 * REFERENCE_SIZE / case.image.shape[0], 6)
    ds.PixelSpacing = [spacing, spacing]
    ds.BitsAllocated = 8
    ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    ds.LossyImageCompression = "01"
    ds.LossyImageCompressionMethod = "ISO_10918_1"
    ds.add_new(0x7FE00010, "OB", encapsulate([encode_jpeg(case.image, config.jpeg_quality)]))
    ds["PixelData"].is_undefined_length = True
    ds.save_as(path, enforce_file_format=True)


def _fmt(value: float) -> str:
    return f"{float(value):.1f}"


def generate_rsna(
    out_dir: str | Path, config: SynthConfig, *, overwrite: bool = False
) -> SynthSummary:
    """Write a synthetic data set in the exact RSNA Kaggle layout.

    Args:
        out_dir: Folder to write into (created if needed).
        config: What to generate.
        overwrite: Replace the DICOMs of an earlier run in ``out_dir/stage_2_train_images``
            (only ``*.dcm`` files there are deleted). Without it such files are an error, since
            stale images would disagree with the new CSVs.

    Returns:
        A summary of what was written.

    Raises:
        ConfigError: If ``config`` is invalid.
        DataError: If the images folder already holds DICOMs and ``overwrite`` is False.
    """
    validate_config(config)
    out = Path(out_dir)
    images = out / IMAGES_DIR
    stale = sorted(images.glob("*.dcm")) if images.is_dir() else []
    if stale and not overwrite:
        raise DataError(
            f"{images}: already holds {len(stale)} DICOM file(s); choose an empty folder or "
            "pass overwrite=True"
        )
    for f in stale:
        f.unlink()
    images.mkdir(parents=True, exist_ok=True)
    label_rows: list[list[str]] = []
    class_rows: list[list[str]] = []
    n_positive = n_boxes = 0
    for index in range(config.n):
        case = make_case(config, index)
        write_dicom(images / f"{case.patient_id}.dcm", case, config)
        if case.target:
            n_positive += 1
            n_boxes += len(case.boxes)
            for box in case.boxes:
                label_rows.append([case.patient_id, *(_fmt(t) for t in box), "1"])
                class_rows.append([case.patient_id, case.class_name])
        else:
            label_rows.append([case.patient_id, "", "", "", "", "0"])
            class_rows.append([case.patient_id, case.class_name])
    for name, header, rows in (
        (LABELS_CSV, ["patientId", "x", "y", "width", "height", "Target"], label_rows),
        (CLASS_INFO_CSV, ["patientId", "class"], class_rows),
    ):
        with (out / name).open("w", newline="", encoding="utf-8") as fh:
            writer = csv.writer(fh, lineterminator="\n")
            writer.writerow(header)
            writer.writerows(rows)
    logger.info(
        "synthetic RSNA set in %s: %d images, %d positive, %d boxes",
        out,
        config.n,
        n_positive,
        n_boxes,
    )
    return SynthSummary(out, config.n, n_positive, n_boxes)
