"""A self-trained detector run by PyTorch and by onnxruntime: same boxes? how fast?

Round 3i (docs/localisation.md): a detector default would lose the ONNX path of ``predict``
(the exported graph holds the classifier only). This measures the way out: torchvision's FCOS
exported with the TorchScript-based exporter (batch 1, fixed size), onnxruntime's boxes and
scores against PyTorch's on real cached films, and the time per film of each, one film at a
time (as ``predict`` runs), after a warm-up.

    PYTHONPATH=src python benchmarks/bench_detector_onnx.py --checkpoint ST.pt \\
        --data CACHE192 [--n 32] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch


class _Single(torch.nn.Module):
    """One (1, 3, H, W) float image in, boxes (N, 4) xyxy and scores (N,) out."""

    def __init__(self, detector: torch.nn.Module) -> None:
        super().__init__()
        self.detector = detector

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.detector([image[0]])[0]
        return out["boxes"], out["scores"]


def main() -> None:
    import onnxruntime as ort

    from pneumoloc.data.cache import open_cache
    from pneumoloc.models.checkpoint import load_checkpoint
    from pneumoloc.models.detector import detector_input, load_detector

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--n", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    wrapped = _Single(load_detector(load_checkpoint(args.checkpoint)["detector"])).eval()
    cache = open_cache(args.data)
    films = np.asarray(cache.images[cache.split.part("val")[: args.n]])
    inputs = [torch.stack(detector_input(torch.from_numpy(f[None]))) for f in films]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "detector.onnx"
        started = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(wrapped, (inputs[0],), str(path), opset_version=17, dynamo=False)
        export_s = time.perf_counter() - started
        options = ort.SessionOptions()
        options.intra_op_num_threads = args.threads
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        name = session.get_inputs()[0].name
        size_mb = path.stat().st_size / 1e6

        def run_ort(x: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
            boxes, scores = session.run(None, {name: x.numpy()})
            return boxes, scores

        def run_torch(x: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
            with torch.no_grad():
                boxes, scores = wrapped(x)
            return boxes.numpy(), scores.numpy()

        diffs = []
        for x in inputs:
            (bo, so), (bt, st) = run_ort(x), run_torch(x)
            k = min(2, len(so), len(st))  # what predict keeps: the top two
            diffs.append(float(np.abs(bo[:k] - bt[:k]).max(initial=0.0)))
            diffs.append(float(np.abs(so[:k] - st[:k]).max(initial=0.0) * 1000))
        timings = {}
        for label, fn in (("pytorch", run_torch), ("onnxruntime", run_ort)):
            for x in inputs[:3]:
                fn(x)
            started = time.perf_counter()
            for x in inputs:
                fn(x)
            timings[label] = 1000 * (time.perf_counter() - started) / len(inputs)
    result = {
        "films": len(inputs),
        "threads": args.threads,
        "export_s": round(export_s, 1),
        "onnx_mb": round(size_mb, 1),
        "max_abs_diff_top2_boxes_px_or_scores_x1000": max(diffs),
        "ms_per_film": {k: round(v, 1) for k, v in timings.items()},
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
