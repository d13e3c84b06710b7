"""The ``pneumoloc`` command. Heavy libraries are imported inside each subcommand, so
``pneumoloc --help`` is instant."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, TypeAlias

from pneumoloc import DISCLAIMER, __version__
from pneumoloc.errors import PneumolocError

logger = logging.getLogger("pneumoloc")

Handler = Callable[[argparse.Namespace], int]
if TYPE_CHECKING:
    Subparsers: TypeAlias = argparse._SubParsersAction[argparse.ArgumentParser]


def _fractions(text: str) -> tuple[float, float, float]:
    parts = [float(p) for p in text.split(",")]
    if len(parts) != 3:
        raise argparse.ArgumentTypeError(
            "expected three comma-separated fractions, e.g. 0.7,0.15,0.15"
        )
    return parts[0], parts[1], parts[2]


def _image_size(text: str) -> int | None:
    if text == "auto":
        return None
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError("expected 'auto' or a number of pixels") from None


# ---- shared arguments and option groups ------------------------------------------------------

_CHECKPOINT_HELP = "checkpoint file, or 'default' for the shipped model"
_DEVICE_HELP = "auto, cpu or cuda"


def _add_checkpoint_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", help=_CHECKPOINT_HELP)


def _add_cam_option(p: argparse.ArgumentParser, *, default_from: str = "checkpoint") -> None:
    p.add_argument("--cam", default=None, help=f"heatmap method (default: the {default_from}'s)")


def _add_backend_option(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--backend",
        choices=["auto", "torch", "onnx"],
        default="auto",
        help="auto (default): ONNX Runtime on a CPU when the checkpoint has an ONNX twin "
        "exported from it (the shipped model does after `make install`), else PyTorch",
    )


def _add_detector_option(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--no-detector",
        action="store_true",
        help="leave a model's self-trained detector out: boxes from the box rule and every "
        "heatmap from the CAM (faster: the shipped default's detector costs about a third of "
        "the throughput, docs/benchmarks.md)",
    )


def _add_device_option(p: argparse.ArgumentParser, *, help: str = _DEVICE_HELP) -> None:
    p.add_argument("--device", default="auto", help=help)


def _add_batch_size_option(
    p: argparse.ArgumentParser, *, default: int | None = 16, help: str | None = None
) -> None:
    p.add_argument("--batch-size", type=int, default=default, help=help)


def _add_workers_option(p: argparse.ArgumentParser, *, help: str) -> None:
    p.add_argument("--workers", type=int, default=None, help=help)


def _add_quiet_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def _add_box_options(p: argparse.ArgumentParser, *, scoring: bool) -> None:
    """``--cam``, ``--box-rule`` and ``--tta``, shared by evaluate and submit; with ``scoring``
    (evaluate) also box tuning on val and the heatmap lung-mask/refine/layers/box-gate flags."""
    _add_cam_option(p)
    p.add_argument(
        "--box-rule",
        choices=["peak", "otsu", "notebook", "multi"],
        default=None,
        help="heatmap -> boxes rule (default: the checkpoint's)" if scoring else None,
    )
    if scoring:
        p.add_argument(
            "--tune-boxes-on-val",
            action="store_true",
            help="choose box settings by the RSNA score on the validation split (test split only)",
        )
    p.add_argument("--tta", action="store_true", help="test-time augmentation of the heatmaps")
    if scoring:
        _add_heatmap_options(p)


def _add_heatmap_options(p: argparse.ArgumentParser) -> None:
    """Heatmap post-processing and box gating (default each: the checkpoint's recipe)."""
    p.add_argument(
        "--lung-mask",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="restrict heatmaps to label-free lung masks (default: the checkpoint's)",
    )
    p.add_argument(
        "--refine",
        choices=["none", "randomwalk"],
        default=None,
        help="heatmap refinement: image-guided random walk (default: the checkpoint's)",
    )
    p.add_argument(
        "--cam-layers",
        choices=["final", "stages"],
        default=None,
        help="stages: fuse the CAM of the last three backbone stages (with --cam layercam etc.)",
    )
    p.add_argument(
        "--box-gate",
        choices=["decision", "f1"],
        default=None,
        help="boxes above the decision threshold, or above the F1-optimal box_threshold",
    )
    p.add_argument(
        "--cam-align",
        choices=["centre", "cells"],
        default=None,
        help="classic CAM upsampling: align_corners=False (centre) or from each feature cell's "
        "true centre (cells); default: the checkpoint's",
    )
    p.add_argument(
        "--cam-floor",
        choices=["relu", "shift", "auto"],  # pneumoloc.cam.names.CAM_FLOORS
        default=None,
        help="classic CAM to heatmap: clip negative evidence (relu), subtract each map's "
        "minimum (shift: a film whose every location votes 'no' keeps its ranking), or relu "
        "where a location votes 'yes' and shift elsewhere (auto); default: the checkpoint's",
    )
    p.add_argument(
        "--heatmap-source",
        choices=["cam", "detector"],  # pneumoloc.inference.recipe.HEATMAP_SOURCES
        default=None,
        help="with a self-trained detector: its own score map as the heatmap of the films that "
        "get boxes (detector), or the CAM everywhere (cam); default: the checkpoint's",
    )


# ---- synth -----------------------------------------------------------------------------------


def _add_synth_parser(sub: Subparsers) -> None:
    p = sub.add_parser("synth", help="write a synthetic data set in the RSNA Kaggle layout")
    p.add_argument("out", type=Path, help="output folder")
    p.add_argument("--n", type=int, default=200, help="number of images")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--image-size", type=int, default=1024, help="side in pixels (RSNA: 1024)")
    p.add_argument("--prevalence", type=float, default=0.3, help="fraction of positive images")
    p.add_argument("--contrast", type=float, default=0.25, help="opacity contrast (difficulty)")
    p.add_argument("--noise", type=float, default=0.04, help="noise level (difficulty)")
    p.set_defaults(handler=_cmd_synth)


def _cmd_synth(args: argparse.Namespace) -> int:
    from pneumoloc.data.synthetic import SynthConfig, generate_rsna

    config = SynthConfig(
        n=args.n,
        seed=args.seed,
        image_size=args.image_size,
        prevalence=args.prevalence,
        opacity_contrast=args.contrast,
        noise=args.noise,
    )
    summary = generate_rsna(args.out, config)
    print(
        f"wrote {summary.n_images} synthetic images ({summary.n_positive} positive, "
        f"{summary.n_boxes} boxes) in the RSNA layout to {summary.out_dir}"
    )
    return 0


# ---- prepare ---------------------------------------------------------------------------------


def _add_prepare_parser(sub: Subparsers) -> None:
    p = sub.add_parser("prepare", help="decode a data folder once into a memory-mapped cache")
    p.add_argument("data", type=Path, help="RSNA-layout folder or NORMAL/PNEUMONIA folder")
    p.add_argument("--size", type=int, default=256, help="side of the cached square images")
    p.add_argument(
        "--out", type=Path, default=None, help="cache folder (default: under ~/.cache/pneumoloc)"
    )
    _add_workers_option(p, help="decoding processes (default: all cores)")
    p.add_argument("--split-seed", type=int, default=0, help="seed of the patient-level split")
    p.add_argument("--fractions", type=_fractions, default=(0.7, 0.15, 0.15), help="train,val,test")
    p.add_argument("--limit", type=int, default=None, help="cache only the first N labelled images")
    p.add_argument(
        "--unlabelled",
        action="store_true",
        help="any folder of images, cached without labels (for train --unlabelled)",
    )
    _add_quiet_option(p)
    p.set_defaults(handler=_cmd_prepare)


def _cmd_prepare(args: argparse.Namespace) -> int:
    from pneumoloc.data.cache import prepare_cache

    cache = prepare_cache(
        args.data,
        args.out,
        size=args.size,
        workers=args.workers,
        split_seed=args.split_seed,
        fractions=args.fractions,
        progress=not args.quiet,
        max_rows=args.limit,
        unlabelled=args.unlabelled,
    )
    m = cache.manifest
    print(f"cache: {cache.root}")
    print(
        f"  {m['n_ok']} images cached at {m['size']} px ({m['n_positive']} pneumonia), "
        f"{m['n_failed']} unreadable (skipped, see index.csv)"
    )
    if m.get("n_missing_labelled"):
        print(f"  {m['n_missing_labelled']} labelled image ids have no image on disk (not cached)")
    if m.get("n_unlabelled"):
        print(f"  {m['n_unlabelled']} images on disk have no label (not cached)")
    sizes = m["split"]["sizes"]
    print(f"  patient-level split (seed {m['split']['seed']}): {sizes}")
    run = m.get("last_run", {})
    if run.get("decoded"):
        print(
            f"  decoded {run['decoded']} images in {run['seconds']:.1f} s "
            f"({run['images_per_s']:.0f} img/s)"
        )
    return 0


# ---- train -----------------------------------------------------------------------------------


def _add_train_parser(sub: Subparsers) -> None:
    """Every training flag defaults to None: the YAML config's (or the built-in) value."""
    p = sub.add_parser("train", help="train a classifier from image-level labels (torchrun-ready)")
    p.add_argument(
        "--data",
        type=Path,
        nargs="+",
        help="data folder (RSNA or NORMAL/PNEUMONIA) or cache folder; several: one source each "
        "(split by patient each, equal shares of every epoch, validated separately)",
    )
    p.add_argument("--source-weights", type=float, nargs="+", help="share of each source")
    p.add_argument("--samples-per-epoch", type=int, help="with several sources (default: see docs)")
    p.add_argument(
        "--unlabelled", type=Path, help="folder (or unlabelled cache) of unlabelled images"
    )
    p.add_argument("--teacher", type=Path, help="checkpoint that pseudo-labels --unlabelled")
    p.add_argument(
        "--pseudo-fraction",
        type=float,
        help="share of each predicted class kept as pseudo-labels, most confident first (0.5)",
    )
    p.add_argument(
        "--calibrate",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="fit a temperature on validation into best.pt (default: on)",
    )
    p.add_argument("--config", type=Path, default=None, help="YAML config; flags override it")
    p.add_argument("--out", type=Path, default=None, help="run folder (default runs/train)")
    p.add_argument("--model", help="smallcamnet or any timm backbone name (default resnet18)")
    p.add_argument(
        "--pretrained",
        help="local state dict PATH, or 'imagenet' (offline for tf_efficientnet_lite0/1/2 with "
        "pneumoloc[pretrained]; other models download via timm)",
    )
    p.add_argument("--image-size", type=int)
    p.add_argument("--epochs", type=int)
    p.add_argument("--batch-size", type=int, help="per process")
    p.add_argument("--lr", type=float)
    p.add_argument("--weight-decay", type=float)
    p.add_argument("--loss", choices=["bce", "focal"])
    p.add_argument("--pos-weight", help="'auto' (negatives/positives) or a number")
    p.add_argument("--amp", choices=["auto", "bf16", "fp16", "off"])
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--seed", type=int)
    p.add_argument("--patience", type=int, help="early-stopping patience in epochs")
    p.add_argument("--device", help=_DEVICE_HELP)
    p.add_argument("--output-stride", type=int, choices=[8, 16, 32])
    p.add_argument(
        "--pool", help="spatial pooling of the CAM: avg, lse, topk, max or attention (MIL)"
    )
    p.add_argument(
        "--decoder",
        choices=["pylon"],
        help="pyramid decoder over the stride-8/16/32 stages (PYLON): CAM at stride 8",
    )
    p.add_argument(
        "--decoder-drop",
        type=float,
        help="top-down drop of the decoder in training (0 to <1; default 0): the stride-8 path "
        "must find the evidence itself (docs/localisation.md, round 3b)",
    )
    p.add_argument(
        "--outside-lung-loss",
        type=float,
        help="weight of an extra loss that pushes the CAM's strongest location outside the "
        "label-free lung mask to 'no pneumonia' (default 0: off; docs/localisation.md round 3f)",
    )
    p.add_argument("--split-seed", type=int)
    p.add_argument("--tensorboard", action="store_true")
    p.add_argument("--no-augment", action="store_true")
    p.add_argument("--max-steps-per-epoch", type=int)
    p.add_argument(
        "--resume",
        nargs="?",
        const="last",
        default=None,
        help="continue an interrupted run (its last.pt, or a given checkpoint)",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="start a fresh run in a non-empty --out (its checkpoints, metrics.jsonl, "
        "config.yaml and tensorboard/ are removed first); without it such an --out is refused",
    )
    p.set_defaults(handler=_cmd_train)


def _cmd_train(args: argparse.Namespace) -> int:
    from pneumoloc.train import train
    from pneumoloc.training.config import load_train_config

    data = [str(d) for d in args.data or []]
    overrides = {
        "data": data[0] if data else None,
        "extra_data": data[1:] or None,
        "source_weights": args.source_weights,
        "samples_per_epoch": args.samples_per_epoch,
        "unlabelled": str(args.unlabelled) if args.unlabelled else None,
        "teacher": str(args.teacher) if args.teacher else None,
        "pseudo_fraction": args.pseudo_fraction,
        "calibrate": args.calibrate,
        "out": str(args.out) if args.out else None,
        "model": args.model,
        "pretrained": args.pretrained,
        "image_size": args.image_size,
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "weight_decay": args.weight_decay,
        "loss": args.loss,
        "pos_weight": args.pos_weight,
        "amp": args.amp,
        "channels_last": args.channels_last,
        "compile": args.compile or None,
        "seed": args.seed,
        "patience": args.patience,
        "device": args.device,
        "output_stride": args.output_stride,
        "pool": args.pool,
        "decoder": args.decoder,
        "decoder_drop": args.decoder_drop,
        "outside_lung_loss": args.outside_lung_loss,
        "split_seed": args.split_seed,
        "tensorboard": args.tensorboard or None,
        "max_steps_per_epoch": args.max_steps_per_epoch,
        "augment": False if args.no_augment else None,
    }
    config = load_train_config(args.config, overrides)
    resume = None
    if args.resume is not None:
        resume = Path(config.out) / "last.pt" if args.resume == "last" else Path(args.resume)
    try:
        result = train(config, resume=resume, overwrite=args.overwrite)
    except KeyboardInterrupt:
        print(f"interrupted; resume with: pneumoloc train ... --out {config.out} --resume")
        return 130
    if result.best_metrics:
        m = result.best_metrics
        auroc = "n/a" if m.get("auroc") is None else f"{m['auroc']:.4f}"
        print(f"best epoch {result.best_epoch}: val AUROC {auroc}, threshold {m['threshold']:.3f}")
        for name, sm in (m.get("sources") or {}).items():
            src_auroc = "n/a" if sm.get("auroc") is None else f"{sm['auroc']:.4f}"
            print(f"  {name}: val AUROC {src_auroc} ({sm['n']} images)")
    print(f"checkpoint: {result.best_checkpoint}")
    return 0


# ---- selftrain -------------------------------------------------------------------------------


def _add_selftrain_parser(sub: Subparsers) -> None:
    p = sub.add_parser(
        "selftrain",
        help="train a box detector on the classifier's own CAM boxes (no ground-truth boxes)",
    )
    p.add_argument("checkpoint", help="a trained classifier checkpoint")
    p.add_argument("--data", type=Path, required=True, help="the cache folder it was trained on")
    p.add_argument(
        "--out", type=Path, required=True, help="checkpoint to write (classifier + detector)"
    )
    p.add_argument("--epochs", type=int, default=12)
    _add_batch_size_option(p, default=8)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument(
        "--min-probability",
        type=float,
        default=0.5,
        help="labelled-positive training images below this probability give no pseudo-boxes",
    )
    p.add_argument("--rounds", type=int, choices=[1, 2], default=1)
    p.add_argument(
        "--unlabelled",
        type=Path,
        help="an unlabelled cache (prepare --unlabelled) whose confident images add pseudo-boxes "
        "and background examples",
    )
    p.add_argument(
        "--unlabelled-min-probability",
        type=float,
        default=0.7,
        help="an unlabelled image gives pseudo-boxes at or above this probability and is "
        "background at or below 1 minus it",
    )
    p.add_argument(
        "--detector-backbone",
        default="resnet18",
        help="resnet18 (from scratch unless the classifier is one), a tf_efficientnet_lite0/1/2, "
        "or auto: the classifier's own encoder when it is one of these (started from its weights)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--candidates",
        type=int,
        default=1,
        help="train this many detectors (seeds --seed and up) and keep the one whose boxes keep "
        "the largest share of the CAM box area on the validation images the classifier flags "
        "(no label or box of them is read); needs --rounds 1",
    )
    p.add_argument(
        "--candidate-epochs",
        type=int,
        default=None,
        help="with --candidates: compare the candidates after this many epochs and train only "
        "the kept one on (default: compare them fully trained)",
    )
    _add_device_option(p)
    p.set_defaults(handler=_cmd_selftrain)


def _cmd_selftrain(args: argparse.Namespace) -> int:
    from pneumoloc.selftrain import SelfTrainConfig, self_train

    config = SelfTrainConfig(
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        min_probability=args.min_probability,
        rounds=args.rounds,
        unlabelled_min_probability=args.unlabelled_min_probability,
        detector_backbone=args.detector_backbone,
        seed=args.seed,
        candidates=args.candidates,
        candidate_epochs=args.candidate_epochs,
        device=args.device,
    )
    result = self_train(args.checkpoint, args.data, args.out, config, unlabelled=args.unlabelled)
    print(
        f"detector trained on {result.n_pseudo_positive} pseudo-boxed and {result.n_negative} "
        f"background images ({result.n_from_unlabelled} of them unlabelled) in "
        f"{result.seconds:.0f} s (no ground-truth box used)"
    )
    if result.selection is not None:
        for tried in result.selection["candidates"]:
            print(
                f"  seed {tried['seed']}: median area ratio {tried['area_ratio_median']}, "
                f"median IoU {tried['iou_median']} ({tried['n_with_detection']} of "
                f"{tried['n_images']} flagged validation images with a box)"
            )
        print(
            f"kept seed {result.selection['selected_seed']} (compared after "
            f"{result.selection['after_epochs']} epochs)"
        )
    print(f"checkpoint (classifier + detector): {result.checkpoint}")
    return 0


# ---- demo ------------------------------------------------------------------------------------


def _add_demo_parser(sub: Subparsers) -> None:
    p = sub.add_parser(
        "demo", help="the main job on an embedded default: synthetic data end to end"
    )
    p.add_argument("--out", type=Path, default=Path("runs/demo"), help="output folder")
    p.add_argument("--n", type=int, default=400, help="synthetic images")
    p.add_argument("--image-size", type=int, default=256, help="synthetic image side")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="a smaller, faster run (for tests)")
    p.set_defaults(handler=_cmd_demo)


def _cmd_demo(args: argparse.Namespace) -> int:
    from pneumoloc.demo import run_demo

    return run_demo(
        Path(args.out), n=args.n, image_size=args.image_size, seed=args.seed, quick=args.quick
    )


# ---- evaluate --------------------------------------------------------------------------------


def _add_evaluate_parser(sub: Subparsers) -> None:
    p = sub.add_parser("evaluate", help="metrics and an HTML report of a checkpoint on a split")
    _add_checkpoint_argument(p)
    p.add_argument(
        "--data", type=Path, required=True, help="data folder (RSNA or NORMAL/PNEUMONIA) or cache"
    )
    p.add_argument("--split", choices=["test", "val", "all"], default="test")
    p.add_argument("--out", type=Path, default=Path("runs/evaluate"), help="output folder")
    _add_box_options(p, scoring=True)
    p.add_argument(
        "--image-size", type=_image_size, default=None, help="'auto' (the checkpoint's) or pixels"
    )
    p.add_argument("--gallery", type=int, default=4, help="example overlays per category")
    _add_device_option(p)
    _add_batch_size_option(p)
    p.add_argument("--n-boot", type=int, default=1000, help="bootstrap resamples of the AUROC CI")
    _add_workers_option(p, help="decoding processes if the data must be cached")
    _add_quiet_option(p)
    p.set_defaults(handler=_cmd_evaluate)


def _box_overrides(args: argparse.Namespace) -> tuple[dict | None, bool | None]:
    """Box settings and lung-mask choice from the flags (None: the checkpoint's)."""
    from pneumoloc.inference.recipe import NOTEBOOK_BOX_RULE, NOTEBOOK_RECIPE

    if args.box_rule == "notebook":  # the original notebook's whole rule, not just its threshold
        lung = NOTEBOOK_RECIPE.lung_mask if args.lung_mask is None else args.lung_mask
        return dict(NOTEBOOK_BOX_RULE), lung
    return ({"rule": args.box_rule} if args.box_rule else None), args.lung_mask


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from pneumoloc.evaluate import evaluate

    if args.box_rule and args.tune_boxes_on_val:
        from pneumoloc.errors import ConfigError

        raise ConfigError("--box-rule and --tune-boxes-on-val exclude each other")
    box_config, lung_mask = _box_overrides(args)
    metrics = evaluate(
        args.checkpoint,
        args.data,
        split=args.split,
        out=args.out,
        cam_method=args.cam,
        box_config=box_config,
        tune_boxes_on_val=args.tune_boxes_on_val,
        tta=args.tta,
        lung_mask=lung_mask,
        refine=args.refine,
        cam_layers=args.cam_layers,
        box_gate=args.box_gate,
        cam_align=args.cam_align,
        cam_floor=args.cam_floor,
        heatmap_source=args.heatmap_source,
        gallery=args.gallery,
        device=args.device,
        image_size=args.image_size,
        batch_size=args.batch_size,
        n_boot=args.n_boot,
        workers=args.workers,
        progress=not args.quiet,
    )
    c, prov = metrics["classification"], metrics["provenance"]
    auroc = "n/a" if c["auroc"] is None else f"{c['auroc']:.4f}"
    if c["auroc_ci_low"] is not None:
        auroc += f" (95% CI {c['auroc_ci_low']:.4f}-{c['auroc_ci_high']:.4f})"
    print(f"{prov['split']['name']} split: {c['n']} images, AUROC {auroc}")
    ece, raw = (("n/a" if v is None else f"{v:.4f}") for v in (c["ece"], c["ece_uncalibrated"]))
    print(f"  ECE {ece} (uncalibrated {raw}, temperature {c['temperature']:.3f})")
    by_view = c.get("by_view")
    if by_view:
        parts = [
            f"{view} {'n/a' if m['auroc'] is None else format(m['auroc'], '.4f')} "
            f"({m['n']} images, {m['n_positive']} positive)"
            for view, m in by_view["views"].items()
        ]
        shortcut = by_view["view_only_auroc"]
        print(
            f"  AUROC by view: {', '.join(parts)}; view alone "
            f"{'n/a' if shortcut is None else format(shortcut, '.4f')}"
        )
    patient = c.get("patient_level")
    if patient:
        value = "n/a" if patient["auroc"] is None else f"{patient['auroc']:.4f}"
        print(f"  patient-level AUROC {value} ({patient['n_patients']} patients, mean probability)")
    loc = metrics.get("localisation")
    if loc is not None:
        rsna = "n/a" if loc["rsna_map"] is None else f"{loc['rsna_map']:.4f}"
        tuned = " (box settings tuned on val)" if prov["boxes_tuned_on_val"] else ""
        print(f"  RSNA score {rsna}{tuned}")
        va = loc.get("vs_anatomy")
        if va:

            def f(x: float | None) -> str:
                return "n/a" if x is None else f"{x:.3f}"

            model, lungs = va["model"], va["lung_fields"]
            print(
                f"  label-gated RSNA score {f(model['rsna_map_label_gated'])} (lung-field boxes "
                f"{f(lungs['rsna_map_label_gated'])}); pointing game "
                f"{f(model['pointing_game'])} (random point of the lung "
                f"{f(lungs['pointing_game'])})"
            )
    else:
        print("  no ground-truth boxes in this data: localisation not scored")
    print(f"metrics: {Path(args.out) / 'metrics.json'}")
    print(f"report:  {Path(args.out) / 'report' / 'index.html'}")
    return 0


# ---- submit ----------------------------------------------------------------------------------


def _add_submit_parser(sub: Subparsers) -> None:
    p = sub.add_parser("submit", help="write a Kaggle RSNA submission CSV for a folder of images")
    _add_checkpoint_argument(p)
    p.add_argument("--images", type=Path, required=True, help="folder of DICOM (or image) files")
    p.add_argument("--out", type=Path, default=Path("submission.csv"), help="CSV to write")
    _add_box_options(p, scoring=False)
    _add_device_option(p)
    _add_batch_size_option(p)
    _add_workers_option(p, help="decoding processes (default: up to 8)")
    _add_quiet_option(p)
    p.set_defaults(handler=_cmd_submit)


def _cmd_submit(args: argparse.Namespace) -> int:
    from pneumoloc.submit import submit

    result = submit(
        args.checkpoint,
        args.images,
        args.out,
        cam_method=args.cam,
        box_config={"rule": args.box_rule} if args.box_rule else None,
        tta=args.tta,
        device=args.device,
        batch_size=args.batch_size,
        workers=args.workers,
        progress=not args.quiet,
    )
    print(
        f"wrote {result.path}: {result.n_images} rows, {result.n_with_boxes} with boxes "
        f"({result.n_boxes} boxes) in {result.seconds:.1f} s"
    )
    if result.failed:
        print(f"{len(result.failed)} unreadable file(s); their rows are empty:", file=sys.stderr)
        for name, reason in result.failed[:20]:
            print(f"  {name}: {reason}", file=sys.stderr)
        return 1
    return 0


# ---- serve -----------------------------------------------------------------------------------


def _add_serve_parser(sub: Subparsers) -> None:
    p = sub.add_parser("serve", help="a local web page and JSON API for one model")
    p.add_argument("--model", default="default", help=_CHECKPOINT_HELP)
    p.add_argument(
        "--host", default="127.0.0.1", help="address to bind (non-loopback needs a token)"
    )
    p.add_argument("--port", type=int, default=8000)
    p.add_argument(
        "--token-file",
        type=Path,
        default=None,
        help="file whose first line is the access token for /api (default: $PNEUMOLOC_TOKEN)",
    )
    p.add_argument(
        "--token",
        default=None,
        help="deprecated: the token on the command line is visible to every user in `ps`; "
        "use $PNEUMOLOC_TOKEN or --token-file",
    )
    p.add_argument(
        "--allowed-host",
        action="append",
        default=[],
        metavar="NAME",
        help="also accept requests whose Host header is NAME (repeatable; loopback names and "
        "the bind address always are; '*' accepts any and needs a token)",
    )
    p.add_argument(
        "--max-upload-mb", type=float, default=32.0, help="largest accepted upload, MiB (> 0)"
    )
    _add_backend_option(p)
    _add_detector_option(p)
    _add_cam_option(p)
    _add_device_option(p)
    p.add_argument(
        "--no-input-check",
        action="store_true",
        help="answer every readable upload, frontal chest radiograph or not",
    )
    p.set_defaults(handler=_cmd_serve)


def _cmd_serve(args: argparse.Namespace) -> int:
    from pneumoloc.serve import run_server

    if args.token:
        logger.warning(
            "--token is deprecated: a token on the command line is visible to every user of "
            "this machine (ps, /proc/PID/cmdline); set PNEUMOLOC_TOKEN or use --token-file"
        )
    run_server(
        args.model,
        host=args.host,
        port=args.port,
        token=args.token,
        token_file=args.token_file,
        allowed_hosts=args.allowed_host,
        max_upload_mb=args.max_upload_mb,
        cam_method=args.cam,
        device=args.device,
        backend=args.backend,
        input_check=not args.no_input_check,
        use_detector=not args.no_detector,
    )
    return 0


# ---- predict ---------------------------------------------------------------------------------


def _add_predict_parser(sub: Subparsers) -> None:
    p = sub.add_parser(
        "predict",
        help="predict DICOM/PNG/JPEG files: JSON records, overlays and summary.csv",
        description="Each image is first checked to be a frontal chest radiograph (DICOM "
        "tags, image evidence, and the model's features when calibrate-ood was run); a refused "
        "image gets a 'refused' row with the reason and no probability. Exit status: 0 when "
        "every input was predicted, 1 when any file could not be read (listed in summary.csv, "
        "skipped), 3 when any was refused by the input check (and none failed), 2 on usage "
        "errors (bad option, missing input or model, an --out holding an earlier run), 130 on "
        "Ctrl-C (summary.csv written; continue with --resume).",
    )
    p.add_argument("inputs", nargs="+", type=Path, help="files or folders (searched recursively)")
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument(
        "--model",
        default="default",
        help="checkpoint (torch) or exported .onnx (onnx), or 'default' for the shipped model",
    )
    _add_backend_option(p)
    _add_detector_option(p)
    _add_cam_option(p, default_from="model")
    _add_device_option(p, help=f"{_DEVICE_HELP} (torch backend)")
    _add_batch_size_option(p, default=None, help="default: 8 on a GPU, 1 on the CPU (faster)")
    p.add_argument(
        "--keep-identifiers",
        action="store_true",
        help="copy DICOM identifiers (PatientID, PatientName, ...) into the JSON records",
    )
    p.add_argument("--no-overlay", action="store_true", help="do not write overlay PNGs")
    p.add_argument(
        "--dicom-out",
        type=Path,
        default=None,
        help="folder for a DICOM SR + Secondary Capture per DICOM input, in its study "
        "(these carry its identifiers; needs pneumoloc[pacs])",
    )
    p.add_argument(
        "--no-input-check",
        action="store_true",
        help="give a probability for every readable image, frontal chest film or not",
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue an earlier run in --out: inputs with finished records are skipped",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="delete an earlier run's records, overlays and summary in --out first",
    )
    p.add_argument(
        "--pseudonymise",
        action="store_true",
        help="name outputs by keyed pseudonyms (HMAC-SHA256) instead of the file names; the "
        "key is kept in --out/.pseudonym-key unless --pseudonym-key-file is given",
    )
    p.add_argument(
        "--pseudonym-key-file", type=Path, default=None, help="file holding the pseudonym key"
    )
    _add_workers_option(p, help="reading/writing workers (default: all cores)")
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="network threads (default: all cores; 1 can be faster on a busy machine)",
    )
    p.add_argument(
        "--parallel",
        choices=("auto", "threads", "processes"),
        default="auto",
        help="whether the workers are threads or processes (auto: processes for 32 inputs or "
        "more with the onnx backend); the outputs are the same",
    )
    _add_quiet_option(p)
    p.set_defaults(handler=_cmd_predict)


def _cmd_predict(args: argparse.Namespace) -> int:
    from pneumoloc.predict import predict_paths

    key = None
    if args.pseudonym_key_file is not None:
        try:
            key = args.pseudonym_key_file.read_text().strip()
        except OSError as exc:
            raise PneumolocError(
                f"{args.pseudonym_key_file}: cannot read the key ({exc})"
            ) from None
    result = predict_paths(
        args.inputs,
        args.out,
        model=args.model,
        backend=args.backend,
        use_detector=not args.no_detector,
        cam_method=args.cam,
        device=args.device,
        batch_size=args.batch_size,
        keep_identifiers=args.keep_identifiers,
        overlays=not args.no_overlay,
        workers=args.workers,
        threads=args.threads,
        parallel=args.parallel,
        progress=not args.quiet,
        dicom_out=args.dicom_out,
        input_check=not args.no_input_check,
        resume=args.resume,
        overwrite=args.overwrite,
        pseudonymise_ids=args.pseudonymise or key is not None,
        pseudonym_key=key,
    )
    print(
        f"{len(result.rows)} image(s): {result.n_ok} predicted, {result.n_failed} failed, "
        f"{result.n_refused} refused (not frontal chest radiographs), "
        f"in {result.seconds:.1f} s ({result.backend}, {result.model_id})"
    )
    print(f"summary: {result.summary}")
    if result.n_failed:
        print(f"{result.n_failed} file(s) could not be read (skipped):", file=sys.stderr)
        for row in [r for r in result.rows if r.status == "failed"][:20]:
            print(f"  {row.source}: {row.error}", file=sys.stderr)
    if result.n_refused:
        print(
            f"{result.n_refused} image(s) refused, no probability given (--no-input-check "
            "to predict them anyway):",
            file=sys.stderr,
        )
        for row in [r for r in result.rows if r.status == "refused"][:20]:
            print(f"  {row.source}: {row.error}", file=sys.stderr)
    return result.exit_code


# ---- listen ----------------------------------------------------------------------------------


def _add_listen_parser(sub: Subparsers) -> None:
    p = sub.add_parser(
        "listen",
        help="a DICOM C-STORE listener: analyse each chest X-ray received, send SR + "
        "Secondary Capture to the PACS",
        description="Runs until SIGINT or SIGTERM, then finishes the queued images. See "
        "docs/pacs.md for the statuses it answers with. Needs pneumoloc[pacs].",
    )
    p.add_argument("--ae-title", default="PNEUMOLOC", help="this listener's AE title")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback only)")
    p.add_argument("--port", type=int, default=11112, help="DICOM port to listen on")
    p.add_argument(
        "--dest",
        default=None,
        metavar="AE@HOST:PORT",
        help="where results are sent with C-STORE (the PACS), e.g. ORTHANC@127.0.0.1:4242",
    )
    p.add_argument(
        "--dicom-out", type=Path, default=None, help="also write every result to this folder"
    )
    p.add_argument(
        "--allow-caller",
        action="append",
        default=[],
        metavar="AE",
        help="accept associations only from this calling AE title (repeatable; default any)",
    )
    p.add_argument(
        "--queue-size", type=int, default=16, help="images waiting for the model, at most"
    )
    p.add_argument("--model", default="default", help=_CHECKPOINT_HELP)
    _add_backend_option(p)
    _add_detector_option(p)
    _add_cam_option(p, default_from="model")
    _add_device_option(p, help=f"{_DEVICE_HELP} (torch backend)")
    p.set_defaults(handler=_cmd_listen)


def _cmd_listen(args: argparse.Namespace) -> int:
    from pneumoloc.listen import Destination, ListenConfig, run_listener

    config = ListenConfig(
        ae_title=args.ae_title,
        host=args.host,
        port=args.port,
        destination=Destination.parse(args.dest) if args.dest else None,
        model=args.model,
        backend=args.backend,
        device=args.device,
        cam_method=args.cam,
        use_detector=not args.no_detector,
        queue_size=args.queue_size,
        dicom_out=args.dicom_out,
        allowed_callers=tuple(args.allow_caller),
    )
    return run_listener(config)


# ---- export ----------------------------------------------------------------------------------


def _add_export_parser(sub: Subparsers) -> None:
    p = sub.add_parser(
        "export", help="export a checkpoint's classifier and CAM heatmap as one ONNX graph"
    )
    _add_checkpoint_argument(p)
    p.add_argument("--onnx", type=Path, required=True, help="the .onnx file to write")
    p.add_argument("--opset", type=int, default=18, help="ONNX opset (>= 17)")
    p.add_argument("--torchscript", action="store_true", help="use the legacy TorchScript exporter")
    p.set_defaults(handler=_cmd_export)


def _cmd_export(args: argparse.Namespace) -> int:
    from pneumoloc.export import export_onnx

    result = export_onnx(args.checkpoint, args.onnx, opset=args.opset, dynamo=not args.torchscript)
    print(
        f"wrote {result.path} (opset {result.opset}, {result.exporter} exporter; "
        f"max |ONNX Runtime - PyTorch|: probability {result.max_abs_diff_probability:.1e}, "
        f"heatmap {result.max_abs_diff_heatmap:.1e})"
    )
    if result.detector_path is not None:
        print(
            f"wrote {result.detector_path} (its box detector; keep it beside {result.path.name}; "
            f"max |ONNX Runtime - PyTorch| box corner {result.max_abs_diff_detector_px:.1e} px)"
        )
    return 0


def _add_quantize_parser(sub: Subparsers) -> None:
    p = sub.add_parser(
        "quantize",
        help="write an int8 copy of an exported ONNX model and measure its parity",
        description="Post-training static int8 quantisation with ONNX Runtime, calibrated on "
        "the data's training split; parity with float32 is measured on its validation split, "
        "printed and stored in the file. Run the result with --backend onnx --model FILE "
        "(never chosen by --backend auto).",
    )
    p.add_argument("onnx", type=Path, help="a file written by `pneumoloc export --onnx`")
    p.add_argument("--data", required=True, help="cache or data folder (train: calibration)")
    p.add_argument("--out", type=Path, required=True, help="the int8 .onnx file to write")
    p.add_argument("--n-calibration", type=int, default=256)
    p.add_argument("--n-parity", type=int, default=256)
    p.set_defaults(handler=_cmd_quantize)


def _cmd_quantize(args: argparse.Namespace) -> int:
    from pneumoloc.quantize import quantize_onnx

    r = quantize_onnx(
        args.onnx,
        args.out,
        args.data,
        n_calibration=args.n_calibration,
        n_parity=args.n_parity,
    )
    print(
        f"wrote {r.path}: int8 vs float32 on {r.n_parity} held-out images: probability max "
        f"|diff| {r.max_abs_diff_probability:.4f} (mean {r.mean_abs_diff_probability:.4f}), "
        f"heatmap max |diff| {r.max_abs_diff_heatmap:.4f}, {r.decisions_changed} decision(s) "
        "changed"
    )
    return 0


def _add_calibrate_parser(sub: Subparsers) -> None:
    p = sub.add_parser(
        "calibrate",
        help="fit a checkpoint's temperature on its validation split (same decisions)",
    )
    _add_checkpoint_argument(p)
    p.add_argument("--data", required=True, help="the cache (or data folder) it was trained on")
    p.add_argument("--out", type=Path, required=True, help="the calibrated checkpoint to write")
    _add_device_option(p)
    _add_batch_size_option(p)
    p.set_defaults(handler=_cmd_calibrate)


def _cmd_calibrate(args: argparse.Namespace) -> int:
    from pneumoloc.calibrate import calibrate

    result = calibrate(
        args.checkpoint, args.data, args.out, device=args.device, batch_size=args.batch_size
    )
    print(
        f"wrote {result.path}: temperature {result.temperature:.3f}; validation ECE "
        f"{result.ece_before:.4f} -> {result.ece_after:.4f} ({result.n_images} images; "
        "ECE on a test split: pneumoloc evaluate)"
    )
    return 0


def _add_calibrate_ood_parser(sub: Subparsers) -> None:
    p = sub.add_parser(
        "calibrate-ood",
        help="fit the input check's statistics of real films' features for a checkpoint",
        description="Fits, for each cache given (one per source), the mean and covariance of "
        "the classifier's pooled features on its training split and a threshold on its "
        "validation split; writes CHECKPOINT's .ood.safetensors beside it (used by predict and "
        "serve).",
    )
    _add_checkpoint_argument(p)
    p.add_argument(
        "--data", required=True, nargs="+", help="caches (or data folders) of real films"
    )
    p.add_argument("--out", type=Path, default=None, help="default: beside the checkpoint")
    p.add_argument("--max-per-split", type=int, default=None, help="at most N films of each split")
    _add_device_option(p)
    _add_batch_size_option(p, default=8)
    p.set_defaults(handler=_cmd_calibrate_ood)


def _cmd_calibrate_ood(args: argparse.Namespace) -> int:
    from pneumoloc.calibrate_ood import calibrate_ood

    result = calibrate_ood(
        args.checkpoint,
        args.data,
        args.out,
        device=args.device,
        batch_size=args.batch_size,
        max_per_split=args.max_per_split,
    )
    for name, facts in result.sources.items():
        print(
            f"  {name}: fitted on {facts['n_fit']} films, threshold on {facts['n_heldout']} "
            f"held-out films ({facts['heldout_refused_fraction']:.1%} of them refused)"
        )
    print(f"wrote {result.path}")
    return 0


def _add_ensemble_parser(sub: Subparsers) -> None:
    p = sub.add_parser(
        "ensemble",
        help="average several checkpoints as one model file (threshold and temperature on val)",
    )
    p.add_argument(
        "checkpoints",
        nargs="+",
        help="two or more checkpoint files (with --localiser: one or more, giving the probability)",
    )
    p.add_argument(
        "--localiser",
        nargs="+",
        default=None,
        metavar="CHECKPOINT",
        help="checkpoints whose heatmaps alone make the ensemble's heatmap (and whose recipe it "
        "takes); the positional checkpoints then give the probability alone",
    )
    p.add_argument(
        "--data",
        default=None,
        nargs="+",
        help="the cache(s) (or data folders) they were trained on; several: one threshold for "
        "all (not needed for one classifier with --localiser: it keeps its own threshold)",
    )
    p.add_argument("--out", type=Path, required=True, help="the ensemble file to write")
    p.add_argument("--half", action="store_true", help="store the weights in float16")
    _add_device_option(p)
    _add_batch_size_option(p)
    p.set_defaults(handler=_cmd_ensemble)


def _cmd_ensemble(args: argparse.Namespace) -> int:
    from pneumoloc.ensemble import build_ensemble

    result = build_ensemble(
        args.checkpoints,
        args.data,
        args.out,
        device=args.device,
        batch_size=args.batch_size,
        half=args.half,
        localisers=args.localiser,
    )
    auroc = (result.val_metrics.get("val") or {}).get("auroc")
    print(
        f"wrote {result.path}: {result.n_members} members, validation AUROC "
        f"{auroc if auroc is None else round(auroc, 4)}, threshold {result.threshold:.4f}, "
        f"temperature {result.temperature:.3f}"
    )
    return 0


# ---- the top parser --------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every subcommand."""
    parser = argparse.ArgumentParser(
        prog="pneumoloc",
        description="Weakly supervised pneumonia detection and localisation on chest X-rays. "
        + DISCLAIMER,
    )
    parser.add_argument("--version", action="version", version=f"pneumoloc {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_synth_parser(sub)
    _add_prepare_parser(sub)
    _add_train_parser(sub)
    _add_selftrain_parser(sub)
    _add_calibrate_parser(sub)
    _add_calibrate_ood_parser(sub)
    _add_ensemble_parser(sub)
    _add_demo_parser(sub)
    _add_evaluate_parser(sub)
    _add_submit_parser(sub)
    _add_serve_parser(sub)
    _add_predict_parser(sub)
    _add_export_parser(sub)
    _add_quantize_parser(sub)
    _add_listen_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``pneumoloc`` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
    )
    handler: Handler = args.handler
    try:
        return handler(args)
    except PneumolocError as exc:
        logger.error("%s", exc)
        return 2
    except KeyboardInterrupt:
        logger.error("interrupted")
        return 130


if __name__ == "__main__":
    sys.exit(main())
