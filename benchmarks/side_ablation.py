"""Does a heatmap know *which lung*? Side accuracy and map-gated lung boxes (issue 13).

An experiment over trained checkpoints (the seeds of ``localisation_ablation.py``), no training.
The question behind it: the maps do not beat a random point of the lung at finding the opacity
(rounds 3-3e), but RSNA positives have one box (43 %) or one per lung (54 %); a map that only
tells the sick side(s) apart would let a box rule drop the healthy lung's box, which the
lung-field baseline always draws.

Measured per checkpoint, on the truly positive films of each split (label-gated), with the
``lung`` recipe (heatmap restricted to the label-free lung mask, no random walk) and
``cam_floor="shift"`` (so that no film's heatmap is empty: round 3f):

* ``side_accuracy``: on films whose truth boxes all lie on one side of the image midline, the
  share where the heatmap's mass inside the lung mask is larger on that side (a coin gives 0.5);
* ``lung_sides@s``: lung-field boxes (one per half of the lung mask), each kept only when its
  half holds at least ``s`` of the map's in-lung mass, scored by that share;
* ``lung_fields``: both lung-field boxes always (the anatomy baseline, same films);
* ``peak``: the shipped box rule on the same heatmap;
* ``raw_peak_in_lung`` / ``raw_peak_right_half``: where the *unrestricted* CAM (``plain``
  recipe) peaks: the share of the positive films whose maximum lies inside the label-free lung
  mask (the issue's question "where does its evidence sit instead"), and in the image's right
  half (the patient's left, the heart's side).

The validation split chooses ``s``; the test split is reported. No box reaches anything but the
figures.

    python benchmarks/side_ablation.py --rsna CACHE192 --runs OUT/pylon-s0 OUT/pylon-s1 ... \\
        --results docs/results/side-ablation-2026-12-04.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np

SHARES = (0.2, 0.3, 0.4)


def side_of_boxes(boxes: np.ndarray, width: float) -> str | None:
    """ "left" / "right" (image sides) when every box centre is on one side, else None."""
    if len(boxes) == 0:
        return None
    centres = boxes[:, 0] + boxes[:, 2] / 2
    if np.all(centres < width / 2):
        return "left"
    if np.all(centres >= width / 2):
        return "right"
    return None


def half_shares(heatmap: np.ndarray, mask: np.ndarray | None) -> tuple[float, float]:
    """Share of the in-lung heatmap mass in the left and right image halves."""
    hm = np.maximum(np.asarray(heatmap, np.float64), 0.0)
    if mask is not None:
        hm = np.where(mask, hm, 0.0)
    mid = hm.shape[1] // 2
    left, right = float(hm[:, :mid].sum()), float(hm[:, mid:].sum())
    total = left + right
    return (0.5, 0.5) if total <= 0 else (left / total, right / total)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rsna", type=Path, required=True)
    parser.add_argument("--runs", type=Path, nargs="+", required=True)
    parser.add_argument("--results", type=Path, required=True)
    args = parser.parse_args()

    from pneumoloc.data.cache import open_cache
    from pneumoloc.evaluate import predict_split
    from pneumoloc.inference import Predictor
    from pneumoloc.localise.anatomy import lung_field_boxes
    from pneumoloc.localise.boxes import cam_to_boxes
    from pneumoloc.metrics.anatomy import box_accuracy
    from pneumoloc.metrics.localisation import rsna_map

    cache = open_cache(args.rsna)
    size = cache.size
    results: dict[str, Any] = {
        "setup": {
            "cache": str(args.rsna),
            "recipe": "lung mask, no refinement; label-gated (truly positive films only)",
            "machine": "2-core CPU",
        },
        "runs": {},
    }
    for run in args.runs:
        predictor = Predictor.from_checkpoint(
            run / "best.pt", device="cpu", lung_mask=True, refine=None, cam_floor="shift"
        )
        raw_predictor = Predictor.from_checkpoint(
            run / "best.pt", device="cpu", lung_mask=False, refine=None, cam_floor="shift"
        )
        entry: dict[str, Any] = {}
        for split in ("val", "test"):
            rows = cache.split.part(split)
            preds = predict_split(predictor, cache, rows, progress=False)
            raw = predict_split(raw_predictor, cache, rows, progress=False)
            pos = [i for i in range(len(preds)) if preds.labels[i] == 1 and len(preds.gts[i])]
            gts = [preds.gts[i] for i in pos]
            sides, hits, in_lung, right_half = 0, 0, 0, 0
            rules: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {
                "lung_fields": [],
                "peak": [],
                **{f"lung_sides@{s:g}": [] for s in SHARES},
            }
            for i in pos:
                h0, w0 = (int(v) for v in preds.shapes[i])
                mask = preds.lung_mask(i)
                hm = np.asarray(preds.heatmaps[i], np.float32)
                raw_hm = np.asarray(raw.heatmaps[i], np.float32)
                r, c = np.unravel_index(int(np.argmax(raw_hm)), raw_hm.shape)
                in_lung += bool(mask is not None and mask[r, c])
                right_half += c >= raw_hm.shape[1] // 2
                left, right = half_shares(hm, mask)
                truth_side = side_of_boxes(preds.gts[i], w0)
                if truth_side is not None:
                    sides += 1
                    hits += (left > right) == (truth_side == "left")
                scale = np.array([w0 / size, h0 / size] * 2)
                fields = np.zeros((0, 4)) if mask is None else lung_field_boxes(mask) * scale
                share = [left if b[0] + b[2] / 2 < w0 / 2 else right for b in fields]
                rules["lung_fields"].append((fields, np.ones(len(fields))))
                for s in SHARES:
                    keep = [k for k, v in enumerate(share) if v >= s]
                    rules[f"lung_sides@{s:g}"].append(
                        (fields[keep].reshape(-1, 4), np.asarray(share)[keep])
                    )
                peak = cam_to_boxes(
                    hm, 1.0, threshold=0.0, config=predictor.box_config, out_shape=(h0, w0)
                )
                rules["peak"].append((peak.boxes, peak.scores))
            entry[split] = {
                "n_positive": len(pos),
                "n_one_sided": sides,
                "side_accuracy": hits / sides if sides else None,
                "raw_peak_in_lung": in_lung / len(pos) if pos else None,
                "raw_peak_right_half": right_half / len(pos) if pos else None,
                **{
                    rule: {
                        "rsna_map_label_gated": rsna_map(pairs, gts),
                        "box_acc_iou30": box_accuracy([p[0] for p in pairs], gts, 0.3),
                        "mean_boxes": float(np.mean([len(p[0]) for p in pairs])),
                    }
                    for rule, pairs in rules.items()
                },
            }
            print(run.name, split, json.dumps(entry[split], default=float), flush=True)
        results["runs"][run.name] = entry
        args.results.parent.mkdir(parents=True, exist_ok=True)
        args.results.write_text(json.dumps(results, indent=1, default=float))


if __name__ == "__main__":
    main()
