"""Issue 13: the classic CAM upsampled from its cells' true centres (``cam_align="cells"``) vs
``align_corners=False`` (``"centre"``, every shipped version so far), on real RSNA films.

For each checkpoint (the shipped default, and any others given), each inference recipe
(``plain``: raw CAM; ``lung``: lung mask; ``lung+rw``: lung mask and random walk, the shipped
one) and each alignment, ``evaluate`` runs on the validation and the test split of the RSNA
sample (patient-level splits). Every call also measures, on the same images, the anatomy
baselines (one box per lung field, its lower two thirds, a random point in the lung mask) and
the label-gated figures. Nothing is tuned: the validation boxes are used only to decide
whether the alignment becomes the default, and the test figures are reported beside them.
Results go to ``--results`` (JSON) after every step; finished steps are skipped on a re-run.

``--offsets`` also measures where the plain CAM's peak sits relative to the nearest true box
centre on every truly positive film with boxes (mean and mean absolute dx, dy as fractions of
the image side; positive = right / down), for both alignments: a constant offset would show
as a mean far from zero with a small spread.

    PYTHONPATH=src .venv/bin/python benchmarks/cam_align_ablation.py \\
        --results docs/results/cam-align-2026-12-03.json
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RSNA = ROOT.parent / "shared" / "data" / "rsna-pneumonia-sample"
RECIPES: dict[str, dict[str, Any]] = {
    "plain": {"lung_mask": False, "refine": "none"},
    "lung": {"lung_mask": True, "refine": "none"},
    "lung+rw": {"lung_mask": True, "refine": "randomwalk"},
}
KEYS = ("rsna_map", "rsna_map_label_gated", "pointing_game", "box_acc_iou30", "box_acc_iou50")


def _summary(report: dict[str, Any]) -> dict[str, Any]:
    cls, loc = report["classification"], report.get("localisation") or {}
    vs = loc.get("vs_anatomy") or {}
    return {
        "auroc": cls.get("auroc"),
        "n": cls.get("n"),
        "n_with_truth": loc.get("n_with_truth"),
        "notebook_mean_iou": loc.get("notebook_mean_iou"),
        "model": vs.get("model"),
        "lung_fields": vs.get("lung_fields"),
        "lower_lung_fields": vs.get("lower_lung_fields"),
        "random_in_lung_pointing": (vs.get("lung_fields") or {}).get("pointing_game"),
    }


def _offsets(rsna: Path, split: str, align: str) -> dict[str, float]:
    import numpy as np

    from pneumoloc.data.cache import resolve_cache
    from pneumoloc.inference.torch_backend import Predictor

    predictor = Predictor.from_checkpoint(
        "default", device="cpu", cam_align=align, lung_mask=False, refine=None
    )
    cache = resolve_cache(rsna, size=predictor.image_size, progress=False)
    rows = cache.split.part(split)
    rows = rows[cache.labels[rows] == 1]
    truth = cache.load_eval_boxes(rows, scale="original")
    _, maps = predictor.heatmaps(np.asarray(cache.images[rows]))
    found = []
    for heat, boxes, shape in zip(maps, truth, cache.original_shapes[rows], strict=True):
        if len(boxes) == 0:
            continue
        r, c = np.unravel_index(int(np.argmax(heat)), heat.shape)
        y, x = (r + 0.5) / heat.shape[0], (c + 0.5) / heat.shape[1]
        b = np.asarray(boxes, float)
        cx, cy = (b[:, 0] + b[:, 2] / 2) / shape[1], (b[:, 1] + b[:, 3] / 2) / shape[0]
        k = int(np.argmin((cx - x) ** 2 + (cy - y) ** 2))
        found.append((x - cx[k], y - cy[k]))
    d = np.asarray(found)
    return {
        "n": len(d),
        "mean_dx": float(d[:, 0].mean()),
        "mean_dy": float(d[:, 1].mean()),
        "mean_abs_dx": float(np.abs(d[:, 0]).mean()),
        "mean_abs_dy": float(np.abs(d[:, 1]).mean()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--checkpoints", nargs="+", default=["default"])
    parser.add_argument("--rsna", type=Path, default=RSNA)
    parser.add_argument("--splits", nargs="+", default=["val", "test"])
    parser.add_argument("--recipes", nargs="+", default=list(RECIPES))
    parser.add_argument("--results", type=Path, required=True)
    parser.add_argument("--offsets", action="store_true", help="also the peak-to-box offsets")
    args = parser.parse_args()

    from pneumoloc.evaluate import evaluate

    results: dict[str, Any] = (
        json.loads(args.results.read_text()) if args.results.is_file() else {"evals": {}}
    )
    results["setup"] = {
        "command": "benchmarks/cam_align_ablation.py " + " ".join(os.sys.argv[1:]),
        "data": str(args.rsna),
        "machine": f"{os.cpu_count()}-core CPU",
        "note": "validation boxes decide; test figures reported, never used to choose",
    }
    for ckpt in args.checkpoints:
        for split in args.splits:
            for recipe in args.recipes:
                for align in ("centre", "cells"):
                    key = f"{Path(ckpt).stem}|{recipe}|{align}|{split}"
                    if key in results["evals"]:
                        continue
                    start = time.perf_counter()
                    with tempfile.TemporaryDirectory() as tmp:
                        report = evaluate(
                            ckpt,
                            args.rsna,
                            split=split,
                            out=Path(tmp),
                            gallery=0,
                            n_boot=200,
                            progress=False,
                            device="cpu",
                            cam_align=align,
                            **RECIPES[recipe],
                        )
                    results["evals"][key] = {
                        **_summary(report),
                        "seconds": round(time.perf_counter() - start, 1),
                    }
                    tmp_path = args.results.with_suffix(".tmp")
                    tmp_path.parent.mkdir(parents=True, exist_ok=True)
                    tmp_path.write_text(json.dumps(results, indent=1, default=str))
                    tmp_path.replace(args.results)
                    m = results["evals"][key]["model"] or {}
                    print(key, {k: m.get(k) for k in KEYS}, flush=True)
    if args.offsets:
        results["offsets"] = {
            f"{align}|{split}": _offsets(args.rsna, split, align)
            for split in args.splits
            for align in ("centre", "cells")
        }
        args.results.write_text(json.dumps(results, indent=1, default=str))
        print(json.dumps(results["offsets"], indent=1))


if __name__ == "__main__":
    main()
