"""``predict``: a record and overlay per readable file, failures reported, nothing unsafe."""

from __future__ import annotations

import csv
import json
import logging
import re
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch
from PIL import Image

from conftest import save_untrained_checkpoint
from pneumoloc.cli import main
from pneumoloc.data.synthetic import SynthConfig, make_case, write_dicom
from pneumoloc.errors import CheckpointError, ConfigError, DataError
from pneumoloc.inference import Predictor
from pneumoloc.inference.loading import default_batch_size, load_predictor
from pneumoloc.io import read_xray
from pneumoloc.predict import (
    SUMMARY_COLUMNS,
    InputFile,
    assign_ids,
    collect_inputs,
    predict_paths,
)

SIZE = 32  # model input side; the synthetic DICOMs are 64 px
SAFE_FILE = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9._-]*$")


def write_synthetic_dicom(path: Path, index: int, **tags: str) -> Path:
    """A 64 px synthetic RSNA-like DICOM; ``tags`` overwrite DICOM elements by keyword."""
    config = SynthConfig(n=1, seed=7, image_size=64)
    write_dicom(path, make_case(config, index), config)
    if tags:
        ds = pydicom.dcmread(path)
        for keyword, value in tags.items():
            setattr(ds, keyword, value)
        ds.save_as(path)
    return path


def save_model(
    path: Path, threshold: float, *, name: str = "smallcamnet", size: int = SIZE
) -> Path:
    """A seeded, untrained model whose positive head on ReLU features gives non-flat CAMs."""
    return save_untrained_checkpoint(path, name, size=size, threshold=threshold)


def grey(shape: tuple[int, int], seed: int) -> np.ndarray:
    """A blob on noise, so CAMs have structure."""
    rng = np.random.default_rng(seed)
    img = rng.integers(0, 90, shape, dtype=np.uint8)
    h, w = shape
    img[h // 4 : h // 2, w // 3 : (2 * w) // 3] = 220
    return img


@pytest.fixture(scope="module")
def mixed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """3 DICOMs, a non-square PNG (in a subfolder), a JPEG, a corrupt DICOM, a text "PNG"."""
    root = tmp_path_factory.mktemp("mixed") / "inputs"
    (root / "sub").mkdir(parents=True)
    for i in range(3):
        write_synthetic_dicom(root / f"case{i}.dcm", i)
    Image.fromarray(grey((48, 80), 1)).save(root / "sub" / "wide.png")
    Image.fromarray(grey((64, 64), 2)).save(root / "photo.jpeg", quality=90)
    good = (root / "case0.dcm").read_bytes()
    (root / "corrupt.dcm").write_bytes(good[: len(good) // 2])
    (root / "fake.png").write_text("this is not a picture\n")
    (root / "notes.txt").write_text("not an input: unsupported suffix inside a folder\n")
    return root


GOOD = {"case0", "case1", "case2", "wide", "photo"}
BAD = {"corrupt", "fake"}


@pytest.fixture(scope="module")
def checkpoint(mixed: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """smallcamnet at 32 px whose threshold splits the good files into both decisions."""
    root = tmp_path_factory.mktemp("predict-model")
    probe = save_model(root / "probe.pt", 0.0)
    files = [mixed / f"case{i}.dcm" for i in range(3)] + [
        mixed / "sub/wide.png",
        mixed / "photo.jpeg",
    ]
    predictor = Predictor.from_checkpoint(probe, device="cpu")
    probs = sorted(p.probability for p in predictor.predict_xrays([read_xray(f) for f in files]))
    assert probs[1] < probs[2]  # distinct probabilities: a threshold between them is stable
    return save_model(root / "model.pt", (probs[1] + probs[2]) / 2)


def read_summary(path: Path) -> list[dict[str, str]]:
    with path.open(newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def test_predict_mixed_folder(mixed: Path, checkpoint: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = predict_paths(
        [mixed], out, model=checkpoint, workers=2, batch_size=2, progress=False, input_check=False
    )
    assert result.exit_code == 1 and result.n_failed == 2 and result.n_ok == 5
    rows = read_summary(out / "summary.csv")
    assert tuple(rows[0]) == SUMMARY_COLUMNS
    by_id = {r["id"]: r for r in rows}
    assert set(by_id) == GOOD | BAD  # notes.txt is not an input
    assert [r["id"] for r in rows] == [r.id for r in result.rows]
    assert by_id["wide"]["source"] == "inputs/sub/wide.png"
    for i in BAD:
        assert by_id[i]["status"] == "failed" and by_id[i]["error"]
        assert by_id[i]["probability"] == by_id[i]["decision"] == ""
    assert "not a DICOM, PNG or JPEG" in by_id["fake"]["error"]
    # One JSON and one overlay per good file, nothing for the bad ones.
    expected = {"summary.csv"} | {f"{i}.json" for i in GOOD} | {f"{i}.png" for i in GOOD}
    assert {p.name for p in out.iterdir()} == expected
    decisions = set()
    threshold = None
    for i in GOOD:
        row, record = by_id[i], json.loads((out / f"{i}.json").read_text())
        assert row["status"] == "ok" and row["error"] == ""
        assert record["id"] == i and record["cam_method"] == "cam" and record["backend"] == "torch"
        assert record["box_source"] == "cam"
        assert record["model_id"] == "smallcamnet@32px" and record["model_version"]
        assert float(row["probability"]) == pytest.approx(record["probability"], abs=1e-6)
        threshold = record["threshold"]
        positive = record["probability"] >= threshold
        assert (
            record["decision"] == row["decision"] == ("pneumonia" if positive else "no pneumonia")
        )
        assert int(row["n_boxes"]) == len(record["boxes"])
        decisions.add(positive)
        # Boxes in ORIGINAL pixels (the PNG is 80 wide, 48 high), none when negative.
        h, w = record["image_height"], record["image_width"]
        assert (h, w) == ((48, 80) if i == "wide" else (64, 64))
        if not positive:
            assert record["boxes"] == []
        else:
            assert record["boxes"], "a positive image with a non-flat CAM gets a box"
        for b in record["boxes"]:
            assert min(b["x"], b["y"]) >= 0 and min(b["width"], b["height"]) > 0
            assert b["x"] + b["width"] <= w + 1e-6 and b["y"] + b["height"] <= h + 1e-6
            assert 0 <= b["confidence"] <= 1
        overlay = Image.open(out / f"{i}.png")
        assert overlay.mode == "RGB" and overlay.width >= 384
    assert decisions == {True, False}
    # The same numbers as the one inference path (Predictor on the decoded file).
    pred = Predictor.from_checkpoint(checkpoint, device="cpu").predict_xrays(
        [read_xray(mixed / "sub/wide.png", min_size=SIZE)]
    )[0]
    record = json.loads((out / "wide.json").read_text())
    assert record["probability"] == pytest.approx(pred.probability, abs=1e-6)
    assert len(record["boxes"]) == len(pred.boxes)
    assert threshold == pytest.approx(pred.threshold)


def test_predict_without_overlays_in_process(mixed: Path, checkpoint: Path, tmp_path: Path) -> None:
    files = [mixed / "case1.dcm", mixed / "photo.jpeg"]
    threads = torch.get_num_threads()
    result = predict_paths(
        files,
        tmp_path,
        model=checkpoint,
        overlays=False,
        workers=1,
        threads=1,
        progress=False,
        input_check=False,  # synthetic images, not films
    )
    assert torch.get_num_threads() == threads  # restored
    with pytest.raises(ConfigError, match="threads"):
        predict_paths(files, tmp_path, model=checkpoint, threads=0, progress=False)
    assert result.exit_code == 0 and [r.id for r in result.rows] == ["case1", "photo"]
    assert {p.name for p in tmp_path.iterdir()} == {"summary.csv", "case1.json", "photo.json"}
    assert all(r.overlay_path is None and r.json_path is not None for r in result.rows)


def test_cli_predict_exit_codes(
    mixed: Path, checkpoint: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    common = ["--model", str(checkpoint), "--quiet", "--workers", "2", "--no-input-check"]
    assert main(["predict", str(mixed), "--out", str(tmp_path / "a"), *common]) == 1
    assert len(read_summary(tmp_path / "a" / "summary.csv")) == 7
    good = [str(mixed / "case0.dcm"), str(mixed / "sub" / "wide.png")]
    assert main(["predict", *good, "--out", str(tmp_path / "b"), "--no-overlay", *common]) == 0
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == [
        "case0.json",
        "summary.csv",
        "wide.json",
    ]
    # Usage errors: a missing input, an unknown CAM method, a bad batch size.
    assert main(["predict", str(tmp_path / "nope.dcm"), "--out", str(tmp_path / "c"), *common]) == 2
    assert main(["predict", *good, "--out", str(tmp_path / "c"), "--cam", "nope", *common]) == 2
    assert main(["predict", *good, "--out", str(tmp_path / "c"), "--batch-size", "0", *common]) == 2
    assert main(["predict", *good, "--out", str(mixed / "fake.png"), *common]) == 2
    with pytest.raises(SystemExit) as exc:
        main(["predict", "--out", str(tmp_path / "c")])  # no input
    assert exc.value.code == 2


def test_missing_default_model_is_a_clear_error(
    mixed: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(
        "pneumoloc.inference.base.DEFAULT_WEIGHTS", tmp_path / "absent" / "default.pt"
    )
    with pytest.raises(CheckpointError, match="default model is not installed"):
        load_predictor("default")
    with caplog.at_level(logging.ERROR):
        code = main(["predict", str(mixed / "case0.dcm"), "--out", str(tmp_path / "o"), "--quiet"])
    assert code == 2 and "default model is not installed" in caplog.text
    with pytest.raises(CheckpointError, match="no default ONNX model"):
        load_predictor("default", "onnx")


def test_default_batch_size_batches_on_the_cpu_too() -> None:
    # Batching pays on the CPU for the default model (benchmarks/bench_clinician.py,
    # docs/benchmarks.md); the next test checks it changes no output.
    assert default_batch_size("onnx", "auto") == default_batch_size("torch", "cpu") == 8
    assert default_batch_size("torch", "cuda") == default_batch_size("torch", "auto") == 8


def _records(out: Path) -> dict[str, dict]:  # type: ignore[type-arg]
    return {p.name: json.loads(p.read_text()) for p in sorted(out.glob("*.json"))}


@pytest.mark.parametrize("backend", ["onnx", "torch"])
def test_batched_predictions_equal_one_at_a_time(
    mixed: Path, checkpoint: Path, tmp_path: Path, backend: str
) -> None:
    """Batch 8 and batch 1 give the same records: identical with ONNX Runtime (its kernels do
    not depend on the batch); with PyTorch the convolutions block differently by batch, so
    probabilities agree to float32 rounding (<= 1e-6) and decisions and boxes are the same."""
    from pneumoloc.export import export_onnx

    model = checkpoint
    if backend == "onnx":
        model = export_onnx(checkpoint, tmp_path / "model.onnx").path
    runs = {}
    for batch in (1, 8):
        out = tmp_path / f"b{batch}"
        predict_paths(
            [mixed], out, model=model, backend=backend, batch_size=batch, workers=2,
            progress=False, input_check=False,
        )  # fmt: skip
        runs[batch] = _records(out)
    one, many = runs[1], runs[8]
    assert sorted(one) == sorted(many) and len(one) >= 5
    for name, a in one.items():
        b = many[name]
        if backend == "onnx":
            assert a == b
            continue
        assert abs(a["probability"] - b["probability"]) <= 1e-6
        assert a["decision"] == b["decision"]
        keys = ("x", "y", "width", "height", "confidence")
        assert len(a["boxes"]) == len(b["boxes"])
        for box_a, box_b in zip(a["boxes"], b["boxes"], strict=True):
            assert np.allclose([box_a[k] for k in keys], [box_b[k] for k in keys], atol=1e-3)


def test_backend_option_errors(checkpoint: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="backend"):
        load_predictor(checkpoint, "tensorflow")
    with pytest.raises(ConfigError, match="--backend onnx"):
        load_predictor(tmp_path / "model.onnx", "torch")
    with pytest.raises(ConfigError, match="CPU"):
        load_predictor(tmp_path / "model.onnx", "onnx", device="cuda")
    with pytest.raises(ConfigError, match="device"):
        load_predictor(checkpoint, device="tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="no CUDA"):
            load_predictor(checkpoint, device="cuda")


def test_ids_are_safe_unique_and_never_overwrite_inputs(tmp_path: Path) -> None:
    for rel in ("a/x.png", "b/x.png", "b/X.jpeg", "c/..png", "c/%2e%2e%2fx.dcm"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"")
    files = [InputFile(tmp_path / r, r) for r in ("a/x.png", "b/x.png", "b/X.jpeg")]
    assert assign_ids(files) == ["x", "x_2", "X_3"]
    odd = [InputFile(tmp_path / "c/..png", ""), InputFile(tmp_path / "c/%2e%2e%2fx.dcm", "")]
    assert assign_ids(odd) == ["unnamed", "_2e_2e_2fx"]
    # An input inside the output folder is never overwritten by its own overlay.
    out = tmp_path / "a"
    assert assign_ids([InputFile(out / "x.png", "x.png")], out.resolve()) == ["x_2"]


def test_collect_inputs_recurses_sorted_and_skips_hidden_and_out(tmp_path: Path) -> None:
    data = tmp_path / "data"
    for rel in ("b.png", "a/z.dcm", "a/y.JPG", ".hidden/h.png", "a/.h.png", "out/o.png", "n.txt"):
        (data / rel).parent.mkdir(parents=True, exist_ok=True)
        (data / rel).write_bytes(b"")
    found = collect_inputs([data], exclude=(data / "out").resolve())
    assert [f.source for f in found] == ["data/a/y.JPG", "data/a/z.dcm", "data/b.png"]
    # A file argument is always tried, whatever its suffix.
    assert [f.source for f in collect_inputs([data / "n.txt"])] == ["n.txt"]
    with pytest.raises(DataError, match="no such file"):
        collect_inputs([data / "missing.png"])
    (data / "a" / "empty").mkdir()
    with pytest.raises(DataError, match="no DICOM"):
        collect_inputs([data / "a" / "empty"])


def _all_files(root: Path) -> set[Path]:
    return {p for p in root.rglob("*") if p.is_file() or p.is_symlink()}


def test_hostile_names_and_patient_ids_cannot_escape_out(checkpoint: Path, tmp_path: Path) -> None:
    inputs = tmp_path / "in"
    inputs.mkdir()
    names = ["..png", "a b ü.png", "%2e%2e%2fx.dcm", "=cmd()|x.png", ".hidden.png"]
    try:
        (inputs / "new\nline.png").write_bytes(b"")
        names.append("new\nline.png")
    except OSError:  # a file system that refuses newlines in names
        pass
    paths = []
    for k, name in enumerate(names):
        path = inputs / name
        if name.endswith(".dcm"):
            write_synthetic_dicom(path, k, PatientID="../../x", PatientName="../../x")
        else:
            Image.fromarray(grey((40, 40), k)).save(path, format="PNG")
        paths.append(path)
    hostile = write_synthetic_dicom(inputs / "plain.dcm", 9, PatientID="../../y", PatientName="../")
    paths.append(hostile)
    out = tmp_path / "deep" / "out"
    out.mkdir(parents=True)
    # A pre-planted symbolic link at an output name must be replaced, never written through.
    victim = tmp_path / "victim.txt"
    victim.write_text("untouched")
    (out / "plain.json").symlink_to(victim)
    before = _all_files(tmp_path)
    result = predict_paths(
        paths,
        out,
        model=checkpoint,
        keep_identifiers=True,
        workers=2,
        progress=False,
        input_check=False,  # synthetic images, not films
    )
    assert result.exit_code == 0, [r.error for r in result.rows]
    new = _all_files(tmp_path) - before
    assert new, "outputs were written"
    resolved_out = out.resolve()
    for path in new:
        assert path.resolve().parent == resolved_out, path
        assert SAFE_FILE.match(path.name), path.name
    assert victim.read_text() == "untouched"
    assert not (out / "plain.json").is_symlink()
    assert (
        json.loads((out / "plain.json").read_text())["dicom_identifiers"]["PatientID"] == "../../y"
    )
    sources = [r["source"] for r in read_summary(out / "summary.csv")]
    assert all("\n" not in s for s in sources)
    assert "'=cmd()|x.png" in sources  # no spreadsheet formula
    assert "a b ü.png" in sources


SECRETS = ("Doe^Jane", "SECRET123", "19800101")


def _identifiable(folder: Path) -> list[str]:
    """Names of files under ``folder`` that contain any of SECRETS, in bytes or PNG text."""
    hits = []
    for path in folder.rglob("*"):
        data = path.read_bytes()
        if any(s.encode() in data for s in SECRETS):
            hits.append(path.name)
        if path.suffix == ".png":
            with Image.open(path) as im:
                if getattr(im, "text", {}) or any(s in str(im.info) for s in SECRETS):
                    hits.append(f"{path.name} (metadata)")
    return hits


def test_identifying_tags_are_written_only_when_asked(
    checkpoint: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    dcm = write_synthetic_dicom(
        tmp_path / "study.dcm",
        0,
        PatientName="Doe^Jane",
        PatientID="SECRET123",
        PatientBirthDate="19800101",
        AccessionNumber="ACC42",
    )
    with caplog.at_level(logging.DEBUG):
        plain = predict_paths([dcm], tmp_path / "plain", model=checkpoint, progress=False)
        kept = predict_paths(
            [dcm], tmp_path / "kept", model=checkpoint, keep_identifiers=True, progress=False
        )
    assert plain.exit_code == kept.exit_code == 0
    assert _identifiable(tmp_path / "plain") == []
    record = json.loads((tmp_path / "plain" / "study.json").read_text())
    assert "dicom_identifiers" not in record
    assert not any(s in caplog.text for s in SECRETS)
    ids = json.loads((tmp_path / "kept" / "study.json").read_text())["dicom_identifiers"]
    assert ids["PatientName"] == "Doe^Jane" and ids["PatientID"] == "SECRET123"
    assert ids["PatientBirthDate"] == "19800101" and ids["AccessionNumber"] == "ACC42"
    assert "StudyInstanceUID" in ids
    # Only the JSON record carries them, never the summary or the overlay.
    assert _identifiable(tmp_path / "kept") == ["study.json"]
    # PNG/JPEG inputs have no DICOM tags: no block.
    png = tmp_path / "p.png"
    Image.fromarray(grey((40, 40), 0)).save(png)
    predict_paths([png], tmp_path / "p", model=checkpoint, keep_identifiers=True, progress=False)
    assert "dicom_identifiers" not in json.loads((tmp_path / "p" / "p.json").read_text())


def test_open_errors_and_reader_bugs_are_failed_rows(
    mixed: Path, checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import pneumoloc.io.reader

    real = pneumoloc.io.reader.read_xray

    def flaky(path: Path, **kwargs: object) -> object:
        if Path(path).stem == "case0":
            raise PermissionError(13, "Permission denied", str(path))
        if Path(path).stem == "case1":
            raise RuntimeError("a reader bug")
        return real(path, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(pneumoloc.io.reader, "read_xray", flaky)
    files = [mixed / "case0.dcm", mixed / "case1.dcm", mixed / "case2.dcm"]
    for overlays in (False, True):  # the model's decode, then also the overlay's second decode
        out = tmp_path / str(overlays)
        result = predict_paths(
            files, out, model=checkpoint, workers=2, progress=False, overlays=overlays
        )
        assert [r.status for r in result.rows] == ["failed", "failed", "ok"]
        assert "cannot open the file (Permission denied)" in result.rows[0].error
        assert result.rows[1].error == "RuntimeError: a reader bug"
        assert result.exit_code == 1


def test_box_gate_f1_withholds_boxes_below_the_box_threshold(tmp_path: Path) -> None:
    """With box_gate "f1" an image needs the stored box_threshold for boxes; the decision
    still uses the decision threshold. Without a stored box_threshold it falls back to it."""
    from conftest import save_untrained_checkpoint
    from pneumoloc.errors import ConfigError
    from pneumoloc.inference import Predictor

    path = save_untrained_checkpoint(
        tmp_path / "m.pt", size=32, threshold=0.0, box_threshold=1.0, box_gate="f1"
    )
    images = np.random.default_rng(0).integers(0, 255, (3, 32, 32), dtype=np.uint8)
    shapes = [(64, 64)] * 3
    gated = Predictor.from_checkpoint(path, device="cpu", lung_mask=False)
    assert gated.box_gate == "f1" and gated.box_threshold == 1.0
    preds = gated.predict_arrays(images, shapes)
    assert all(p.positive for p in preds) and all(len(p.boxes) == 0 for p in preds)
    plain = Predictor.from_checkpoint(path, device="cpu", lung_mask=False, box_gate="decision")
    assert plain.box_threshold == 0.0
    assert all(len(p.boxes) > 0 for p in plain.predict_arrays(images, shapes))
    legacy = save_untrained_checkpoint(tmp_path / "old.pt", size=32, threshold=0.3, box_gate="f1")
    assert Predictor.from_checkpoint(legacy, device="cpu").box_threshold == 0.3
    with pytest.raises(ConfigError, match="box_gate"):
        _ = Predictor.from_checkpoint(path, device="cpu", box_gate="strict").box_threshold
