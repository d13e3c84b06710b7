"""DICOM results (pneumoloc.report.dicom): the SR's content tree, the Secondary Capture, and
what they copy from the source. Synthetic sources written with pydicom; no network."""

from __future__ import annotations

import logging
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("highdicom", reason="needs pneumoloc[pacs] (highdicom)")

import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from pneumoloc import DISCLAIMER
from pneumoloc.inference.prediction import Prediction
from pneumoloc.localise.boxes import ScoredBoxes
from pneumoloc.report import dicom as rd

MODEL = rd.ModelInfo(model_id="smallcamnet@64px-test", version="0.1.0", threshold=0.4)


def source_image(rows: int = 96, cols: int = 80, **tags: object) -> Dataset:
    """A CR image of a named patient (with a non-ASCII name) in a study of its own."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.1"
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.PatientName, ds.PatientID = "Müller^Anna", "PAT-0042"
    ds.PatientBirthDate, ds.PatientSex, ds.PatientAge = "19600101", "F", "064Y"
    ds.StudyDate, ds.StudyTime, ds.AccessionNumber = "20240101", "101010", "ACC-7"
    ds.StudyID, ds.ReferringPhysicianName = "S1", "Doe^John"
    ds.Modality, ds.BodyPartExamined, ds.ViewPosition = "CR", "CHEST", "PA"
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.Rows, ds.Columns = rows, cols
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = np.full((rows, cols), 90, np.uint8).tobytes()
    for key, value in tags.items():
        setattr(ds, key, value)
    return ds


def prediction(positive: bool = True, shape: tuple[int, int] = (96, 80)) -> Prediction:
    boxes = (
        ScoredBoxes(
            np.array([[10.5, 12.0, 30.0, 40.25], [45.0, 20.0, 20.0, 30.0]]), np.array([0.9, 0.6])
        )
        if positive
        else ScoredBoxes()
    )
    heat = np.zeros((32, 32), np.float32)
    heat[8:20, 5:15] = 1.0
    return Prediction(
        probability=0.8125 if positive else 0.1,
        positive=positive,
        threshold=0.4,
        heatmap=heat,
        boxes=boxes,
        original_shape=shape,
    )


def test_structured_report_round_trip() -> None:
    src = source_image()
    pred = prediction()
    sr = rd.structured_report(src, pred, MODEL)
    # Through bytes and back, then read with highdicom.
    back = pydicom.dcmread(pydicom.filebase.DicomBytesIO(rd.dataset_bytes(sr)))
    summary = rd.result_summary(back)
    assert summary["probability"] == pytest.approx(0.8125)
    assert summary["threshold"] == pytest.approx(0.4)
    assert summary["decision"] == "pneumonia"
    assert summary["model_id"] == MODEL.model_id
    assert summary["referenced_sop_instance_uid"] == src.SOPInstanceUID
    got = [(b["x"], b["y"], b["width"], b["height"], b["confidence"]) for b in summary["boxes"]]
    want = [(10.5, 12.0, 30.0, 40.25, 0.9), (45.0, 20.0, 20.0, 30.0, 0.6)]
    np.testing.assert_allclose(np.array(got), np.array(want), atol=1e-5)
    assert {b["referenced_sop_instance_uid"] for b in summary["boxes"]} == {src.SOPInstanceUID}
    # The disclaimer is a TEXT item of the root container; the report is unverified.
    texts = [
        i.TextValue
        for i in back.ContentSequence
        if i.ValueType == "TEXT" and i.RelationshipType == "CONTAINS"
    ]
    assert texts == [DISCLAIMER]
    assert back.VerificationFlag == "UNVERIFIED" and back.CompletionFlag == "COMPLETE"
    assert back.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.33"
    assert [t.TemplateIdentifier for t in back.ContentTemplateSequence] == ["1500"]


def test_negative_report_has_no_region() -> None:
    summary = rd.result_summary(rd.structured_report(source_image(), prediction(False), MODEL))
    assert summary["decision"] == "no pneumonia" and summary["boxes"] == []


def test_box_polyline_is_closed_in_pixel_corners() -> None:
    line = rd.box_polyline([10, 20, 30, 40])
    assert line.tolist() == [[10, 20], [40, 20], [40, 60], [10, 60], [10, 20]]


@pytest.mark.parametrize("kind", ["sr", "sc"])
def test_results_join_the_source_study_with_new_uids(kind: str) -> None:
    src = source_image()
    results = rd.dicom_results(src, prediction(), np.full((96, 80), 90, np.uint8), MODEL)
    ds = results.sr if kind == "sr" else results.sc
    for keyword in (
        "StudyInstanceUID",
        "PatientName",
        "PatientID",
        "PatientBirthDate",
        "PatientSex",
        "AccessionNumber",
        "StudyDate",
        "StudyID",
    ):
        assert ds[keyword].value == src[keyword].value, keyword
    assert ds.SpecificCharacterSet == "ISO_IR 100"
    assert ds.PatientAge == "064Y"
    assert ds.SeriesInstanceUID != src.SeriesInstanceUID
    assert ds.SOPInstanceUID != src.SOPInstanceUID
    assert results.sr.SeriesInstanceUID != results.sc.SeriesInstanceUID


def test_secondary_capture_burns_in_heatmap_and_boxes() -> None:
    src = source_image()
    grey = np.full((96, 80), 90, np.uint8)
    sc = rd.secondary_capture(src, prediction(), grey)
    back = pydicom.dcmread(pydicom.filebase.DicomBytesIO(rd.dataset_bytes(sc)))
    rgb = back.pixel_array
    assert back.PhotometricInterpretation == "RGB" and rgb.ndim == 3
    assert back.BurnedInAnnotation == "YES" and back.ImageComments == DISCLAIMER
    assert back.SourceImageSequence[0].ReferencedSOPInstanceUID == src.SOPInstanceUID
    assert back.Modality == "CR"
    # Colour (heatmap and boxes) where the source was plain grey.
    assert (np.ptp(rgb.astype(int), axis=2) > 30).any()
    negative = rd.secondary_capture(src, prediction(False), grey).pixel_array
    assert not np.array_equal(negative, rgb)


@pytest.mark.parametrize(("age", "copied"), [("51", "051Y"), ("007M", "007M"), ("about 60", None)])
def test_patient_age_is_a_valid_age_string(age: str, copied: str | None) -> None:
    """RSNA's bare "51" becomes "051Y"; a value that is no age at all is left out."""
    src = source_image()
    with pytest.warns(UserWarning) if len(age) != 4 else _nothing():
        src.PatientAge = age
    sr = rd.structured_report(src, prediction(), MODEL)
    assert sr.get("PatientAge") == copied


def _nothing():  # type: ignore[no-untyped-def]
    import contextlib

    return contextlib.nullcontext()


def test_source_without_uids_is_refused() -> None:
    src = source_image()
    del src.StudyInstanceUID
    with pytest.raises(rd.DicomResultError, match="StudyInstanceUID"):
        rd.structured_report(src, prediction(), MODEL)


def test_no_identifier_reaches_the_logs(caplog: pytest.LogCaptureFixture) -> None:
    src = source_image()
    with caplog.at_level(logging.DEBUG):
        rd.dicom_results(src, prediction(), np.full((96, 80), 90, np.uint8), MODEL)
    for value in ("Müller", "PAT-0042", src.SOPInstanceUID, src.StudyInstanceUID):
        assert value not in caplog.text


def test_read_source_header(tmp_path: Path) -> None:
    src = source_image()
    path = tmp_path / "x.dcm"
    src.save_as(path, enforce_file_format=True)
    header = rd.read_source_header(path)
    assert header.SOPInstanceUID == src.SOPInstanceUID and "PixelData" not in header
    assert rd.read_source_header(path.read_bytes()).StudyInstanceUID == src.StudyInstanceUID


@pytest.mark.skipif(shutil.which("dciodvfy") is None, reason="dciodvfy (dicom3tools) absent")
def test_results_pass_dciodvfy(tmp_path: Path) -> None:
    results = rd.dicom_results(source_image(), prediction(), np.full((96, 80), 90, np.uint8), MODEL)
    for name, ds in (("sr", results.sr), ("sc", results.sc)):
        path = tmp_path / f"{name}.dcm"
        path.write_bytes(rd.dataset_bytes(ds))
        done = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
        lines = (done.stdout + done.stderr).splitlines()
        assert not [line for line in lines if line.startswith("Error")], lines


def test_predict_dicom_out(tmp_path: Path) -> None:
    """``predict --dicom-out`` writes an SR and an SC per DICOM input, none for a PNG."""
    from PIL import Image

    from conftest import save_untrained_checkpoint
    from pneumoloc.predict import predict_paths

    ckpt = save_untrained_checkpoint(tmp_path / "m.pt", size=64, threshold=0.0)
    inputs = tmp_path / "in"
    inputs.mkdir()
    src = source_image(96, 80)
    rng = np.random.default_rng(0)
    src.PixelData = rng.integers(0, 255, (96, 80), dtype=np.uint8).tobytes()
    src.save_as(inputs / "a.dcm", enforce_file_format=True)
    Image.fromarray(rng.integers(0, 255, (50, 50), dtype=np.uint8)).save(inputs / "b.png")
    result = predict_paths(
        [inputs],
        tmp_path / "out",
        model=ckpt,
        device="cpu",
        progress=False,
        dicom_out=tmp_path / "dicom",
        input_check=False,  # noise images: the input check would refuse them
    )
    assert result.n_failed == 0
    assert sorted(p.name for p in (tmp_path / "dicom").iterdir()) == ["a.sc.dcm", "a.sr.dcm"]
    summary = rd.result_summary(pydicom.dcmread(tmp_path / "dicom" / "a.sr.dcm"))
    record = (tmp_path / "out" / "a.json").read_text()
    assert f'"probability": {round(summary["probability"], 6)}' in record
    # The JSON record stays free of identifiers.
    assert "PAT-0042" not in record and "Müller" not in record
