"""Several training sources in one run: labelled caches, and pseudo-labelled unlabelled images.

Each labelled source is its own cache with its own patient-level split (RSNA patients and
Kermany children never mix across parts); training draws from all of them with fixed shares
(:mod:`pneumoloc.training.sampling`), and validation scores each source on its own validation
split (:func:`validate_sources`). The checkpoint is selected on the mean of the sources'
validation AUROCs, so a large, easy source cannot hide a small, hard one; its decision and box
thresholds maximise the mean over sources of Youden's J and of F1.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pneumoloc.data.datasets import ImageLabelDataset, SourcesDataset, training_dataset
from pneumoloc.training.checkpointing import data_summary

__all__ = [
    "PSEUDO_SOURCE",
    "TrainSources",
    "balanced_weights",
    "build_sources",
    "pooled_thresholds",
    "source_name",
]

PSEUDO_SOURCE = "pseudo-labels"
_GENERIC = {"train", "test", "val", "images", "data", "stage_2_train_images"}


def source_name(cache: Any) -> str:
    """A short name for a cache's data folder: "rsna-pneumonia-sample",
    "kermany-pediatric/train" (a generic folder name gets its parent's)."""
    path = Path(str(cache.manifest.get("source") or cache.root))
    return f"{path.parent.name}/{path.name}" if path.name.lower() in _GENERIC else path.name


@dataclass
class TrainSources:
    """The training sources of a run and their validation splits.

    Attributes:
        train: All training images, one named source after another.
        val: Validation dataset per labelled source (the pseudo-labelled source has none).
        summaries: The checkpoint's description of each source.
        pseudo: The pseudo-labelling summary, when unlabelled images are used.
    """

    train: SourcesDataset
    val: dict[str, ImageLabelDataset]
    summaries: list[dict[str, Any]]
    pseudo: dict[str, Any] | None = None
    weights: list[float] = field(default_factory=list)

    def positive_fraction(self) -> float:
        """The share of positives in an epoch, given each source's share of it."""
        fractions = [float(d.labels.mean()) if len(d) else 0.0 for d in self.train.parts]
        w = np.asarray(self.weights, dtype=np.float64)
        return float(np.dot(w / w.sum(), fractions))


def build_sources(
    caches: list[Any],
    weights: list[float] | None,
    pseudo: tuple[Any, Any] | None = None,
) -> TrainSources:
    """The sources of ``caches`` (labelled, in order) and optionally ``pseudo`` = (unlabelled
    cache, :class:`~pneumoloc.training.pseudo.PseudoLabels`)."""
    names: list[str] = []
    for cache in caches:
        name = source_name(cache)
        names.append(name if name not in names else f"{name}#{len(names)}")
    train = {n: training_dataset(c, "train") for n, c in zip(names, caches, strict=True)}
    val = {n: training_dataset(c, "val") for n, c in zip(names, caches, strict=True)}
    summaries = [
        {"name": n, **data_summary(c, len(train[n]), len(val[n]))}
        for n, c in zip(names, caches, strict=True)
    ]
    summary = None
    if pseudo is not None:
        cache, labels = pseudo
        full = np.full(len(cache.images), -1, dtype=np.int64)
        full[labels.rows] = labels.labels
        train[PSEUDO_SOURCE] = ImageLabelDataset(cache.images, full, labels.rows)
        summary = labels.summary
        summaries.append({"name": PSEUDO_SOURCE, **summary, "n_train": len(labels.rows)})
    dataset = SourcesDataset(train)
    return TrainSources(dataset, val, summaries, summary, list(weights or [1.0] * len(train)))


def balanced_weights(labels_per_source: list[np.ndarray]) -> np.ndarray:
    """Per-image weights that give every source the same total weight (1 / its size)."""
    return np.concatenate(
        [np.full(len(y), 1.0 / max(len(y), 1)) for y in labels_per_source]
    ).astype(np.float64)


def pooled_thresholds(labels: list[np.ndarray], probs: list[np.ndarray]) -> tuple[float, float]:
    """One decision threshold and one box threshold for several sources, each counting equally.

    The decision threshold maximises the mean over sources of Youden's J (TPR - FPR); the box
    threshold the mean over sources of F1 (see ``metrics.classification.f1_threshold``). A
    pooled Youden would instead favour the source with the most positives (Kermany's 74%).
    Sources with one class only do not vote.
    """
    voters = [(y, p) for y, p in zip(labels, probs, strict=True) if len(np.unique(y)) == 2]
    if not voters:
        return 0.5, 0.5
    candidates = np.unique(np.concatenate([p for _, p in voters]))
    youden = np.zeros(len(candidates))
    f1 = np.zeros(len(candidates))
    for y, p in voters:
        y = y.astype(bool)
        # For every candidate t: predicted positive = p >= t.
        pos = np.sort(p[y])
        neg = np.sort(p[~y])
        tp = len(pos) - np.searchsorted(pos, candidates, side="left")
        fp = len(neg) - np.searchsorted(neg, candidates, side="left")
        youden += tp / len(pos) - fp / len(neg)
        f1 += 2 * tp / np.maximum(2 * tp + fp + (len(pos) - tp), 1)
    return float(candidates[int(np.argmax(youden))]), float(candidates[int(np.argmax(f1))])


def validate_sources(
    state: Any,
    vals: dict[str, ImageLabelDataset],
    ctx: Any,
    *,
    pos_weight: float,
    channels_last: bool,
) -> dict[str, Any]:
    """Each source's validation metrics, and the pooled ones the run is selected on.

    ``auroc`` (what early stopping and ``best.pt`` follow) is the mean of the sources' AUROCs;
    ``threshold`` and ``box_threshold`` maximise the mean over sources of Youden's J and of F1
    (:func:`pooled_thresholds`); ``sources`` holds every source's own metrics.
    """
    from pneumoloc.training.validation import gather_predictions, validation_metrics

    per: dict[str, dict[str, Any]] = {}
    labels, probs = [], []
    for name, dataset in vals.items():
        p = gather_predictions(
            state.model, dataset, ctx, state.device, state.amp_dtype, channels_last
        )
        if len(dataset):
            per[name] = {"n": len(dataset), **validation_metrics(dataset.labels, p, pos_weight)}
            labels.append(dataset.labels)
            probs.append(p)
    y = np.concatenate(labels) if labels else np.zeros(0)
    p = np.concatenate(probs) if probs else np.zeros(0)
    w = balanced_weights(labels)
    aurocs = [m["auroc"] for m in per.values() if m["auroc"] is not None]
    threshold, box_threshold = pooled_thresholds(labels, probs)
    mean = lambda key: float(np.mean([m[key] for m in per.values()])) if per else None  # noqa: E731
    return {
        "loss": mean("loss"),
        "auroc": float(np.mean(aurocs)) if aurocs else None,
        "auprc": float(np.mean([m["auprc"] for m in per.values() if m["auprc"] is not None]))
        if aurocs
        else None,
        "accuracy": float(np.sum(w * ((p >= 0.5) == y)) / max(w.sum(), 1e-12)) if len(y) else None,
        "threshold": threshold,
        "accuracy_at_threshold": float(np.sum(w * ((p >= threshold) == y)) / max(w.sum(), 1e-12))
        if len(y)
        else None,
        "box_threshold": box_threshold,
        "selection": "mean of the sources' validation AUROCs; thresholds maximise the mean "
        "over sources of Youden's J (decision) and F1 (boxes)",
        "sources": per,
    }
