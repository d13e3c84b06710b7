"""``predict`` across runs and odd folders (issue 14): Ctrl-C writes summary.csv and --resume
skips finished records; a reused --out is refused or cleaned; pseudonyms replace file names;
broken links, folders named *.dcm and hidden files are reported, never silently dropped."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import save_untrained_checkpoint
from pneumoloc.errors import ConfigError
from pneumoloc.inference.base import BasePredictor
from pneumoloc.predict import predict_paths


@pytest.fixture
def checkpoint(tmp_path: Path) -> Path:
    return save_untrained_checkpoint(tmp_path / "model.pt", size=32, threshold=0.5)


@pytest.fixture
def inputs(tmp_path: Path) -> Path:
    folder = tmp_path / "in"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(6):
        Image.fromarray(rng.integers(0, 200, (40, 40), dtype=np.uint8)).save(
            folder / f"patient-{i}.png"
        )
    return folder


def _run(inputs: Path, out: Path, checkpoint: Path, **kw: object):  # type: ignore[no-untyped-def]
    return predict_paths(
        [inputs],
        out,
        model=checkpoint,
        device="cpu",
        workers=1,
        batch_size=2,
        progress=False,
        overlays=False,
        input_check=False,
        **kw,
    )


def test_predict_ctrl_c_writes_summary_and_resume_skips_finished_records(
    tmp_path: Path, inputs: Path, checkpoint: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "out"
    # The pipeline's network call per batch (the rest of each image runs in worker threads).
    real = BasePredictor.raw_outputs
    calls: list[int] = []

    def interrupted(self, images, with_features=False):  # type: ignore[no-untyped-def]
        if len(calls) == 2:
            raise KeyboardInterrupt
        calls.append(len(images))
        return real(self, images, with_features)

    monkeypatch.setattr(BasePredictor, "raw_outputs", interrupted)
    with pytest.raises(KeyboardInterrupt):
        _run(inputs, out, checkpoint)
    lines = (out / "summary.csv").read_text().splitlines()
    assert len(lines) == 7  # header + every input
    assert sum(",ok," in line for line in lines) == 4
    assert sum(",interrupted," in line for line in lines) == 2
    calls.clear()
    monkeypatch.setattr(
        BasePredictor,
        "raw_outputs",
        lambda s, i, with_features=False: (calls.append(len(i)), real(s, i, with_features))[1],
    )
    result = _run(inputs, out, checkpoint, resume=True)
    assert sum(calls) == 2  # only the two unfinished inputs are predicted again
    assert [r.status for r in result.rows] == ["ok"] * 6
    assert len((out / "summary.csv").read_text().splitlines()) == 7


def test_reused_out_with_stale_records_is_refused_or_cleaned(
    tmp_path: Path, inputs: Path, checkpoint: Path
) -> None:
    out = tmp_path / "out"
    _run(inputs, out, checkpoint)
    (inputs / "patient-5.png").unlink()
    with pytest.raises(ConfigError, match=r"--resume.*--overwrite"):
        _run(inputs, out, checkpoint)
    result = _run(inputs, out, checkpoint, overwrite=True)
    assert len(result.rows) == 5
    assert not (out / "patient-5.json").exists()  # the stale record is gone
    assert sorted(p.name for p in out.glob("*.json")) == [f"patient-{i}.json" for i in range(5)]


def test_pseudonymise_replaces_file_names_in_every_output(
    tmp_path: Path, inputs: Path, checkpoint: Path
) -> None:
    out = tmp_path / "out"
    result = predict_paths(
        [inputs],
        out,
        model=checkpoint,
        device="cpu",
        workers=1,
        progress=False,
        input_check=False,
        pseudonymise_ids=True,
    )
    ids = [r.id for r in result.rows]
    assert all(i.startswith("img-") and len(i) == 20 for i in ids)
    for path in out.iterdir():
        assert "patient" not in path.name
        if path.suffix in (".json", ".csv"):
            assert "patient" not in path.read_text(), path.name
    assert (out / ".pseudonym-key").stat().st_mode & 0o077 == 0
    again = predict_paths(
        [inputs],
        out,
        model=checkpoint,
        device="cpu",
        workers=1,
        progress=False,
        input_check=False,
        pseudonymise_ids=True,
        overwrite=True,
    )
    assert [r.id for r in again.rows] == ids  # stable with the folder's key
    other = predict_paths(
        [inputs],
        tmp_path / "o2",
        model=checkpoint,
        device="cpu",
        workers=1,
        progress=False,
        input_check=False,
        pseudonymise_ids=True,
        pseudonym_key="a key of mine",
    )
    assert set(r.id for r in other.rows).isdisjoint(ids)
    first = json.loads((out / f"{ids[0]}.json").read_text())
    assert first["id"] == ids[0] and first["source"] == ids[0]


@pytest.mark.skipif(os.name == "nt", reason="symbolic links")
def test_predict_reports_broken_links_image_named_folders_and_hidden_files(
    tmp_path: Path, inputs: Path, checkpoint: Path, caplog: pytest.LogCaptureFixture
) -> None:
    (inputs / "gone.dcm").symlink_to(tmp_path / "nowhere.dcm")
    (inputs / "loop.png").symlink_to("loop.png")
    (inputs / "series.dcm").mkdir()
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(inputs / "._patient-0.png")
    with caplog.at_level(logging.WARNING):
        result = _run(inputs, tmp_path / "out", checkpoint)
    rows = {r.id: r for r in result.rows}
    assert rows["gone"].status == "failed" and "broken symbolic link" in rows["gone"].error
    assert rows["loop"].status == "failed" and "symbolic link loop" in rows["loop"].error
    assert "series.dcm is a folder, not an image file" in caplog.text
    assert "hidden file(s)/folder(s) left out" in caplog.text
    assert result.exit_code == 1
