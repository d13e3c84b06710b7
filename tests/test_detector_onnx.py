"""A self-trained detector in the exported model: ``export`` writes its file beside the model,
ONNX Runtime draws the boxes PyTorch draws, ``--backend auto`` keeps the torch-free path, and
worker processes finish images from the detections the network stage packed."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import save_untrained_checkpoint
from pneumoloc.errors import CheckpointError
from pneumoloc.export import export_onnx, read_onnx_metadata
from pneumoloc.inference import Predictor
from pneumoloc.inference.base import pack_detections, unpack_detections
from pneumoloc.inference.loading import file_sha256, load_predictor, onnx_equivalent
from pneumoloc.inference.onnx_backend import DETECTOR_SUFFIX, OnnxPredictor, detector_file
from pneumoloc.models.detector import DETECTOR_KIND, build_detector

SIZE = 64


def images(n: int, seed: int = 0) -> np.ndarray:
    """uint8 (n, SIZE, SIZE): dark noise with a bright block at a random place."""
    rng = np.random.default_rng(seed)
    out = rng.integers(0, 90, (n, SIZE, SIZE), dtype=np.uint8)
    for img in out:
        y, x = rng.integers(4, SIZE // 2, 2)
        img[y : y + 20, x : x + 16] = 200
    return out


def save_with_detector(path: Path, seed: int = 0) -> Path:
    """An untrained classifier (threshold 0: every image gets boxes) with a seeded, untrained
    FCOS whose head weights are spread out (distinct scores, so no ties between boxes)."""
    torch.manual_seed(seed)
    detector = build_detector(SIZE, fpn_channels=64)
    with torch.no_grad():
        for p in detector.head.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    entry = {
        "kind": DETECTOR_KIND,
        "image_size": SIZE,
        "fpn_channels": 64,
        "state_dict": detector.state_dict(),
        "config": {"min_score": 0.0, "max_boxes": 2, "rounds": 1},
    }
    return save_untrained_checkpoint(path, size=SIZE, threshold=0.0, detector=entry)


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    root = tmp_path_factory.mktemp("detector-onnx")
    ckpt = save_with_detector(root / "model.pt")
    result = export_onnx(ckpt, root / "model.onnx")
    assert result.detector_path is not None
    return ckpt, result.path, result.detector_path


def _boxes(preds: list) -> list[tuple[np.ndarray, np.ndarray]]:
    return [(p.boxes.boxes, p.boxes.scores) for p in preds]


def test_export_writes_the_detector_file_and_onnx_draws_the_torch_boxes(
    exported: tuple[Path, Path, Path],
) -> None:
    ckpt, model, side = exported
    assert side == model.with_name("model" + DETECTOR_SUFFIX) and side.is_file()
    entry = read_onnx_metadata(model)["detector"]
    assert entry["file"] == side.name and entry["sha256"] == file_sha256(side)
    assert entry["kind"] == DETECTOR_KIND and entry["config"]["max_boxes"] == 2
    assert "state_dict" not in entry and str(ckpt.parent) not in json.dumps(entry)
    x, shapes = images(6, seed=1), [(SIZE * 3, SIZE * 2)] * 6
    torch_pred = Predictor.from_checkpoint(ckpt, device="cpu")
    onnx_pred = OnnxPredictor.from_onnx(model)
    assert onnx_pred.has_detector and onnx_pred.describe()["box_source"] == "detector"
    on_torch, on_onnx = _boxes(torch_pred.predict_arrays(x, shapes)), []
    on_onnx = _boxes(onnx_pred.predict_arrays(x, shapes))
    assert all(len(b) == 2 for b, _ in on_torch)  # boxes on every image (threshold 0)
    for (bt, st), (bo, so) in zip(on_torch, on_onnx, strict=True):
        assert bt.shape == bo.shape
        assert np.abs(bt - bo).max() <= 0.01 and np.abs(st - so).max() <= 1e-4
    # They are the detector's, not the box rule's (the file opened without its detector).
    plain = OnnxPredictor.from_onnx(model, use_detector=False)
    assert not plain.has_detector and plain.box_source == "cam"
    rule = _boxes(plain.predict_arrays(x, shapes))
    assert any(
        b.shape != r.shape or np.abs(b - r).max() > 1
        for (b, _), (r, _) in zip(on_onnx, rule, strict=True)
    )


def test_auto_backend_keeps_onnx_with_the_detector_and_refuses_a_wrong_file(
    exported: tuple[Path, Path, Path], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    ckpt, model, side = exported
    auto = load_predictor(ckpt, "auto", device="cpu")
    assert auto.backend == "onnx" and auto.has_detector
    same = onnx_equivalent(Predictor.from_checkpoint(ckpt, device="cpu"), ckpt)
    assert isinstance(same, OnnxPredictor) and same.has_detector
    without = Predictor.from_checkpoint(ckpt, device="cpu", use_detector=False)
    assert onnx_equivalent(without, ckpt) is None  # not the same predictor
    # A copy of the pair with the detector file missing, then with another detector's bytes.
    import shutil

    shutil.copy(ckpt, tmp_path / "model.pt")
    shutil.copy(model, tmp_path / "model.onnx")
    with pytest.raises(CheckpointError, match=r"model\.detector\.onnx is missing"):
        OnnxPredictor.from_onnx(tmp_path / "model.onnx")
    with caplog.at_level("WARNING"):
        fallback = load_predictor(tmp_path / "model.pt", "auto", device="cpu")
    assert fallback.backend == "torch" and fallback.has_detector and "missing" in caplog.text
    other = export_onnx(save_with_detector(tmp_path / "other.pt", seed=1), tmp_path / "o.onnx")
    assert other.detector_path is not None
    shutil.copy(other.detector_path, tmp_path / side.name)
    with pytest.raises(CheckpointError, match="SHA-256"):
        OnnxPredictor.from_onnx(tmp_path / "model.onnx")
    # Opened without its detector, the file needs none.
    assert not OnnxPredictor.from_onnx(tmp_path / "model.onnx", use_detector=False).has_detector


def test_the_detector_file_name_from_a_model_file_is_a_plain_name(tmp_path: Path) -> None:
    model = tmp_path / "m.onnx"
    assert detector_file(model, {}) is None
    assert detector_file(model, {"detector": {"file": "m.detector.onnx"}}) == (
        tmp_path / "m.detector.onnx"
    )
    for name in (
        "../m.detector.onnx",
        "/etc/m.detector.onnx",
        "a/m.detector.onnx",
        "m.onnx",
        "..detector.onnx",
        "",
        None,
        3,
    ):
        with pytest.raises(CheckpointError, match="plain file name"):
            detector_file(model, {"detector": {"file": name}})


def test_packed_detections_travel_to_a_worker_copy_that_draws_the_same_boxes(
    exported: tuple[Path, Path, Path],
) -> None:
    found = [
        (np.array([[1, 2, 10, 12], [3, 4, 5, 6]], np.float32), np.array([0.9, 0.2], np.float32)),
        (np.zeros((0, 4), np.float32), np.zeros(0, np.float32)),
        (np.array([[0, 0, 8, 8]], np.float32), np.array([0.5], np.float32)),
    ]
    packed = pack_detections(found, max_boxes=2)
    assert packed.shape == (3, 2, 5)
    for (b, s), (b2, s2) in zip(found, unpack_detections(packed), strict=True):
        assert np.array_equal(b, b2) and np.array_equal(s, s2)
    _, model, _ = exported
    predictor = OnnxPredictor.from_onnx(model)
    x, shapes = images(3, seed=4), [(SIZE, SIZE)] * 3
    raw = predictor.raw_outputs(x)
    assert len(raw) == 5 and raw[4] is not None and raw[4].shape == (3, 2, 5)
    worker = pickle.loads(pickle.dumps(predictor.without_network()))
    assert worker.has_detector and worker.box_source == "detector"
    here = _boxes(predictor.finish(x, raw, shapes))
    there = _boxes(worker.finish(x, raw, shapes))
    for (a, sa), (b, sb) in zip(here, there, strict=True):
        assert np.array_equal(a, b) and np.array_equal(sa, sb)
    with pytest.raises(RuntimeError, match="without its network"):
        worker.detect(x)
    # Without the packed detections (a 4-tuple), the predictor runs its detector itself.
    again = _boxes(predictor.finish(x, raw[:4], shapes))
    assert all(np.array_equal(a, b) for (a, _), (b, _) in zip(here, again, strict=True))


def test_only_images_that_get_boxes_go_through_the_detector(
    exported: tuple[Path, Path, Path],
) -> None:
    _, model, _ = exported
    predictor = OnnxPredictor.from_onnx(model, threshold_override=2.0)  # nothing is positive
    calls: list[int] = []
    real = predictor.detect

    def counting(batch: np.ndarray) -> list:
        calls.append(len(batch))
        return real(batch)

    predictor.detect = counting  # type: ignore[method-assign]
    preds = predictor.predict_arrays(images(4), [(SIZE, SIZE)] * 4)
    assert calls == [] and all(len(p.boxes.boxes) == 0 for p in preds)


def test_predict_with_worker_processes_writes_the_detector_boxes_threads_write(
    exported: tuple[Path, Path, Path], tmp_path: Path
) -> None:
    import sys

    from pneumoloc.predict import predict_paths
    from test_predict_parallel import _cli, _files

    if not sys.platform.startswith("linux"):
        pytest.skip("worker processes are forked (Linux only)")
    _, model, _ = exported
    folder = tmp_path / "in"
    folder.mkdir()
    for i, img in enumerate(images(10, seed=7)):
        Image.fromarray(img).resize((SIZE * 2, SIZE * 2)).save(folder / f"x{i}.png")
    settings = {"backend": "onnx", "workers": 2, "batch_size": 4, "input_check": False}
    predict_paths(
        [folder], tmp_path / "threads", model=model, progress=False, parallel="threads", **settings
    )
    run = _cli(folder, tmp_path / "processes", model, "processes", "--no-input-check")
    assert run.returncode == 0, run.stderr
    assert "2 worker processes" in run.stderr
    a, b = _files(tmp_path / "threads"), _files(tmp_path / "processes")
    assert sorted(a) == sorted(b) and [n for n in a if a[n] != b[n]] == []
    record = json.loads(a["x0.json"])
    assert record["box_source"] == "detector" and len(record["boxes"]) == 2


def test_quantize_keeps_the_detector_beside_the_int8_copy(
    exported: tuple[Path, Path, Path], tmp_path: Path
) -> None:
    pytest.importorskip("onnxruntime.quantization")
    from conftest import write_folder_dataset
    from pneumoloc.data.cache import prepare_cache
    from pneumoloc.quantize import quantize_onnx

    _, model, side = exported
    data = write_folder_dataset(tmp_path / "data", n_per_class=8, size=SIZE)
    cache = prepare_cache(data, tmp_path / "cache", size=SIZE, workers=1, progress=False).root
    out = tmp_path / "elsewhere" / "model.int8.onnx"
    quantize_onnx(model, out, cache, n_calibration=8, n_parity=8)
    assert (out.parent / side.name).read_bytes() == side.read_bytes()
    int8 = OnnxPredictor.from_onnx(out)
    assert int8.has_detector and int8.meta["quantization"]


def test_the_score_map_pass_gives_fcos_own_detections() -> None:
    """``fcos_with_score_map`` re-runs FCOS's eval steps to keep the head's outputs: its boxes
    are exactly ``detector(images)``'s, and its map is the score FCOS ranks boxes by, upsampled:
    bilinear upsampling averages neighbouring locations, so the map never exceeds the best
    box's score (the highest location score), and comes close to it."""
    from pneumoloc.models.checkpoint import load_checkpoint
    from pneumoloc.models.detector import detect, detect_with_maps, load_detector

    torch.manual_seed(0)
    path = save_with_detector(Path(pytest.importorskip("tempfile").mkdtemp()) / "d.pt")
    detector = load_detector(load_checkpoint(path)["detector"])
    x = images(4, seed=3)
    plain = detect(detector, x, min_score=0.0, max_boxes=2)
    found, maps = detect_with_maps(detector, x, min_score=0.0, max_boxes=2)
    assert maps.shape == (4, SIZE, SIZE) and maps.dtype == np.float32
    assert maps.min() >= 0.0 and maps.max() <= 1.0
    for (b, s), (b2, s2), m in zip(plain, found, maps, strict=True):
        assert np.array_equal(b, b2) and np.array_equal(s, s2)
        assert len(s) and 0.5 * s[0] <= m.max() <= s[0] + 1e-5


def test_heatmap_source_detector_shows_the_detectors_map_on_flagged_films_only(
    exported: tuple[Path, Path, Path],
) -> None:
    from pneumoloc.errors import ConfigError
    from pneumoloc.inference.recipe import InferenceRecipe

    with pytest.raises(ConfigError, match="heatmap_source"):
        InferenceRecipe(heatmap_source="boxes")
    ckpt, model, _ = exported
    x, shapes = images(6, seed=2), [(SIZE, SIZE)] * 6
    probs = Predictor.from_checkpoint(ckpt, device="cpu").probabilities(x)
    threshold = float(np.sort(probs)[2:4].mean())  # between two films: both kinds occur
    flagged = probs >= threshold
    assert flagged.any() and not flagged.all(), probs
    settings = {"threshold_override": threshold, "lung_mask": False}
    det_t = Predictor.from_checkpoint(ckpt, device="cpu", heatmap_source="detector", **settings)
    det_o = OnnxPredictor.from_onnx(model, heatmap_source="detector", **settings)
    on_cam = Predictor.from_checkpoint(ckpt, device="cpu", **settings)
    ref = on_cam.predict_arrays(x, shapes)
    _, maps = det_t.detect_with_maps(x)
    for backend in (det_t, det_o):
        preds = backend.predict_arrays(x, shapes)
        _, via_heatmaps = backend.heatmaps(x)
        for i, p in enumerate(preds):
            np.testing.assert_allclose(via_heatmaps[i], p.heatmap, atol=1e-6)
            if flagged[i]:  # the detector's map, scaled to its peak
                np.testing.assert_allclose(p.heatmap, maps[i] / maps[i].max(), atol=1e-4)
            else:  # the CAM, as without the setting
                np.testing.assert_allclose(p.heatmap, ref[i].heatmap, atol=1e-4)
    assert det_o.recipe.heatmap_source == "detector"
    # Without a detector the setting changes nothing.
    plain = Predictor.from_checkpoint(
        ckpt, device="cpu", use_detector=False, heatmap_source="detector", **settings
    )
    for p, r in zip(plain.predict_arrays(x, shapes), ref, strict=True):
        np.testing.assert_allclose(p.heatmap, r.heatmap, atol=1e-6)


def test_dicom_results_name_the_detector_as_the_source_of_boxes_and_heatmap(
    exported: tuple[Path, Path, Path],
) -> None:
    from pneumoloc.report.dicom import ModelInfo

    _, model, _ = exported
    params = ModelInfo.from_predictor(OnnxPredictor.from_onnx(model, heatmap_source="detector"))
    assert {"box_source=detector", "heatmap_source=detector"} <= set(params.parameters)
    plain = ModelInfo.from_predictor(OnnxPredictor.from_onnx(model, use_detector=False))
    assert {"box_source=cam", "heatmap_source=cam"} <= set(plain.parameters)
    # A detector model opened without its detector says the CAM gives its heatmaps.
    ckpt, _, _ = exported
    without = Predictor.from_checkpoint(
        ckpt, device="cpu", use_detector=False, heatmap_source="detector"
    )
    assert without.describe()["heatmap_source"] == "cam"


def test_no_detector_keeps_the_onnx_path_without_the_detector(
    exported: tuple[Path, Path, Path], tmp_path: Path
) -> None:
    from pneumoloc.cli import main

    ckpt, model, _ = exported
    fast = load_predictor(ckpt, "auto", device="cpu", use_detector=False)
    assert fast.backend == "onnx" and not fast.has_detector
    assert not load_predictor(ckpt, "torch", device="cpu", use_detector=False).has_detector
    assert not load_predictor(model, "onnx", use_detector=False).has_detector
    folder = tmp_path / "in"
    folder.mkdir()
    Image.fromarray(images(1, seed=9)[0]).save(folder / "a.png")
    common = [str(folder), "--model", str(ckpt), "--quiet", "--no-overlay", "--no-input-check"]
    assert main(["predict", *common, "--out", str(tmp_path / "d")]) == 0
    assert main(["predict", *common, "--out", str(tmp_path / "n"), "--no-detector"]) == 0
    with_detector = json.loads((tmp_path / "d" / "a.json").read_text())
    without = json.loads((tmp_path / "n" / "a.json").read_text())
    assert (with_detector["backend"], with_detector["box_source"]) == ("onnx", "detector")
    assert (without["backend"], without["box_source"], without["heatmap_source"]) == (
        "onnx",
        "cam",
        "cam",
    )


def test_serve_and_listen_pass_no_detector_to_the_model_loader(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """``serve --no-detector`` and ``listen --no-detector`` load the model without it."""
    import pneumoloc.inference.loading as loading
    from pneumoloc.cli import main
    from pneumoloc.listen import ListenConfig
    from pneumoloc.listen.server import Listener

    asked: list[dict] = []

    class Loaded(Exception):
        pass

    def fake_load(*args: object, **kwargs: object) -> None:
        asked.append(kwargs)
        raise Loaded

    monkeypatch.setattr(loading, "load_predictor", fake_load)
    with pytest.raises(Loaded):
        main(["serve", "--no-detector", "--port", "0"])
    with pytest.raises(Loaded):
        Listener(ListenConfig(port=0, dicom_out=tmp_path, use_detector=False)).start()
    with pytest.raises(Loaded):
        Listener(ListenConfig(port=0, dicom_out=tmp_path)).start()
    assert [a["use_detector"] for a in asked] == [False, False, True]
