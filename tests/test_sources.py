"""Several training sources: shares of every epoch, per-source validation, the guard on
unlabelled images."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from conftest import write_folder_dataset
from pneumoloc.data.cache import prepare_cache
from pneumoloc.data.datasets import ImageLabelDataset, SourcesDataset
from pneumoloc.errors import ConfigError, DataError
from pneumoloc.training.sampling import SourceBalancedSampler, allocate


def _sources(*sizes: int) -> SourcesDataset:
    parts = {}
    for s, n in enumerate(sizes):
        images = np.full((n, 4, 4), s, dtype=np.uint8)
        parts[f"s{s}"] = ImageLabelDataset(images, np.arange(n) % 2, np.arange(n))
    return SourcesDataset(parts)


def test_allocate_is_proportional_and_exact() -> None:
    assert allocate(10, [1, 1]) == [5, 5]
    assert allocate(40, [1, 3]) == [10, 30]
    assert sum(allocate(7, [1, 1, 1])) == 7
    with pytest.raises(ConfigError):
        allocate(5, [0, 0])


def test_equal_shares_whatever_the_sizes() -> None:
    data = _sources(10, 100)
    sampler = SourceBalancedSampler(data, seed=0)
    assert len(sampler) == 20  # 2 sources x the smallest's 10
    seen_large = []
    for epoch in range(3):
        sampler.set_epoch(epoch)
        positions = np.fromiter(iter(sampler), dtype=np.int64)
        source = data.source_of[positions]
        assert (source == 0).sum() == 10 and (source == 1).sum() == 10
        assert len(set(positions[source == 0])) == 10  # the small source once, all of it
        large = positions[source == 1]
        assert len(set(large)) == 10  # no repeats inside an epoch
        seen_large.append(set(large))
    assert seen_large[0] != seen_large[1]  # a fresh subset of the large source each epoch
    # Deterministic: the same epoch draws the same positions.
    sampler.set_epoch(1)
    again = set(np.fromiter(iter(sampler), dtype=np.int64)[data.source_of[list(sampler)] == 1])
    assert again == seen_large[1]


def test_weights_epoch_size_and_ranks() -> None:
    data = _sources(6, 50)
    sampler = SourceBalancedSampler(data, [1, 3], num_samples=40, seed=1)
    positions = np.fromiter(iter(sampler), dtype=np.int64)
    assert np.bincount(data.source_of[positions], minlength=2).tolist() == [10, 30]
    small = positions[data.source_of[positions] == 0]
    assert np.bincount(small, minlength=6).min() >= 1  # 10 draws of 6 images: all seen
    shards = [
        list(SourceBalancedSampler(data, [1, 3], num_samples=40, num_replicas=3, rank=r, seed=1))
        for r in range(3)
    ]
    assert [len(s) for s in shards] == [14, 14, 14]  # padded like DistributedSampler
    assert sorted(set().union(*map(set, shards))) == sorted(set(positions.tolist()))
    with pytest.raises(ConfigError, match="3 source weights for 2 sources"):
        SourceBalancedSampler(data, [1, 1, 1])


def test_sources_must_share_an_image_size() -> None:
    a = ImageLabelDataset(np.zeros((2, 4, 4), np.uint8), np.array([0, 1]), [0, 1])
    b = ImageLabelDataset(np.zeros((2, 8, 8), np.uint8), np.array([0, 1]), [0, 1])
    with pytest.raises(DataError, match="different sizes"):
        SourcesDataset({"a": a, "b": b})


def test_two_sources_are_validated_separately(tmp_path: Path, synth_rsna: Path) -> None:
    import torch

    from pneumoloc.train import train
    from pneumoloc.training.config import TrainConfig

    folder = write_folder_dataset(tmp_path / "kermany-like" / "train", n_per_class=12, size=40)
    config = TrainConfig(
        data=str(synth_rsna),
        extra_data=[str(folder)],
        out=str(tmp_path / "run"),
        model="smallcamnet",
        image_size=32,
        epochs=2,
        batch_size=8,
        progress=False,
    )
    result = train(config)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
    val = records[-1]["val"]
    names = set(val["sources"])
    assert names == {synth_rsna.name, "kermany-like/train"}
    aurocs = [m["auroc"] for m in val["sources"].values() if m["auroc"] is not None]
    assert val["auroc"] == pytest.approx(np.mean(aurocs))  # selection: mean over sources
    assert "mean of the sources" in val["selection"]
    payload = torch.load(result.best_checkpoint, weights_only=True)
    assert [s["name"] for s in payload["data"]["sources"]] == [
        synth_rsna.name,
        "kermany-like/train",
    ]


def test_unlabelled_images_never_include_held_out_ones(tmp_path: Path) -> None:
    from pneumoloc.training.pseudo import check_disjoint

    labelled = write_folder_dataset(tmp_path / "lab", n_per_class=12, size=40)
    cache = prepare_cache(labelled, tmp_path / "c", size=32, workers=1, progress=False)
    held = cache.table.iloc[cache.split.part("test")]["path"].tolist()
    unl = tmp_path / "unl"
    unl.mkdir()
    for i, p in enumerate(held[:2]):
        (unl / f"copy{i}{Path(p).suffix}").write_bytes(Path(p).read_bytes())
        (unl / Path(p).name).write_bytes(Path(p).read_bytes())  # same name as a test image
    unl_cache = prepare_cache(
        unl, tmp_path / "u", size=32, workers=1, progress=False, unlabelled=True
    )
    assert unl_cache.manifest["kind"] == "unlabelled" and len(unl_cache.split.part("val")) == 0
    with pytest.raises(DataError, match="validation or test images"):
        check_disjoint(unl_cache, [cache])


def test_one_threshold_for_two_sources_counts_each_equally() -> None:
    from pneumoloc.training.sources import pooled_thresholds

    rng = np.random.default_rng(0)
    # Source A (adults): few positives, moderate scores. Source B (children): many positives
    # with high scores. A pooled Youden favours B; the mean of the per-source J does not.
    ya = (np.arange(200) < 40).astype(int)
    pa = np.clip(rng.normal(0.30 + 0.25 * ya, 0.08), 0, 1)
    yb = (np.arange(800) < 600).astype(int)
    pb = np.clip(rng.normal(0.55 + 0.35 * yb, 0.08), 0, 1)

    def mean_j(t: float) -> float:
        return float(
            np.mean(
                [
                    ((p >= t) & (y == 1)).sum() / (y == 1).sum()
                    - ((p >= t) & (y == 0)).sum() / (y == 0).sum()
                    for y, p in ((ya, pa), (yb, pb))
                ]
            )
        )

    threshold, box = pooled_thresholds([ya, yb], [pa, pb])
    grid = np.linspace(0, 1, 501)
    assert mean_j(threshold) >= max(mean_j(t) for t in grid) - 1e-9
    assert 0 < box < 1
    # A single source gives the usual Youden threshold.
    from pneumoloc.metrics.classification import youden_threshold

    assert pooled_thresholds([ya], [pa])[0] == pytest.approx(youden_threshold(ya, pa))
