"""``predict`` with worker processes (issue 15): the same files as with threads, byte for byte;
Ctrl-C and a dying worker lose nothing already written; the choice of workers is checked.

Worker processes are forked only from a process with no other Python thread, which a test
session is not (pytest and earlier tests leave threads), so the runs with processes happen
in a fresh interpreter running the CLI (:data:`DRIVER`), as a user's would."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import save_untrained_checkpoint
from pneumoloc.errors import PneumolocError
from pneumoloc.predict import pipeline, predict_paths

linux_only = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="worker processes are forked (Linux only)"
)


@pytest.fixture(scope="module")
def onnx_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from pneumoloc.export import export_onnx

    root = tmp_path_factory.mktemp("parallel-model")
    ckpt = save_untrained_checkpoint(root / "model.pt", size=64, threshold=0.5)
    return export_onnx(ckpt, root / "model.onnx").path


@pytest.fixture(scope="module")
def inputs(synth_rsna: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Synthetic films (DICOM), noise pictures (PNG, refused by the input check), a file that
    is not an image (a failed row): every kind of row."""
    folder = tmp_path_factory.mktemp("parallel-in")
    for path in sorted((synth_rsna / "stage_2_train_images").glob("*.dcm"))[:14]:
        (folder / path.name).write_bytes(path.read_bytes())
    rng = np.random.default_rng(5)
    for i in range(4):
        Image.fromarray(rng.integers(0, 256, (80, 70), dtype=np.uint8)).save(folder / f"n{i}.png")
    (folder / "broken.dcm").write_bytes(b"DICM but not really" * 10)
    return folder


def _predict(inputs: Path, out: Path, model: Path, parallel: str, **kw: object):  # type: ignore[no-untyped-def]
    settings: dict[str, object] = {"backend": "onnx", "workers": 2, "batch_size": 4, **kw}
    return predict_paths([inputs], out, model=model, progress=False, parallel=parallel, **settings)


DRIVER = """
import os, sys
from pathlib import Path

from pneumoloc.inference.base import BasePredictor
from pneumoloc.predict import pipeline

how = os.environ.get("DRIVER_FAULT", "")
if how == "ctrl-c":  # Ctrl-C in the network's third batch (this process; workers ignore it)
    real = BasePredictor.raw_outputs
    calls = []

    def raw_outputs(self, images, with_features=False):
        if len(calls) == 2:
            raise KeyboardInterrupt
        calls.append(len(images))
        return real(self, images, with_features)

    BasePredictor.raw_outputs = raw_outputs
elif how.startswith("crash:"):  # a worker dies on one file, as if killed for memory
    victim, real_finish = how[len("crash:"):], pipeline._Context.finish

    def finish(self, item, *args):
        if Path(item.path).name == victim:
            os._exit(9)
        return real_finish(self, item, *args)

    pipeline._Context.finish = finish
elif how:
    raise SystemExit(f"unknown DRIVER_FAULT {how!r}")
from pneumoloc.cli import main

sys.exit(main(sys.argv[1:]))
"""


def _cli(
    inputs: Path, out: Path, model: Path, parallel: str, *extra: str, fault: str = ""
) -> subprocess.CompletedProcess[str]:
    src = Path(__file__).resolve().parents[1] / "src"
    env = {**os.environ, "PYTHONPATH": str(src), "DRIVER_FAULT": fault}
    cmd = [sys.executable, "-c", DRIVER, "-v", "predict", str(inputs), "--out", str(out)]
    cmd += ["--model", str(model), "--backend", "onnx", "--workers", "2", "--batch-size", "4"]
    cmd += ["--parallel", parallel, "--quiet", *extra]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


@linux_only
def test_processes_write_the_same_files_as_threads(
    inputs: Path, onnx_model: Path, tmp_path: Path
) -> None:
    threads = _predict(inputs, tmp_path / "threads", onnx_model, "threads")
    run = _cli(inputs, tmp_path / "processes", onnx_model, "processes")
    assert run.returncode == 1, run.stderr  # the broken file failed
    assert "2 worker processes" in run.stderr and "instead of processes" not in run.stderr
    statuses = [r.status for r in threads.rows]
    assert {"ok", "failed"} <= set(statuses)  # real work and a failure went through the pool
    a, b = _files(tmp_path / "threads"), _files(tmp_path / "processes")
    assert sorted(a) == sorted(b) and any(name.endswith(".png") for name in a)
    assert [name for name in a if a[name] != b[name]] == []


@linux_only
def test_auto_uses_processes_for_a_long_onnx_run_only(onnx_model: Path) -> None:
    from pneumoloc.inference.loading import load_predictor

    onnx = load_predictor(onnx_model, "onnx")
    n = pipeline.PROCESS_MIN_INPUTS
    alone = threading.active_count() == 1
    assert pipeline._use_processes("auto", onnx, n, 2) == alone
    assert not pipeline._use_processes("auto", onnx, n - 1, 2)
    assert not pipeline._use_processes("auto", onnx, n, 1)  # one worker: the calling thread
    assert not pipeline._use_processes("threads", onnx, 10 * n, 2)
    with pytest.raises(ValueError, match="parallel"):
        pipeline._use_processes("fibers", onnx, n, 2)
    stop = threading.Event()
    other = threading.Thread(target=stop.wait)
    other.start()
    try:  # another Python thread: never fork beside it
        assert not pipeline._use_processes("auto", onnx, n, 2)
        assert not pipeline._use_processes("processes", onnx, n, 2)
    finally:
        stop.set()
        other.join()


def test_torch_backend_keeps_threads_and_asking_for_processes_is_an_error(
    tmp_path: Path, inputs: Path
) -> None:
    from pneumoloc.inference.loading import load_predictor

    ckpt = save_untrained_checkpoint(tmp_path / "m.pt", size=32, threshold=0.5)
    torch_pred = load_predictor(ckpt, "torch", device="cpu")
    assert not torch_pred.can_leave_network
    assert not pipeline._use_processes("auto", torch_pred, 1000, 2)
    with pytest.raises(PneumolocError, match="--parallel threads"):
        _predict(inputs, tmp_path / "out", ckpt, "processes", backend="torch")
    with pytest.raises(NotImplementedError):
        torch_pred.without_network()


def test_a_predictor_without_its_network_pickles_finishes_and_refuses_the_network(
    onnx_model: Path,
) -> None:
    from pneumoloc.inference.loading import load_predictor

    full = load_predictor(onnx_model, "onnx")
    bare = pickle.loads(pickle.dumps(full.without_network()))
    images = np.random.default_rng(1).integers(0, 256, (2, 64, 64), dtype=np.uint8)
    raw = full.raw_outputs(images)
    shapes = [(64, 64), (100, 80)]
    for a, b in zip(
        full.finish(images, raw, shapes), bare.finish(images, raw, shapes), strict=True
    ):
        assert a.probability == b.probability and a.positive == b.positive
        assert np.array_equal(a.heatmap, b.heatmap)
        assert np.array_equal(a.boxes.boxes, b.boxes.boxes)
    assert bare.describe() == full.describe()
    with pytest.raises(RuntimeError, match="without its network"):
        bare.raw_outputs(images)


@linux_only
def test_ctrl_c_with_worker_processes_writes_the_summary_and_resume_finishes(
    inputs: Path, onnx_model: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    run = _cli(inputs, out, onnx_model, "processes", fault="ctrl-c")
    assert run.returncode == 130, run.stderr
    assert "--resume" in run.stderr
    lines = (out / "summary.csv").read_text().splitlines()
    assert len(lines) == 1 + 19
    interrupted = sum(",interrupted," in line for line in lines)
    assert 0 < interrupted <= 19 - 8  # the two batches that ran were written by the workers
    run = _cli(inputs, out, onnx_model, "processes", "--resume")
    assert run.returncode == 1, run.stderr
    assert ",interrupted," not in (out / "summary.csv").read_text()
    reference = tmp_path / "reference"
    _predict(inputs, reference, onnx_model, "threads")
    assert _files(out) == _files(reference)  # resumed, the same files as one run


@linux_only
def test_a_dying_worker_is_a_clear_error_and_resume_continues(
    inputs: Path, onnx_model: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    victim = sorted(inputs.glob("*.dcm"))[9].name
    run = _cli(inputs, out, onnx_model, "processes", fault=f"crash:{victim}")
    assert run.returncode == 2, run.stderr
    assert "worker process died" in run.stderr and "--resume" in run.stderr
    assert list(out.glob("*.json"))  # what was finished before the crash is kept
    assert ",ok," in (out / "summary.csv").read_text()  # and listed, so resume skips it
    run = _cli(inputs, out, onnx_model, "processes", "--resume")
    assert "already done" in run.stderr and not list(out.glob(".partial-*"))
    assert run.returncode == 1, run.stderr
    reference = tmp_path / "reference"
    _predict(inputs, reference, onnx_model, "threads")
    assert _files(out).keys() == _files(reference).keys()
