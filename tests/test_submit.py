"""``submit``: one valid Kaggle row per image, boxes in original pixels, failures reported."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from pneumoloc.cli import main
from pneumoloc.errors import CsvValidationError, DataError
from pneumoloc.inference import Predictor
from pneumoloc.io import read_xray
from pneumoloc.models import build_model
from pneumoloc.models.checkpoint import save_checkpoint
from pneumoloc.submit import format_prediction_string, submit, validate_submission

SIZE = 32  # model input; the synthetic images are 64 px


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A seeded, untrained smallcamnet whose threshold 0 makes every image positive (boxes)."""
    torch.manual_seed(0)
    model = build_model("smallcamnet")
    with torch.no_grad():  # a positive head on ReLU features: a non-zero CAM, hence boxes
        model.head.weight.abs_()
        model.head.bias.zero_()
    path = tmp_path_factory.mktemp("submit-model") / "model.pt"
    save_checkpoint(
        path,
        {
            "model": {"name": "smallcamnet", "kwargs": {}},
            "state_dict": model.state_dict(),
            "image_size": SIZE,
            "threshold": 0.0,
        },
    )
    return path


def _read(path: Path) -> list[list[str]]:
    with path.open(newline="", encoding="utf-8") as fh:
        return list(csv.reader(fh))


def _boxes(prediction: str) -> np.ndarray:
    return np.array([float(t) for t in prediction.split()]).reshape(-1, 5)


def test_submit_one_row_per_image_in_original_pixels(
    checkpoint: Path, synth_rsna: Path, tmp_path: Path
) -> None:
    images = synth_rsna / "stage_2_train_images"
    out = tmp_path / "submission.csv"
    result = submit(checkpoint, images, out, workers=1, progress=False)
    rows = _read(out)
    assert rows[0] == ["patientId", "PredictionString"]
    stems = sorted(p.stem for p in images.glob("*.dcm"))
    assert [r[0] for r in rows[1:]] == stems and result.n_images == 40 and not result.failed
    assert validate_submission(out, expected_ids=stems) == 40
    assert result.n_with_boxes > 0
    all_boxes = np.concatenate([_boxes(r[1]) for r in rows[1:]])
    assert len(all_boxes) == result.n_boxes
    conf, x, y, w, h = all_boxes.T
    assert np.all((conf >= 0) & (conf <= 1)) and np.all((w > 0) & (h > 0))
    assert np.all((x >= 0) & (y >= 0) & (x + w <= 64) & (y + h <= 64))
    # The same boxes, in 64-px originals, as the one inference path gives for that file.
    first = next(r for r in rows[1:] if r[1])
    pred = Predictor.from_checkpoint(checkpoint, device="cpu").predict_xrays(
        [read_xray(images / f"{first[0]}.dcm", min_size=SIZE)]
    )[0]
    assert pred.original_shape == (64, 64)
    expected = _boxes(format_prediction_string(pred.boxes.boxes, pred.boxes.scores, (64, 64)))
    np.testing.assert_allclose(_boxes(first[1]), expected)
    assert np.abs(_boxes(first[1])[:, 1:] - np.c_[pred.boxes.boxes]).max() <= 1.0


def test_corrupt_file_gets_an_empty_row_and_a_failure(
    checkpoint: Path, synth_rsna: Path, tmp_path: Path
) -> None:
    images = tmp_path / "images"
    shutil.copytree(synth_rsna / "stage_2_train_images", images)
    (images / "corrupt.dcm").write_bytes(b"DICM" + b"\x00garbage" * 20)
    first = sorted(images.glob("*.dcm"))[0]
    shutil.copy(first, images / "we,ird é.dcm")  # a comma and unicode in the patientId
    out = tmp_path / "sub.csv"
    result = submit(checkpoint, images, out, workers=2, batch_size=8, progress=False)
    assert [name for name, _ in result.failed] == ["corrupt.dcm"]
    rows = {r[0]: r[1] for r in _read(out)[1:]}
    assert len(rows) == 42 and rows["corrupt"] == ""
    assert rows["we,ird é"] == rows[first.stem] != ""
    code = main(
        [
            "submit",
            str(checkpoint),
            "--images",
            str(images),
            "--out",
            str(tmp_path / "c.csv"),
            "--workers",
            "1",
            "--quiet",
        ]
    )
    assert code == 1
    assert validate_submission(tmp_path / "c.csv") == 42


def test_cli_submit_success_and_duplicate_ids(
    checkpoint: Path, synth_rsna: Path, tmp_path: Path
) -> None:
    out = tmp_path / "s.csv"
    assert (
        main(
            [
                "submit",
                str(checkpoint),
                "--images",
                str(synth_rsna / "stage_2_train_images"),
                "--out",
                str(out),
                "--workers",
                "1",
                "--box-rule",
                "otsu",
                "--quiet",
            ]
        )
        == 0
    )
    assert validate_submission(out) == 40
    dup = tmp_path / "dup"
    dup.mkdir()
    src = next((synth_rsna / "stage_2_train_images").glob("*.dcm"))
    shutil.copy(src, dup / "a.dcm")
    (dup / "a.png").write_bytes(b"")
    with pytest.raises(DataError, match="share the patientId 'a'"):
        submit(checkpoint, dup, tmp_path / "d.csv", workers=1, progress=False)


def test_format_prediction_string_rounds_and_clips() -> None:
    boxes = np.array([[10.4, 20.6, 30.2, 40.0], [90, 95, 50, 50], [99.7, 0, 0.2, 0.2]])
    text = format_prediction_string(boxes, np.array([0.98765, 1.2, 0.00001]), (100, 100))
    assert text == "0.9877 10 21 31 40 1.0000 90 95 10 5 0.0000 99 0 1 1"
    assert format_prediction_string(np.zeros((0, 4)), np.zeros(0), (10, 10)) == ""


VALID = "patientId,PredictionString\na,0.5 0 0 100 100 0.25 10 10 5 5\nb,\n"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("patientid,PredictionString\na,\n", "header"),
        ("patientId,PredictionString,extra\na,,\n", "header"),
        ("", "header"),
        ("patientId,PredictionString\na,0.5 0 0 100\n", "groups of 5"),
        ("patientId,PredictionString\na,1.5 0 0 100 100\n", "confidence 1.5"),
        ("patientId,PredictionString\na,0.5 0 0 0 100\n", "width"),
        ("patientId,PredictionString\na,0.5 0 0 nan 100\n", "finite"),
        ("patientId,PredictionString\na,0.5 0 x 10 100\n", "not a number"),
        ("patientId,PredictionString\na,\na,\n", "duplicate"),
        ("patientId,PredictionString\n,\n", "empty patientId"),
        ("patientId,PredictionString\na\n", "2 fields"),
    ],
)
def test_validate_submission_rejects(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "s.csv"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(CsvValidationError, match=message):
        validate_submission(path)


def test_validate_submission_accepts_and_checks_ids(tmp_path: Path) -> None:
    path = tmp_path / "s.csv"
    path.write_text(VALID, encoding="utf-8")
    assert validate_submission(path) == 2
    assert validate_submission(path, expected_ids=["b", "a"]) == 2
    with pytest.raises(CsvValidationError, match="1 expected ids missing"):
        validate_submission(path, expected_ids=["a", "b", "c"])
    with pytest.raises(CsvValidationError, match="line 4"):
        path.write_text(VALID + "c,0.5 1 2 3\n", encoding="utf-8")
        validate_submission(path)
