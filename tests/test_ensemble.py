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


def test_a_localiser_pair_takes_each_output_from_its_own_member(
    members: tuple[list[Path], Path], tmp_path: Path
) -> None:
    """``ensemble A --localiser B``: A's probability and decisions exactly, B's heatmap and
    recipe; the same in the ONNX graph. The control, a plain ensemble of the same two files,
    averages both outputs (so a pair that averaged would fail the equalities)."""
    pytest.importorskip("onnxruntime")
    from pneumoloc.ensemble import build_ensemble
    from pneumoloc.export import export_onnx
    from pneumoloc.inference.onnx_backend import OnnxPredictor
    from pneumoloc.models.checkpoint import load_checkpoint, save_checkpoint

    paths, cache_dir = members
    localiser = load_checkpoint(paths[1])
    localiser.update(cam_floor="shift", lung_mask=False)  # a recipe of its own
    save_checkpoint(paths[1], localiser)
    result = build_ensemble(
        [paths[0]], None, tmp_path / "pair.pt", device="cpu", localisers=[paths[1]]
    )
    assert result.n_members == 2
    pair = Predictor.from_checkpoint(tmp_path / "pair.pt", device="cpu")
    assert [m["role"] for m in pair.meta["members"]] == ["probability", "heatmap"]
    assert pair.recipe.cam_floor == "shift" and not pair.recipe.lung_mask
    classifier = Predictor.from_checkpoint(paths[0], device="cpu", cam_floor="shift")
    localiser_pred = Predictor.from_checkpoint(paths[1], device="cpu")
    x = np.random.default_rng(3).integers(0, 255, (4, 32, 32), dtype=np.uint8)
    p_pair, h_pair, _ = pair.network(x)
    p_cls, h_cls, _ = classifier.network(x)
    p_loc, h_loc, _ = localiser_pred.network(x)
    assert not np.allclose(p_cls, p_loc) and not np.allclose(h_cls, h_loc)
    np.testing.assert_array_equal(p_pair, p_cls)
    np.testing.assert_array_equal(h_pair, h_loc)
    # one classifier: its own threshold and temperature, so its decisions are unchanged
    assert result.threshold == classifier.threshold == pair.threshold
    assert pair.temperature == classifier.temperature
    np.testing.assert_array_equal(pair.heatmaps(x)[0], classifier.heatmaps(x)[0])

    both = build_ensemble(paths[:2], cache_dir, tmp_path / "both.pt", device="cpu")
    assert both.n_members == 2
    p_both, _, _ = Predictor.from_checkpoint(tmp_path / "both.pt", device="cpu").network(x)
    assert np.allclose(p_both, (p_cls + p_loc) / 2, atol=1e-6)
    assert not np.allclose(p_both, p_cls)

    export = export_onnx(tmp_path / "pair.pt", tmp_path / "pair.onnx")
    assert export.max_abs_diff_probability <= 1e-4 and export.max_abs_diff_heatmap <= 1e-3
    onnx_pair = OnnxPredictor.from_onnx(tmp_path / "pair.onnx", lung_mask=False)
    assert onnx_pair.recipe.cam_floor == "shift"
    p_o, h_o, _ = onnx_pair.network(x)
    assert np.abs(p_o - p_cls).max() <= 1e-4 and np.abs(h_o - h_loc).max() <= 1e-3
    # roles that leave an output to nobody are refused when the file is read
    broken = load_checkpoint(tmp_path / "pair.pt")
    broken["members"][1]["role"] = "probability"
    save_checkpoint(tmp_path / "broken.pt", broken)
    with pytest.raises(CheckpointError, match="heatmap"):
        Predictor.from_checkpoint(tmp_path / "broken.pt", device="cpu")
    broken["members"][1]["role"] = "boxes"
    save_checkpoint(tmp_path / "broken.pt", broken)
    with pytest.raises(CheckpointError, match="roles"):
        Predictor.from_checkpoint(tmp_path / "broken.pt", device="cpu")
