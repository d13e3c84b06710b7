"""Does the self-trained detector's own score map point better than the localiser's CAM?

Round 3j (docs/localisation.md). The default's heatmap is the localiser's CAM (pointing game
0.310 val / 0.433 test), while its boxes come from the detector, whose top box's centre lands
in a true box more often (0.414 / 0.600). FCOS scores every location of its pyramid
(``sqrt(sigmoid(class) * sigmoid(centerness))``, strides 8-128); this reads those maps for the
pneumonia class, upsamples each level to the input size (bilinear) and takes the maximum over
levels, then zeroes it outside the label-free lung mask as the shipped recipe does with the CAM.
On every film with truth boxes of the chosen split it reports the pointing game of:

* ``cam``: the classifier's heatmap on every film (``heatmap_source: cam``, lung mask
  included), what the default showed before round 3j;
* ``detector``: the detector's score map (lung mask);
* ``product``: their product (each scaled to its maximum first);
* ``random_in_lung``: a random point of the lung mask (the anatomy baseline, exact expectation);
* ``deployed``: ``heatmap_source: detector`` as the default ships it: the detector's map on
  the films the classifier flags only, the CAM on the others.

No label or box reaches anything but the scoring.

    PYTHONPATH=src python benchmarks/detector_heatmap.py \\
        --checkpoint src/pneumoloc/weights/default.pt \\
        --data CACHE192 --split val [--results FILE.json]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch


def score_maps(detector: torch.nn.Module, images: np.ndarray) -> np.ndarray:
    """The detector's score map per image (:func:`pneumoloc.models.detector.detect_with_maps`)."""
    from pneumoloc.models.detector import detect_with_maps

    return detect_with_maps(detector, images, min_score=0.05, max_boxes=2, batch_size=8)[1]


def main() -> None:
    from pneumoloc.data.cache import open_cache
    from pneumoloc.inference import Predictor
    from pneumoloc.localise.lungs import estimate_lung_mask, restrict_to_lungs
    from pneumoloc.metrics.anatomy import random_in_lung_pointing
    from pneumoloc.metrics.localisation import pointing_game

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--split", default="val")
    parser.add_argument("--results", type=Path, default=None)
    args = parser.parse_args()
    cache = open_cache(args.data)
    rows = np.sort(cache.split.part(args.split))
    gts_all = cache.load_eval_boxes(rows, scale="cache")
    keep = [i for i, g in enumerate(gts_all) if len(g)]
    rows = rows[keep]
    gts = [gts_all[i] for i in keep]
    images = np.asarray(cache.images[rows])
    predictor = Predictor.from_checkpoint(args.checkpoint, device="cpu", heatmap_source="cam")
    assert predictor.detector is not None, "the checkpoint holds no detector"
    _, cam = predictor.heatmaps(images)
    shipped = Predictor.from_checkpoint(args.checkpoint, device="cpu", heatmap_source="detector")
    _, deployed = shipped.heatmaps(images)
    masks = [estimate_lung_mask(img) for img in images]
    det = score_maps(predictor.detector, images)
    det = restrict_to_lungs(images, det, masks)

    def scaled(maps: np.ndarray) -> np.ndarray:
        peak = maps.reshape(len(maps), -1).max(axis=1).clip(min=1e-12)
        return maps / peak[:, None, None]

    product = scaled(cam) * scaled(det)
    result = {
        "checkpoint": str(args.checkpoint),
        "split": args.split,
        "n_films_with_boxes": len(rows),
        "pointing_game": {
            "cam": pointing_game(list(cam), gts),
            "detector": pointing_game(list(det), gts),
            "product": pointing_game(list(product), gts),
            "deployed": pointing_game(list(deployed), gts),
            "random_in_lung": random_in_lung_pointing(masks, gts, [images.shape[1:]] * len(gts)),
        },
    }
    print(json.dumps(result))
    if args.results is not None:
        args.results.parent.mkdir(parents=True, exist_ok=True)
        with args.results.open("a") as fh:
            fh.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
