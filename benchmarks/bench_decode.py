"""Benchmark X-ray decoding on one CPU core: pydicom's default path against pneumoloc's reader.

Measures images per second over a folder of DICOMs (the RSNA sample by default) for:

* (a) ``pydicom.dcmread(f).pixel_array``, as the original notebook did;
* (b) ``read_xray(f)`` at full resolution;
* (c) ``read_xray(f, min_size=SIZE)``, the reduced-resolution JPEG decode;
* (d) ``read_xray(f)`` then a Pillow box resize to SIZE x SIZE, what a preprocessing cache would
  do without the reduced decode;
* (e) ``read_xray(f, min_size=SIZE)`` then the same resize (a no-op when the DCT scaling
  lands exactly on SIZE, as for 1024 -> 256).

Files are read once before timing so that every variant sees a warm page cache. The variants
run round-robin on each file, ``--repeat`` passes over the files, so that they share the same
background load; images/s is 1 / the mean CPU time per call (robust on a shared machine),
with the median wall time per call alongside. Prints a markdown table.

Usage::

    PYTHONPATH=src .venv/bin/python benchmarks/bench_decode.py --limit 200
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import PIL
import pydicom
from PIL import Image

from pneumoloc.io import read_xray

DEFAULT_DATA = "../shared/data/rsna-pneumonia-sample/stage_2_train_images"


def pin_to_one_core() -> str:
    """Restrict this process to one CPU core where the OS allows it; say which."""
    if hasattr(os, "sched_setaffinity") and hasattr(os, "sched_getaffinity"):
        core = min(os.sched_getaffinity(0))
        os.sched_setaffinity(0, {core})
        return f"pinned to core {core}"
    return "not pinned (no sched_setaffinity on this OS)"


def resize(pixels: np.ndarray, size: int) -> np.ndarray:
    if pixels.shape == (size, size):
        return pixels
    return np.asarray(Image.fromarray(pixels).resize((size, size), Image.Resampling.BOX))


def variants(size: int) -> dict[str, Callable[[Path], np.ndarray]]:
    return {
        "(a) pydicom `dcmread(f).pixel_array`": lambda f: pydicom.dcmread(f).pixel_array,
        "(b) `read_xray(f)` full resolution": lambda f: read_xray(f).pixels,
        f"(c) `read_xray(f, min_size={size})`": lambda f: read_xray(f, min_size=size).pixels,
        f"(d) (b) + resize to {size}": lambda f: resize(read_xray(f).pixels, size),
        f"(e) (c) + resize to {size}": lambda f: resize(read_xray(f, min_size=size).pixels, size),
    }


def time_interleaved(
    fns: dict[str, Callable[[Path], np.ndarray]], files: list[Path], repeat: int
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per-call (CPU seconds, wall seconds) for every variant, run round-robin on each file.

    Interleaving makes every variant see the same background load. CPU time of this thread
    (``time.thread_time``) is what "images/s on one core" means and is nearly immune to other
    processes sharing the core; wall time is reported alongside.
    """
    cpu: dict[str, list[float]] = {label: [] for label in fns}
    wall: dict[str, list[float]] = {label: [] for label in fns}
    for _ in range(repeat):
        for f in files:
            for label, fn in fns.items():
                wall_start, cpu_start = time.perf_counter(), time.thread_time()
                fn(f)
                cpu[label].append(time.thread_time() - cpu_start)
                wall[label].append(time.perf_counter() - wall_start)
    return {label: (np.asarray(cpu[label]), np.asarray(wall[label])) for label in fns}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=DEFAULT_DATA, help="folder of .dcm files")
    parser.add_argument("--limit", type=int, default=200, help="at most this many files")
    parser.add_argument("--size", type=int, default=256, help="target side for (c)-(e)")
    parser.add_argument("--repeat", type=int, default=3, help="passes over the files")
    args = parser.parse_args(argv)

    data = Path(args.data)
    files = sorted(data.glob("*.dcm"))[: args.limit]
    if not files:
        parser.error(f"no .dcm files in {data}")
    pinned = pin_to_one_core()
    for f in files:  # warm the page cache
        f.read_bytes()

    shape = read_xray(files[0]).original_shape
    print(f"Command: `{' '.join(shlex.quote(a) for a in [sys.executable, *sys.argv])}`")
    print(
        f"Machine: {platform.platform()}, {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} CPUs visible, {pinned}; Python {platform.python_version()}, "
        f"pydicom {pydicom.__version__}, Pillow {PIL.__version__}, numpy {np.__version__}"
    )
    if hasattr(os, "getloadavg"):
        print(f"Load average before timing: {os.getloadavg()[0]:.2f} (1 min)")
    print(f"Data: {len(files)} files from {data} (first is {shape[0]} x {shape[1]})\n")
    print(
        "| variant | images/s (1 core, CPU time) | CPU ms/image (mean) "
        "| wall ms/image (median) | vs (a) |"
    )
    print("|---|---:|---:|---:|---:|")
    results = time_interleaved(variants(args.size), files, args.repeat)
    baseline = float(next(iter(results.values()))[0].mean())
    for label, (cpu, wall) in results.items():
        mean_cpu = float(cpu.mean())
        print(
            f"| {label} | {1 / mean_cpu:.0f} | {1000 * mean_cpu:.2f} | "
            f"{1000 * float(np.median(wall)):.2f} | {baseline / mean_cpu:.1f}x |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
