"""``pneumoloc quantize``: an int8 copy whose parity with float32 is measured and bounded."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("onnxruntime.quantization")

from conftest import save_untrained_checkpoint, write_folder_dataset
from pneumoloc.cli import main
from pneumoloc.data.cache import prepare_cache
from pneumoloc.export import export_onnx
from pneumoloc.inference.onnx_backend import OnnxPredictor
from pneumoloc.quantize import QUANTIZATION_KEY, quantize_onnx

SIZE = 64


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    root = tmp_path_factory.mktemp("quantize")
    ckpt = save_untrained_checkpoint(root / "model.pt", "resnet18", size=SIZE, threshold=0.5)
    onnx_path = export_onnx(ckpt, root / "model.onnx").path
    data = write_folder_dataset(root / "data", n_per_class=24, size=SIZE)
    cache = prepare_cache(data, root / "cache", size=SIZE, workers=1, progress=False).root
    return ckpt, onnx_path, cache


def test_int8_parity_is_measured_stored_and_bounded(
    exported: tuple[Path, Path, Path], tmp_path: Path
) -> None:
    _, onnx_path, cache = exported
    result = quantize_onnx(onnx_path, tmp_path / "model.int8.onnx", cache)
    assert result.n_calibration > 0 and result.n_parity > 0
    # The stored parity is what the files give on the same held-out images.
    int8 = OnnxPredictor.from_onnx(result.path, lung_mask=False, refine=None)
    fp32 = OnnxPredictor.from_onnx(onnx_path, lung_mask=False, refine=None)
    facts = int8.meta["quantization"]
    assert facts["max_abs_diff_probability"] == pytest.approx(result.max_abs_diff_probability)
    from pneumoloc.data.cache import open_cache

    c = open_cache(cache)
    images = np.asarray(c.images[np.sort(c.split.part("val"))])
    p8, h8, _ = int8.network(images)
    p32, h32, _ = fp32.network(images)
    assert float(np.abs(p8 - p32).max()) == pytest.approx(result.max_abs_diff_probability)
    assert (
        int8.meta["image_size"] == SIZE and facts["decisions_changed"] == result.decisions_changed
    )
    # The bound for this network (a ResNet-18 at 64 px): int8 stays within 0.05 of float32.
    assert result.max_abs_diff_probability <= 0.05
    assert np.corrcoef(h8.ravel(), h32.ravel())[0, 1] >= 0.9


def test_auto_backend_never_runs_an_int8_file(
    exported: tuple[Path, Path, Path], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    import shutil

    from pneumoloc.inference.loading import load_predictor

    ckpt, _, cache = exported
    own = tmp_path / "m.pt"
    shutil.copy(ckpt, own)
    # An int8 copy where the float twin would be, carrying the checkpoint's digest.
    quantize_onnx(export_onnx(own, tmp_path / "float.onnx").path, tmp_path / "m.onnx", cache)
    with caplog.at_level("WARNING"):
        assert load_predictor(own, "auto", device="cpu").backend == "torch"
    assert "int8" in caplog.text
    assert load_predictor(tmp_path / "m.onnx", "onnx").meta["quantization"] is not None


def test_cli_quantize(exported: tuple[Path, Path, Path], tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    _, onnx_path, cache = exported
    out = tmp_path / "q.onnx"
    assert main(["quantize", str(onnx_path), "--data", str(cache), "--out", str(out)]) == 0
    assert "decision(s) changed" in capsys.readouterr().out
    import onnx

    props = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    assert json.loads(props[QUANTIZATION_KEY])["scheme"].startswith("onnxruntime")
