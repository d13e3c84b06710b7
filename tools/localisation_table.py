"""Markdown tables of benchmarks/localisation_ablation.py results: mean ± sd over seeds.

Usage: python tools/localisation_table.py docs/results/localisation-ablation-2026-12-02.json

"top-box pointing" (files from 2026-12-04 on): the centre of the best label-gated box inside a
truth box; n/a in older files.
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict

import numpy as np

COLS = [
    ("AUROC", lambda e: e["classification"]["auroc"]),
    ("RSNA metric", lambda e: e["localisation"]["vs_anatomy"]["model"]["rsna_map"]),
    ("label-gated", lambda e: e["localisation"]["vs_anatomy"]["model"]["rsna_map_label_gated"]),
    ("pointing", lambda e: e["localisation"]["pointing_game"]),
    (
        "top-box pointing",
        lambda e: e["localisation"]["vs_anatomy"]["model"].get("top_box_pointing_label_gated"),
    ),
    ("box acc@0.3", lambda e: e["localisation"]["vs_anatomy"]["model"]["box_acc_iou30"]),
    ("box acc@0.5", lambda e: e["localisation"]["vs_anatomy"]["model"]["box_acc_iou50"]),
    ("mean IoU", lambda e: e["localisation"]["notebook_mean_iou"]),
    ("median box area", lambda e: e["localisation"]["vs_anatomy"]["model"]["median_box_area"]),
    ("lung covered", lambda e: e["localisation"]["vs_anatomy"]["model"]["lung_coverage"]),
]
BASE = [
    ("RSNA metric", "rsna_map"),
    ("label-gated", "rsna_map_label_gated"),
    ("pointing (random point in lung)", "pointing_game"),
    ("top-box pointing (a lung field's centre)", "top_box_pointing_label_gated"),
    ("box acc@0.3", "box_acc_iou30"),
    ("box acc@0.5", "box_acc_iou50"),
    ("median box area", "median_box_area"),
]


def fmt(values: list[float | None]) -> str:
    v = [x for x in values if x is not None]
    if not v:
        return "n/a"
    return f"{np.mean(v):.3f}" if len(v) == 1 else f"{np.mean(v):.3f} ± {np.std(v):.3f}"


def main() -> None:
    with open(sys.argv[1]) as f:
        evals = json.load(f)["evals"]
    groups: dict[tuple[str, str, str], list[dict]] = defaultdict(list)
    for name, e in evals.items():
        model, recipe, split = name.split("|")
        variant = model if model.startswith("ensemble(") else model.rsplit("-s", 1)[0]
        groups[(split, variant, recipe)].append(e)
    for split in ("val", "test"):
        print(f"\n**{split} split** (mean ± sd over seeds; val boxes used only to select)\n")
        print("| variant | recipe | seeds | " + " | ".join(c for c, _ in COLS) + " |")
        print("|---" * (len(COLS) + 3) + "|")
        for (s, variant, recipe), es in sorted(groups.items()):
            if s != split:
                continue
            cells = [fmt([f(e) for e in es]) for _, f in COLS]
            print(f"| {variant} | {recipe} | {len(es)} | " + " | ".join(cells) + " |")
        # Anatomy baselines: identical for every model up to the gate; shown from the "lung"
        # recipe's rows, or from every row of a file that has none (one classifier gating all).
        rows = [(r, e) for (s, v, r), g in groups.items() if s == split for e in g]
        lung = [e for r, e in rows if r == "lung"]
        for rule in ("lung_fields", "lower_lung_fields"):
            es = lung or [e for _, e in rows]
            cells = [
                fmt([e["localisation"]["vs_anatomy"][rule].get(k) for e in es]) for _, k in BASE
            ]
            print(
                f"\n{rule} (no heatmap; gated like each model): "
                + "; ".join(f"{c} {v}" for (c, _), v in zip(BASE, cells, strict=True))
            )


if __name__ == "__main__":
    main()
