"""Markdown tables from benchmarks/gpu/experiments.py's results.json (docs/localisation.md).

Usage: python tools/ablation_table.py docs/results/gpu-experiments-2026-11-26.json
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

import numpy as np

KEYS = [
    "rsna_map",
    "rsna_map_label_gated",
    "pointing_game",
    "box_acc_0.3",
    "box_acc_0.5",
    "notebook_mean_iou",
    "auroc",
]
BASELINES = {
    "gpu": ("resnet18_256_os32", "cam_peak0.5"),
    "cpu192": ("resnet18_192_os32", "cam_peak0.5"),
}


def _stats(values: list[float | None]) -> tuple[float, float]:
    arr = np.array([np.nan if v is None else v for v in values], dtype=float)
    return float(np.nanmean(arr)), float(np.nanstd(arr))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("results", type=Path)
    parser.add_argument(
        "--baseline", default=None, help="TRAIN,INFER variant of the baseline (default by profile)"
    )
    args = parser.parse_args()
    results = json.loads(args.results.read_text())
    baseline = (
        tuple(args.baseline.split(",", 1))
        if args.baseline
        else BASELINES[results.get("profile", "gpu")]
    )
    test: dict[tuple[str, str], list[dict]] = defaultdict(list)
    val: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for job in results["ablation"]:
        for name, metrics in job.get("test", {}).items():
            test[(job["variant"], name)].append(metrics)
        for name, metrics in job.get("val_loc", {}).items():
            val[(job["variant"], name)].append(metrics)
    base = _stats([m["rsna_map"] for m in test[baseline]])[0]
    header = [
        "training variant",
        "inference variant",
        "n seeds",
        *KEYS,
        "x baseline RSNA",
        "val RSNA",
    ]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    rows = []
    for key, runs in test.items():
        cells = [f"{m:.3f} ± {s:.3f}" for m, s in (_stats([r[k] for r in runs]) for k in KEYS)]
        mean_rsna = _stats([r["rsna_map"] for r in runs])[0]
        val_rsna = _stats([r["rsna_map"] for r in val[key]])[0]
        ratio = f"{mean_rsna / base:.1f}" if base > 0 else "n/a"
        rows.append((val_rsna, [key[0], key[1], str(len(runs)), *cells, ratio, f"{val_rsna:.3f}"]))
    for _, cells in sorted(rows, key=lambda r: (r[1][0], r[1][1])):
        print("| " + " | ".join(cells) + " |")
    # Variants whose box settings were chosen on the validation boxes cannot be chosen by them.
    best = max((r for r in rows if "tunedval" not in r[1][1]), key=lambda r: r[0])
    print(f"\nBest by validation RSNA metric: {best[1][0]} + {best[1][1]} (val {best[0]:.3f}).")


if __name__ == "__main__":
    main()
