"""``export --onnx``: one graph, same numbers as PyTorch, and ``predict --backend onnx`` agrees."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from PIL import Image

from conftest import save_untrained_checkpoint
from pneumoloc.cli import main
from pneumoloc.errors import CheckpointError, ConfigError
from pneumoloc.export import (
    FEATURES_NAME,
    INPUT_NAME,
    META_KEYS,
    OUTPUT_NAMES,
    OnnxPredictor,
    export_onnx,
    read_onnx_metadata,
)
from pneumoloc.inference import Predictor
from pneumoloc.io import read_xray
from pneumoloc.localise.boxes import BoxConfig
from pneumoloc.metrics.localisation import iou_matrix

SIZE = 64


def save_model(path: Path, name: str, *, threshold: float = 0.5, seed: int = 0) -> Path:
    """A seeded, untrained model with a positive head (non-flat, non-zero CAMs)."""
    return save_untrained_checkpoint(
        path,
        name,
        size=SIZE,
        threshold=threshold,
        seed=seed,
        box_config={"rule": "peak", "peak_fraction": 0.6, "closing": 3},
        data={"fingerprint": "abcdef0123456789", "source": "/local/path/never/exported"},
    )


def images(n: int, seed: int = 0) -> np.ndarray:
    """uint8 (n, SIZE, SIZE): noise with a bright blob at a random place."""
    rng = np.random.default_rng(seed)
    out = rng.integers(0, 100, (n, SIZE, SIZE), dtype=np.uint8)
    for img in out:
        y, x = rng.integers(0, SIZE // 2, 2)
        img[y : y + SIZE // 3, x : x + SIZE // 4] = 230
    return out


@pytest.fixture(scope="module", params=["smallcamnet", "resnet18"])
def exported(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple:
    root = tmp_path_factory.mktemp(f"onnx-{request.param}")
    ckpt = save_model(root / "model.pt", request.param)
    result = export_onnx(ckpt, root / "model.onnx")
    return request.param, ckpt, result


@pytest.mark.parametrize("batch", [1, 3])
def test_onnx_matches_pytorch(exported: tuple, batch: int) -> None:
    """ONNX Runtime and PyTorch agree: probability within 1e-4, heatmap within 1e-3 (max abs).

    Both run the same float32 operations (conv, einsum, bilinear resize, max-normalisation),
    only in different kernels and summation orders, so differences are float32 rounding
    (~1e-7 relative; we see <= 1e-6). The probability tolerance is far below what moves a
    decision (thresholds are stored to 6 decimals); the heatmap is normalised to [0, 1], so
    1e-3 is 0.1% of its range, far below what changes a box: box thresholds are fractions of
    the peak, and a pixel within 1e-3 of one could flip, which is why ``predict`` parity is
    checked separately by box IoU.
    """
    name, ckpt, result = exported
    torch_pred = Predictor.from_checkpoint(ckpt, device="cpu")
    onnx_pred = OnnxPredictor.from_onnx(result.path)
    x = images(batch, seed=batch)
    p_t, h_t = torch_pred.heatmaps(x)
    p_o, h_o = onnx_pred.heatmaps(x)
    assert p_o.shape == (batch,) and h_o.shape == (batch, SIZE, SIZE)
    assert p_o.dtype == h_o.dtype == np.float32
    assert np.abs(p_o - p_t).max() <= 1e-4
    assert np.abs(h_o - h_t).max() <= 1e-3
    assert h_o.min() >= 0 and np.allclose(h_o.max(axis=(1, 2)), 1.0, atol=1e-6)
    # ... and so are the decisions and boxes after the network (shared code).
    shapes = [(SIZE * 2, SIZE * 3)] * batch
    for a, b in zip(
        torch_pred.predict_arrays(x, shapes), onnx_pred.predict_arrays(x, shapes), strict=True
    ):
        assert a.positive == b.positive and len(a.boxes) == len(b.boxes)
    assert result.max_abs_diff_probability <= 1e-4 and result.max_abs_diff_heatmap <= 1e-3
    assert name in onnx_pred.model_id


def test_onnx_file_describes_itself(exported: tuple) -> None:
    name, _, result = exported
    proto = onnx.load(str(result.path))
    assert max(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")) >= 17
    assert [i.name for i in proto.graph.input] == [INPUT_NAME]
    assert [o.name for o in proto.graph.output] == [*OUTPUT_NAMES, FEATURES_NAME]
    shape = proto.graph.input[0].type.tensor_type.shape.dim
    assert shape[0].dim_param and not shape[0].dim_value  # dynamic batch axis
    assert [d.dim_value for d in shape[1:]] == [1, SIZE, SIZE]
    assert proto.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.UINT8
    props = {p.key: p.value for p in proto.metadata_props}
    assert props[META_KEYS["image_size"]] == str(SIZE)
    assert float(props[META_KEYS["threshold"]]) == 0.5
    assert json.loads(props[META_KEYS["model"]])["name"] == name
    assert json.loads(props[META_KEYS["intensity"]])["mean"] == 0.5
    assert props[META_KEYS["pneumoloc_version"]]
    assert "/local/path" not in json.dumps(props)  # no local paths leak into the file
    meta = read_onnx_metadata(result.path)
    assert meta["image_size"] == SIZE and meta["threshold"] == 0.5
    assert meta["box_config"]["peak_fraction"] == 0.6
    predictor = OnnxPredictor.from_onnx(result.path)
    assert predictor.box_config == BoxConfig(rule="peak", peak_fraction=0.6, closing=3)
    assert predictor.describe()["backend"] == "onnx"


def test_onnx_carries_the_refinement_setting(tmp_path: Path) -> None:
    """A checkpoint's heatmap refinement travels into the ONNX file, and both backends apply it."""
    ckpt = save_untrained_checkpoint(
        tmp_path / "m.pt", size=SIZE, threshold=0.5, refine="randomwalk"
    )
    path = export_onnx(ckpt, tmp_path / "m.onnx").path
    onnx_pred = OnnxPredictor.from_onnx(path)
    torch_pred = Predictor.from_checkpoint(ckpt, device="cpu")
    assert onnx_pred.refine == torch_pred.refine == "randomwalk"
    x = images(2)
    assert np.abs(onnx_pred.heatmaps(x)[1] - torch_pred.heatmaps(x)[1]).max() <= 1e-3


def test_torchscript_exporter_also_works(tmp_path: Path) -> None:
    ckpt = save_model(tmp_path / "m.pt", "smallcamnet")
    result = export_onnx(ckpt, tmp_path / "m.onnx", dynamo=False)
    assert result.exporter == "torchscript" and result.max_abs_diff_heatmap <= 1e-3
    p, h = OnnxPredictor.from_onnx(result.path).heatmaps(images(2))
    assert p.shape == (2,) and h.shape == (2, SIZE, SIZE)


def test_errors(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="not found"):
        export_onnx(tmp_path / "missing.pt", tmp_path / "x.onnx")
    with pytest.raises(ConfigError, match="opset"):
        export_onnx(tmp_path / "missing.pt", tmp_path / "x.onnx", opset=13)
    # A valid ONNX model that pneumoloc did not write.
    node = onnx.helper.make_node("Identity", ["a"], ["b"])
    value = onnx.helper.make_tensor_value_info
    graph = onnx.helper.make_graph(
        [node],
        "g",
        [value("a", onnx.TensorProto.FLOAT, [1])],
        [value("b", onnx.TensorProto.FLOAT, [1])],
    )
    foreign = tmp_path / "foreign.onnx"
    onnx.save(onnx.helper.make_model(graph), str(foreign))
    with pytest.raises(CheckpointError, match="not a pneumoloc ONNX"):
        read_onnx_metadata(foreign)
    with pytest.raises(CheckpointError, match="not a pneumoloc ONNX"):
        OnnxPredictor.from_onnx(foreign)
    (tmp_path / "junk.onnx").write_bytes(b"\x00garbage")
    with pytest.raises(CheckpointError):
        OnnxPredictor.from_onnx(tmp_path / "junk.onnx")


def test_onnx_backend_refuses_other_cam_methods(tmp_path: Path) -> None:
    ckpt = save_model(tmp_path / "m.pt", "smallcamnet")
    path = export_onnx(ckpt, tmp_path / "m.onnx", check=False).path
    with pytest.raises(ConfigError, match="classic CAM only"):
        OnnxPredictor.from_onnx(path, cam_method="gradcam")
    with pytest.raises(ConfigError, match="test-time"):
        OnnxPredictor.from_onnx(path, tta=True)
    with pytest.raises(ConfigError, match="multi-stage"):
        OnnxPredictor.from_onnx(path, cam_layers="stages")
    with pytest.raises(ValueError, match="uint8"):
        OnnxPredictor.from_onnx(path).heatmaps(images(1).astype(np.float32))


def _boxes(record: dict) -> np.ndarray:
    return np.array([[b["x"], b["y"], b["width"], b["height"]] for b in record["boxes"]])


def test_cli_export_then_predict_onnx_agrees_with_torch(tmp_path: Path) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    x = images(6, seed=11)
    for i, img in enumerate(x):
        big = Image.fromarray(img).resize((SIZE * 2, SIZE + 40))  # non-square originals
        big.save(folder / f"img{i}.png")
    # A threshold between two probabilities (not at one), so both decisions occur.
    probe = Predictor.from_checkpoint(save_model(tmp_path / "probe.pt", "smallcamnet"))
    files = sorted(folder.iterdir())
    probs = np.sort([p.probability for p in probe.predict_xrays([read_xray(f) for f in files])])
    ckpt = save_model(tmp_path / "m.pt", "smallcamnet", threshold=float(probs[2:4].mean()))
    onnx_path = tmp_path / "m.onnx"
    assert main(["export", str(ckpt), "--onnx", str(onnx_path)]) == 0
    common = [str(folder), "--quiet", "--no-overlay", "--no-input-check"]
    torch_args = ["--backend", "torch", "--model", str(ckpt), "--out", str(tmp_path / "t")]
    assert main(["predict", *common, *torch_args]) == 0
    onnx_args = ["--backend", "onnx", "--model", str(onnx_path), "--out", str(tmp_path / "o")]
    assert main(["predict", *common, *onnx_args]) == 0
    decisions = set()
    for i in range(6):
        rt = json.loads((tmp_path / "t" / f"img{i}.json").read_text())
        ro = json.loads((tmp_path / "o" / f"img{i}.json").read_text())
        assert (rt["backend"], ro["backend"]) == ("torch", "onnx")
        assert rt["decision"] == ro["decision"]
        assert abs(rt["probability"] - ro["probability"]) <= 1e-4
        decisions.add(rt["decision"])
        bt, bo = _boxes(rt), _boxes(ro)
        assert len(bt) == len(bo)
        if len(bt):
            assert np.diag(iou_matrix(bt, bo)).min() > 0.95
    assert decisions == {"pneumonia", "no pneumonia"}


def test_onnx_features_match_the_torch_backend(exported: tuple) -> None:
    """The graph's third output is the input check's features, as the torch backend pools
    them, and the file names the weights they belong to (so the same statistics apply)."""
    _, ckpt, result = exported
    torch_pred = Predictor.from_checkpoint(ckpt, device="cpu")
    onnx_pred = OnnxPredictor.from_onnx(result.path)
    x = images(3, seed=5)
    f_t = torch_pred.network_with_features(x)[3]
    f_o = onnx_pred.network_with_features(x)[3]
    assert f_t is not None and f_o is not None and f_o.shape == f_t.shape
    assert np.abs(f_o - f_t).max() <= 1e-4 * max(1.0, float(np.abs(f_t).max()))
    assert onnx_pred.weights_sha256 == torch_pred.weights_sha256 != ""


def test_auto_backend_runs_the_onnx_twin_only_while_the_checkpoint_is_unchanged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from pneumoloc.inference.loading import file_sha256, load_predictor

    ckpt = save_model(tmp_path / "m.pt", "smallcamnet")
    assert load_predictor(ckpt, "auto", device="cpu").backend == "torch"  # no twin yet
    export_onnx(ckpt, tmp_path / "m.onnx")
    auto = load_predictor(ckpt, "auto", device="cpu")
    assert auto.backend == "onnx" and auto.meta["checkpoint_sha256"] == file_sha256(ckpt)
    # On the GPU, or for a heatmap method the graph lacks, PyTorch runs it.
    assert load_predictor(ckpt, "auto", device="cpu", cam_method="gradcam").backend == "torch"
    # Code that computes another graph (a revision bump): the twin is not used either.
    import pneumoloc.inference.onnx_backend as onnx_backend

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(onnx_backend, "GRAPH_REVISION", "not-this-one")
        with caplog.at_level("WARNING"):
            assert load_predictor(ckpt, "auto", device="cpu").backend == "torch"
        assert "another graph" in caplog.text
    assert load_predictor(ckpt, "auto", device="cpu").backend == "onnx"
    # The checkpoint is retrained (other bytes): its stale twin is not used.
    save_model(ckpt, "smallcamnet", seed=1)
    with caplog.at_level("WARNING"):
        again = load_predictor(ckpt, "auto", device="cpu")
    assert again.backend == "torch" and "was not exported from" in caplog.text
