"""Heatmap cost per image of every method in ``pneumoloc.cam.CAM_METHODS``.

Usage:
    python benchmarks/bench_cam.py                       # resnet18, 256 px, batch 16, CPU
    python benchmarks/bench_cam.py --device cuda --repeats 5

Times ``compute_cam(model, x, method=..., scale_to_max=True)`` (probabilities + heatmaps at the
input size) on random weights and random images: the cost does not depend on what the weights
learnt. One warm-up batch per method, then the median of ``--repeats`` timed batches, divided
by the batch size. ScoreCAM runs one forward pass per feature channel (512 for resnet18) per
image, so it is timed on ``--scorecam-batch`` images, ``--scorecam-repeats`` times, without
a warm-up (the other library methods have warmed it up). A plain forward pass (probabilities
only) is the reference row. Prints a markdown table with the machine and the command.
"""

from __future__ import annotations

import argparse
import functools
import os
import platform
import statistics
import time
from collections.abc import Callable

import torch

from pneumoloc.cam import CAM_METHODS, compute_cam
from pneumoloc.io.preprocess import to_model_input
from pneumoloc.models import build_model


def _once(fn: Callable[[], object], device: torch.device) -> float:
    started = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--scorecam-batch", type=int, default=2)
    parser.add_argument("--scorecam-repeats", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--methods", nargs="*", default=list(CAM_METHODS))
    args = parser.parse_args()

    torch.manual_seed(0)
    device = torch.device(args.device)
    model = build_model(args.model).to(device).eval()
    images = torch.randint(0, 256, (args.batch, 1, args.size, args.size), dtype=torch.uint8)
    x = to_model_input(images).to(device)

    def forward() -> None:
        with torch.inference_mode():
            torch.sigmoid(model(x))

    # (name, images, function); ScoreCAM runs hundreds of forward passes per image, so it gets
    # fewer images and repeats and no warm-up (the other library methods warmed it up).
    cases: list[tuple[str, int, Callable[[], object]]] = [
        ("forward only (probabilities)", args.batch, forward)
    ]
    for method in args.methods:
        n = args.scorecam_batch if method == "scorecam" else args.batch
        cases.append(
            (
                method,
                n,
                functools.partial(compute_cam, model, x[:n], method=method, scale_to_max=True),
            )
        )
    fast = [c for c in cases if c[0] != "scorecam"]
    for _, _, fn in fast:
        fn()  # warm-up: hooks, allocator, lazy imports
    # Round-robin over the methods, so that a change of machine load hits them all alike.
    times: dict[str, list[float]] = {name: [] for name, _, _ in cases}
    for _ in range(args.repeats):
        for name, _, fn in fast:
            times[name].append(_once(fn, device))
    for name, _, fn in cases:
        if name == "scorecam":
            times[name] = [_once(fn, device) for _ in range(args.scorecam_repeats)]
    rows = [(name, n, statistics.median(times[name])) for name, n, _ in cases]

    cpu = platform.processor() or platform.machine()
    where = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"CPU {cpu}, {torch.get_num_threads()} torch threads, {os.cpu_count()} cores"
    )
    print(f"machine: {platform.platform()}; {where}; torch {torch.__version__}")
    print(
        f"command: python benchmarks/bench_cam.py --model {args.model} --size {args.size} "
        f"--batch {args.batch} --repeats {args.repeats} --device {args.device}"
    )
    print(
        f"{args.model}, random weights, {args.size} px, median of {args.repeats} batches "
        f"(ScoreCAM: {args.scorecam_repeats}), methods timed round-robin\n"
    )
    print("| method | images per batch | ms per image | images/s |")
    print("|---|---:|---:|---:|")
    for method, n, seconds in rows:
        per_image = seconds / n
        print(f"| {method} | {n} | {per_image * 1000:.1f} | {1 / per_image:.3g} |")


if __name__ == "__main__":
    main()
