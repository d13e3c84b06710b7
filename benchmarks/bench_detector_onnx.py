"""A model with a self-trained detector, run by PyTorch and by ONNX Runtime: same boxes? how fast?

Round 3j (docs/localisation.md): ``pneumoloc export`` writes the detector's own graph beside
the model (``NAME.detector.onnx``) and the ONNX backend runs it on the images that get boxes.
This exports a checkpoint (in a temporary folder), then on real cached films compares every
image's probability, heatmap (the file's recipe: with ``heatmap_source: detector`` the
detector's map on flagged films) and boxes (original pixels, as ``predict`` writes them)
between the two backends, and times ``predict_arrays`` per film for: PyTorch with the
detector, ONNX Runtime with it, and ONNX Runtime without it (the box rule: what the ONNX path
ran before), after a warm-up, one process, ``--threads`` threads for both runtimes.

    PYTHONPATH=src python benchmarks/bench_detector_onnx.py --checkpoint MODEL.pt \\
        --data CACHE192 [--split val] [--n 96] [--threads 2] [--batch-size 8]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np


def _timed(predictor: Any, films: np.ndarray, shapes: list, repeats: int) -> tuple[list, float]:
    predictor.predict_arrays(films[:8], shapes[:8])  # warm-up
    best = float("inf")
    preds: list = []
    for _ in range(repeats):
        started = time.perf_counter()
        preds = predictor.predict_arrays(films, shapes)
        best = min(best, time.perf_counter() - started)
    return preds, 1000 * best / len(films)


def main() -> None:
    import torch

    from pneumoloc.data.cache import open_cache
    from pneumoloc.export import export_onnx
    from pneumoloc.inference import Predictor
    from pneumoloc.inference.onnx_backend import OnnxPredictor

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--split", default="val")
    parser.add_argument("--n", type=int, default=96)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cache = open_cache(args.data)
    rows = np.sort(cache.split.part(args.split))[: args.n]
    films = np.asarray(cache.images[rows])
    shapes = [(int(h), int(w)) for h, w in np.asarray(cache.original_shapes[rows])]
    settings = {"batch_size": args.batch_size}
    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        exported = export_onnx(args.checkpoint, Path(tmp) / "model.onnx")
        export_s = time.perf_counter() - started
        assert exported.detector_path is not None, "the checkpoint holds no detector"
        sizes = {p.name: round(p.stat().st_size / 1e6, 1) for p in Path(tmp).glob("*.onnx")}
        ort_det = OnnxPredictor.from_onnx(exported.path, threads=args.threads, **settings)
        ort_rule = OnnxPredictor.from_onnx(
            exported.path, threads=args.threads, use_detector=False, **settings
        )
        pt_det = Predictor.from_checkpoint(args.checkpoint, device="cpu", **settings)
        p_pt, ms_pt = _timed(pt_det, films, shapes, args.repeats)
        p_ort, ms_ort = _timed(ort_det, films, shapes, args.repeats)
        _, ms_rule = _timed(ort_rule, films, shapes, args.repeats)
    box_px, score, n_boxes, mismatched, decisions = 0.0, 0.0, 0, 0, 0
    for a, b in zip(p_pt, p_ort, strict=True):
        decisions += int(a.positive != b.positive)
        if a.boxes.boxes.shape != b.boxes.boxes.shape:
            mismatched += 1
            continue
        n_boxes += len(a.boxes.boxes)
        if len(a.boxes.boxes):
            box_px = max(box_px, float(np.abs(a.boxes.boxes - b.boxes.boxes).max()))
            score = max(score, float(np.abs(a.boxes.scores - b.boxes.scores).max()))
    prob = max(abs(a.probability - b.probability) for a, b in zip(p_pt, p_ort, strict=True))
    heat = max(float(np.abs(a.heatmap - b.heatmap).max()) for a, b in zip(p_pt, p_ort, strict=True))
    result = {
        "checkpoint": args.checkpoint.name,
        "films": len(films),
        "split": args.split,
        "positive": int(sum(p.positive for p in p_ort)),
        "boxes": n_boxes,
        "threads": args.threads,
        "batch_size": args.batch_size,
        "export_s": round(export_s, 1),
        "onnx_mb": sizes,
        "heatmap_source": ort_det.heatmap_source,
        "max_abs_diff_probability": prob,
        "max_abs_diff_heatmap": heat,
        "decisions_changed": decisions,
        "images_with_another_box_count": mismatched,
        "max_abs_diff_box_px_original": box_px,
        "max_abs_diff_box_score": score,
        "ms_per_film": {
            "pytorch_detector": round(ms_pt, 1),
            "onnxruntime_detector": round(ms_ort, 1),
            "onnxruntime_box_rule": round(ms_rule, 1),
        },
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
