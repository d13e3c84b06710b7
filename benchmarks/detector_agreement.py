"""Label-free check of self-trained detectors: do their boxes agree with the CAM boxes they
learnt from, on validation images the classifier flags? No label and no truth box is read.

For each detector checkpoint: on the validation images the reference checkpoint (the
classifier + localiser the detectors were trained from) flags and boxes, the median IoU of the
detector's top box with the reference's CAM boxes, and the median ratio of its area to the
largest CAM box (docs/localisation.md round 3h: detectors whose boxes shrank to under half the
CAM box scored far below the others). The figures are pneumoloc.localise.agreement's, the
ones `pneumoloc selftrain --candidates` ranks seeds by. (Before 2026-12-04 21:00 UTC this
script passed corner boxes to the xywh IoU: its IoU column from then is wrong; the area ratio
was computed apart and is unaffected.)

    PYTHONPATH=src python benchmarks/detector_agreement.py --data CACHE192 --reference PAIR.pt \\
        --checkpoints NAME=ST.pt ... --results docs/results/detector-agreement-2026-12-04.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np


def main() -> None:
    from pneumoloc.data.cache import open_cache
    from pneumoloc.inference import Predictor
    from pneumoloc.selftrain import agreement_reference, detector_agreement

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--reference", type=Path, required=True)
    parser.add_argument("--checkpoints", nargs="+", required=True, metavar="NAME=PATH")
    parser.add_argument("--split", default="val")
    parser.add_argument("--results", type=Path, required=True)
    args = parser.parse_args()
    cache = open_cache(args.data)
    images = np.asarray(cache.images[cache.split.part(args.split)])
    base = Predictor.from_checkpoint(args.reference, device="cpu")
    flagged, reference = agreement_reference(base, images)
    results = {}
    for item in args.checkpoints:
        name, _, path = item.partition("=")
        detector = Predictor.from_checkpoint(path, device="cpu").detector
        if detector is None:
            raise SystemExit(f"{path}: no self-trained detector in this checkpoint")
        agreement = detector_agreement(detector, images[flagged], reference)
        results[name] = {
            "checkpoint": path,
            "split": args.split,
            "n_flagged": len(flagged),
            "n_with_detection": agreement.n_with_detection,
            "iou_with_cam_median": agreement.iou_median,
            "area_ratio_median": agreement.area_ratio_median,
        }
        print(name, json.dumps(results[name]), flush=True)
    args.results.write_text(json.dumps(results, indent=1, sort_keys=True))


if __name__ == "__main__":
    main()
