"""Evaluate the input check: how many non-chest images it refuses, how many real films it takes.

Real films: EVERY file of ../shared/data (RSNA training and stage-2 test DICOMs, Kermany JPEGs),
read exactly as ``predict`` reads them (:func:`pneumoloc.predict.read_input` at the model's
input size, DICOM tags included) and checked by :class:`pneumoloc.inference.input_check.
InputCheck` of the model. What the check was fitted on: the layout model on the TRAINING
splits of the RSNA and Kermany caches (thresholds on their VALIDATION splits,
``tools/fit_input_check.py``); the feature statistics, when the model has them, likewise
(``pneumoloc calibrate-ood``). So the real films reported include those it was fitted on; the
table also gives each split apart (test split: never seen).

Non-chest images (``benchmarks/input_check_negatives.py``, seed ``--seed``): blanks, noise,
gradients, skimage photographs, lateral-like renderings, and real TEST-split films turned or
inverted. Nothing was fitted on any of them.

Usage::

    PYTHONPATH=src python benchmarks/input_check_eval.py --model default \\
        --rsna-cache /tmp/rsna --kermany-cache /tmp/kermany --json docs/results/input-check.json
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from input_check_negatives import derived_negatives, synthetic_negatives
from pneumoloc.data.cache import open_cache
from pneumoloc.inference.input_check import InputCheck, InputCheckResult
from pneumoloc.inference.loading import load_predictor
from pneumoloc.io.preprocess import resize_square
from pneumoloc.predict import read_input

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def _check(
    predictor, checker: InputCheck, pixels: list[np.ndarray], tags: list
) -> list[InputCheckResult]:  # type: ignore[no-untyped-def]
    feats = None
    if checker.ood is not None:
        feats = predictor.network_with_features(np.stack(pixels))[3]
    return checker.check_batch(pixels, feats, tags)


def _first_reason(result: InputCheckResult) -> str:
    return result.reasons[0].split(":")[0][:60] if result.reasons else ""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--rsna-cache", type=Path, required=True, help="for the split of each film")
    parser.add_argument("--kermany-cache", type=Path, required=True)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    started = time.perf_counter()
    predictor = load_predictor(args.model, "torch", device="cpu", batch_size=args.batch)
    checker = InputCheck.for_predictor(predictor)
    size = predictor.image_size
    print(f"model {predictor.model_id}, input check mode {checker.mode}", flush=True)

    split_of: dict[str, str] = {}
    for cache_dir in (args.rsna_cache, args.kermany_cache):
        cache = open_cache(cache_dir)
        paths = cache.table["path"].astype(str).to_numpy()
        for name in ("train", "val", "test"):
            for i in getattr(cache.split, name):
                split_of[str(Path(paths[i]).resolve())] = name
    sets = {
        "rsna_train_images": sorted(
            (SHARED / "rsna-pneumonia-sample/stage_2_train_images").glob("*.dcm")
        ),
        "rsna_stage2_test_images": sorted(
            (SHARED / "rsna-pneumonia-sample/stage_2_test_images").glob("*.dcm")
        ),
        "kermany_train": sorted((SHARED / "kermany-pediatric/train").rglob("*.jpeg")),
    }
    real: dict[str, collections.Counter] = {}
    by_split: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    refused_examples: list[dict] = []
    test_films: list[tuple[str, np.ndarray]] = []
    for name, files in sets.items():
        counts: collections.Counter = collections.Counter()
        for start in range(0, len(files), args.batch):
            chunk = files[start : start + args.batch]
            reads = [read_input(f, size, check_tags=True) for f in chunk]
            ok = [(f, r) for f, r in zip(chunk, reads, strict=True) if r.pixels is not None]
            counts["unreadable"] += len(chunk) - len(ok)
            results = _check(predictor, checker, [r.pixels for _, r in ok], [r.tags for _, r in ok])
            for (f, r), res in zip(ok, results, strict=True):
                split = split_of.get(
                    str(f.resolve()), "unlabelled" if "test_images" in str(f) else "?"
                )
                counts["accepted" if res.accepted else "refused"] += 1
                by_split[f"{name}:{split}"]["accepted" if res.accepted else "refused"] += 1
                if not res.accepted:
                    refused_examples.append(
                        {"set": name, "file": f.name, "reasons": list(res.reasons)}
                    )
                if split == "test":
                    test_films.append((f.stem, r.pixels))
        real[name] = counts
        print(name, dict(counts), flush=True)

    # 120 test-split films, evenly spread over both sources' (30 per turn / inversion)
    picks = np.linspace(0, len(test_films) - 1, num=min(120, len(test_films))).round()
    derived = derived_negatives([test_films[int(i)] for i in picks])
    negatives = synthetic_negatives(args.seed) + derived
    neg: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for start in range(0, len(negatives), args.batch):
        chunk = negatives[start : start + args.batch]
        pixels = [resize_square(n.pixels, size) for n in chunk]
        for n, res in zip(
            chunk, _check(predictor, checker, pixels, [None] * len(chunk)), strict=True
        ):
            neg[n.category]["refused" if not res.accepted else "accepted"] += 1
            if res.reasons:
                neg[f"{n.category} (first reason)"][_first_reason(res)] += 1
    n_neg = sum(c["refused"] + c["accepted"] for k, c in neg.items() if "(" not in k)
    n_neg_refused = sum(c["refused"] for k, c in neg.items() if "(" not in k)
    n_real = sum(c["accepted"] + c["refused"] for c in real.values())
    n_real_accepted = sum(c["accepted"] for c in real.values())
    summary = {
        "model": predictor.model_id,
        "mode": checker.mode,
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python "
        f"{platform.python_version()}",
        "seconds": round(time.perf_counter() - started, 1),
        "real": {k: dict(v) for k, v in real.items()},
        "real_by_split": {k: dict(v) for k, v in sorted(by_split.items())},
        "real_accepted_fraction": n_real_accepted / n_real,
        "negatives": {k: dict(v) for k, v in sorted(neg.items())},
        "negatives_refused_fraction": n_neg_refused / n_neg,
        "n_real": n_real,
        "n_negatives": n_neg,
        "refused_real_examples": refused_examples[:40],
    }
    print(json.dumps({k: v for k, v in summary.items() if k != "refused_real_examples"}, indent=1))
    if args.json:
        args.json.write_text(json.dumps(summary, indent=1) + "\n")


if __name__ == "__main__":
    main()
