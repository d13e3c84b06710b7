"""Localisation ablation of issue 13, sized for a CPU: encoders x inference recipes, beside anatomy.

Trained variants (3 seeds each, RSNA sample + Kermany, tf_efficientnet_lite0 from the offline
ImageNet weights, the classifier recipe of issue 12):

* ``cam32``: the plain classifier (average pooling), CAM at stride 32;
* ``pylon``: the same encoder with the PYLON pyramid decoder (stride 8) and global max pooling
  (``train --decoder pylon --pool max``);
* ``pylon_drop``: ``pylon`` with top-down drop (``train --decoder-drop 0.5``: in training each
  UP block zeroes the upsampled deeper map of an image with probability 0.5, so the lateral
  path has to find the evidence; docs/localisation.md round 3b);
* ``cam32_lse`` and ``pylon_lse``: the same two encoders with log-sum-exp pooling (r = 5,
  ``train --pool lse``), the pooling that gave round 1's best pointing game (0.556 on test,
  resnet18 at stride 8 on a GPU);
* ``pylon_outside``: ``pylon`` with the outside-lung loss (``train --outside-lung-loss 1``: the
  CAM's strongest location outside the label-free lung mask is pushed to "no pneumonia";
  ``pneumoloc.training.anatomy_loss``);
* ``pylon_student``: ``pylon`` trained with one more source, the unlabelled RSNA images
  pseudo-labelled by ``--teacher`` (noisy student, ``train --unlabelled DIR --teacher CKPT``:
  the teacher's most confident half of each predicted class; ``pneumoloc.training.pseudo``),
  so two thirds of every epoch, not half, are adult RSNA films;
* ``ensemble(...)``: the three seeds of a variant as one model (probability and heatmap
  averaged), with and without test-time augmentation;
* ``--checkpoints NAME=PATH``: models trained elsewhere (the shipped default, say), scored
  under the same recipes on the same splits, not trained again.

Inference recipes applied to every model:

* ``plain``: the raw CAM, no lung mask, no refinement (plain CAM, the baseline);
* ``lung``: heatmap restricted to the label-free lung mask;
* ``lung+rw``: lung mask and random-walk refinement (the shipped recipe before this issue);
* ``lung+shift`` / ``lung+rw+shift``: the same with ``cam_floor="shift"`` (the heatmap is the
  CAM minus its minimum instead of its ReLU, so a film whose every location votes "no" keeps
  a ranking; docs/localisation.md round 3f).

Every ``evaluate`` call also measures, on the same images, the anatomy baselines (one box per
lung field; its lower two thirds; a random point in the lung mask) and the label-gated figures
(``metrics.localisation.vs_anatomy``). Selection is on the validation split (its boxes are used
only to choose, and the table says so); test numbers are reported, never used. Results go to
``--results`` (JSON) after every step; a finished step is skipped when the script is re-run.

    python benchmarks/localisation_ablation.py --rsna CACHE192 --kermany CACHE192 \\
        --out /work/exp/loc --results docs/results/localisation-ablation-2026-12-02.json
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path
from typing import Any

# The results file is read and written as the classifier ablation's (same layout, same atomic
# replace); run as a script, this folder is on sys.path.
from classifier_ablation import _load, _save
from pneumoloc.inference.recipe import NOTEBOOK_BOX_RULE

VARIANTS: dict[str, dict[str, Any]] = {
    "cam32": {},
    "pylon": {"decoder": "pylon", "pool": "max"},
    "pylon_drop": {"decoder": "pylon", "pool": "max", "decoder_drop": 0.5},
    "cam32_lse": {"pool": "lse"},
    "pylon_lse": {"decoder": "pylon", "pool": "lse"},
    "pylon_outside": {"decoder": "pylon", "pool": "max", "outside_lung_loss": 1.0},
    # "student": trained with --unlabelled pseudo-labelled by --teacher (both given to this script)
    "pylon_student": {"decoder": "pylon", "pool": "max", "student": True},
}
RECIPES: dict[str, dict[str, Any]] = {
    # "relu" named: a checkpoint that stores another floor (the issue-13 default) is read
    # the same way as the others under these three
    "plain": {"lung_mask": False, "refine": "none", "cam_floor": "relu"},
    "lung": {"lung_mask": True, "refine": "none", "cam_floor": "relu"},
    "lung+rw": {"lung_mask": True, "refine": "randomwalk", "cam_floor": "relu"},
    "lung+shift": {"lung_mask": True, "refine": "none", "cam_floor": "shift"},
    "lung+rw+shift": {"lung_mask": True, "refine": "randomwalk", "cam_floor": "shift"},
}
# The box rules that need no setting of their own (pneumoloc.localise.boxes.BOX_RULES) on the
# lung+shift maps: run with --recipes (not by default), chosen between on validation boxes.
BOX_RULE_RECIPES: dict[str, dict[str, Any]] = {
    f"lung+shift+{rule}": {**RECIPES["lung+shift"], "box_config": {"rule": rule}}
    for rule in ("otsu", "multi", "notebook")
}
BOX_RULE_RECIPES["lung+shift+notebook"]["box_config"] = dict(NOTEBOOK_BOX_RULE)  # its whole rule
# "auto" floor: ReLU where a location votes yes, shift where none does (round 3g)
BOX_RULE_RECIPES["lung+auto"] = {**RECIPES["lung+shift"], "cam_floor": "auto"}
BOX_RULE_RECIPES["lung+auto+otsu"] = {**BOX_RULE_RECIPES["lung+shift+otsu"], "cam_floor": "auto"}
# the default's recipe without the label-free lung mask: what the mask adds
BOX_RULE_RECIPES["shift+otsu"] = {**BOX_RULE_RECIPES["lung+shift+otsu"], "lung_mask": False}


def _train(args: argparse.Namespace, variant: str, seed: int, out: Path) -> dict[str, Any]:
    from pneumoloc.train import train
    from pneumoloc.training.config import TrainConfig

    settings = dict(VARIANTS[variant])
    if settings.pop("student", False):
        if args.unlabelled is None or args.teacher is None:
            raise SystemExit(f"variant {variant} needs --unlabelled and --teacher")
        settings.update(unlabelled=str(args.unlabelled), teacher=str(args.teacher))
    config = TrainConfig(
        data=str(args.rsna),
        out=str(out),
        model="tf_efficientnet_lite0",
        pretrained="imagenet",
        image_size=args.image_size,
        epochs=args.epochs,
        batch_size=32,
        lr=3e-4,
        seed=seed,
        device="cpu",
        progress=False,
        **settings,
    )
    config.extra_data = [str(args.kermany)]
    start = time.perf_counter()
    train(config)
    return {"seconds": time.perf_counter() - start}


def _evaluate(checkpoint: Path, data: Path, out: Path, split: str, **recipe: Any) -> dict:
    from pneumoloc.evaluate import evaluate

    report = evaluate(
        checkpoint,
        data,
        split=split,
        out=out,
        gallery=0,
        n_boot=200,
        progress=False,
        device="cpu",
        **recipe,
    )
    cls, loc = report["classification"], report.get("localisation") or {}
    return {
        "classification": {k: cls.get(k) for k in ("auroc", "auprc", "n", "n_positive")},
        "localisation": {
            k: loc.get(k)
            for k in (
                "rsna_map",
                "pointing_game",
                "notebook_mean_iou",
                "vs_anatomy",
                "n_with_truth",
            )
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rsna", type=Path, required=True)
    parser.add_argument("--kermany", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--results", type=Path, required=True)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--image-size", type=int, default=192)
    parser.add_argument(
        "--variants", nargs="*", default=[v for v in VARIANTS if v != "pylon_student"]
    )
    parser.add_argument("--unlabelled", type=Path, help="unlabelled cache (pylon_student)")
    parser.add_argument("--teacher", type=Path, help="pseudo-labelling checkpoint (pylon_student)")
    parser.add_argument("--splits", nargs="+", default=["val", "test"])
    parser.add_argument("--ensembles", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument(
        "--recipes",
        nargs="+",
        default=list(RECIPES),
        choices=[*RECIPES, *BOX_RULE_RECIPES],
        help="inference recipes to score (default: the five of RECIPES)",
    )
    parser.add_argument(
        "--checkpoints",
        nargs="*",
        default=[],
        metavar="NAME=PATH",
        help="existing checkpoints to score beside the variants (no training)",
    )
    args = parser.parse_args()
    extra = {}
    for item in args.checkpoints:
        name, sep, path = item.partition("=")
        if not sep or not name or not Path(path).is_file():
            parser.error(f"--checkpoints {item!r}: give NAME=PATH of an existing checkpoint")
        extra[name] = Path(path)
    logging.basicConfig(level=logging.WARNING)
    results = _load(args.results)
    results["setup"] = {
        "machine": "2-core CPU (no GPU)",
        "image_size": args.image_size,
        "epochs": args.epochs,
        "seeds": args.seeds,
        "model": "tf_efficientnet_lite0, offline ImageNet init, RSNA sample + Kermany, batch 32, "
        "AdamW lr 3e-4, cosine (issue 12's recipe)",
        "variants": VARIANTS,
        "recipes": {**RECIPES, **BOX_RULE_RECIPES},
        "rsna": str(args.rsna),
        "kermany": str(args.kermany),
    }
    if args.unlabelled is not None:
        results["setup"]["unlabelled"] = str(args.unlabelled)
        results["setup"]["teacher"] = str(args.teacher)

    def evaluate_model(key: str, ckpt: Path) -> None:
        """Every recipe and split of one model, right after it is made (a cut run keeps it)."""
        every = {**RECIPES, **BOX_RULE_RECIPES}
        recipes = {name: every[name] for name in args.recipes}
        if key.startswith("ensemble(") and "lung" in recipes:
            recipes["lung+tta"] = {"lung_mask": True, "refine": "none", "tta": True}
        for recipe, settings in recipes.items():
            for split in args.splits:
                name = f"{key}|{recipe}|{split}"
                if name in results["evals"]:
                    continue
                start = time.perf_counter()
                out = args.out / "evals" / name.replace("|", "_").replace("(", "").replace(")", "")
                res = _evaluate(ckpt, args.rsna, out, split, **settings)
                res["seconds"] = time.perf_counter() - start
                results["evals"][name] = res
                _save(args.results, results)
                print(name, json.dumps(res["localisation"]["vs_anatomy"]["model"]), flush=True)

    # kept across re-runs: which file each extra name scored
    results.setdefault("checkpoints", {}).update({k: str(v) for k, v in extra.items()})
    for name, path in extra.items():
        evaluate_model(name, path)

    for variant in args.variants:
        ckpts = []
        for seed in args.seeds:
            run = args.out / f"{variant}-s{seed}"
            key = f"{variant}-s{seed}"
            if not (run / "done").is_file():  # written when a training run finished
                results["runs"][key] = _train(args, variant, seed, run)
                (run / "done").write_text(str(results["runs"][key]["seconds"]))
                _save(args.results, results)
            ckpts.append(run / "best.pt")
            evaluate_model(key, run / "best.pt")
        ens = args.out / f"ensemble-{variant}.pt"
        if not args.ensembles:
            continue
        if not ens.is_file():
            from pneumoloc.ensemble import build_ensemble

            build_ensemble(ckpts, [args.rsna, args.kermany], ens, device="cpu")
        evaluate_model(f"ensemble({variant})", ens)


if __name__ == "__main__":
    main()
