"""Temperature scaling: the fit, the command, and what evaluate reports."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import save_untrained_checkpoint
from pneumoloc.data.cache import prepare_cache
from pneumoloc.errors import ConfigError
from pneumoloc.inference import Predictor
from pneumoloc.inference.calibration import apply_temperature, fit_temperature, map_threshold
from pneumoloc.metrics import expected_calibration_error


def overconfident(n: int = 4000, scale: float = 4.0, seed: int = 0) -> tuple[np.ndarray, ...]:
    """Labels drawn from sigmoid(z), and a model that says sigmoid(scale * z)."""
    rng = np.random.default_rng(seed)
    z = rng.normal(0.0, 1.5, n)
    labels = (rng.random(n) < 1 / (1 + np.exp(-z))).astype(int)
    return 1 / (1 + np.exp(-scale * z)), labels


def test_temperature_undoes_a_planted_overconfidence() -> None:
    probs, labels = overconfident(scale=4.0)
    t = fit_temperature(probs, labels)
    assert 3.4 < t < 4.7  # the planted factor, from 4000 noisy labels
    before = expected_calibration_error(labels, probs)
    after = expected_calibration_error(labels, apply_temperature(probs, t))
    assert before > 0.1 and after < 0.04 and after < before / 3
    # Monotone: the ranking and a mapped threshold's decisions do not move.
    calibrated = apply_temperature(probs, t)
    order = np.argsort(probs, kind="stable")
    assert np.all(np.diff(calibrated[order]) >= 0)  # ties only where float64 saturates
    thr = 0.7
    assert np.array_equal(probs >= thr, calibrated >= map_threshold(thr, t))


def test_a_calibrated_model_keeps_temperature_near_one() -> None:
    probs, labels = overconfident(scale=1.0, seed=1)
    assert 0.85 < fit_temperature(probs, labels) < 1.15


def test_fit_edge_cases() -> None:
    assert fit_temperature([0.2, 0.9], [1, 1]) == 1.0  # one class: nothing to fit
    with pytest.raises(ValueError, match="labels"):
        fit_temperature([0.2, 0.9], [1])
    with pytest.raises(ValueError, match="finite"):
        fit_temperature([0.2, float("nan")], [0, 1])
    p = np.array([0.0, 1.0, 0.5], np.float32)
    assert np.array_equal(apply_temperature(p, 1.0), p)
    assert np.all(np.isfinite(apply_temperature(p, 2.0)))


def _overconfident_checkpoint(path: Path, cache_fingerprint: str) -> Path:
    """An untrained smallcamnet whose logits are blown up 40x (very over-confident)."""
    save_untrained_checkpoint(path, size=32, threshold=0.5, data={"fingerprint": cache_fingerprint})
    payload = torch.load(path, weights_only=True)
    payload["state_dict"]["head.weight"] *= 40
    payload["state_dict"]["head.bias"] -= 3.0
    torch.save(payload, path)
    return path


@pytest.fixture(scope="module")
def synth_120(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """120 synthetic RSNA-layout images: a validation split with >= 5 images of each class."""
    from pneumoloc.data.synthetic import SynthConfig, generate_rsna

    out = tmp_path_factory.mktemp("synth-120")
    generate_rsna(out, SynthConfig(n=120, seed=5, image_size=48, prevalence=0.4))
    return out


def test_calibrate_command_lowers_ece_and_keeps_decisions(synth_120: Path, tmp_path: Path) -> None:
    from pneumoloc.calibrate import calibrate
    from pneumoloc.cli import main
    from pneumoloc.evaluate import evaluate

    cache = prepare_cache(synth_120, tmp_path / "c", size=32, workers=1, progress=False)
    assert min(np.bincount(cache.labels[cache.split.part("val")])) >= 5
    ckpt = _overconfident_checkpoint(tmp_path / "m.pt", cache.fingerprint)
    result = calibrate(ckpt, cache.root, tmp_path / "cal.pt", device="cpu")
    assert result.temperature > 1.5 and result.ece_after < result.ece_before

    before = Predictor.from_checkpoint(ckpt, device="cpu")
    after = Predictor.from_checkpoint(tmp_path / "cal.pt", device="cpu")
    images = np.array(cache.images)
    pb = before.predict_arrays(images, [(32, 32)] * len(images))
    pa = after.predict_arrays(images, [(32, 32)] * len(images))
    assert [p.positive for p in pb] == [p.positive for p in pa]
    assert [len(p.boxes) for p in pb] == [len(p.boxes) for p in pa]
    assert not np.allclose([p.probability for p in pb], [p.probability for p in pa])

    report = evaluate(
        tmp_path / "cal.pt", cache.root, out=tmp_path / "ev", split="all", n_boot=0, progress=False
    )
    cls = report["classification"]
    assert cls["temperature"] == pytest.approx(result.temperature)
    assert cls["ece"] < cls["ece_uncalibrated"]

    # The CLI, and a cache the model was not trained on is refused.
    assert (
        main(["calibrate", str(ckpt), "--data", str(cache.root), "--out", str(tmp_path / "x.pt")])
        == 0
    )
    other = _overconfident_checkpoint(tmp_path / "o.pt", "another-cache")
    with pytest.raises(ConfigError, match="not the cache"):
        calibrate(other, cache.root, tmp_path / "o2.pt", device="cpu")


def test_calibration_refuses_a_tiny_validation_split(synth_rsna: Path, tmp_path: Path) -> None:
    from pneumoloc.calibrate import calibrate

    cache = prepare_cache(synth_rsna, tmp_path / "c", size=32, workers=1, progress=False)
    ckpt = _overconfident_checkpoint(tmp_path / "m.pt", cache.fingerprint)
    with pytest.raises(ConfigError, match="at least 5 validation images of each class"):
        calibrate(ckpt, cache.root, tmp_path / "cal.pt", device="cpu")
