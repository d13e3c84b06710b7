"""Classifier ablation of issue 12, sized for a CPU: init, sources, unlabelled images, ensembles.

Every variant is trained with 3 seeds in the same run and evaluated on the same test splits:

* ``scratch``: tf_efficientnet_lite0, random init, RSNA sample only;
* ``imagenet``: the same from the offline ImageNet weights (``--pretrained imagenet``);
* ``imagenet+kermany``: RSNA sample + Kermany pediatric films, two sources, equal shares;
* ``imagenet+unlabelled``: RSNA sample + Noisy-Student pseudo-labels of the 898 unlabelled
  stage-2 test images, the teacher being the ``imagenet`` model of the same seed;
* ``ensemble(...)``: the three seeds of a variant as one model (``pneumoloc ensemble``);
* ``shipped-default``: the model in ``src/pneumoloc/weights/default.pt`` (previous default).

Selection is on validation only (best.pt by validation AUROC, thresholds and temperature on
validation); test numbers are reported, never used. Results go to ``--results`` (JSON) after
every step, and a finished step is skipped when the script is run again.

    python benchmarks/classifier_ablation.py --rsna CACHE192 --kermany CACHE192 \\
        --unlabelled UNLABELLED_CACHE192 --out /work/exp/ablation \\
        --results docs/results/classifier-ablation-2026-12-02.json
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path
from typing import Any

VARIANTS = ("scratch", "imagenet", "imagenet+kermany", "imagenet+unlabelled")


def _load(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {"runs": {}, "evals": {}}


def _save(path: Path, results: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(results, indent=1, sort_keys=True, default=str))
    tmp.replace(path)


def _config(args: argparse.Namespace, variant: str, seed: int, out: Path) -> Any:
    from pneumoloc.training.config import TrainConfig

    pretrained = None if variant == "scratch" else "imagenet"
    config = TrainConfig(
        data=str(args.rsna),
        out=str(out),
        model="tf_efficientnet_lite0",
        pretrained=pretrained,
        image_size=args.image_size,
        epochs=args.epochs,
        batch_size=32,
        lr=1e-3 if pretrained is None else 3e-4,
        seed=seed,
        device="cpu",
        progress=False,
    )
    if variant == "imagenet+kermany":
        config.extra_data = [str(args.kermany)]
    if variant == "imagenet+unlabelled":
        config.unlabelled = str(args.unlabelled)
        config.teacher = str(args.out / f"imagenet-s{seed}" / "best.pt")
    return config


def _evaluate(checkpoint: Path, data: Path, out: Path, split: str) -> dict[str, Any]:
    from pneumoloc.evaluate import evaluate

    report = evaluate(
        checkpoint, data, split=split, out=out, gallery=0, n_boot=200, progress=False, device="cpu"
    )
    cls, loc = report["classification"], report.get("localisation") or {}
    keep = (
        "auroc",
        "auroc_ci_low",
        "auroc_ci_high",
        "auprc",
        "sensitivity",
        "specificity",
        "threshold",
        "ece",
        "ece_uncalibrated",
        "temperature",
        "n",
        "n_positive",
        "by_view",
        "patient_level",
    )
    return {
        "classification": {k: cls.get(k) for k in keep},
        "localisation": {
            k: loc.get(k)
            for k in ("rsna_map", "pointing_game", "notebook_mean_iou", "max_box_acc")
            if k in loc
        },
    }


def _classify_only(checkpoint: Path, data: Path, split: str) -> dict[str, Any]:
    """Image- and patient-level classification on a split without boxes (Kermany): the
    probabilities only, as ``evaluate`` computes them (no heatmap post-processing needed)."""
    import numpy as np

    from pneumoloc.data.cache import open_cache
    from pneumoloc.inference import Predictor
    from pneumoloc.inference.calibration import apply_temperature
    from pneumoloc.metrics import (
        classification_metrics,
        expected_calibration_error,
        patient_level_metrics,
    )

    predictor = Predictor.from_checkpoint(checkpoint, device="cpu", batch_size=32)
    cache = open_cache(data)
    rows = cache.split.part(split)
    labels = np.asarray(cache.labels[rows])
    probs = np.concatenate(
        [
            predictor.probabilities(np.asarray(cache.images[rows[i : i + 256]]))
            for i in range(0, len(rows), 256)
        ]
    )
    metrics = classification_metrics(labels, probs, predictor.threshold, n_boot=200)
    metrics["ece_uncalibrated"] = expected_calibration_error(
        labels, apply_temperature(probs, 1.0 / predictor.temperature)
    )
    patients = cache.table["patient_id"].to_numpy()[rows]
    metrics["patient_level"] = patient_level_metrics(
        labels, probs, patients, predictor.threshold, n_boot=200
    )
    metrics["temperature"] = predictor.temperature
    return {"classification": metrics, "localisation": {}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rsna", type=Path, required=True)
    parser.add_argument("--kermany", type=Path, required=True)
    parser.add_argument("--unlabelled", type=Path, required=True)
    parser.add_argument("--rsna-default", type=Path, help="RSNA cache at the shipped model's size")
    parser.add_argument("--kermany-default", type=Path, help="Kermany at the shipped model's size")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--results", type=Path, required=True)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--image-size", type=int, default=192)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")

    from pneumoloc.ensemble import build_ensemble
    from pneumoloc.train import train

    results = _load(args.results)
    results["setup"] = {
        "machine": "2-core CPU (no GPU), this session",
        "image_size": args.image_size,
        "epochs": args.epochs,
        "seeds": args.seeds,
        "rsna": str(args.rsna),
        "kermany": str(args.kermany),
        "unlabelled": str(args.unlabelled),
        "model": "tf_efficientnet_lite0 (avg pool, classic CAM), batch 32, AdamW, cosine",
        "lr": "1e-3 from scratch, 3e-4 from ImageNet (not tuned)",
    }

    def evaluate_model(name: str, ckpt: Path, rsna: Path, kermany: Path) -> None:
        # kermany_val: every candidate's pediatric validation AUROC, so that the default model
        # (one for adults and children) can be chosen on validation alone.
        for label, data in (
            ("rsna_test", rsna),
            ("kermany_test", kermany),
            ("kermany_val", kermany),
        ):
            key = f"{name}|{label}"
            if key in results["evals"]:
                continue
            started = time.perf_counter()
            res = (
                _evaluate(ckpt, data, args.out / "eval" / name / label, "test")
                if label == "rsna_test"
                else _classify_only(ckpt, data, label.split("_")[1])
            )
            res["seconds"] = time.perf_counter() - started
            results["evals"][key] = res
            _save(args.results, results)
            logging.info("%s: AUROC %.4f", key, res["classification"]["auroc"] or float("nan"))

    if args.rsna_default and args.kermany_default:
        evaluate_model(
            "shipped-default",
            Path("src/pneumoloc/weights/default.pt"),
            args.rsna_default,
            args.kermany_default,
        )
    for seed in args.seeds:
        for variant in args.variants:
            name = f"{variant}-s{seed}"
            run_dir = args.out / name
            if name not in results["runs"]:
                started = time.perf_counter()
                result = train(_config(args, variant, seed, run_dir))
                results["runs"][name] = {
                    "variant": variant,
                    "seed": seed,
                    "best_epoch": result.best_epoch,
                    "val": result.best_metrics,
                    "seconds": time.perf_counter() - started,
                }
                _save(args.results, results)
            evaluate_model(name, run_dir / "best.pt", args.rsna, args.kermany)
    for variant in args.variants:
        members = [args.out / f"{variant}-s{s}" / "best.pt" for s in args.seeds]
        if len(members) < 2 or not all(m.is_file() for m in members):
            continue
        name = f"ensemble({variant})"
        path = args.out / f"{name}.pt"
        if not path.is_file():
            res = build_ensemble(members, args.rsna, path, device="cpu", half=True)
            results["runs"][name] = {"variant": name, "val": res.val_metrics["val"]}
            _save(args.results, results)
        evaluate_model(name, path, args.rsna, args.kermany)
    logging.info("done: %s", args.results)


if __name__ == "__main__":
    main()
