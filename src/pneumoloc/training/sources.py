"""Several training sources in one run: labelled caches, and pseudo-labelled unlabelled images.

Each labelled source is its own cache with its own patient-level split (RSNA patients and
Kermany children never mix across parts); training draws from all of them with fixed shares
(:mod:`pneumoloc.training.sampling`), and validation scores each source on its own validation
split (:func:`validate_sources`). The checkpoint is selected on the mean of the sources'
validation AUROCs, so a large, easy source cannot hide a small, hard one; its decision and box
thresholds are chosen on the pooled validation images weighted so that every source counts
equally.
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


def pooled_thresholds(
    labels: np.ndarray, probs: np.ndarray, weights: np.ndarray
) -> tuple[float, float]:
    """Youden-optimal decision threshold and F1-optimal box threshold on weighted pooled data."""
    from sklearn.metrics import precision_recall_curve, roc_curve

    fpr, tpr, thr = roc_curve(labels, probs, sample_weight=weights)
    finite = np.isfinite(thr)
    youden = float(thr[finite][np.argmax((tpr - fpr)[finite])])
    precision, recall, pr_thr = precision_recall_curve(labels, probs, sample_weight=weights)
    f1 = 2 * precision[:-1] * recall[:-1] / np.maximum(precision[:-1] + recall[:-1], 1e-12)
    return youden, float(pr_thr[int(np.argmax(f1))])


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
    ``threshold`` and ``box_threshold`` are chosen on all validation images, each source
    weighted equally; ``sources`` holds every source's own metrics.
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
    two = len(np.unique(y)) == 2
    threshold, box_threshold = pooled_thresholds(y, p, w) if two else (0.5, 0.5)
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
        "selection": "mean of the sources' validation AUROCs; thresholds on all sources, "
        "each weighted equally",
        "sources": per,
    }
