"""Semi-supervised training (noisy student, Xie et al. 2020) end to end, and its guards.

The end-to-end test plants a task with a known answer: 32 px noise images, the positives with a
faint square at a random position. With 42 labelled training images the network memorises its
training set and generalises only moderately; the teacher's confident pseudo-labels of 2,000
unlabelled images must make a student that is clearly better on a separate labelled test set,
at the same training budget (same model, seed, batch size, epochs and optimiser steps).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pneumoloc.data.cache import prepare_cache
from pneumoloc.errors import ConfigError, DataError
from pneumoloc.training.augment import AugmentConfig
from pneumoloc.training.config import TrainConfig

SIZE = 32
CONTRAST = 30.0  # grey levels added to the square; the background noise has sd 30
SIDE = 6  # side of the square, px
EPOCHS, BATCH = 60, 8
NO_AUGMENT = AugmentConfig(**{k: 0.0 for k in vars(AugmentConfig())})


def write_planted(
    root: Path, n: int, *, seed: int, prefix: str, labelled: bool = True
) -> list[int]:
    """``n`` PNGs of noise, odd indices with a faint square at a random position: in
    NORMAL/PNEUMONIA folders, or one flat folder when not ``labelled``. Returns the labels."""
    rng = np.random.default_rng(seed)
    labels = []
    for i in range(n):
        y = i % 2
        image = rng.normal(110.0, 30.0, (SIZE, SIZE))
        if y:
            r, c = rng.integers(2, SIZE - SIDE - 2, 2)
            image[r : r + SIDE, c : c + SIDE] += CONTRAST
        folder = root / ("PNEUMONIA" if y else "NORMAL") if labelled else root
        folder.mkdir(parents=True, exist_ok=True)
        pixels = np.clip(image, 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"{prefix}{i:04d}.png")
        labels.append(y)
    return labels


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Train on one CPU thread: tiny ops gain nothing from more, and on a busy machine several
    threads per op are many times slower. The previous setting is restored after."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.mark.usefixtures("one_thread")
def test_noisy_student_beats_labels_only_at_the_same_budget(tmp_path: Path) -> None:
    from sklearn.metrics import roc_auc_score

    from pneumoloc.inference import Predictor
    from pneumoloc.train import train
    from pneumoloc.training.sources import PSEUDO_SOURCE

    # Labelled: 140 images, 30% (42) to train and 70% (98) to validate, so that the teacher's
    # decision threshold (where its pseudo-labels are cut) is not set on a handful of images.
    # Different file-name prefixes: unlabelled images may not share names with held-out ones.
    write_planted(tmp_path / "lab", 140, seed=0, prefix="lab")
    write_planted(tmp_path / "unl", 2000, seed=1, prefix="unl", labelled=False)
    write_planted(tmp_path / "test", 400, seed=2, prefix="test")
    options = {"size": SIZE, "workers": 1, "progress": False}
    lab = prepare_cache(tmp_path / "lab", tmp_path / "c-lab", fractions=(0.3, 0.7, 0.0), **options)
    unl = prepare_cache(tmp_path / "unl", tmp_path / "c-unl", unlabelled=True, **options)
    test = prepare_cache(tmp_path / "test", tmp_path / "c-test", **options)
    n_train = len(lab.split.part("train"))
    assert n_train == 42 and len(lab.split.part("val")) == 98
    assert unl.manifest["kind"] == "unlabelled" and len(unl.split.part("train")) == 2000

    # Everything the two runs share. The budget is fixed: no early stopping, last.pt compared
    # (best.pt follows a validation AUROC that saturates early).
    common = {
        "data": str(lab.root),
        "model": "test_resnet",  # timm's tiny ResNet (BatchNorm): no long loss plateau
        "image_size": SIZE,
        "epochs": EPOCHS,
        "batch_size": BATCH,
        "lr": 3e-3,
        "augment": NO_AUGMENT,
        "patience": 10_000,
        "device": "cpu",
        "seed": 0,
        "progress": False,
    }
    teacher = train(TrainConfig(out=str(tmp_path / "labels-only"), **common))
    student = train(
        TrainConfig(
            out=str(tmp_path / "student"),
            unlabelled=str(unl.root),
            teacher=str(teacher.run_dir / "last.pt"),
            pseudo_fraction=0.25,
            # Half labelled, half pseudo-labelled: as many images (and steps) per epoch as the
            # labels-only run, so both take the same number of optimiser steps.
            samples_per_epoch=n_train,
            **common,
        )
    )

    last = [torch.load(r.run_dir / "last.pt", weights_only=True) for r in (teacher, student)]
    steps = [p["training_state"]["scheduler"]["last_epoch"] for p in last]
    assert steps[0] == steps[1] == EPOCHS * -(-n_train // BATCH)  # the same budget

    sources = {s["name"]: s for s in last[1]["data"]["sources"]}
    assert set(sources) == {"lab", PSEUDO_SOURCE}  # the labelled folder, then the pseudo-labels
    pseudo = sources[PSEUDO_SOURCE]
    assert pseudo["n_unlabelled"] == 2000 and pseudo["fraction"] == 0.25
    assert pseudo["n_positive"] > 0 and pseudo["n_negative"] > 0
    assert pseudo["n_train"] == pseudo["n_positive"] + pseudo["n_negative"]
    assert (student.run_dir / "metrics.jsonl").is_file()
    records = [json.loads(line) for line in (student.run_dir / "metrics.jsonl").open()]
    assert len(records) == EPOCHS

    images, labels = np.array(test.images), np.asarray(test.labels)
    assert len(labels) == 400 and set(np.unique(labels).tolist()) == {0, 1}

    def test_auroc(path: Path) -> float:
        probs = Predictor.from_checkpoint(path, device="cpu").probabilities(images)
        return float(roc_auc_score(labels, probs))

    labels_only = test_auroc(teacher.run_dir / "last.pt")
    semi = test_auroc(student.run_dir / "last.pt")
    # The premise: labels-only is mediocre (it learnt something, far from everything) ...
    assert 0.6 < labels_only < 0.9, f"labels-only test AUROC {labels_only:.3f}"
    # ... and the pseudo-labels make the student clearly better (measured: 0.636 -> 0.779).
    assert semi >= labels_only + 0.05, f"student {semi:.3f} vs labels-only {labels_only:.3f}"


def test_unlabelled_images_need_a_teacher_and_an_unlabelled_cache(tmp_path: Path) -> None:
    from conftest import save_untrained_checkpoint, write_folder_dataset
    from pneumoloc.train import train

    with pytest.raises(ConfigError, match="teacher"):
        TrainConfig(data="d", unlabelled="u", teacher=None).validate()
    with pytest.raises(ConfigError, match="teacher"):
        TrainConfig(data="d", unlabelled=None, teacher="t.pt").validate()
    with pytest.raises(ConfigError, match="pseudo_fraction"):
        TrainConfig(data="d", unlabelled="u", teacher="t.pt", pseudo_fraction=0.0).validate()

    folder = write_folder_dataset(tmp_path / "lab", n_per_class=12, size=40)
    labelled = prepare_cache(folder, tmp_path / "c", size=32, workers=1, progress=False)
    teacher = save_untrained_checkpoint(tmp_path / "teacher.pt", size=32, threshold=0.5)
    config = TrainConfig(
        data=str(labelled.root),
        unlabelled=str(labelled.root),  # a labelled cache given as unlabelled images
        teacher=str(teacher),
        out=str(tmp_path / "run"),
        model="smallcamnet",
        image_size=32,
        epochs=1,
        device="cpu",
        progress=False,
    )
    with pytest.raises(DataError, match="labelled cache was given as unlabelled"):
        train(config)
    assert not (tmp_path / "run" / "last.pt").exists()
