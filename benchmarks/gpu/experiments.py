"""One prepared run of every experiment that needs a GPU (or runs --smoke on a CPU).

1. Training throughput of resnet18 at 256 px, AMP + channels-last, data pipeline included
   (uint8 batches gathered and augmented on the GPU), on the RSNA sample tiled to 8,900 images.
2. Classification baselines (issue 3): resnet18 @256 from scratch vs the notebook's smallcamnet
   @128, same split and epoch budget, on the RSNA sample and on the Kermany pediatric set.
3. Localisation ablation (issue 7) on the RSNA sample's patient-level split, 3 seeds: training
   variants x inference variants; every number on the held-out TEST split, plus the validation
   split's numbers used to pick the default recipe (the test split picks nothing).
4. The default model: the best small recipe by VALIDATION RSNA metric, its seed-0 checkpoint.

Writes results.json (and default.pt) to --out. Usage on the lent GPU machine:
    python benchmarks/gpu/experiments.py --rsna .devdata/rsna --kermany .devdata/kermany/train \
        --out $OUT
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import time
import traceback
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np

TRAIN_VARIANTS: dict[str, dict[str, Any]] = {
    # name: train settings (image_size, model, output_stride, pool, lr, epochs)
    "notebook_smallcamnet128": {"model": "smallcamnet", "image_size": 128, "lr": 1e-3},
    "resnet18_256_os32": {"model": "resnet18", "image_size": 256},
    "resnet18_256_os8": {"model": "resnet18", "image_size": 256, "output_stride": 8},
    "resnet18_256_os8_lse": {
        "model": "resnet18",
        "image_size": 256,
        "output_stride": 8,
        "pool": "lse",
    },
    "resnet18_384_os16": {"model": "resnet18", "image_size": 384, "output_stride": 16},
    "effb0_256_os8": {"model": "efficientnet_b0", "image_size": 256, "output_stride": 8},
    "effb0_256_os8_topk": {
        "model": "efficientnet_b0",
        "image_size": 256,
        "output_stride": 8,
        "pool": "topk",
    },
}
# CPU-only profile (issue 7: "on a CPU only, work at 192 px and say so"): resnet18 at 192 px,
# the plain-CAM baseline and the pooling options; efficientnet_b0 at stride 8 trains at about
# 3 img/s on 2 cores, too slow for 3 seeds here.
CPU_TRAIN_VARIANTS: dict[str, dict[str, Any]] = {
    "resnet18_192_os32": {"model": "resnet18", "image_size": 192},
    "resnet18_192_os32_attention": {"model": "resnet18", "image_size": 192, "pool": "attention"},
    "resnet18_192_os32_topk": {"model": "resnet18", "image_size": 192, "pool": "topk"},
    "resnet18_192_os16": {"model": "resnet18", "image_size": 192, "output_stride": 16},
}
SMALL_MODELS = {
    "effb0_256_os8",
    "effb0_256_os8_topk",
}  # candidates for the shipped default (a few MB)

# Inference variants: (cam method, tta, lung mask, box config overrides)
INFER_VARIANTS: dict[str, dict[str, Any]] = {
    "cam_peak0.5": {"box": {"rule": "peak", "peak_fraction": 0.5}},
    "notebook_rule": {"box": {"rule": "notebook", "notebook_std": 0.5}},
    "cam_peak0.3": {"box": {"rule": "peak", "peak_fraction": 0.3}},
    "cam_otsu": {"box": {"rule": "otsu"}},
    "cam_peak0.5_split2": {
        "box": {"rule": "peak", "peak_fraction": 0.5, "split_midline": True, "max_boxes": 2}
    },
    "cam_peak0.3_split2": {
        "box": {"rule": "peak", "peak_fraction": 0.3, "split_midline": True, "max_boxes": 2}
    },
    "lung_peak0.5_split2": {
        "lung": True,
        "box": {"rule": "peak", "peak_fraction": 0.5, "split_midline": True, "max_boxes": 2},
    },
    "lung_peak0.4_smooth_split2": {
        "lung": True,
        "box": {
            "rule": "peak",
            "peak_fraction": 0.4,
            "split_midline": True,
            "max_boxes": 2,
            "smooth_fraction": 1 / 64,
        },
    },
    "tta_peak0.5_split2": {
        "tta": True,
        "box": {"rule": "peak", "peak_fraction": 0.5, "split_midline": True, "max_boxes": 2},
    },
    "gradcampp_peak0.5_split2": {
        "cam": "gradcam++",
        "box": {"rule": "peak", "peak_fraction": 0.5, "split_midline": True, "max_boxes": 2},
    },
    # Refinement: image-guided random walk (pneumoloc.localise.refine), then the lung mask.
    "lung_rw_peak0.5_split2": {
        "lung": True,
        "refine": "randomwalk",
        "box": {"rule": "peak", "peak_fraction": 0.5, "split_midline": True, "max_boxes": 2},
    },
    # Multi-stage fusion: LayerCAM over the last three stages, then the lung mask.
    "layercam_stages_lung_peak0.5_split2": {
        "cam": "layercam",
        "cam_layers": "stages",
        "lung": True,
        "box": {"rule": "peak", "peak_fraction": 0.5, "split_midline": True, "max_boxes": 2},
    },
    # Self-training: FCOS trained on the lung_peak0.5_split2 boxes of the TRAINING images
    # (pneumoloc.selftrain); its boxes replace the rule's (the CAM boxes are the fallback).
    "selftrain_r1": {
        "lung": True,
        "detector": 1,
        "box": {"rule": "peak", "peak_fraction": 0.5, "split_midline": True, "max_boxes": 2},
    },
    "selftrain_r2": {
        "lung": True,
        "detector": 2,
        "box": {"rule": "peak", "peak_fraction": 0.5, "split_midline": True, "max_boxes": 2},
    },
}
# Box gating (pneumoloc.metrics.classification.f1_threshold): boxes only on images whose
# probability reaches the F1-optimal threshold on the validation IMAGE LABELS.
for _name in (
    "lung_peak0.5_split2",
    "lung_rw_peak0.5_split2",
    "selftrain_r1",
    "selftrain_r2",
):
    INFER_VARIANTS[f"{_name}_f1gate"] = {**INFER_VARIANTS[_name], "gate": "f1"}
# Box settings (rule, peak fraction, number of boxes) CHOSEN ON THE VALIDATION SPLIT'S BOXES
# (evaluate.tune_box_config, the --tune-boxes-on-val grid): flagged by "tunedval" in the name;
# their "val RSNA" is optimistic by construction and does not compete for the default.
INFER_VARIANTS["lung_tunedval"] = {**INFER_VARIANTS["lung_peak0.5_split2"], "tune": True}
INFER_VARIANTS["lung_rw_tunedval"] = {**INFER_VARIANTS["lung_rw_peak0.5_split2"], "tune": True}
SELFTRAIN_EPOCHS = 12


def _train_job(args: tuple[str, int, str, int, str, dict[str, Any]]) -> dict[str, Any]:
    variant, seed, cache_dir, epochs, out_dir, settings = args
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    import torch

    from pneumoloc.train import train
    from pneumoloc.training.config import load_train_config

    run = Path(out_dir) / f"{variant}-s{seed}"
    config = load_train_config(
        None,
        {
            "data": cache_dir,
            "out": str(run),
            "epochs": epochs,
            "batch_size": 32,
            "lr": 1e-3,
            "seed": seed,
            "progress": False,
            "patience": max(5, epochs // 3),
            "device": "cuda" if torch.cuda.is_available() else "cpu",
            **settings,
        },
    )
    started = time.perf_counter()
    try:
        result = train(config)
    except Exception:
        return {"variant": variant, "seed": seed, "error": traceback.format_exc()[-2000:]}
    return {
        "variant": variant,
        "seed": seed,
        "checkpoint": str(result.best_checkpoint),
        "best_epoch": result.best_epoch,
        "val": result.best_metrics,
        "seconds": time.perf_counter() - started,
    }


def _trained_from_disk(variant: str, seed: int, runs: Path) -> dict[str, Any]:
    """The record ``_train_job`` returns, rebuilt from a finished run's best checkpoint."""
    import torch

    path = runs / f"{variant}-s{seed}" / "best.pt"
    if not path.is_file():
        return {"variant": variant, "seed": seed, "error": f"{path}: no checkpoint"}
    payload = torch.load(path, map_location="cpu", weights_only=True)
    return {
        "variant": variant,
        "seed": seed,
        "checkpoint": str(path),
        "best_epoch": int(payload.get("epoch", -1)) + 1,
        "val": payload.get("metrics", {}).get("val", {}),
    }


def _evaluate_model(
    checkpoint: str,
    cache_dir: str,
    part: str,
    detectors: dict[int, str] | None = None,
    box_threshold: float | None = None,
    tuned: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Every inference variant of one checkpoint on one split part: heatmaps once per CAM mode.

    ``detectors`` maps a self-training round to the checkpoint (classifier + detector) that
    ``pneumoloc.selftrain`` wrote; variants with a "detector" key need it. ``box_threshold``
    (F1-optimal on the validation image labels) is used by variants with ``"gate": "f1"``.
    """
    from pneumoloc.data.cache import open_cache
    from pneumoloc.inference import Predictor
    from pneumoloc.localise.boxes import BoxConfig
    from pneumoloc.metrics.classification import classification_metrics
    from pneumoloc.metrics.localisation import localisation_metrics

    cache = open_cache(cache_dir)
    rows = cache.split.part(part)
    images = np.asarray(cache.images[rows])
    labels = cache.labels[rows]
    shapes = [(int(s[0]), int(s[1])) for s in cache.original_shapes[rows]]
    gts = cache.load_eval_boxes(rows, scale="original")
    out: dict[str, Any] = {}
    maps_cache: dict[tuple[Any, ...], tuple[np.ndarray, np.ndarray]] = {}
    loaded: dict[str, Any] = {}
    for name, spec in INFER_VARIANTS.items():
        detector_round = spec.get("detector")
        if detector_round and not (detectors or {}).get(detector_round):
            continue
        if spec.get("tune") and name not in (tuned or {}):
            continue
        key = (
            spec.get("cam", "cam"),
            bool(spec.get("tta")),
            bool(spec.get("lung")),
            spec.get("refine"),
            spec.get("cam_layers"),
        )
        recipe = {
            "cam_method": key[0],
            "tta": key[1],
            "lung_mask": key[2],
            "refine": key[3],
            "cam_layers": key[4],
            "box_config": (tuned or {})[name] if spec.get("tune") else BoxConfig(**spec["box"]),
        }
        source = (detectors or {})[detector_round] if detector_round else checkpoint
        if source not in loaded:  # each checkpoint is read once; variants only change settings
            loaded[source] = Predictor.from_checkpoint(source, use_detector=bool(detector_round))
        base = loaded[source]
        predictor = dataclasses.replace(
            base, meta=dict(base.meta), recipe=base.recipe.replace(**recipe), batch_size=32
        )
        if spec.get("gate") == "f1":
            if box_threshold is None:
                continue
            predictor.recipe = predictor.recipe.replace(box_gate="f1")
            predictor.meta["box_threshold"] = box_threshold
        if key not in maps_cache:
            maps_cache[key] = predictor.heatmaps(images)
        probs, maps = maps_cache[key]
        threshold = predictor.threshold
        boxes = predictor.draw_boxes(images, probs, maps, shapes)
        # Heatmap metrics (pointing game, MaxBoxAcc) on images with truth.
        loc = localisation_metrics(
            [b.boxes for b in boxes],
            [b.scores for b in boxes],
            list(maps),
            gts,
            image_shapes=shapes,
        )
        # The same boxes gated by the TRUE label: how far a perfect classifier would get.
        predictor.threshold_override = 0.5
        predictor.recipe = predictor.recipe.replace(box_gate="decision")
        oracle = predictor.draw_boxes(images, labels.astype(np.float64), maps, shapes)
        loc_oracle = localisation_metrics(
            [b.boxes for b in oracle], [b.scores for b in oracle], None, gts
        )
        cls = classification_metrics(labels, probs, threshold, n_boot=200)
        out[name] = {
            "auroc": cls["auroc"],
            "rsna_map": loc["rsna_map"],
            "rsna_map_label_gated": loc_oracle["rsna_map"],
            "notebook_mean_iou": loc["notebook_mean_iou"],
            "pointing_game": loc["pointing_game"],
            "box_acc_0.3": (loc["max_box_acc"] or {}).get("iou_0.3"),
            "box_acc_0.5": (loc["max_box_acc"] or {}).get("iou_0.5"),
            "n_images": loc["n_images"],
            "n_with_truth": loc["n_with_truth"],
        }
    return out


def _tune_on_val(checkpoint: str, cache_dir: str) -> dict[str, Any]:
    """Box settings of the "tune" variants, chosen by the RSNA score on the VALIDATION boxes."""
    from pneumoloc.data.cache import open_cache
    from pneumoloc.evaluate import EvalPredictions, tune_box_config
    from pneumoloc.inference import Predictor
    from pneumoloc.localise.boxes import BoxConfig

    cache = open_cache(cache_dir)
    rows = cache.split.part("val")
    images = np.asarray(cache.images[rows])
    shapes = np.array([(int(s[0]), int(s[1])) for s in cache.original_shapes[rows]])
    gts = cache.load_eval_boxes(rows, scale="original")
    chosen: dict[str, Any] = {}
    for name, spec in INFER_VARIANTS.items():
        if not spec.get("tune"):
            continue
        predictor = Predictor.from_checkpoint(
            checkpoint, lung_mask=bool(spec.get("lung")), refine=spec.get("refine"), batch_size=32
        )
        probs, maps = predictor.heatmaps(images)
        preds = EvalPredictions(
            rows=rows,
            labels=cache.labels[rows],
            probs=probs,
            boxes=[],
            heatmaps=list(maps),
            gts=gts,
            shapes=shapes,
        )
        chosen[name], _ = tune_box_config(preds, predictor.threshold, BoxConfig(**spec["box"]))
    return chosen


def _validation_box_threshold(checkpoint: str, cache_dir: str) -> float:
    """The F1-optimal threshold on the validation split's image labels (what ``train`` now
    stores as ``box_threshold``; computed here for checkpoints saved before it did)."""
    import torch

    from pneumoloc.data.cache import open_cache
    from pneumoloc.inference import Predictor
    from pneumoloc.metrics.classification import f1_threshold

    stored = torch.load(checkpoint, map_location="cpu", weights_only=True).get("box_threshold")
    if stored is not None:
        return float(stored)
    cache = open_cache(cache_dir)
    rows = cache.split.part("val")
    probs, _ = Predictor.from_checkpoint(checkpoint, batch_size=32, lung_mask=False).heatmaps(
        np.asarray(cache.images[rows])
    )
    return f1_threshold(cache.labels[rows], probs)


def _self_train_job(job: dict[str, Any], cache_dir: str) -> dict[int, str]:
    """Self-train detectors (rounds 1 and 2) on the checkpoint's training split."""
    from pneumoloc.selftrain import SelfTrainConfig, self_train

    out = Path(job["checkpoint"]).with_name("selftrain.pt")
    config = SelfTrainConfig(epochs=SELFTRAIN_EPOCHS, rounds=2, seed=int(job["seed"]))
    result = self_train(job["checkpoint"], cache_dir, out, config)
    return {k + 1: str(p) for k, p in enumerate(result.round_checkpoints)}


def _eval_job(args: tuple[dict[str, Any], str]) -> dict[str, Any]:
    job, cache_dir = args
    if "error" in job:
        return job
    try:
        detectors = _self_train_job(job, cache_dir) if job.get("selftrain") else None
        gate = _validation_box_threshold(job["checkpoint"], cache_dir)
        tuned = _tune_on_val(job["checkpoint"], cache_dir)
        ckpt = job["checkpoint"]
        return {
            **job,
            "box_threshold": gate,
            "tuned_on_val": {k: dataclasses.asdict(v) for k, v in tuned.items()},
            "test": _evaluate_model(ckpt, cache_dir, "test", detectors, gate, tuned),
            "val_loc": _evaluate_model(ckpt, cache_dir, "val", detectors, gate, tuned),
        }
    except Exception:
        return {**job, "error": traceback.format_exc()[-2000:]}


def throughput(
    cache_dir: str, out_dir: str, *, steps: int, batch: int, compile_model: bool, size: int = 256
) -> dict[str, Any]:
    """Training images/s of resnet18 @256 with AMP + channels-last on a tiled copy of the cache."""
    import pandas as pd
    import torch

    from pneumoloc.data.cache import Cache, open_cache
    from pneumoloc.data.splits import Split
    from pneumoloc.train import train
    from pneumoloc.training.config import load_train_config

    base = open_cache(cache_dir)
    reps = 20
    images = np.concatenate([np.asarray(base.images)] * reps)
    table = pd.concat([base.table] * reps, ignore_index=True)
    table["image_id"] = [f"{i}-{k}" for k in range(reps) for i in base.table["image_id"]]
    table["patient_id"] = table["image_id"]
    n = len(table)
    split = Split(
        train=np.arange(n - 256),
        val=np.arange(n - 256, n),
        test=np.arange(0),
        seed=0,
        fractions=(1.0, 0.0, 0.0),
    )
    cache = Cache(
        root=Path(cache_dir),
        manifest={**base.manifest, "fingerprint": "tiled"},
        images=images,
        table=table,
        split=split,
    )
    config = load_train_config(
        None,
        {
            "data": cache_dir,
            "out": str(Path(out_dir) / f"throughput-compile{int(compile_model)}"),
            "model": "resnet18",
            "image_size": size,
            "epochs": 3,
            "batch_size": batch,
            "max_steps_per_epoch": steps,
            "progress": False,
            "compile": compile_model,
            "amp": "bf16",
            "channels_last": True,
            "device": "cuda" if torch.cuda.is_available() else "cpu",
        },
    )
    result = train(config, cache=cache)
    rates = [h["train_images_per_s"] for h in result.history]
    return {
        "images_per_s_per_epoch": rates,
        "batch": batch,
        "steps": steps,
        "compile": compile_model,
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "data_on_device": True,
    }


def _export_small(evaluated: list[dict[str, Any]], out: Path) -> None:
    """Seed-0 checkpoints of the small candidates, weights in float16 (files come back <= 16 MB)."""
    import torch

    for job in evaluated:
        if (
            job.get("seed") == 0
            and "checkpoint" in job
            and (job["variant"] in SMALL_MODELS or job["variant"].startswith("notebook"))
        ):
            payload = torch.load(job["checkpoint"], map_location="cpu", weights_only=True)
            payload["state_dict"] = {
                k: v.half() if v.is_floating_point() else v
                for k, v in payload["state_dict"].items()
            }
            torch.save(payload, out / f"{job['variant']}.pt")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rsna", type=Path, required=True)
    parser.add_argument("--kermany", type=Path, default=None)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--work", type=Path, default=Path("/tmp/pneumoloc-exp"))
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--jobs", type=int, default=6)
    parser.add_argument(
        "--smoke", action="store_true", help="tiny settings to check the script on a CPU"
    )
    parser.add_argument(
        "--skip", default="", help="comma list of parts to skip: throughput,baselines,ablation"
    )
    parser.add_argument(
        "--profile",
        choices=["gpu", "cpu192"],
        default="gpu",
        help="cpu192: resnet18 variants at 192 px for a CPU-only machine",
    )
    parser.add_argument(
        "--stage",
        choices=["all", "train", "eval"],
        default="all",
        help="train: checkpoints only; eval: evaluate the checkpoints already under --work",
    )
    parser.add_argument("--variants", default="", help="comma list: only these training variants")
    parser.add_argument(
        "--selftrain",
        default="",
        help="comma list of training variants to self-train detectors for ('all': every one)",
    )
    args = parser.parse_args()
    if args.profile == "cpu192":
        TRAIN_VARIANTS.clear()
        TRAIN_VARIANTS.update(CPU_TRAIN_VARIANTS)
    logging.basicConfig(level=logging.WARNING)
    from pneumoloc.data.cache import prepare_cache

    skip = set(filter(None, args.skip.split(",")))
    args.out.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {"started": time.time(), "smoke": args.smoke, "profile": args.profile}

    def save() -> None:
        (args.out / "results.json").write_text(json.dumps(results, indent=1, default=str))

    variants = (
        [v for v in args.variants.split(",") if v] or list(TRAIN_VARIANTS)
        if not args.smoke
        else ["notebook_smallcamnet128", "resnet18_256_os8"]
    )
    if args.smoke:
        for v in TRAIN_VARIANTS.values():
            v["image_size"] = min(v["image_size"], 64) if v["model"] != "smallcamnet" else 32
    sizes = sorted({TRAIN_VARIANTS[v]["image_size"] for v in variants})
    t0 = time.perf_counter()
    caches = {
        s: str(prepare_cache(args.rsna, args.work / f"rsna{s}", size=s, progress=False).root)
        for s in sizes
    }
    results["prepare_seconds"] = time.perf_counter() - t0
    save()

    epochs = 2 if args.smoke else args.epochs
    ctx = get_context("spawn")
    if "ablation" not in skip:
        jobs = [
            (
                v,
                s,
                caches[TRAIN_VARIANTS[v]["image_size"]],
                epochs,
                str(args.work / "runs"),
                TRAIN_VARIANTS[v],
            )
            for s in range(args.seeds)
            for v in variants
        ]
        t0 = time.perf_counter()
        if args.stage == "eval":
            trained = [_trained_from_disk(v, s, Path(out)) for v, s, _, _, out, _ in jobs]
        else:
            with ProcessPoolExecutor(max_workers=args.jobs, mp_context=ctx) as pool:
                trained = list(pool.map(_train_job, jobs))
        results["train_seconds"] = time.perf_counter() - t0
        chosen = set(args.selftrain.split(",")) if args.selftrain else set()
        for job in trained:
            job["selftrain"] = "all" in chosen or job["variant"] in chosen
        results["trained"] = trained
        save()
        if args.stage == "train":
            print("training done", results["train_seconds"], flush=True)
            return
        t0 = time.perf_counter()
        with ProcessPoolExecutor(max_workers=args.jobs, mp_context=ctx) as pool:
            evaluated = list(
                pool.map(
                    _eval_job,
                    [(j, caches[TRAIN_VARIANTS[j["variant"]]["image_size"]]) for j in trained],
                )
            )
        results["eval_seconds"] = time.perf_counter() - t0
        results["ablation"] = evaluated
        save()
        print("ablation done", results["train_seconds"], results["eval_seconds"], flush=True)
        _export_small(evaluated, args.out)

    if "baselines" not in skip and args.kermany is not None:
        sizes_k = [32, 64] if args.smoke else [128, 256]
        kcaches = {
            s: str(
                prepare_cache(args.kermany, args.work / f"kermany{s}", size=s, progress=False).root
            )
            for s in sizes_k
        }
        kjobs = [
            (
                v,
                0,
                kcaches[sizes_k[0] if v.startswith("notebook") else sizes_k[1]],
                2 if args.smoke else 15,
                str(args.work / "kermany-runs"),
                {
                    **TRAIN_VARIANTS[v],
                    "image_size": sizes_k[0] if v.startswith("notebook") else sizes_k[1],
                },
            )
            for v in ("notebook_smallcamnet128", "resnet18_256_os32")
        ]
        with ProcessPoolExecutor(max_workers=2, mp_context=ctx) as pool:
            results["kermany"] = list(pool.map(_train_job, kjobs))
        save()
    if "throughput" not in skip:
        for compile_model in (False, True):
            try:
                results[f"throughput_compile{int(compile_model)}"] = throughput(
                    caches[sizes[-1] if args.smoke else 256],
                    str(args.work),
                    steps=3 if args.smoke else 40,
                    batch=16 if args.smoke else 256,
                    compile_model=compile_model,
                    size=sizes[-1] if args.smoke else 256,
                )
            except Exception:
                results[f"throughput_compile{int(compile_model)}"] = {
                    "error": traceback.format_exc()[-2000:]
                }
            print("throughput", results[f"throughput_compile{int(compile_model)}"], flush=True)
            save()

    results["finished"] = time.time()
    save()
    print("done", flush=True)


if __name__ == "__main__":
    main()
