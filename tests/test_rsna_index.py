"""The RSNA Kaggle layout: labels CSV validation, grouping, missing and unlabelled images."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from conftest import RSNA_SAMPLE
from pneumoloc.data.folder import index_data
from pneumoloc.data.rsna import index_rsna, read_rsna_labels
from pneumoloc.errors import CsvValidationError, DataError

HEADER = "patientId,x,y,width,height,Target\n"


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "stage_2_train_labels.csv"
    path.write_text(text)
    return path


def test_groups_boxes_per_patient(tmp_path: Path) -> None:
    path = _write(
        tmp_path,
        HEADER + "a,,,,,0\nb,10.0,20.0,30.0,40.0,1\nb,100,200,50,60,1\nc,1,2,3,4,1\n",
    )
    labels = read_rsna_labels(path)
    assert list(labels) == ["a", "b", "c"]
    assert labels["a"][0] == 0 and labels["a"][1].shape == (0, 4)
    assert labels["b"][0] == 1
    np.testing.assert_array_equal(labels["b"][1], [[10, 20, 30, 40], [100, 200, 50, 60]])


@pytest.mark.parametrize(
    ("body", "line", "column"),
    [
        ("a,,,,,2\n", 2, "Target"),
        ("a,,,,,0\nb,x1,2,3,4,1\n", 3, "x"),
        ("a,1,2,0,4,1\n", 2, "width"),
        ("a,1,2,3,,1\n", 2, "height"),
        ("a,1,2,3,4,0\n", 2, "x"),
        ("a,,,,,0\na,1,2,3,4,1\n", 3, "Target"),
        ("a,1,2,3,nan,1\n", 2, "height"),
    ],
)
def test_csv_errors_name_file_line_column(
    tmp_path: Path, body: str, line: int, column: str
) -> None:
    path = _write(tmp_path, HEADER + body)
    with pytest.raises(CsvValidationError) as info:
        read_rsna_labels(path)
    err = info.value
    assert (err.line, err.column) == (line, column)
    assert str(path) in str(err) and f"line {line}" in str(err)


def test_missing_column(tmp_path: Path) -> None:
    path = _write(tmp_path, "patientId,x,y,width,Target\na,,,,0\n")
    with pytest.raises(CsvValidationError, match="height"):
        read_rsna_labels(path)


def test_synthetic_layout_indexes(synth_rsna: Path) -> None:
    index = index_rsna(synth_rsna)
    assert len(index.records) == 40 and not index.missing and not index.unlabelled
    for rec in index.records:
        assert rec.path is not None and rec.path.is_file()
        assert (len(rec.boxes) > 0) == bool(rec.label)


def test_missing_and_unlabelled_are_reported(synth_rsna: Path, tmp_path: Path) -> None:
    import shutil

    root = tmp_path / "partial"
    shutil.copytree(synth_rsna, root)
    images = sorted((root / "stage_2_train_images").iterdir())
    images[0].unlink()
    images[1].unlink()
    shutil.copy(images[2], images[2].with_name("not-in-csv.dcm"))
    index = index_data(root)
    assert len(index.records) == 38
    assert sorted(index.missing) == sorted([images[0].stem, images[1].stem])
    assert [p.name for p in index.unlabelled] == ["not-in-csv.dcm"]
    assert "2 labelled image ids have no image" in index.summary()


def test_not_a_data_folder(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="not a data folder"):
        index_data(tmp_path)


@pytest.mark.skipif(not RSNA_SAMPLE.is_dir(), reason="shared RSNA sample not present")
def test_real_rsna_sample_partial_download() -> None:
    index = index_rsna(RSNA_SAMPLE)
    assert len(index.records) == 636
    assert len(index.missing) == 26684 - 636
    assert sum(r.label for r in index.records) == 197
    details = {r.detail for r in index.records}
    assert details == {"Lung Opacity", "Normal", "No Lung Opacity / Not Normal"}
