"""``prepare`` on hostile data folders (issue 14): links that lead nowhere, labels files in other
encodings, repeated rows, absurd boxes, hidden files. Each test is named after its defect."""

from __future__ import annotations

import csv
import logging
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from conftest import RSNA_SAMPLE, write_folder_dataset
from pneumoloc.data.cache import prepare_cache
from pneumoloc.data.rsna import LABELS_CSV, read_rsna_labels
from pneumoloc.errors import CsvValidationError

HEADER = "patientId,x,y,width,height,Target\n"


def _copy_rsna(synth_rsna: Path, tmp_path: Path) -> Path:
    root = tmp_path / "rsna"
    shutil.copytree(synth_rsna, root, symlinks=True)
    return root


def _images(root: Path) -> list[Path]:
    return sorted((root / "stage_2_train_images").glob("*.dcm"))


@pytest.mark.skipif(os.name == "nt", reason="symbolic links")
def test_prepare_rsna_dangling_symlink_and_symlink_loop_get_failed_rows(
    synth_rsna: Path, tmp_path: Path
) -> None:
    root = _copy_rsna(synth_rsna, tmp_path)
    dangling, looping = _images(root)[:2]
    dangling.unlink()
    dangling.symlink_to(tmp_path / "nowhere.dcm")
    looping.unlink()
    looping.symlink_to(looping.name)  # a link to itself
    cache = prepare_cache(root, tmp_path / "cache", size=32, workers=1, progress=False)
    table = cache.table.set_index("image_id")
    assert table.loc[dangling.stem, "status"] == "failed"
    assert "broken symbolic link" in table.loc[dangling.stem, "error"]
    assert table.loc[looping.stem, "status"] == "failed"
    assert "symbolic link loop" in table.loc[looping.stem, "error"]
    assert (table["status"] == "ok").sum() == len(table) - 2  # the rest is cached


@pytest.mark.parametrize("encoding", ["utf-16", "utf-8-sig", "utf-32"])
def test_labels_csv_with_a_byte_order_mark_is_read(tmp_path: Path, encoding: str) -> None:
    path = tmp_path / LABELS_CSV
    path.write_bytes((HEADER + "a,,,,,0\nb,1,2,3,4,1\n").encode(encoding))
    labels = read_rsna_labels(path)
    assert list(labels) == ["a", "b"]
    np.testing.assert_array_equal(labels["b"][1], [[1, 2, 3, 4]])


def test_labels_csv_in_latin1_gives_a_clear_error_not_a_unicode_traceback(
    tmp_path: Path,
) -> None:
    path = tmp_path / LABELS_CSV
    path.write_bytes((HEADER + "a,,,,,0\nJosé,1,2,3,4,1\n").encode("latin-1"))
    with pytest.raises(CsvValidationError) as info:
        read_rsna_labels(path)
    message = str(info.value)
    assert str(path) in message and "line 3" in message
    assert "not UTF-8" in message and "Latin-1" in message


def test_labels_csv_in_utf16_without_bom_gives_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / LABELS_CSV
    path.write_bytes((HEADER + "a,,,,,0\n").encode("utf-16-le"))
    with pytest.raises(CsvValidationError, match="UTF-16"):
        read_rsna_labels(path)


def test_duplicated_csv_rows_do_not_double_ground_truth_boxes(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / LABELS_CSV
    path.write_text(HEADER + "b,1,2,3,4,1\nb,10,20,30,40,1\nb,1,2,3,4,1\na,,,,,0\na,,,,,0\n")
    with caplog.at_level(logging.WARNING):
        labels = read_rsna_labels(path)
    np.testing.assert_array_equal(labels["b"][1], [[1, 2, 3, 4], [10, 20, 30, 40]])
    assert "1 duplicated box row(s)" in caplog.text and "line 4" in caplog.text


@pytest.mark.parametrize(("value", "column"), [("1e30", "x"), ("3e5", "width"), ("inf", "y")])
def test_absurd_box_values_are_refused_with_the_row(
    tmp_path: Path, value: str, column: str
) -> None:
    cells = {"x": "1", "y": "2", "width": "3", "height": "4"}
    cells[column] = value
    path = tmp_path / LABELS_CSV
    path.write_text(
        HEADER + "a,,,,,0\n" + f"b,{cells['x']},{cells['y']},{cells['width']},{cells['height']},1\n"
    )
    with pytest.raises(CsvValidationError) as info:
        read_rsna_labels(path)
    assert (info.value.line, info.value.column) == (3, column)


def test_boxes_outside_the_image_are_warned_and_clipped(
    synth_rsna: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    root = _copy_rsna(synth_rsna, tmp_path)
    labels = root / LABELS_CSV
    with labels.open(newline="") as fh:
        rows = list(csv.reader(fh))
    target = next(r for r in rows[1:] if r[5] == "1")
    rows.append([target[0], "50", "60", "500", "500", "1"])  # the images are 64 px
    with labels.open("w", newline="") as fh:
        csv.writer(fh).writerows(rows)
    with caplog.at_level(logging.WARNING):
        cache = prepare_cache(root, tmp_path / "cache", size=32, workers=1, progress=False)
    assert target[0] in caplog.text and "outside the image" in caplog.text
    row = int(np.flatnonzero(cache.table["image_id"].to_numpy() == target[0])[0])
    boxes = cache.load_eval_boxes([row])[0]
    assert (boxes[:, 0] + boxes[:, 2] <= 64).all() and (boxes[:, 1] + boxes[:, 3] <= 64).all()
    assert cache.manifest["n_boxes_clipped"] == 1


def test_prepare_leaves_out_hidden_files_like_predict_and_warns(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    root = write_folder_dataset(tmp_path / "k", n_per_class=6, size=32)
    shutil.copy(next((root / "NORMAL").glob("*.png")), root / "NORMAL" / "._resource-fork.png")
    hidden_dir = root / "PNEUMONIA" / ".thumbnails"
    hidden_dir.mkdir()
    shutil.copy(next((root / "PNEUMONIA").glob("*.jpeg")), hidden_dir / "person99_virus_1.jpeg")
    with caplog.at_level(logging.WARNING):
        cache = prepare_cache(root, tmp_path / "cache", size=32, workers=1, progress=False)
    assert len(cache.table) == 12
    assert not any("resource-fork" in p or ".thumbnails" in p for p in cache.table["path"])
    assert "hidden file(s)/folder(s) left out" in caplog.text


@pytest.mark.skipif(os.name == "nt", reason="symbolic links")
def test_prepare_folder_layout_broken_link_gets_a_failed_row(tmp_path: Path) -> None:
    root = write_folder_dataset(tmp_path / "k", n_per_class=6, size=32)
    (root / "NORMAL" / "IM-0100-0001.png").symlink_to(tmp_path / "gone.png")
    cache = prepare_cache(root, tmp_path / "cache", size=32, workers=1, progress=False)
    row = cache.table[cache.table["image_id"] == "NORMAL/IM-0100-0001.png"].iloc[0]
    assert row["status"] == "failed" and "broken symbolic link" in row["error"]


@pytest.mark.skipif(not (RSNA_SAMPLE / "stage_2_train_images").is_dir(), reason="needs shared data")
def test_malformed_rescale_slope_is_warned_with_the_file_name(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    import pydicom

    from pneumoloc.io import read_xray

    source = sorted((RSNA_SAMPLE / "stage_2_train_images").glob("*.dcm"))[0]
    ds = pydicom.dcmread(source)
    ds.RescaleSlope = "7.77777"  # then made malformed in the bytes (pydicom validates values)
    path = tmp_path / "bad-slope.dcm"
    ds.save_as(path)
    data = path.read_bytes()
    assert data.count(b"7.77777 ") == 1
    path.write_bytes(data.replace(b"7.77777 ", b"abc-xyz "))
    with caplog.at_level(logging.WARNING):
        read_xray(path)
    assert "bad-slope.dcm" in caplog.text and "RescaleSlope" in caplog.text
