"""The preprocessing cache: round trip, resume, changed files, corrupt files, boxes kept apart."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from pneumoloc.data import cache as cache_mod
from pneumoloc.data.cache import open_cache, prepare_cache, resolve_cache
from pneumoloc.data.datasets import ImageLabelDataset, training_dataset
from pneumoloc.errors import CacheError
from pneumoloc.io import read_xray
from pneumoloc.io.preprocess import resize_square


def test_round_trip_folder(folder_dataset: Path, tmp_path: Path) -> None:
    cache = prepare_cache(folder_dataset, tmp_path / "c", size=32, workers=1, progress=False)
    assert cache.images.shape == (12, 32, 32) and cache.images.dtype == np.uint8
    assert (cache.table["status"] == "ok").all()
    assert cache.labels.sum() == 6
    # Row content equals reading + resizing the file directly.
    row = 3
    direct = resize_square(read_xray(cache.table["path"][row]).pixels, 32)
    np.testing.assert_array_equal(cache.images[row], direct)
    assert tuple(cache.original_shapes[row]) == (48, 48)
    reopened = open_cache(tmp_path / "c")
    np.testing.assert_array_equal(reopened.images, cache.images)
    assert reopened.fingerprint == cache.fingerprint


def test_parallel_equals_serial(synth_rsna: Path, tmp_path: Path) -> None:
    serial = prepare_cache(synth_rsna, tmp_path / "s", size=32, workers=1, progress=False)
    parallel = prepare_cache(
        synth_rsna, tmp_path / "p", size=32, workers=2, chunk_size=4, progress=False
    )
    np.testing.assert_array_equal(serial.images, parallel.images)
    assert serial.table["image_id"].tolist() == parallel.table["image_id"].tolist()


def test_boxes_scaled_to_cache(synth_rsna: Path, tmp_path: Path) -> None:
    cache = prepare_cache(synth_rsna, tmp_path / "c", size=32, workers=1, progress=False)
    positives = np.flatnonzero(cache.labels == 1)
    orig = cache.load_eval_boxes(positives, scale="original")
    scaled = cache.load_eval_boxes(positives, scale="cache")
    assert all(len(b) > 0 for b in orig)
    np.testing.assert_allclose(scaled[0], orig[0] * 32 / 64, rtol=1e-6)


def test_resume_after_interruption(
    folder_dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    reference = prepare_cache(folder_dataset, tmp_path / "ref", size=32, workers=1, progress=False)
    real = cache_mod._decode_chunk
    calls: list[list[int]] = []

    def flaky(path: str, size: int, rows: list[int], paths: list[str]) -> list[dict]:
        if len(calls) == 2:
            raise KeyboardInterrupt
        calls.append(rows)
        return real(path, size, rows, paths)

    monkeypatch.setattr(cache_mod, "_decode_chunk", flaky)
    with pytest.raises(KeyboardInterrupt):
        prepare_cache(
            folder_dataset, tmp_path / "c", size=32, workers=1, chunk_size=3, progress=False
        )
    with pytest.raises(CacheError, match="incomplete"):
        open_cache(tmp_path / "c")
    done_before = {r for rows in calls for r in rows}
    calls.clear()
    monkeypatch.setattr(cache_mod, "_decode_chunk", lambda *a: (calls.append(a[2]), real(*a))[1])
    cache = prepare_cache(
        folder_dataset, tmp_path / "c", size=32, workers=1, chunk_size=3, progress=False
    )
    redone = {r for rows in calls for r in rows}
    assert redone == set(range(12)) - done_before  # nothing finished was decoded again
    np.testing.assert_array_equal(cache.images, reference.images)
    # A second run over an unchanged folder decodes nothing.
    calls.clear()
    prepare_cache(folder_dataset, tmp_path / "c", size=32, workers=1, progress=False)
    assert calls == []


def test_changed_file_is_rebuilt(
    folder_dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    prepare_cache(folder_dataset, tmp_path / "c", size=32, workers=1, progress=False)
    target = sorted((folder_dataset / "NORMAL").iterdir())[0]
    from PIL import Image

    Image.fromarray(np.full((48, 48), 200, np.uint8)).save(target)
    os.utime(target, ns=(1, 1))
    real = cache_mod._decode_chunk
    calls: list[list[str]] = []
    monkeypatch.setattr(cache_mod, "_decode_chunk", lambda *a: (calls.append(a[3]), real(*a))[1])
    cache = prepare_cache(folder_dataset, tmp_path / "c", size=32, workers=1, progress=False)
    assert [p for paths in calls for p in paths] == [str(target)]
    row = cache.table.index[cache.table["path"] == str(target)][0]
    assert (cache.images[row] == 200).all()


def test_corrupt_file_is_reported_and_skipped(folder_dataset: Path, tmp_path: Path) -> None:
    bad = folder_dataset / "PNEUMONIA" / "person99_virus_1.jpeg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 this is not really a jpeg")
    cache = prepare_cache(folder_dataset, tmp_path / "c", size=32, workers=2, progress=False)
    table = cache.table.set_index("path")
    assert table.loc[str(bad), "status"] == "failed"
    assert table.loc[str(bad), "error"]
    assert (cache.table["status"] == "ok").sum() == 12
    bad_row = int(np.flatnonzero(cache.table["path"] == str(bad))[0])
    assert bad_row not in set(cache.split.part("all").tolist())
    assert cache.manifest["n_failed"] == 1


def test_size_mismatch_is_a_clear_error(folder_dataset: Path, tmp_path: Path) -> None:
    prepare_cache(folder_dataset, tmp_path / "c", size=32, workers=1, progress=False)
    with pytest.raises(CacheError, match="built at 32 px but 64 px"):
        resolve_cache(tmp_path / "c", size=64)


def test_split_stored_with_cache(synth_rsna: Path, tmp_path: Path) -> None:
    cache = prepare_cache(synth_rsna, tmp_path / "c", size=32, workers=1, progress=False)
    stored = json.loads((tmp_path / "c" / "splits.json").read_text())
    assert sorted(stored["train"] + stored["val"] + stored["test"]) == sorted(cache.image_ids)
    assert cache.manifest["split"]["sizes"]["test"] == len(cache.split.test) > 0


def test_training_dataset_cannot_reach_boxes(synth_rsna: Path, tmp_path: Path) -> None:
    """Would fail if training read boxes: boxes.json is destroyed and training data still flows."""
    cache = prepare_cache(synth_rsna, tmp_path / "c", size=32, workers=1, progress=False)
    (tmp_path / "c" / "boxes.json").write_text("{ this is not json")
    with pytest.raises(json.JSONDecodeError):
        cache.load_eval_boxes([0])
    dataset = training_dataset(cache, "train")
    assert isinstance(dataset, ImageLabelDataset)
    items = [dataset[i] for i in range(len(dataset))]
    assert all(len(item) == 2 for item in items)
    image, label = items[0]
    assert image.shape == (1, 32, 32) and image.dtype == torch.uint8 and label.shape == ()
    # The dataset holds images and labels only: no reference to the cache, its table or folder.
    held = list(vars(dataset).values())
    assert not any(isinstance(v, (cache_mod.Cache, Path, str)) for v in held)
    assert {type(v) for v in held} <= {np.ndarray, np.memmap}
    batch = dataset.__getitems__([2, 0, 1])
    assert torch.equal(batch[1][0], items[0][0])
