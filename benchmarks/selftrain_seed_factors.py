"""What makes a self-training seed collapse: the detector's initialisation, the background
images drawn, or the data order? (docs/localisation.md round 3i.)

Each of the three is given its own seed, in a full factorial over two seeds (by default 0, a
seed that works, and 1, one that collapsed with every backbone in round 3h), and the detector
is trained for a few epochs on the teacher's pseudo-boxes exactly as ``pneumoloc selftrain``
does. Round 3h's logs showed the fate in the first epoch's mean training loss (collapsed:
1.88-1.99, working: 1.62-1.75), so the per-epoch losses are the measurement; with
``--agreement`` the label-free area ratio on the flagged validation images is added (no label
or box is read anywhere).

    PYTHONPATH=src python benchmarks/selftrain_seed_factors.py --data CACHE192 \\
        --teacher src/pneumoloc/weights/default.pt --epochs 2 --agreement \\
        --results docs/results/selftrain-seed-factors-2026-12-04.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch


def main() -> None:
    from pneumoloc.data.cache import open_cache
    from pneumoloc.inference import Predictor
    from pneumoloc.models.detector import build_detector
    from pneumoloc.selftrain import (
        SelfTrainConfig,
        agreement_reference,
        detector_agreement,
        make_pseudo_labels,
        train_detector,
    )

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--teacher", type=Path, required=True)
    parser.add_argument("--seeds", type=int, nargs=2, default=[0, 1])
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--agreement", action="store_true")
    parser.add_argument("--results", type=Path, required=True)
    args = parser.parse_args()

    teacher = Predictor.from_checkpoint(args.teacher, device="cpu")
    cache = open_cache(args.data)
    images = np.asarray(cache.images[cache.split.part("train")])
    labels = np.asarray(cache.labels[cache.split.part("train")]).astype(np.int64)
    size = images.shape[-1]
    preds = teacher.predict_arrays(images, [(size, size)] * len(images))
    probs = np.array([p.probability for p in preds])
    cam = [p.boxes for p in preds]
    held = np.asarray(cache.images[cache.split.part("val")])
    flagged, reference = agreement_reference(teacher, held)
    base = SelfTrainConfig(epochs=args.epochs, device="cpu")
    results = {"epochs": args.epochs, "seeds": args.seeds, "runs": []}
    for init, negatives, order in itertools.product(args.seeds, repeat=3):
        started = time.perf_counter()
        pseudo = make_pseudo_labels(
            labels, probs, cam, threshold=teacher.threshold, config=replace(base, seed=negatives)
        )
        torch.manual_seed(init)
        detector = build_detector(size, base.fpn_channels, "resnet18")
        losses = train_detector(
            detector, images, pseudo, replace(base, seed=order), device=torch.device("cpu")
        )
        run = {"init": init, "negatives": negatives, "order": order, "losses": losses}
        if args.agreement:
            run["agreement"] = detector_agreement(detector, held[flagged], reference).to_dict()
        run["seconds"] = time.perf_counter() - started
        results["runs"].append(run)
        print(json.dumps(run), flush=True)
        args.results.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
