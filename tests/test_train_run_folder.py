"""``train`` and its run folder (issue 14): a fresh run never mixes with an earlier one, and an
epoch interrupted by Ctrl-C and resumed reports its loss over every step."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import write_folder_dataset
from pneumoloc.cli import main
from pneumoloc.data.cache import prepare_cache
from pneumoloc.errors import ConfigError
from pneumoloc.models.checkpoint import load_checkpoint
from pneumoloc.train import train
from pneumoloc.training.config import TrainConfig, load_train_config


@pytest.fixture(scope="module")
def small_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = write_folder_dataset(tmp_path_factory.mktemp("d"), n_per_class=12, size=32, seed=2)
    prepare_cache(
        root, root / "cache", size=32, workers=1, progress=False, fractions=(0.6, 0.2, 0.2)
    )
    return root / "cache"


def _config(cache: Path, out: Path, **kw: object) -> TrainConfig:
    base: dict[str, object] = dict(
        data=str(cache),
        out=str(out),
        model="smallcamnet",
        image_size=32,
        epochs=2,
        batch_size=4,
        lr=3e-3,
        seed=0,
        device="cpu",
        progress=False,
        patience=10,
        calibrate=False,
    )
    base.update(kw)
    return load_train_config(None, base)


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_fresh_train_into_nonempty_out_is_refused(small_cache: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    train(_config(small_cache, run, epochs=1, seed=0))
    best_before = (run / "best.pt").read_bytes()
    with pytest.raises(ConfigError, match=r"--resume.*--overwrite"):
        train(_config(small_cache, run, epochs=1, seed=1))
    assert (run / "best.pt").read_bytes() == best_before
    assert len(_metrics(run)) == 1  # nothing appended


def test_train_overwrite_starts_clean(small_cache: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    train(_config(small_cache, run, epochs=2, seed=0))
    (run / "notes.txt").write_text("mine")
    train(_config(small_cache, run, epochs=1, seed=1), overwrite=True)
    lines = _metrics(run)
    assert len(lines) == 1  # one run's lines only, not 2 + 1
    assert load_checkpoint(run / "last.pt")["config"]["seed"] == 1
    assert (run / "notes.txt").read_text() == "mine"  # only the run's own outputs are removed
    with pytest.raises(ConfigError, match="exclude"):
        train(_config(small_cache, run), overwrite=True, resume=run / "last.pt")


def test_cli_train_refuses_nonempty_out_with_exit_status_2(
    small_cache: Path, tmp_path: Path
) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / "best.pt").write_bytes(b"an earlier run")
    argv = ["train", "--data", str(small_cache), "--out", str(run), "--model", "smallcamnet"]
    argv += ["--image-size", "32", "--epochs", "1", "--device", "cpu", "--no-calibrate"]
    assert main(argv) == 2
    assert (run / "best.pt").read_bytes() == b"an earlier run"


def test_sigint_mid_epoch_loss_counts_the_steps_before_the_interruption(
    small_cache: Path, tmp_path: Path
) -> None:
    train(_config(small_cache, tmp_path / "full"))

    def stop(epoch: int, step: int) -> None:
        if (epoch, step) == (1, 1):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(_config(small_cache, tmp_path / "cut"), step_callback=stop)
    train(_config(small_cache, tmp_path / "cut"), resume=tmp_path / "cut" / "last.pt")
    full, cut = _metrics(tmp_path / "full"), _metrics(tmp_path / "cut")
    assert len(cut) == 2
    # The resumed epoch's loss is the mean over ALL its steps, as in the uninterrupted run.
    assert cut[1]["train_loss"] == pytest.approx(full[1]["train_loss"], rel=1e-6)
    assert "train_loss_partial" not in cut[1]


def test_resume_from_a_checkpoint_without_loss_sums_marks_the_loss_partial(
    small_cache: Path, tmp_path: Path
) -> None:
    import torch

    def stop(epoch: int, step: int) -> None:
        if (epoch, step) == (1, 1):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(_config(small_cache, tmp_path / "cut"), step_callback=stop)
    last = tmp_path / "cut" / "last.pt"
    payload = load_checkpoint(last)
    for key in ("epoch_seen", "epoch_loss_sum"):  # as written before this change
        payload["training_state"].pop(key)
    torch.save(payload, last)
    train(_config(small_cache, tmp_path / "cut"), resume=last)
    assert _metrics(tmp_path / "cut")[1]["train_loss_partial"] is True
