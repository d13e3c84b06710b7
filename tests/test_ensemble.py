"""Ensembles as a model: one file, averaged probability and heatmap, every command takes it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from conftest import save_untrained_checkpoint
from pneumoloc.data.cache import prepare_cache
from pneumoloc.errors import CheckpointError, ConfigError
from pneumoloc.inference import Predictor


@pytest.fixture
def members(synth_rsna: Path, tmp_path: Path) -> tuple[list[Path], Path]:
    cache = prepare_cache(synth_rsna, tmp_path / "c", size=32, workers=1, progress=False)
    data = {"fingerprint": cache.fingerprint}
    paths = [
        save_untrained_checkpoint(tmp_path / f"m{i}.pt", size=32, threshold=0.5, seed=i, data=data)
        for i in range(3)
    ]
    return paths, cache.root


def test_ensemble_averages_its_members(members: tuple[list[Path], Path], tmp_path: Path) -> None:
    from pneumoloc.ensemble import build_ensemble

    paths, cache_dir = members
    result = build_ensemble(paths, cache_dir, tmp_path / "e.pt", device="cpu", half=True)
    assert result.n_members == 3
    ens = Predictor.from_checkpoint(tmp_path / "e.pt", device="cpu")
    assert len(ens.members) == 3 and ens.model_id.startswith("ensemble@32px")
    singles = [Predictor.from_checkpoint(p, device="cpu") for p in paths]
    x = np.random.default_rng(0).integers(0, 255, (4, 32, 32), dtype=np.uint8)
    p_e, h_e, _ = ens.network(x)
    outs = [s.network(x) for s in singles]
    # fp16 storage: the members' weights are rounded, so compare to a tolerance.
    assert np.allclose(p_e, np.mean([o[0] for o in outs], 0), atol=2e-3)
    assert np.allclose(h_e, np.mean([o[1] for o in outs], 0), atol=2e-2)
    assert not np.allclose(outs[0][0], outs[1][0])  # the members differ: averaging is visible
    # The stored threshold and temperature are used; decisions come from the calibrated scale.
    probs, _ = ens.heatmaps(x)
    assert ens.temperature == pytest.approx(result.temperature)
    assert np.allclose(
        probs, 1 / (1 + np.exp(-np.log(p_e / (1 - p_e)) / ens.temperature)), atol=1e-5
    )


def test_ensemble_file_works_in_predict_and_onnx(
    members: tuple[list[Path], Path], tmp_path: Path
) -> None:
    pytest.importorskip("onnxruntime")
    from pneumoloc.ensemble import build_ensemble
    from pneumoloc.export import export_onnx
    from pneumoloc.inference.onnx_backend import OnnxPredictor
    from pneumoloc.predict import predict_paths

    paths, cache_dir = members
    build_ensemble(paths[:2], cache_dir, tmp_path / "e.pt", device="cpu")
    img = tmp_path / "in" / "x.png"
    img.parent.mkdir()
    from PIL import Image

    Image.fromarray(np.random.default_rng(1).integers(0, 255, (48, 40), dtype=np.uint8)).save(img)
    run = predict_paths(
        [img], tmp_path / "out", model=tmp_path / "e.pt", progress=False, input_check=False
    )
    assert run.exit_code == 0 and [r.status for r in run.rows] == ["ok"]

    export = export_onnx(tmp_path / "e.pt", tmp_path / "e.onnx")
    assert export.max_abs_diff_probability <= 1e-4
    onnx_pred = OnnxPredictor.from_onnx(tmp_path / "e.onnx")
    torch_pred = Predictor.from_checkpoint(tmp_path / "e.pt", device="cpu")
    x = np.random.default_rng(2).integers(0, 255, (3, 32, 32), dtype=np.uint8)
    (p_o, h_o), (p_t, h_t) = onnx_pred.heatmaps(x), torch_pred.heatmaps(x)
    assert onnx_pred.temperature == pytest.approx(torch_pred.temperature)
    assert np.abs(p_o - p_t).max() <= 1e-4 and np.abs(h_o - h_t).max() <= 1e-3


def test_ensemble_refuses_what_cannot_be_averaged(
    members: tuple[list[Path], Path], tmp_path: Path
) -> None:
    from pneumoloc.ensemble import build_ensemble
    from pneumoloc.models.checkpoint import model_from_checkpoint

    paths, cache_dir = members
    with pytest.raises(ConfigError, match="at least two"):
        build_ensemble(paths[:1], cache_dir, tmp_path / "e.pt", device="cpu")
    other = save_untrained_checkpoint(tmp_path / "big.pt", size=48, threshold=0.5)
    with pytest.raises(ConfigError, match="input sizes"):
        build_ensemble([paths[0], other], cache_dir, tmp_path / "e.pt", device="cpu")
    foreign = save_untrained_checkpoint(
        tmp_path / "f.pt", size=32, threshold=0.5, data={"fingerprint": "elsewhere"}
    )
    with pytest.raises(ConfigError, match="not the cache"):
        build_ensemble([paths[0], foreign], cache_dir, tmp_path / "e.pt", device="cpu")
    build_ensemble(paths[:2], cache_dir, tmp_path / "e.pt", device="cpu")
    with pytest.raises(CheckpointError, match="ensemble of 2"):
        model_from_checkpoint(tmp_path / "e.pt")
    with pytest.raises(ConfigError, match="already an ensemble"):
        build_ensemble([tmp_path / "e.pt", paths[0]], cache_dir, tmp_path / "e2.pt", device="cpu")
