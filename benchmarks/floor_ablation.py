"""Label-gated localisation with and without the heatmap's ReLU (issue 13).

The classic heatmap is ``relu(CAM)`` in logit units (``pneumoloc.cam.classic``). On a truly
positive film the model scores low, every CAM cell can be negative: the heatmap is all zero, the
pointing game then "points" at pixel (0, 0) and no box is drawn. With global max pooling
(``pylon``) that happens on every positive film whose probability is under 0.5. The label-gated
figures were meant to judge localisation apart from classification; on such films they do not.

This script measures, per checkpoint, on the truly positive films of each split:

* ``all_zero``: the share whose ReLU'd heatmap is zero everywhere;
* for ``relu`` (as shipped) and ``shift`` (``CAM - min(CAM)``: the same ranking of locations,
  never empty), with and without the label-free lung mask: the pointing game, the label-gated
  RSNA metric of the shipped box rule (``BoxConfig()``), box accuracy at IoU 0.3;
* the anatomy baselines on the same films (lung-field boxes; a random point of the lung).

No training; validation and test rows are both reported, nothing is chosen here.

    python benchmarks/floor_ablation.py --rsna CACHE192 --runs OUT/pylon-s0 ... \\
        --results docs/results/floor-ablation-2026-12-04.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rsna", type=Path, required=True)
    parser.add_argument("--runs", type=Path, nargs="+", required=True)
    parser.add_argument("--results", type=Path, required=True)
    args = parser.parse_args()

    from pneumoloc.cam.classic import upsample_cam
    from pneumoloc.data.cache import open_cache
    from pneumoloc.io.preprocess import to_model_input
    from pneumoloc.localise.anatomy import anatomy_boxes
    from pneumoloc.localise.boxes import BoxConfig, cam_to_boxes
    from pneumoloc.localise.lungs import estimate_lung_mask
    from pneumoloc.metrics.anatomy import box_accuracy, random_in_lung_pointing
    from pneumoloc.metrics.localisation import pointing_game, rsna_map
    from pneumoloc.models.checkpoint import load_checkpoint, model_from_checkpoint

    torch.set_num_threads(2)
    cache = open_cache(args.rsna)
    labels = cache.labels
    size = cache.size
    gts_all = cache.load_eval_boxes(np.arange(len(labels)))
    parts = {
        split: [int(i) for i in cache.split.part(split) if labels[i] == 1 and len(gts_all[i])]
        for split in ("val", "test")
    }
    masks = {i: estimate_lung_mask(np.asarray(cache.images[i])) for r in parts.values() for i in r}
    results: dict[str, Any] = {
        "setup": {
            "cache": str(args.rsna),
            "boxes": "BoxConfig() (peak 0.5), label-gated: truly positive films only",
            "machine": "2-core CPU",
        },
        "baselines": {},
        "runs": {},
    }
    for split, rows in parts.items():
        gts = [gts_all[i] for i in rows]
        shapes = [(int(s[0]), int(s[1])) for s in cache.original_shapes[rows]]
        lm = [masks[i] for i in rows]
        fields = anatomy_boxes(lm, np.ones(len(rows)), threshold=0.5, out_shapes=shapes)
        results["baselines"][split] = {
            "n": len(rows),
            "random_in_lung_pointing": random_in_lung_pointing(lm, gts, shapes),
            "lung_fields_rsna_label_gated": rsna_map([(b.boxes, b.scores) for b in fields], gts),
            "lung_fields_box_acc_iou30": box_accuracy([b.boxes for b in fields], gts, 0.3),
        }
    print(json.dumps(results["baselines"]), flush=True)
    config = BoxConfig()
    for run in args.runs:
        model = model_from_checkpoint(load_checkpoint(run / "best.pt"))[0].eval()
        entry: dict[str, Any] = {}
        for split, rows in parts.items():
            images = torch.from_numpy(np.asarray(cache.images[rows]))[:, None]
            with torch.no_grad():
                cams = []
                for start in range(0, len(rows), 32):
                    _, cam = model.forward_with_cam(to_model_input(images[start : start + 32]))
                    cams.append(upsample_cam(cam.float(), (size, size), None))
                cam_maps = torch.cat(cams).numpy()
            gts = [gts_all[i] for i in rows]
            shapes = [(int(s[0]), int(s[1])) for s in cache.original_shapes[rows]]
            row: dict[str, Any] = {
                "all_zero": float(np.mean([(c.max() <= 0) for c in cam_maps])),
            }
            for floor in ("relu", "shift"):
                maps = [np.maximum(c, 0) if floor == "relu" else c - c.min() for c in cam_maps]
                for lung in (False, True):
                    hms = [
                        np.where(masks[i], m, 0.0) if lung and masks[i] is not None else m
                        for m, i in zip(maps, rows, strict=True)
                    ]
                    boxes = [
                        cam_to_boxes(
                            h.astype(np.float32), 1.0, threshold=0.0, config=config, out_shape=s
                        )
                        if h.max() > h.min()
                        else None
                        for h, s in zip(hms, shapes, strict=True)
                    ]
                    pairs = [
                        (np.zeros((0, 4)), np.zeros(0)) if b is None else (b.boxes, b.scores)
                        for b in boxes
                    ]
                    row[f"{floor}|{'lung' if lung else 'plain'}"] = {
                        "pointing_game": pointing_game(hms, gts, image_shapes=shapes),
                        "rsna_map_label_gated": rsna_map(pairs, gts),
                        "box_acc_iou30": box_accuracy([p[0] for p in pairs], gts, 0.3),
                    }
            entry[split] = row
            print(run.name, split, json.dumps(row), flush=True)
        results["runs"][run.name] = entry
        args.results.parent.mkdir(parents=True, exist_ok=True)
        args.results.write_text(json.dumps(results, indent=1, default=float))


if __name__ == "__main__":
    main()
