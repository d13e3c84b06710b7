"""Benchmark ``pneumoloc predict``: latency of one DICOM and throughput over a folder.

Latency: one DICOM file -> probability + heatmap + boxes (decode at reduced resolution,
resize to the model's side, network, box extraction), exactly what ``predict`` does per file
(:func:`pneumoloc.predict.read_input` then ``predict_arrays``), without writing anything.
Startup (imports, model loading, ONNX session creation) is excluded: ``--warmup`` runs come
first. Median and p95 over ``--runs`` runs, with the stages timed separately; the overlay
(display decode, drawing, PNG encoding and writing) is timed on its own. The PyTorch and ONNX
Runtime backends alternate run by run so they share the same background load.

Throughput: images/s of :func:`pneumoloc.predict.predict_paths` over a folder (the 636-image
RSNA sample by default), both backends, with and without overlay PNGs; wall time of the whole
call, model loading included (< 0.2 s), after a warm-up call on one file.

If ``--model default`` is not installed, a resnet18 at 256 px with random (seeded, saved)
weights is used, its head made positive and its threshold 0 so that every image goes through
box extraction: latency does not depend on the weights' values (the boxes step only slightly,
via how many components the CAM has).

Usage::

    PYTHONPATH=src .venv/bin/python benchmarks/bench_predict.py --model default \\
        --dicom ../shared/data/rsna-pneumonia-sample/stage_2_train_images/<first>.dcm \\
        --folder ../shared/data/rsna-pneumonia-sample/stage_2_train_images
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnxruntime
import torch

from pneumoloc.errors import CheckpointError
from pneumoloc.export import export_onnx
from pneumoloc.inference import BasePredictor, resolve_checkpoint
from pneumoloc.inference.loading import default_batch_size, load_predictor
from pneumoloc.localise.boxes import cam_to_boxes
from pneumoloc.models import build_model
from pneumoloc.models.checkpoint import save_checkpoint
from pneumoloc.predict import predict_paths, read_input
from pneumoloc.predict.outputs import _png_bytes
from pneumoloc.report.overlay import prediction_overlay

DEFAULT_FOLDER = Path("../shared/data/rsna-pneumonia-sample/stage_2_train_images")


def load_avg() -> str:
    return f"{os.getloadavg()[0]:.2f}" if hasattr(os, "getloadavg") else "n/a"


def checkpoint_for(model: str, work: Path) -> tuple[Path, str]:
    """The checkpoint to time, and a note saying what it is."""
    try:
        return resolve_checkpoint(model), f"`{model}`"
    except CheckpointError:
        if model != "default":
            raise
    torch.manual_seed(0)
    net = build_model("resnet18")
    with torch.no_grad():  # a positive head on ReLU features: non-zero CAMs, so boxes are made
        net.head.weight.abs_()
        net.head.bias.zero_()
    path = work / "resnet18-256-random.pt"
    save_checkpoint(
        path,
        {"model": net.spec, "state_dict": net.state_dict(), "image_size": 256, "threshold": 0.0},
    )
    return path, (
        "resnet18 at 256 px, random seeded weights with a positive head and threshold 0, so "
        "every image gets boxes (the default model is not installed)"
    )


def percentiles(values: list[float]) -> tuple[float, float]:
    arr = np.asarray(values) * 1000
    return float(np.median(arr)), float(np.percentile(arr, 95))


def time_latency(
    predictors: dict[str, BasePredictor], dicom: Path, runs: int, warmup: int, work: Path
) -> dict[str, dict[str, list[float]]]:
    """Per backend and stage, the seconds of each run (backends alternate run by run).

    "end to end" is one timed call of what ``predict`` does per file (decode, resize, network,
    boxes); the stages before it are timed in separate calls to show where the time goes.
    """
    stages = ("decode+resize", "network", "boxes", "end to end", "overlay")
    times: dict[str, dict[str, list[float]]] = {n: {s: [] for s in stages} for n in predictors}
    for k in range(warmup + runs):
        for name, predictor in predictors.items():
            t0 = time.perf_counter()
            read = read_input(dicom, predictor.image_size)
            assert read.pixels is not None, read.error
            t1 = time.perf_counter()
            probs, maps = predictor.heatmaps(read.pixels[None])
            t2 = time.perf_counter()
            cam_to_boxes(
                maps[0],
                float(probs[0]),
                threshold=predictor.threshold,
                config=predictor.box_config,
                out_shape=read.original_shape,
            )
            t3 = time.perf_counter()
            read = read_input(dicom, predictor.image_size)
            assert read.pixels is not None
            pred = predictor.predict_arrays(read.pixels[None], [read.original_shape])[0]
            t4 = time.perf_counter()
            shown = read_input(dicom, predictor.image_size, display=True).display
            assert shown is not None
            rgb = prediction_overlay(pred, shown, title=dicom.stem)
            (work / f"overlay-{name}.png").write_bytes(_png_bytes(rgb))
            t5 = time.perf_counter()
            if k >= warmup:
                spans = (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4)
                for stage, value in zip(stages, spans, strict=True):
                    times[name][stage].append(value)
    return times


def time_throughput(
    run: Callable[[Path], float], label: str, rows: list[str], n_files: int, out: Path
) -> None:
    load_before = load_avg()
    seconds = run(out)
    rows.append(
        f"| {label} | {n_files / seconds:.1f} | {1000 * seconds / n_files:.1f} | "
        f"{seconds:.1f} | {load_before} / {load_avg()} |"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default", help="checkpoint, or 'default'")
    parser.add_argument("--dicom", type=Path, default=None, help="the DICOM to time")
    parser.add_argument("--folder", type=Path, default=DEFAULT_FOLDER, help="throughput folder")
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument(
        "--batch-size", type=int, default=None, help="default: predict's (1 on the CPU)"
    )
    parser.add_argument(
        "--threads", type=int, default=None, help="network threads, both backends (default: all)"
    )
    parser.add_argument("--skip-throughput", action="store_true")
    args = parser.parse_args(argv)

    files = sorted(args.folder.glob("*.dcm"))
    dicom = args.dicom or files[0]
    work = Path(tempfile.mkdtemp(prefix="pneumoloc-bench-predict-"))
    ckpt, what = checkpoint_for(args.model, work)
    onnx_path = work / "model.onnx"
    t = time.perf_counter()
    export_onnx(ckpt, onnx_path)
    export_s = time.perf_counter() - t

    print(f"Command: `{' '.join(shlex.quote(a) for a in [sys.executable, *sys.argv])}`")
    print(
        f"Machine: {platform.platform()}, {os.cpu_count()} CPUs visible; Python "
        f"{platform.python_version()}, torch {torch.__version__}, onnxruntime "
        f"{onnxruntime.__version__}; network threads: {args.threads or 'all cores'}"
    )
    print(f"Model: {what}; ONNX export took {export_s:.1f} s")
    print(f"DICOM: {dicom.name}\n")

    if args.threads:
        torch.set_num_threads(args.threads)
    predictors = {
        "torch": load_predictor(ckpt, "torch", device="cpu", batch_size=args.batch_size),
        "onnx": load_predictor(onnx_path, "onnx", batch_size=args.batch_size, threads=args.threads),
    }
    size = predictors["torch"].image_size
    shape = read_input(dicom, size).original_shape
    load_before = load_avg()
    times = time_latency(predictors, dicom, args.runs, args.warmup, work)
    print(
        f"Latency, one {shape[0]} x {shape[1]} DICOM -> probability + heatmap + boxes at "
        f"{size} px, ms, median / p95 over {args.runs} runs (load average {load_before} "
        f"before, {load_avg()} after):\n"
    )
    stages = list(next(iter(times.values())))
    print("| backend | " + " | ".join(stages) + " |")
    print("|---|" + "---:|" * len(stages))
    for name, per_stage in times.items():
        cells = ["{:.1f} / {:.1f}".format(*percentiles(per_stage[s])) for s in stages]
        print(f"| {name} | " + " | ".join(cells) + " |")
    print(
        "\n(end to end: decode + resize + network + boxes in one call, what predict does per "
        "file; overlay: the 512 px display decode, drawing, PNG encoding and writing)"
    )
    if args.skip_throughput:
        return 0

    # Warm-up: imports and first-call costs of predict_paths.
    for backend, model in (("torch", ckpt), ("onnx", onnx_path)):
        predict_paths(
            [dicom], work / "warm", model=model, backend=backend, device="cpu", progress=False
        )
    rows: list[str] = []
    for backend, model in (("torch", ckpt), ("onnx", onnx_path)):
        for overlays in (False, True):

            def run(
                out: Path, backend: str = backend, model: Path = model, ov: bool = overlays
            ) -> float:
                t0 = time.perf_counter()
                result = predict_paths(
                    [args.folder],
                    out,
                    model=model,
                    backend=backend,
                    device="cpu",
                    batch_size=args.batch_size,
                    overlays=ov,
                    threads=args.threads,
                    progress=False,
                )
                assert result.n_failed == 0
                return time.perf_counter() - t0

            label = f"{backend}, {'with' if overlays else 'no'} overlays"
            out = work / f"run-{backend}-{int(overlays)}"
            time_throughput(run, label, rows, len(files), out)
    batch = args.batch_size or default_batch_size("torch", "cpu")
    print(f"\nThroughput over {len(files)} files of {args.folder} (batch {batch}):\n")
    print("| run | images/s | ms/image | wall s | load avg before / after |")
    print("|---|---:|---:|---:|---|")
    print("\n".join(rows))
    print(f"\nOutputs left in {work}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
