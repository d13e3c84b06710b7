"""The main job on an embedded default: synthetic RSNA data, end to end, no download.

Generates a synthetic data set in the exact RSNA Kaggle layout, caches it, trains a classifier
from image-level labels only, then evaluates classification and localisation on the held-out
test split against the synthetic boxes (which training never sees), with an HTML report.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

logger = logging.getLogger(__name__)


def _fmt(value: object) -> str:
    return "n/a" if value is None else f"{value:.3f}" if isinstance(value, float) else str(value)


def run_demo(
    out: Path, *, n: int = 400, image_size: int = 256, seed: int = 0, quick: bool = False
) -> int:
    """Generate, cache, train, evaluate and report.

    Args:
        out: Output folder (synthetic data, cache, run, evaluation).
        n: Number of synthetic images.
        image_size: Side of the synthetic images (the model sees them at half this, at most 128).
        seed: Seed of the generator, the split and training.
        quick: A smaller, faster run (for tests).

    Returns:
        The process exit status.
    """
    from pneumoloc.data.cache import prepare_cache
    from pneumoloc.data.synthetic import SynthConfig, generate_rsna
    from pneumoloc.evaluate import evaluate
    from pneumoloc.train import train
    from pneumoloc.training.config import load_train_config

    started = time.perf_counter()
    model, model_size, epochs = "resnet18", min(128, image_size), 10
    if quick:
        n, image_size, model, model_size, epochs = min(n, 60), 64, "smallcamnet", 32, 2
    data_dir = out / "synthetic-rsna"
    summary = generate_rsna(
        data_dir, SynthConfig(n=n, seed=seed, image_size=image_size), overwrite=True
    )
    print(
        f"[1/4] synthetic RSNA-layout data: {summary.n_images} images "
        f"({summary.n_positive} with pneumonia, {summary.n_boxes} boxes) -> {data_dir}"
    )
    cache = prepare_cache(data_dir, out / "cache", size=model_size, split_seed=seed, progress=False)
    print(
        f"[2/4] cache: {cache.manifest['n_ok']} images at {cache.size} px, "
        f"patient-level split {cache.manifest['split']['sizes']}"
    )
    config = load_train_config(
        None,
        {
            "data": str(cache.root),
            "out": str(out / "run"),
            "model": model,
            "image_size": model_size,
            "epochs": epochs,
            "batch_size": 32,
            "lr": 2e-3,
            "seed": seed,
            "split_seed": seed,
            "progress": not quick,
        },
    )
    result = train(config, cache=cache, overwrite=True)  # the demo remakes its run each time
    best = result.best_metrics
    print(
        f"[3/4] trained {model} at {model_size} px from image labels only: best epoch "
        f"{result.best_epoch}, validation AUROC {_fmt(best.get('auroc'))}"
    )
    metrics = evaluate(
        result.best_checkpoint,
        cache.root,
        split="test",
        out=out / "evaluation",
        progress=False,
        n_boot=200 if quick else 1000,
    )
    cls, loc = metrics["classification"], metrics.get("localisation") or {}
    print(f"[4/4] held-out test split ({cls['n']} images):")
    print(
        f"      AUROC {_fmt(cls['auroc'])} (95% CI {_fmt(cls['auroc_ci_low'])}-"
        f"{_fmt(cls['auroc_ci_high'])}), accuracy {_fmt(cls['accuracy'])}, "
        f"sensitivity {_fmt(cls['sensitivity'])}, specificity {_fmt(cls['specificity'])}"
    )
    if loc:
        mba = loc.get("max_box_acc", {})
        print(
            f"      RSNA metric {_fmt(loc.get('rsna_map'))}, notebook mean IoU "
            f"{_fmt(loc.get('notebook_mean_iou'))}, "
            f"pointing game {_fmt(loc.get('pointing_game'))}, "
            f"box accuracy at IoU 0.3 {_fmt(mba.get('iou_0.3'))}"
        )
    print(f"      report: {out / 'evaluation' / 'report' / 'index.html'}")
    print(
        f"done in {time.perf_counter() - started:.0f} s. Synthetic data: these numbers show the "
        "pipeline works, not how it performs on real X-rays. Research use only."
    )
    return 0
