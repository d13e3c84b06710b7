"""Cost of the heatmap post-processing steps per image: lung mask and random-walk refinement.

Usage:
    python benchmarks/bench_refine.py                 # 256 px, 32 images, this machine's threads
    python benchmarks/bench_refine.py --size 192 --threads 1 --batches 1,16

Times ``restrict_to_lungs`` and ``random_walk_refine`` (default ``RandomWalkConfig``) on
synthetic chest X-rays (``pneumoloc.data.synthetic``) with smooth random heatmaps: the cost does
not depend on the heatmap's content. The random walk is timed in calls of each ``--batches``
size, next to the torch code it replaced in issue 15 (``previous_torch_refine`` below, the same
as the reference in ``tests/test_refine.py``), and the largest difference between the two is
printed. One warm-up pass, then the median of ``--repeats`` passes over all ``--n`` images,
divided by ``--n``. ``--threads`` sets torch's threads; the numpy walk is single-threaded (no
BLAS). Prints a markdown table with the machine, its load average and the command.

Measured (issue 15) on the 2-core development machine while two other CPU-bound jobs ran on
it (load average 1.8 to 4.3), so both columns are slower and noisier than on an idle machine;
``--size 192 --threads 1 --batches 1,16``, 32 images, five runs (median of 5 or 9 passes each),
smallest and largest per-run value:

| random walk, 192 px, 1 thread | batch 1, ms/image | batch 16, ms/image |
|---|---:|---:|
| numpy (``random_walk_refine``, this version) | 3.3 to 5.0 | 2.8 to 4.6 |
| previous torch code | 14.3 to 23.1 | 18.8 to 27.2 |

In every run the numpy walk took 4 to 7 times less time than the torch code. With the defaults
(256 px, one batch of 32), ``--threads 1``, load average 4: numpy 5.8, torch 59.6 ms/image.
Largest difference between the two outputs in all these runs: 2.3e-06 (outputs in [0, 1]).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from pneumoloc.data.synthetic import SynthConfig, make_case
from pneumoloc.localise.lungs import restrict_to_lungs
from pneumoloc.localise.refine import RandomWalkConfig, random_walk_refine


def previous_torch_refine(images: np.ndarray, heatmaps: np.ndarray) -> np.ndarray:
    """Previous code: ``random_walk_refine`` as written with torch before issue 15 (CPU)."""
    config = RandomWalkConfig()
    img = torch.as_tensor(images)
    maps = torch.as_tensor(heatmaps).float()
    img = img.float() / 255.0 if img.dtype == torch.uint8 else img.float()
    size, r, sigma = config.work_size, config.radius, config.smooth
    k = 2 * r + 1
    small_img = F.interpolate(img[:, None], size=(size, size), mode="area")
    x = F.interpolate(maps[:, None], size=(size, size), mode="area")
    half = max(1, round(3 * sigma))
    t = torch.arange(-half, half + 1, dtype=small_img.dtype)
    kernel = torch.exp(-(t**2) / (2 * sigma**2))
    kernel = kernel / kernel.sum()
    guide = F.conv2d(
        F.pad(small_img, (half, half, 0, 0), mode="replicate"), kernel.view(1, 1, 1, -1)
    )
    guide = F.conv2d(F.pad(guide, (0, 0, half, half), mode="replicate"), kernel.view(1, 1, -1, 1))
    neighbours = F.unfold(guide, k, padding=r)
    inside = F.unfold(torch.ones_like(guide), k, padding=r)
    affinity = torch.exp(-((neighbours - guide.flatten(2)) ** 2) / (2 * config.sigma**2)) * inside
    transition = affinity / affinity.sum(dim=1, keepdim=True).clamp(min=1e-12)
    for _ in range(config.steps):
        x = (F.unfold(x, k, padding=r) * transition).sum(dim=1).view(-1, 1, size, size)
    refined = F.interpolate(x, size=tuple(maps.shape[-2:]), mode="bilinear", align_corners=False)
    refined = refined[:, 0].clamp(min=0)
    peak = refined.amax(dim=(-2, -1), keepdim=True)
    refined = torch.where(peak > 0, refined / peak.clamp(min=1e-12), torch.zeros_like(refined))
    return refined.numpy().astype(np.float32)


def in_batches(
    fn: Callable[[np.ndarray, np.ndarray], np.ndarray], batch: int
) -> Callable[[np.ndarray, np.ndarray], np.ndarray]:
    """``fn`` applied in calls of ``batch`` images."""

    def run(images: np.ndarray, maps: np.ndarray) -> np.ndarray:
        return np.concatenate(
            [fn(images[i : i + batch], maps[i : i + batch]) for i in range(0, len(images), batch)]
        )

    return run


def ms_per_image(
    fn: Callable[[np.ndarray, np.ndarray], np.ndarray],
    images: np.ndarray,
    maps: np.ndarray,
    repeats: int,
) -> float:
    fn(images, maps)
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn(images, maps)
        times.append(time.perf_counter() - started)
    return 1000 * statistics.median(times) / len(images)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--n", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument(
        "--batches", default=None, help="comma-separated batch sizes of the walk (default: --n)"
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    batches = [int(b) for b in args.batches.split(",")] if args.batches else [args.n]
    config = SynthConfig(image_size=args.size)
    rng = np.random.default_rng(0)
    images = np.stack([make_case(config, i).image for i in range(args.n)])
    maps = ndimage.gaussian_filter(rng.random((args.n, args.size, args.size)), (0, 8, 8))
    maps = (maps / maps.max(axis=(1, 2), keepdims=True)).astype(np.float32)
    load_before = os.getloadavg()[0]
    lungs = ms_per_image(restrict_to_lungs, images, maps, args.repeats)
    rows = [(f"lung mask (restrict_to_lungs), batch {args.n}", lungs)]
    largest = 0.0
    for batch in batches:
        new = in_batches(random_walk_refine, batch)
        old = in_batches(previous_torch_refine, batch)
        rows.append(
            (
                f"random walk (random_walk_refine, numpy), batch {batch}",
                ms_per_image(new, images, maps, args.repeats),
            )
        )
        rows.append(
            (
                f"random walk, previous torch code, batch {batch}",
                ms_per_image(old, images, maps, args.repeats),
            )
        )
        largest = max(largest, float(np.abs(new(images, maps) - old(images, maps)).max()))
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"torch {torch.__version__}, {torch.get_num_threads()} torch threads, load average "
        f"{load_before:.1f} before, {os.getloadavg()[0]:.1f} after"
    )
    print(f"command: python {' '.join(sys.argv)}")
    print(f"\n| step ({args.size} px, {args.n} images) | ms/image |\n|---|---|")
    for name, ms in rows:
        print(f"| {name} | {ms:.1f} |")
    print(f"\nlargest |numpy - previous torch| over all batches: {largest:.2g}")


if __name__ == "__main__":
    main()
