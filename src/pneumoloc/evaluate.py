"""``pneumoloc evaluate``: metrics and a readable report of a checkpoint on one split of a data set.

Images come from the preprocessing cache (prepared at the checkpoint's image size if needed);
probabilities, heatmaps and boxes come from :class:`pneumoloc.inference.Predictor`, the one
inference path. Ground-truth boxes (original pixels) are read only here, for scoring.

Outputs in ``out``: ``metrics.json`` and ``report/index.html`` with its PNG figures and a
gallery of overlays (true positives, false positives, misses).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pneumoloc import DISCLAIMER, __version__
from pneumoloc.data.cache import Cache, resolve_cache
from pneumoloc.data.records import safe_name
from pneumoloc.errors import ConfigError, DataError
from pneumoloc.inference import BasePredictor, Predictor
from pneumoloc.inference.loading import onnx_equivalent
from pneumoloc.localise.boxes import BoxConfig, ScoredBoxes, cam_to_boxes_batch

logger = logging.getLogger(__name__)

__all__ = [
    "EVAL_SPLITS",
    "TUNING_GRID",
    "EvalPredictions",
    "evaluate",
    "gallery_file_name",
    "predict_split",
    "tune_box_config",
]

EVAL_SPLITS = ("test", "val", "all")

TUNING_GRID: dict[str, tuple[Any, ...]] = {
    "rule": ("peak", "otsu"),
    "peak_fraction": (0.3, 0.4, 0.5, 0.6, 0.7),
    "max_boxes": (1, 2, 3),
}
"""Box settings tried by ``--tune-boxes-on-val`` (``peak_fraction`` only matters for "peak")."""

LIMITS = (
    "These numbers describe this model on these {n} images only ({source}, {split} split). They "
    "do not predict performance on other hospitals, scanners, populations or clinical use, and "
    "small samples give wide confidence intervals. Boxes are derived from the class activation "
    "maps of a classifier trained with image-level labels only; they show where the evidence lies "
    "and are coarser than a radiologist's annotation."
)


@dataclass
class EvalPredictions:
    """Predictions of one split, kept lean enough for tens of thousands of images.

    Attributes:
        rows: Cache rows.
        labels: Image-level labels (N,).
        probs: Probabilities (N,).
        boxes: Predicted boxes (original pixels) per image.
        heatmaps: Per image the float16 heatmap at the model's size, kept only where it can be
            needed (images with truth boxes or label 1, or predicted positive); otherwise None.
        gts: Ground-truth boxes (original pixels) per image; empty without boxes.
        shapes: (N, 2) original (height, width).
        lung_masks: The lung masks the predictor used (bit-packed, None where none was found),
            or None when its recipe uses none (then whoever needs them computes them).
        mask_shape: (H, W) of the masks (the model's input size).
    """

    rows: np.ndarray
    labels: np.ndarray
    probs: np.ndarray
    boxes: list[ScoredBoxes]
    heatmaps: list[np.ndarray | None]
    gts: list[np.ndarray]
    shapes: np.ndarray
    lung_masks: list[np.ndarray | None] | None = None
    mask_shape: tuple[int, int] = (0, 0)

    def lung_mask(self, i: int) -> np.ndarray | None:
        """Image ``i``'s lung mask as the predictor computed it (requires ``lung_masks``)."""
        assert self.lung_masks is not None
        packed = self.lung_masks[i]
        if packed is None:
            return None
        h, w = self.mask_shape
        return np.unpackbits(packed, count=h * w).astype(bool).reshape(h, w)

    def __len__(self) -> int:
        return len(self.rows)


def predict_split(
    predictor: BasePredictor,
    cache: Cache,
    rows: np.ndarray,
    *,
    progress: bool = True,
    desc: str = "evaluate",
) -> EvalPredictions:
    """Run the predictor over cache rows, batch by batch, with a progress bar."""
    from tqdm.auto import tqdm

    rows = np.asarray(rows, dtype=np.int64)
    shapes = cache.original_shapes[rows] if len(rows) else np.zeros((0, 2), np.int64)
    labels = cache.labels[rows]
    gts = cache.load_eval_boxes(rows, scale="original")
    probs = np.zeros(len(rows), np.float64)
    boxes: list[ScoredBoxes] = []
    heatmaps: list[np.ndarray | None] = []
    masks: list[np.ndarray | None] | None = [] if predictor.lung_mask else None
    step = max(1, predictor.batch_size)
    with tqdm(total=len(rows), desc=desc, unit="img", disable=not progress) as bar:
        for start in range(0, len(rows), step):
            batch = rows[start : start + step]
            images = np.asarray(cache.images[batch])
            preds = predictor.predict_arrays(
                images, [tuple(s) for s in shapes[start : start + step]]
            )
            for k, pred in enumerate(preds):
                i = start + k
                probs[i] = pred.probability
                boxes.append(pred.boxes)
                keep = pred.positive or labels[i] == 1 or len(gts[i]) > 0
                heatmaps.append(pred.heatmap.astype(np.float16) if keep else None)
                if masks is not None:
                    mask = pred.lung_mask
                    masks.append(None if mask is None else np.packbits(mask.ravel()))
            bar.update(len(batch))
    return EvalPredictions(
        rows=rows,
        labels=labels,
        probs=probs,
        boxes=boxes,
        heatmaps=heatmaps,
        gts=gts,
        shapes=shapes,
        lung_masks=masks,
        mask_shape=(predictor.image_size, predictor.image_size),
    )


def _rsna_score(boxes: Sequence[ScoredBoxes], gts: Sequence[np.ndarray]) -> float | None:
    from pneumoloc.metrics import rsna_map

    value = rsna_map([(b.boxes, b.scores) for b in boxes], gts)
    return None if math.isnan(value) else value


def _grid(base: BoxConfig) -> list[BoxConfig]:
    configs = []
    for rule in TUNING_GRID["rule"]:
        fractions = TUNING_GRID["peak_fraction"] if rule == "peak" else (base.peak_fraction,)
        for fraction in fractions:
            for max_boxes in TUNING_GRID["max_boxes"]:
                configs.append(
                    dataclasses.replace(
                        base, rule=rule, peak_fraction=fraction, max_boxes=max_boxes
                    )
                )
    return configs


def tune_box_config(
    preds: EvalPredictions, threshold: float, base: BoxConfig
) -> tuple[BoxConfig, list[dict[str, Any]]]:
    """Choose box settings by the RSNA score on (validation) predictions.

    Args:
        preds: Predictions of the VALIDATION split, with its truth boxes.
        threshold: The classifier's decision threshold (gates boxes).
        base: Settings not tuned (closing, NMS, ...) come from here.

    Returns:
        The best config (the first in grid order on ties) and every config's score.

    Raises:
        DataError: When the validation split has no truth boxes to tune on.
    """
    if not any(len(g) for g in preds.gts):
        raise DataError("--tune-boxes-on-val: the validation split has no ground-truth boxes")
    idx = [i for i, h in enumerate(preds.heatmaps) if h is not None]
    # Images without a kept heatmap are predicted negative and have no truth: every config
    # gives them no box, and the RSNA score skips such images, so they can be left out.
    heatmaps = [np.asarray(preds.heatmaps[i], dtype=np.float32) for i in idx]
    probs = preds.probs[idx]
    shapes = [(int(preds.shapes[i][0]), int(preds.shapes[i][1])) for i in idx]
    gts = [preds.gts[i] for i in idx]
    results: list[dict[str, Any]] = []
    best: tuple[float, BoxConfig] | None = None
    for config in _grid(base):
        boxes = cam_to_boxes_batch(
            heatmaps, probs, threshold=threshold, config=config, out_shapes=shapes
        )
        score = _rsna_score(boxes, gts)
        results.append(
            {
                "rule": config.rule,
                "peak_fraction": config.peak_fraction,
                "max_boxes": config.max_boxes,
                "rsna_map": score,
            }
        )
        value = -1.0 if score is None else score
        if best is None or value > best[0]:
            best = (value, config)
    assert best is not None
    return best[1], results


def _checked_split(split: str, tune: bool) -> None:
    if split not in EVAL_SPLITS:
        raise ConfigError(f"unknown split {split!r}; choose one of {list(EVAL_SPLITS)}")
    if tune and split != "test":
        raise ConfigError(
            f"--tune-boxes-on-val chooses box settings on the validation split, so it cannot "
            f"evaluate split {split!r} (that would score the images it was tuned on); "
            "use --split test"
        )


def _resolve_box_config(
    predictor: BasePredictor, box_config: BoxConfig | Mapping[str, Any] | None
) -> BoxConfig:
    if box_config is None:
        return predictor.box_config
    if isinstance(box_config, BoxConfig):
        return box_config
    return dataclasses.replace(predictor.box_config, **dict(box_config))


UNKNOWN_VIEW = "unknown"
"""The ``by_view`` group of images without a recorded view (JPEG/PNG among DICOMs)."""


def _by_view(
    preds: EvalPredictions, views: np.ndarray | None, threshold: float, n_boot: int
) -> dict[str, Any] | None:
    """Within-view metrics and the view-shortcut baselines; None when no image has a view."""
    from pneumoloc.metrics import by_group_metrics, view_shortcut_aurocs

    if views is None or not len(preds):
        return None
    names = np.array([str(v).strip().upper() or UNKNOWN_VIEW for v in views], dtype=object)
    if np.all(names == UNKNOWN_VIEW):
        return None
    return {
        "source": "DICOM ViewPosition",
        "views": by_group_metrics(preds.labels, preds.probs, names, threshold, n_boot=n_boot),
        **view_shortcut_aurocs(preds.labels, preds.probs, names),
    }


def _classification(
    preds: EvalPredictions,
    threshold: float,
    n_boot: int,
    temperature: float = 1.0,
    *,
    views: np.ndarray | None = None,
    patient_ids: np.ndarray | None = None,
) -> dict[str, Any]:
    from pneumoloc.inference.calibration import apply_temperature
    from pneumoloc.metrics import (
        calibration_curve_bins,
        classification_metrics,
        expected_calibration_error,
        patient_level_metrics,
        roc_pr_curves,
    )

    metrics = classification_metrics(preds.labels, preds.probs, threshold, n_boot=n_boot)
    # ECE before calibration: the network's own probabilities (the stored temperature undone).
    raw = apply_temperature(preds.probs, 1.0 / temperature)
    metrics["temperature"] = temperature
    metrics["ece_uncalibrated"] = (
        expected_calibration_error(preds.labels, raw) if len(preds) else None
    )
    metrics["by_view"] = _by_view(preds, views, threshold, n_boot)
    metrics["patient_level"] = (
        patient_level_metrics(preds.labels, preds.probs, patient_ids, threshold, n_boot=n_boot)
        if patient_ids is not None and len(preds)
        else None
    )
    both = 0 < int(preds.labels.sum()) < len(preds)
    curves = (
        roc_pr_curves(preds.labels, preds.probs)
        if both
        else {"fpr": [], "tpr": [], "precision": [], "recall": []}
    )
    return {
        **metrics,
        "curves": curves,
        "calibration": calibration_curve_bins(preds.labels, preds.probs),
    }


def _table_column(cache: Cache, column: str, rows: np.ndarray) -> np.ndarray | None:
    """One column of the cache's index at ``rows`` as strings; None if the index lacks it."""
    if column not in cache.table.columns:
        return None
    return cache.table[column].fillna("").astype(str).to_numpy()[rows]


def _localisation(preds: EvalPredictions, predictor: BasePredictor, cache: Cache) -> dict[str, Any]:
    from pneumoloc.localise.lungs import estimate_lung_mask
    from pneumoloc.metrics import localisation_metrics, max_box_acc, pointing_game
    from pneumoloc.metrics.anatomy import anatomy_comparison

    out = localisation_metrics(
        [b.boxes for b in preds.boxes], [b.scores for b in preds.boxes], None, preds.gts
    )
    # Heatmap metrics only look at images with truth; pass only those (their heatmaps are kept).
    idx = [i for i, g in enumerate(preds.gts) if len(g)]
    heatmaps = [np.asarray(preds.heatmaps[i], dtype=np.float32) for i in idx]
    gts = [preds.gts[i] for i in idx]
    shapes = [(int(preds.shapes[i][0]), int(preds.shapes[i][1])) for i in idx]
    pg = pointing_game(heatmaps, gts, image_shapes=shapes)
    mba = max_box_acc(heatmaps, gts, image_shapes=shapes)
    curve = mba.pop("curve")
    out["pointing_game"] = None if math.isnan(pg) else pg
    out["max_box_acc"] = mba
    out["max_box_acc_curve"] = curve
    out["n_predicted_boxes"] = int(sum(len(b) for b in preds.boxes))
    # The anatomy baselines and label-gated figures, on the same images (issue 13).
    # The predictor's own masks when its recipe used them (the same function of the same
    # pixels), else computed here.
    if preds.lung_masks is not None:
        masks = [preds.lung_mask(i) for i in range(len(preds))]
    else:
        masks = [estimate_lung_mask(np.asarray(cache.images[r])) for r in preds.rows]
    out["vs_anatomy"] = anatomy_comparison(
        heatmaps=preds.heatmaps,
        probs=preds.probs,
        labels=preds.labels,
        model_boxes=preds.boxes,
        gts=preds.gts,
        shapes=[(int(s[0]), int(s[1])) for s in preds.shapes],
        masks=masks,
        box_threshold=predictor.box_threshold,
        box_config=predictor.box_config,
        pointing=out["pointing_game"],
        label_gated_boxes=_detector_label_gated(preds, predictor, cache),
    )
    return out


def _detector_label_gated(
    preds: EvalPredictions, predictor: BasePredictor, cache: Cache
) -> list[ScoredBoxes] | None:
    """For a predictor whose boxes come from a self-trained detector: its boxes on every truly
    positive image (probability taken as 1, so the gate always opens) and none elsewhere, the
    label-gated counterpart of what it deploys; None for the box rule (the anatomy comparison
    draws those from the heatmaps itself)."""
    if getattr(predictor, "box_source", "cam") == "cam":
        return None
    out = [ScoredBoxes() for _ in range(len(preds))]
    pos = [i for i in range(len(preds)) if preds.labels[i] == 1 and preds.heatmaps[i] is not None]
    if not pos:
        return out
    drawn = predictor.draw_boxes(
        np.asarray(cache.images[preds.rows[pos]]),
        np.ones(len(pos)),
        np.stack([np.asarray(preds.heatmaps[i], np.float32) for i in pos]),
        [(int(preds.shapes[i][0]), int(preds.shapes[i][1])) for i in pos],
    )
    for i, boxes in zip(pos, drawn, strict=True):
        out[i] = boxes
    return out


def _json_safe(value: Any) -> Any:
    """NaN/inf -> None and NumPy scalars -> Python, recursively (strict JSON)."""
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def gallery_file_name(category: str, rank: int, image_id: str) -> str:
    """A safe PNG file name for a gallery image: never a raw id, never a path."""
    return f"{safe_name(category)}_{rank:02d}_{safe_name(image_id, max_len=80)}.png"


def _gallery_picks(
    preds: EvalPredictions, threshold: float, n: int
) -> list[tuple[str, str, list[int]]]:
    """(file tag, heading, indices) of the true positives, false positives and misses shown."""
    positive = preds.probs >= threshold
    label = preds.labels == 1
    order_desc = np.argsort(-preds.probs, kind="stable")
    order_asc = order_desc[::-1]
    tp = [int(i) for i in order_desc if positive[i] and label[i]][:n]
    fp = [int(i) for i in order_desc if positive[i] and not label[i]][:n]
    fn = [int(i) for i in order_asc if not positive[i] and label[i]][:n]
    return [
        ("tp", "True positives (highest probability)", tp),
        ("fp", "False positives (highest probability)", fp),
        ("fn", "Missed: false negatives (lowest probability)", fn),
    ]


def _write_gallery(
    preds: EvalPredictions, cache: Cache, threshold: float, n: int, report_dir: Path
) -> list[Any]:
    from pneumoloc.report import GalleryItem, render_overlay, save_png

    items = []
    ids = cache.image_ids
    root = report_dir.resolve()
    for tag, category, picks in _gallery_picks(preds, threshold, n):
        for rank, i in enumerate(picks):
            row = int(preds.rows[i])
            image_id = ids[row]
            name = gallery_file_name(tag, rank, image_id)
            path = (report_dir / name).resolve()
            if path.parent != root:  # defence in depth: safe_name already forbids separators
                raise DataError(f"refusing to write gallery image outside {root}: {name!r}")
            heatmap = preds.heatmaps[i]
            rgb = render_overlay(
                np.asarray(cache.images[row]),
                None if heatmap is None else np.asarray(heatmap, dtype=np.float32),
                preds.boxes[i].boxes,
                preds.boxes[i].scores,
                gt_boxes=preds.gts[i] if len(preds.gts[i]) else None,
                probability=float(preds.probs[i]),
                threshold=threshold,
                title=image_id,
                box_shape=(int(preds.shapes[i][0]), int(preds.shapes[i][1])),
            )
            save_png(rgb, path)
            caption = (
                f"{image_id}: P = {preds.probs[i]:.3f}, {len(preds.gts[i])} true box(es), "
                f"{len(preds.boxes[i])} predicted"
            )
            items.append(GalleryItem(file=name, category=category, caption=caption))
    return items


def _subgroups(
    preds: EvalPredictions, cache: Cache, threshold: float, n_boot: int
) -> dict[str, Any] | None:
    """Metrics by view position, sex and age band (aggregates only; docs/pacs.md)."""
    from pneumoloc.data.demographics import subgroup_columns
    from pneumoloc.metrics.subgroups import subgroup_metrics

    scored = cache.has_boxes
    return subgroup_metrics(
        preds.labels,
        preds.probs,
        subgroup_columns(cache.table, preds.rows),
        threshold,
        boxes=[(b.boxes, b.scores) for b in preds.boxes] if scored else None,
        gts=preds.gts if scored else None,
        n_boot=n_boot,
    )


def _write_figures(metrics: Mapping[str, Any], report_dir: Path) -> dict[str, str]:
    from pneumoloc.report import plots

    c = metrics["classification"]
    cm = c["confusion"]
    tpr = cm["tp"] / (cm["tp"] + cm["fn"]) if cm["tp"] + cm["fn"] else None
    fpr = cm["fp"] / (cm["fp"] + cm["tn"]) if cm["fp"] + cm["tn"] else None
    roc_point = (fpr, tpr) if tpr is not None and fpr is not None else None
    pr_point = (tpr, c["precision"]) if tpr is not None and c["precision"] is not None else None
    figures = {
        "ROC curve": plots.plot_roc(
            c["curves"],
            report_dir / "roc.png",
            auroc=c["auroc"],
            ci=(c["auroc_ci_low"], c["auroc_ci_high"]),
            operating_point=roc_point,
        ).name,
        "Precision-recall curve": plots.plot_pr(
            c["curves"],
            report_dir / "pr.png",
            auprc=c["auprc"],
            prevalence=c["prevalence"],
            operating_point=pr_point,
        ).name,
        "Calibration (reliability diagram)": plots.plot_calibration(
            c["calibration"], report_dir / "calibration.png", ece=c["ece"]
        ).name,
    }
    loc = metrics.get("localisation")
    if loc is not None:
        figures["Box accuracy vs CAM threshold (MaxBoxAcc sweep)"] = plots.plot_box_sweep(
            loc["max_box_acc_curve"], report_dir / "box_sweep.png"
        ).name
    if metrics.get("subgroups"):
        from pneumoloc.report.subgroups import plot_subgroups

        figures["Metrics by subgroup (95% bootstrap CIs)"] = plot_subgroups(
            metrics["subgroups"], report_dir / "subgroups.png"
        ).name
    return figures


def evaluate(
    checkpoint: str | Path | None,
    data: str | Path,
    *,
    split: str = "test",
    out: str | Path = "runs/evaluate",
    cam_method: str | None = None,
    box_config: BoxConfig | Mapping[str, Any] | None = None,
    tune_boxes_on_val: bool = False,
    tta: bool = False,
    lung_mask: bool | None = None,
    refine: str | None = None,
    cam_layers: str | None = None,
    box_gate: str | None = None,
    cam_align: str | None = None,
    cam_floor: str | None = None,
    heatmap_source: str | None = None,
    gallery: int = 4,
    device: str = "auto",
    image_size: int | None = None,
    batch_size: int = 16,
    n_boot: int = 1000,
    workers: int | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Evaluate a checkpoint on one split of a data set and write metrics and a report.

    Args:
        checkpoint: Checkpoint path, or None / "default" for the shipped model.
        data: An RSNA-layout or NORMAL/PNEUMONIA folder, or a cache folder.
        split: "test", "val" or "all" of the cache's stored patient-level split.
        out: Output folder (``metrics.json``, ``report/``).
        cam_method: Heatmap method (default: the checkpoint's, else "cam").
        box_config: Box settings: a :class:`BoxConfig`, or a mapping of fields that replace the
            checkpoint's (e.g. ``{"rule": "otsu"}``). Default: the checkpoint's or the defaults.
        tune_boxes_on_val: Choose ``rule``, ``peak_fraction`` and ``max_boxes`` from
            :data:`TUNING_GRID` by the RSNA score on the validation split's boxes (other fields
            from ``box_config``); only allowed with ``split="test"``.
        tta: Test-time augmentation of the heatmaps.
        lung_mask: Restrict heatmaps to the estimated lung fields (None: the checkpoint's).
        refine: Heatmap refinement, "randomwalk" or "none" (None: the checkpoint's).
        cam_layers: "stages" fuses the last three stages (grad-cam methods; None: the
            checkpoint's, else the final map).
        box_gate: "decision" or "f1" (None: the checkpoint's): which threshold gates boxes.
        cam_align: The classic CAM's upsampling, "centre" or "cells" (None: the checkpoint's;
            see ``pneumoloc.cam.names.CAM_ALIGNS``).
        cam_floor: "relu", "shift" or "auto" (None: the checkpoint's; ``CAM_FLOORS``): how the
            classic CAM becomes a heatmap; an ONNX twin runs only when it computes the same.
        heatmap_source: "cam" or "detector" (None: the checkpoint's; ``HEATMAP_SOURCES``):
            for a model with a self-trained detector, its score map as the heatmap of the
            films that get boxes.
        gallery: Overlays per category (true/false positives, misses); 0 for none.
        device: "auto", "cpu" or "cuda".
        image_size: Run the model at this size instead of the checkpoint's (None: the
            checkpoint's). The decision threshold was chosen at the checkpoint's size.
        batch_size: Images per forward pass.
        n_boot: Bootstrap resamples of the AUROC confidence interval.
        workers: Decoding processes if the data folder must be cached first (default: all cores).
        progress: Show progress bars.

    Returns:
        The metrics dict written to ``metrics.json``. Besides the image-level numbers,
        ``classification`` holds ``by_view`` (metrics within each DICOM view position, the
        view-only AUROC and the AUROC with which the probability predicts the view; None when
        no image records a view) and ``patient_level`` (mean probability per patient; None
        when every patient has one image).

    Raises:
        ConfigError: Unknown split, or tuning asked with a split other than "test".
        DataError: No images in the split, or no validation boxes to tune on.
        CheckpointError, CacheError: From loading the model or the data.
    """
    _checked_split(split, tune_boxes_on_val)
    kwargs: dict[str, Any] = {"tta": tta, "batch_size": batch_size}
    if lung_mask is not None:
        kwargs["lung_mask"] = lung_mask
    if refine is not None:
        kwargs["refine"] = None if refine == "none" else refine
    if cam_layers is not None:
        kwargs["cam_layers"] = cam_layers
    if box_gate is not None:
        kwargs["box_gate"] = box_gate
    if cam_align is not None:
        kwargs["cam_align"] = cam_align
    if cam_floor is not None:
        kwargs["cam_floor"] = cam_floor
    if heatmap_source is not None:
        kwargs["heatmap_source"] = heatmap_source
    if cam_method is not None:
        kwargs["cam_method"] = cam_method
    predictor: BasePredictor = Predictor.from_checkpoint(checkpoint, device=device, **kwargs)
    predictor.recipe = predictor.recipe.replace(
        box_config=_resolve_box_config(predictor, box_config)
    )
    trained_size = predictor.image_size
    if image_size is None or image_size == trained_size:
        # The same model, metadata and recipe, its network run by ONNX Runtime on a CPU when
        # the checkpoint has an ONNX twin exported from it (about 4x faster here).
        predictor = onnx_equivalent(predictor, checkpoint) or predictor
    if image_size is not None and image_size != trained_size:
        logger.warning(
            "running the model at %d px although it was trained at %d px; its decision "
            "threshold was chosen at %d px",
            image_size,
            trained_size,
            trained_size,
        )
        predictor.meta["image_size"] = int(image_size)
    cache = resolve_cache(data, size=predictor.image_size, progress=progress, workers=workers)
    rows = cache.split.part(split)
    if len(rows) == 0:
        raise DataError(f"{cache.root}: the {split!r} split holds no readable images")
    threshold = predictor.threshold

    tuning: dict[str, Any] | None = None
    if tune_boxes_on_val:
        if not cache.has_boxes:
            raise DataError(
                f"{data}: --tune-boxes-on-val needs ground-truth boxes; this data has none"
            )
        val_rows = cache.split.part("val")
        if len(val_rows) == 0:
            raise DataError(f"{cache.root}: the validation split is empty; nothing to tune on")
        val = predict_split(predictor, cache, val_rows, progress=progress, desc="tune on val")
        chosen, grid = tune_box_config(val, threshold, predictor.box_config)
        predictor.recipe = predictor.recipe.replace(box_config=chosen)
        tuning = {
            "split": "val",
            "n_images": len(val),
            "chosen": dataclasses.asdict(chosen),
            "grid": grid,
        }
        logger.info("box settings tuned on %d validation images: %s", len(val), chosen)

    preds = predict_split(predictor, cache, rows, progress=progress)
    metrics: dict[str, Any] = {
        "classification": _classification(
            preds,
            threshold,
            n_boot,
            predictor.temperature,
            views=_table_column(cache, "view", rows),
            patient_ids=_table_column(cache, "patient_id", rows),
        ),
        "localisation": _localisation(preds, predictor, cache) if cache.has_boxes else None,
    }
    metrics["subgroups"] = _subgroups(preds, cache, threshold, n_boot)
    if not cache.has_boxes:
        metrics["localisation_unavailable"] = (
            "Ground-truth boxes are unavailable for this data (its layout carries image-level "
            "labels only), so no localisation metric is computed."
        )
    metrics["provenance"] = _provenance(
        predictor, cache, checkpoint, split, len(rows), tuning, trained_size
    )
    if tuning is not None:
        metrics["box_tuning"] = tuning

    out = Path(out)
    report_dir = out / "report"
    report_dir.mkdir(parents=True, exist_ok=True)
    metrics = _json_safe(metrics)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1, allow_nan=False))
    from pneumoloc.report import write_report

    figures = _write_figures(metrics, report_dir)
    items = _write_gallery(preds, cache, threshold, gallery, report_dir) if gallery > 0 else []
    index = write_report(report_dir, metrics, figures, items)
    logger.info("wrote %s and %s", out / "metrics.json", index)
    return metrics


def _provenance(
    predictor: BasePredictor,
    cache: Cache,
    checkpoint: str | Path | None,
    split: str,
    n: int,
    tuning: Mapping[str, Any] | None,
    trained_size: int,
) -> dict[str, Any]:
    source = cache.manifest.get("source", str(cache.root))
    notes = []
    trained_on = predictor.meta.get("data", {}) or {}
    same_data = trained_on.get("fingerprint") == cache.fingerprint
    if same_data:
        train_seed = (predictor.meta.get("config") or {}).get("split_seed")
        cache_seed = cache.split.seed
        if split == "all":
            notes.append(
                "The 'all' split includes the images this model was trained and "
                "selected on: these numbers are optimistic."
            )
        elif train_seed is not None and train_seed != cache_seed:
            notes.append(
                f"This data's split (seed {cache_seed}) is not the one used in training "
                f"(seed {train_seed}): evaluated images may have been trained on."
            )
        elif split == "val":
            notes.append(
                "The validation split chose the checkpoint and its threshold: these "
                "numbers are optimistic; prefer the test split."
            )
    limits = LIMITS.format(n=n, source=source, split=split)
    if notes:
        limits += " " + " ".join(notes)
    return {
        "data_source": str(source),
        "data_kind": cache.manifest.get("kind"),
        "cache_path": str(cache.root),
        "cache_fingerprint": cache.fingerprint,
        "trained_on_same_data": same_data,
        "split": {
            "name": split,
            "n_images": n,
            "seed": cache.split.seed,
            "fractions": list(cache.split.fractions),
        },
        "n_unreadable": int(cache.manifest.get("n_failed", 0)),
        "n_missing_labelled": int(cache.manifest.get("n_missing_labelled", 0)),
        "checkpoint": predictor.meta.get("checkpoint_path", str(checkpoint)),
        "model_id": predictor.model_id,
        "backend": predictor.backend,
        "model": predictor.meta.get("model"),
        "image_size": predictor.image_size,
        "trained_image_size": trained_size,
        "threshold": predictor.threshold,
        "threshold_source": "checkpoint (chosen on its validation split)",
        **predictor.recipe.to_meta(),
        "box_threshold": predictor.box_threshold,
        "box_source": predictor.box_source,
        "heatmap_source": predictor.heatmap_source,
        "boxes_tuned_on_val": tuning is not None,
        "box_tuning": None
        if tuning is None
        else {"split": tuning["split"], "n_images": tuning["n_images"]},
        "pneumoloc_version": __version__,
        "checkpoint_pneumoloc_version": predictor.meta.get("pneumoloc_version"),
        "evaluated_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "disclaimer": DISCLAIMER,
        "limits": limits,
    }
