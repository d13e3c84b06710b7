"""Validation during training: probabilities, the epoch's metrics, the value early stopping watches.

Under DDP every rank scores its share of the validation set and every rank sees them all.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from pneumoloc.data.datasets import ImageLabelDataset
from pneumoloc.io.preprocess import to_model_input
from pneumoloc.training.distributed import DistContext
from pneumoloc.training.state import TrainState


@torch.no_grad()
def predict_probabilities(
    model: torch.nn.Module,
    dataset: ImageLabelDataset,
    *,
    device: torch.device,
    batch_size: int = 64,
    amp_dtype: torch.dtype | None = None,
    channels_last: bool = False,
) -> np.ndarray:
    """Probabilities for every item of a dataset, in order. Restores the model's mode."""
    was_training = model.training
    model.eval()
    probs = []
    for start in range(0, len(dataset), batch_size):
        images, _ = dataset.gather(np.arange(start, min(start + batch_size, len(dataset))))
        x = to_model_input(images.to(device, non_blocking=True))
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(
            device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None
        ):
            logits = model(x)
        probs.append(torch.sigmoid(logits.float()).cpu())
    model.train(was_training)
    return torch.cat(probs).numpy() if probs else np.zeros(0, np.float32)


def gather_predictions(
    model: torch.nn.Module,
    dataset: ImageLabelDataset,
    ctx: DistContext,
    device: torch.device,
    amp_dtype: torch.dtype | None,
    channels_last: bool,
) -> np.ndarray:
    """Probabilities for the whole dataset on every rank, each rank scoring every n-th item."""
    if not ctx.enabled:
        return predict_probabilities(
            model, dataset, device=device, amp_dtype=amp_dtype, channels_last=channels_last
        )
    share = np.arange(ctx.rank, len(dataset), ctx.world_size)
    sub = ImageLabelDataset(
        dataset.images, np.zeros(dataset.images.shape[0]), dataset.indices[share]
    )
    probs = predict_probabilities(
        model, sub, device=device, amp_dtype=amp_dtype, channels_last=channels_last
    )
    out = np.zeros(len(dataset), dtype=np.float32)
    for positions, values in ctx.gather_objects((share, probs)):
        out[positions] = values
    return out


def validation_metrics(labels: np.ndarray, probs: np.ndarray, pos_weight: float) -> dict[str, Any]:
    """Loss, AUROC, AUPRC, accuracy at 0.5 and at the Youden threshold (chosen here), and the
    F1-optimal threshold that gates boxes (``box_threshold``)."""
    from sklearn.metrics import average_precision_score, roc_auc_score

    from pneumoloc.metrics.classification import f1_threshold, youden_threshold

    p = np.clip(probs.astype(np.float64), 1e-7, 1 - 1e-7)
    y = labels.astype(np.float64)
    loss = float(np.mean(-(pos_weight * y * np.log(p) + (1 - y) * np.log(1 - p))))
    two_classes = len(np.unique(y)) == 2
    threshold = float(youden_threshold(y, p)) if two_classes else 0.5
    return {
        "loss": loss,
        "auroc": float(roc_auc_score(y, p)) if two_classes else None,
        "auprc": float(average_precision_score(y, p)) if two_classes else None,
        "accuracy": float(np.mean((p >= 0.5) == y)),
        "threshold": threshold,
        "accuracy_at_threshold": float(np.mean((p >= threshold) == y)),
        "box_threshold": float(f1_threshold(y, p)) if two_classes else threshold,
    }


def validate(
    state: TrainState,
    dataset: ImageLabelDataset,
    ctx: DistContext,
    *,
    pos_weight: float,
    channels_last: bool,
) -> dict[str, Any]:
    """The model's validation metrics now (placeholders when the validation split is empty)."""
    probs = gather_predictions(
        state.model, dataset, ctx, state.device, state.amp_dtype, channels_last
    )
    if len(dataset):
        return validation_metrics(dataset.labels, probs, pos_weight)
    return {"loss": None, "auroc": None, "auprc": None, "accuracy": None, "threshold": 0.5}


def monitored_value(metrics: dict[str, Any]) -> float:
    """What early stopping maximises: validation AUROC, else minus the validation loss."""
    if metrics["auroc"] is not None:
        return float(metrics["auroc"])
    return -(metrics["loss"] or 0.0)
