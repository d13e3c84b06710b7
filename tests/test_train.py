"""Training: every backbone learns, resume is exact, DDP matches one process, bad input is clear."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import write_folder_dataset
from pneumoloc.data.cache import prepare_cache
from pneumoloc.errors import CheckpointError, ConfigError, DataError
from pneumoloc.io.preprocess import to_model_input
from pneumoloc.models import build_model
from pneumoloc.models.checkpoint import load_checkpoint, model_from_checkpoint
from pneumoloc.train import bce_or_focal, train
from pneumoloc.training.config import TrainConfig, load_train_config

BACKBONES = [
    "smallcamnet",
    "resnet18",
    "resnet50",
    "densenet121",
    "efficientnet_b0",
    "convnext_tiny",
]


def _easy_batch(n: int = 16, size: int = 32, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 100, (n, 1, size, size), generator=g, dtype=torch.uint8)
    labels = (torch.arange(n) % 2).float()
    for i in range(n):
        if labels[i]:
            y, x = torch.randint(2, size // 2, (2,), generator=g).tolist()
            images[i, :, y : y + size // 3, x : x + size // 3] = 250
    return images, labels


@pytest.mark.parametrize("name", BACKBONES)
def test_backbone_trains_and_loss_falls(name: str) -> None:
    torch.manual_seed(0)
    model = build_model(name)
    images, labels = _easy_batch(n=8)
    x = to_model_input(images)
    # The notebook's network has no normalisation layers and needs a larger step.
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3 if name == "smallcamnet" else 1e-3)
    model.train()
    losses = []
    for _ in range(6):
        loss = bce_or_focal(model(x), labels, pos_weight=1.0, loss="bce", gamma=2.0)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    assert all(np.isfinite(losses))
    assert losses[-1] < losses[0] * 0.9, losses


def test_focal_loss_downweights_easy_examples() -> None:
    logits = torch.tensor([4.0, -4.0, 0.0])
    targets = torch.tensor([1.0, 0.0, 1.0])
    bce = bce_or_focal(logits, targets, pos_weight=1.0, loss="bce", gamma=2.0)
    focal = bce_or_focal(logits, targets, pos_weight=1.0, loss="focal", gamma=2.0)
    assert focal < bce


@pytest.fixture(scope="module")
def easy_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = write_folder_dataset(tmp_path_factory.mktemp("easy"), n_per_class=20, size=32, seed=1)
    out = root / "cache"
    prepare_cache(root, out, size=32, workers=1, progress=False, fractions=(0.6, 0.2, 0.2))
    return out


def _config(cache: Path, out: Path, **kw: object) -> TrainConfig:
    base = dict(
        data=str(cache),
        out=str(out),
        model="smallcamnet",
        image_size=32,
        epochs=3,
        batch_size=8,
        lr=3e-3,
        seed=0,
        device="cpu",
        progress=False,
        patience=10,
    )
    base.update(kw)
    return load_train_config(None, base)


def test_train_end_to_end_writes_run(easy_cache: Path, tmp_path: Path) -> None:
    result = train(_config(easy_cache, tmp_path / "run", epochs=4))
    run = tmp_path / "run"
    assert (
        (run / "config.yaml").is_file()
        and (run / "best.pt").is_file()
        and (run / "last.pt").is_file()
    )
    lines = (run / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 4
    assert result.best_metrics["auroc"] is not None and result.best_metrics["auroc"] > 0.8
    ckpt = load_checkpoint(run / "best.pt")
    for key in (
        "model",
        "state_dict",
        "image_size",
        "intensity",
        "label_names",
        "threshold",
        "box_threshold",
        "cam_layer",
        "config",
        "pneumoloc_version",
        "data",
        "metrics",
    ):
        assert key in ckpt, key
    assert ckpt["cam_layer"] and 0 <= ckpt["threshold"] <= 1
    # The box gate: F1-optimal on the validation labels (an image-level choice, no boxes).
    # best.pt is calibrated at the end (temperature on the validation split) and both
    # thresholds are mapped to the calibrated scale, so they decide exactly as the raw ones.
    from pneumoloc.inference.calibration import map_threshold

    # (A validation split with < 5 images of a class is left uncalibrated: T = 1.)
    t = ckpt.get("temperature", 1.0)
    assert t > 0 and ("calibration" not in ckpt or ckpt["calibration"]["split"] == "val")
    val = ckpt["metrics"]["val"]
    assert ckpt["box_threshold"] == pytest.approx(map_threshold(val["box_threshold"], t))
    assert ckpt["threshold"] == pytest.approx(map_threshold(val["threshold"], t))
    assert 0 <= ckpt["box_threshold"] <= 1
    model, meta = model_from_checkpoint(run / "best.pt")
    assert meta["image_size"] == 32 and not model.training


def _train_interrupted(cache: Path, out: Path, at: tuple[int, int], **kw: object) -> None:
    def stop(epoch: int, step: int) -> None:
        if (epoch, step) == at:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(_config(cache, out, **kw), step_callback=stop)


@pytest.mark.parametrize(
    "model",
    ["smallcamnet", pytest.param("resnet18", marks=pytest.mark.slow)],  # resnet18: BN + dropout
)
def test_resume_reproduces_uninterrupted_run(easy_cache: Path, tmp_path: Path, model: str) -> None:
    kw: dict[str, object] = {"model": model, "drop_rate": 0.2 if model == "resnet18" else 0.0}
    train(_config(easy_cache, tmp_path / "full", **kw))
    _train_interrupted(easy_cache, tmp_path / "cut", at=(1, 1), **kw)
    assert load_checkpoint(tmp_path / "cut" / "last.pt")["training_state"]["step_in_epoch"] == 2
    train(_config(easy_cache, tmp_path / "cut", **kw), resume=tmp_path / "cut" / "last.pt")
    full = load_checkpoint(tmp_path / "full" / "last.pt")["state_dict"]
    resumed = load_checkpoint(tmp_path / "cut" / "last.pt")["state_dict"]
    for key in full:
        assert torch.equal(full[key], resumed[key]), key


def test_resume_wrong_model_and_corrupt_checkpoint(easy_cache: Path, tmp_path: Path) -> None:
    train(_config(easy_cache, tmp_path / "a", epochs=1))
    with pytest.raises(CheckpointError, match="model"):
        train(
            _config(easy_cache, tmp_path / "b", model="resnet18"), resume=tmp_path / "a" / "last.pt"
        )
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match=r"bad\.pt"):
        train(_config(easy_cache, tmp_path / "c"), resume=bad)
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "missing.pt")


def test_bad_training_data(tmp_path: Path, easy_cache: Path) -> None:
    with pytest.raises(DataError, match="32 px"):
        train(_config(easy_cache, tmp_path / "r", image_size=64))
    root = tmp_path / "one-class"
    write_folder_dataset(root, n_per_class=12, size=32)
    for f in (root / "PNEUMONIA").iterdir():
        f.unlink()
    with pytest.raises(DataError, match="single class"):
        train(_config(root, tmp_path / "r2"))


def test_training_never_reads_boxes(synth_rsna: Path, tmp_path: Path) -> None:
    """Would fail if training touched boxes: the cache's boxes file is made unreadable first."""
    cache = tmp_path / "cache"
    prepare_cache(synth_rsna, cache, size=32, workers=1, progress=False)
    (cache / "boxes.json").write_text("][ corrupted on purpose")
    result = train(_config(cache, tmp_path / "run", epochs=1))
    assert result.best_checkpoint.is_file()


def test_config_file_and_overrides(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("model: resnet18\nepochs: 7\naugment:\n  rotate_deg: 3\n")
    config = load_train_config(path, {"epochs": 2, "data": "x"})
    assert (config.model, config.epochs, config.augment.rotate_deg) == ("resnet18", 2, 3)
    path.write_text("epoch: 3\n")
    with pytest.raises(ConfigError, match="unknown setting 'epoch'"):
        load_train_config(path, {"data": "x"})


def test_ddp_two_process_gloo_matches_single(easy_cache: Path, tmp_path: Path) -> None:
    """2-process DDP (gloo, CPU) vs one process with the same global batch.

    smallcamnet has no batch-norm and augmentation is off, so the two runs compute the same
    gradients up to float summation order: final weights agree within 1e-4 (absolute).
    """
    common = [
        "--data",
        str(easy_cache),
        "--model",
        "smallcamnet",
        "--image-size",
        "32",
        "--epochs",
        "2",
        "--lr",
        "3e-3",
        "--device",
        "cpu",
        "--no-augment",
        "--seed",
        "0",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    single = subprocess.run(
        [
            sys.executable,
            "-m",
            "pneumoloc",
            "train",
            *common,
            "--batch-size",
            "8",
            "--out",
            str(tmp_path / "single"),
        ],
        env=env,
        capture_output=True,
        text=True,
    )
    assert single.returncode == 0, single.stderr[-2000:]
    ddp = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            "--master_port",
            "29533",
            "-m",
            "pneumoloc",
            "train",
            *common,
            "--batch-size",
            "4",
            "--out",
            str(tmp_path / "ddp"),
        ],
        env=env,
        capture_output=True,
        text=True,
    )
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    a = load_checkpoint(tmp_path / "single" / "last.pt")["state_dict"]
    b = load_checkpoint(tmp_path / "ddp" / "last.pt")["state_dict"]
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-4, rtol=0)
    assert len((tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()) == 2


def test_decoder_drop_reaches_the_model_and_needs_a_decoder() -> None:
    from pneumoloc.models import build_model
    from pneumoloc.training.state import build_model_on_device

    config = load_train_config(
        None, {"data": "x", "model": "test_efficientnet", "decoder": "pylon", "decoder_drop": 0.5}
    )
    model = build_model_on_device(config, torch.device("cpu"), build_model)
    assert model.spec["kwargs"]["decoder_drop"] == 0.5
    plain = load_train_config(None, {"data": "x", "model": "test_efficientnet", "decoder": "pylon"})
    spec = build_model_on_device(plain, torch.device("cpu"), build_model).spec
    assert spec["kwargs"].get("decoder_drop", 0.0) == 0.0  # off unless asked for
    with pytest.raises(ConfigError, match="needs a decoder"):
        load_train_config(None, {"data": "x", "decoder_drop": 0.5})
    with pytest.raises(ConfigError, match=r"decoder_drop must be in \[0, 1\)"):
        load_train_config(None, {"data": "x", "decoder": "pylon", "decoder_drop": 1.0})


def test_outside_lung_loss_is_validated_and_enters_the_training_step(
    easy_cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(ConfigError, match="outside_lung_loss"):
        load_train_config(None, {"data": "x", "outside_lung_loss": -1.0})
    from pneumoloc.training import loop

    calls: list[tuple[tuple[int, ...], tuple[int, ...]]] = []
    real = loop.outside_lung_loss

    def spy(cam: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
        calls.append((tuple(cam.shape), tuple(images.shape)))
        assert float(images.min()) >= 0.0 and float(images.max()) <= 1.0  # before standardise
        return real(cam, images)

    monkeypatch.setattr(loop, "outside_lung_loss", spy)
    train(_config(easy_cache, tmp_path / "off", epochs=1))
    assert calls == []  # off by default
    result = train(_config(easy_cache, tmp_path / "on", epochs=2, outside_lung_loss=1.0))
    assert calls and all(len(c) == 3 and len(i) == 4 and c[0] == i[0] for c, i in calls)
    assert result.best_metrics["auroc"] is not None
    saved = load_train_config(tmp_path / "on" / "config.yaml", {})
    assert saved.outside_lung_loss == 1.0
