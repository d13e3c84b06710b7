"""Cost of the heatmap post-processing steps per image: lung mask and random-walk refinement.

Usage:
    python benchmarks/bench_refine.py                 # 256 px, 32 images, this machine's threads
    python benchmarks/bench_refine.py --size 512 --threads 1

Times ``restrict_to_lungs`` and ``random_walk_refine`` (default ``RandomWalkConfig``) on
synthetic chest X-rays (``pneumoloc.data.synthetic``) with smooth random heatmaps: the cost does
not depend on the heatmap's content. One warm-up call, then the median of ``--repeats`` calls,
divided by the number of images. Prints a markdown table with the machine and the command.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

import numpy as np
import torch
from scipy import ndimage

from pneumoloc.data.synthetic import SynthConfig, make_case
from pneumoloc.localise.lungs import restrict_to_lungs
from pneumoloc.localise.refine import random_walk_refine


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--n", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    config = SynthConfig(image_size=args.size)
    rng = np.random.default_rng(0)
    images = np.stack([make_case(config, i).image for i in range(args.n)])
    maps = ndimage.gaussian_filter(rng.random((args.n, args.size, args.size)), (0, 8, 8))
    maps = (maps / maps.max(axis=(1, 2), keepdims=True)).astype(np.float32)
    rows = []
    for name, fn in (
        ("lung mask (restrict_to_lungs)", lambda: restrict_to_lungs(images, maps)),
        ("random walk (random_walk_refine)", lambda: random_walk_refine(images, maps)),
    ):
        fn()
        times = []
        for _ in range(args.repeats):
            started = time.perf_counter()
            fn()
            times.append(time.perf_counter() - started)
        rows.append((name, 1000 * statistics.median(times) / args.n))
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads"
    )
    print(f"command: python {' '.join(sys.argv)}")
    print(f"\n| step ({args.size} px, {args.n} images) | ms/image |\n|---|---|")
    for name, ms in rows:
        print(f"| {name} | {ms:.1f} |")


if __name__ == "__main__":
    main()
