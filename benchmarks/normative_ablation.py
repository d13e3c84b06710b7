"""Label-trained normative maps: where a film is denser than films labelled negative (issue 13).

An experiment, not a feature yet. The question: does "brighter than the same place of the lung
on films labelled normal" point at the opacity more often than a random point of the lung, and
do its boxes beat the lung-field boxes? Only image-level labels are used: the atlas (per-place
mean and spread of lung density) is fitted on the TRAINING split's negatives; no box of any
image reaches it. Validation boxes choose between rows; test rows are reported, never used.

Each film is put in a lung frame: the bounding box of its label-free lung mask
(``localise.lungs.estimate_lung_mask``) resampled to ``--grid`` x ``--grid`` cells, density
normalised inside the mask (median 0, 10-90 % range 1), smoothed. Maps:

* ``density``: the normalised density itself inside the lung (control: no atlas);
* ``normative``: z-score against the atlas, positive part (denser than negatives there);
* ``asymmetry``: density minus the mirror place of the other lung, positive part;
* ``normative+asym``: the mean of the two.

Boxes (``peak`` and ``multi``: the shipped box rules on the map; ``z>T``: per lung half, the
bounding box of the largest connected region denser than T atlas standard deviations, scored by
its mean z). Every row is measured label-gated (boxes on every truly positive film), beside the
lung-field boxes and a random point of the lung on the same films. Parts: ``val`` (selection),
``test`` (reported), ``trainpos`` (the training split's positives: never in the atlas, which
holds negatives only, so they are held out from the fit too; 138 films, the largest set here).

    python benchmarks/normative_ablation.py --rsna CACHE192 \
        --results docs/results/normative-2026-12-04.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage


def lung_frame(mask: np.ndarray) -> tuple[int, int, int, int] | None:
    """(y0, y1, x0, x1) bounding box of a lung mask, or None."""
    ys, xs = np.nonzero(mask)
    if len(ys) == 0:
        return None
    return int(ys.min()), int(ys.max()) + 1, int(xs.min()), int(xs.max()) + 1


def to_frame(image: np.ndarray, box: tuple[int, int, int, int], grid: int) -> np.ndarray:
    """Resample the box of ``image`` onto a ``grid`` x ``grid`` frame (bilinear)."""
    y0, y1, x0, x1 = box
    ys = np.linspace(y0, y1 - 1, grid)
    xs = np.linspace(x0, x1 - 1, grid)
    yy, xx = np.meshgrid(ys, xs, indexing="ij")
    return ndimage.map_coordinates(image.astype(np.float32), [yy, xx], order=1)


def from_frame(
    values: np.ndarray, box: tuple[int, int, int, int], shape: tuple[int, int]
) -> np.ndarray:
    """Put a frame map back into image pixels inside ``box`` (zero outside)."""
    y0, y1, x0, x1 = box
    grid = values.shape[0]
    out = np.zeros(shape, np.float32)
    ys = (np.arange(y0, y1) - y0) / max(y1 - 1 - y0, 1) * (grid - 1)
    xs = (np.arange(x0, x1) - x0) / max(x1 - 1 - x0, 1) * (grid - 1)
    yy, xx = np.meshgrid(ys, xs, indexing="ij")
    out[y0:y1, x0:x1] = ndimage.map_coordinates(values.astype(np.float32), [yy, xx], order=1)
    return out


def normalised_density(image: np.ndarray, mask: np.ndarray, sigma: float) -> np.ndarray:
    """Density relative to the film's own lung: median 0, 10-90 % range 1, smoothed."""
    x = ndimage.gaussian_filter(image.astype(np.float32), sigma)
    inside = x[mask]
    lo, med, hi = np.percentile(inside, [10, 50, 90])
    return (x - med) / max(hi - lo, 1.0)


def atlas_fit(frames: list[Any], rows: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """Per-cell mean and spread of the frame density over ``rows`` (mask-weighted)."""
    stack = np.stack([frames[i][0] for i in rows])
    weight = np.stack([frames[i][1] for i in rows]) > 0.5
    count = weight.sum(0)
    mean = (stack * weight).sum(0) / np.maximum(count, 1)
    var = ((stack - mean) ** 2 * weight).sum(0) / np.maximum(count - 1, 1)
    return mean, np.sqrt(np.maximum(var, np.percentile(var, 10)))


def zthr_boxes(
    z: np.ndarray, mask: np.ndarray, t: float, scale: tuple[float, float]
) -> tuple[np.ndarray, np.ndarray]:
    """Per lung half, the box of the largest region with z > t (original pixels), its mean z."""
    boxes, scores = [], []
    mid = z.shape[1] // 2
    for x0, cols in ((0, slice(0, mid)), (mid, slice(mid, None))):
        zz, hot = z[:, cols], (z[:, cols] > t) & mask[:, cols]
        if hot.sum() < 20:
            continue
        lab, n = ndimage.label(ndimage.binary_closing(hot, iterations=2))
        if n == 0:
            continue
        k = int(np.argmax(ndimage.sum_labels(zz, lab, index=np.arange(1, n + 1)))) + 1
        r, c = ndimage.find_objects((lab == k).astype(np.int32))[0]
        boxes.append(
            (
                (x0 + c.start) * scale[1],
                r.start * scale[0],
                (c.stop - c.start) * scale[1],
                (r.stop - r.start) * scale[0],
            )
        )
        scores.append(float(zz[lab == k].mean()))
    return np.asarray(boxes, float).reshape(-1, 4), np.asarray(scores, float)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rsna", type=Path, required=True)
    parser.add_argument("--results", type=Path, required=True)
    parser.add_argument("--grids", type=int, nargs="+", default=[16, 32, 48])
    parser.add_argument("--sigmas", type=float, nargs="+", default=[2.0, 4.0, 6.0])
    parser.add_argument("--z", type=float, nargs="+", default=[0.5, 1.0, 1.5, 2.0])
    args = parser.parse_args()

    from pneumoloc.data.cache import open_cache
    from pneumoloc.localise.anatomy import anatomy_boxes
    from pneumoloc.localise.boxes import BoxConfig, cam_to_boxes
    from pneumoloc.localise.lungs import estimate_lung_mask
    from pneumoloc.metrics.anatomy import box_accuracy, median_box_area, random_in_lung_pointing
    from pneumoloc.metrics.localisation import pointing_game, rsna_map

    cache = open_cache(args.rsna)
    images = np.asarray(cache.images)
    labels = cache.labels
    size = cache.size
    shapes = [(int(s[0]), int(s[1])) for s in cache.original_shapes]
    masks = [estimate_lung_mask(im) for im in images]
    boxes_all = cache.load_eval_boxes(np.arange(len(images)))
    train = cache.split.part("train")
    parts = {
        "val": [int(i) for i in cache.split.part("val") if labels[i] == 1],
        "test": [int(i) for i in cache.split.part("test") if labels[i] == 1],
        "trainpos": [int(i) for i in train if labels[i] == 1],
    }
    results: dict[str, Any] = {
        "setup": {
            "cache": str(args.rsna),
            "size": size,
            "machine": "2-core CPU",
            "note": "label-gated: every figure is on truly positive films only; the atlas is "
            "fitted on training-split negatives (image labels only); no box reached any fit",
            "parts": {k: len(v) for k, v in parts.items()},
        },
        "baselines": {},
        "rows": {},
    }
    for part, rows in parts.items():
        gts = [boxes_all[i] for i in rows]
        shp = [shapes[i] for i in rows]
        lm = [masks[i] for i in rows]
        lungs = anatomy_boxes(lm, np.ones(len(rows)), threshold=0.5, out_shapes=shp)
        results["baselines"][part] = {
            "random_in_lung_pointing": random_in_lung_pointing(lm, gts, shp),
            "lung_fields_rsna_map": rsna_map([(b.boxes, b.scores) for b in lungs], gts),
            "lung_fields_box_acc_iou30": box_accuracy([b.boxes for b in lungs], gts, 0.3),
        }
    print(json.dumps(results["baselines"]), flush=True)
    for grid in args.grids:
        for sigma in args.sigmas:
            dens = [
                None if m is None else normalised_density(im, m, sigma)
                for im, m in zip(images, masks, strict=True)
            ]
            boxes = [None if m is None else lung_frame(m) for m in masks]
            frames = [
                None
                if b is None
                else (to_frame(d, b, grid), to_frame(m.astype(np.float32), b, grid))
                for d, m, b in zip(dens, masks, boxes, strict=True)
            ]
            mean, std = atlas_fit(frames, [i for i in train if labels[i] == 0 and frames[i]])
            for part, rows in parts.items():
                gts = [boxes_all[i] for i in rows]
                shp = [shapes[i] for i in rows]
                maps: dict[str, list[np.ndarray]] = {"density": [], "normative": []}
                for i in rows:
                    if frames[i] is None:
                        for v in maps.values():
                            v.append(np.ones((size, size), np.float32))
                        continue
                    z = np.maximum((frames[i][0] - mean) / std, 0.0)
                    maps["normative"].append(from_frame(z, boxes[i], (size, size)) * masks[i])
                    maps["density"].append(np.where(masks[i], dens[i] - dens[i][masks[i]].min(), 0))
                for name, hms in maps.items():
                    if name == "density" and grid != args.grids[0]:
                        continue  # no atlas: the same for every grid
                    key = f"{name}|grid{grid}|sigma{sigma:g}|{part}"
                    row: dict[str, Any] = {
                        "pointing_game": pointing_game(hms, gts, image_shapes=shp)
                    }
                    rules: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {}
                    for rule in ("peak", "multi"):
                        out = [
                            cam_to_boxes(
                                h, 1.0, threshold=0.0, config=BoxConfig(rule=rule), out_shape=s
                            )
                            for h, s in zip(hms, shp, strict=True)
                        ]
                        rules[rule] = [(o.boxes, o.scores) for o in out]
                    if name == "normative":
                        for t in args.z:
                            rules[f"z>{t:g}"] = [
                                zthr_boxes(
                                    h,
                                    masks[i] if masks[i] is not None else h > -1,
                                    t,
                                    (s[0] / size, s[1] / size),
                                )
                                for h, i, s in zip(hms, rows, shp, strict=True)
                            ]
                    for rule, pairs in rules.items():
                        row[rule] = {
                            "rsna_map_label_gated": rsna_map(pairs, gts),
                            "box_acc_iou30": box_accuracy([p[0] for p in pairs], gts, 0.3),
                            "median_box_area": median_box_area([p[0] for p in pairs], shp),
                        }
                    results["rows"][key] = row
                    print(key, json.dumps(row, default=float), flush=True)
            args.results.parent.mkdir(parents=True, exist_ok=True)
            args.results.write_text(json.dumps(results, indent=1, default=float))


if __name__ == "__main__":
    main()
