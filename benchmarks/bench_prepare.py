"""Preparation rate of `pneumoloc prepare` (images/s, all cores) on a data folder.

Usage:
    python benchmarks/bench_prepare.py --data ../shared/data/rsna-pneumonia-sample --size 256

Builds a fresh cache in a temporary folder (never inside the data folder), reports the rate of
decoding + resizing + writing, and, for comparison, the rate of pydicom's default decode path
(`dcmread(f).pixel_array`, as the original notebook read images) on one core over the same files.
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

from pneumoloc.data.cache import prepare_cache


def pydicom_default_rate(files: list[Path], limit: int) -> float:
    """Images/s of pydicom's default pixel path on one core."""
    import pydicom

    chosen = files[:limit]
    started = time.perf_counter()
    for f in chosen:
        pydicom.dcmread(f).pixel_array  # noqa: B018 - decoding is the point
    return len(chosen) / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data", type=Path, default=Path("../shared/data/rsna-pneumonia-sample"))
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--workers", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--pydicom-limit", type=int, default=200)
    args = parser.parse_args()

    rates = []
    for _ in range(args.repeats):
        with tempfile.TemporaryDirectory() as tmp:
            started = time.perf_counter()
            cache = prepare_cache(
                args.data, Path(tmp) / "cache", size=args.size, workers=args.workers, progress=False
            )
            elapsed = time.perf_counter() - started
            n = int(cache.manifest["n_images"])
            rates.append(n / elapsed)
    print(
        f"machine: {platform.platform()}, {os.cpu_count()} cores, "
        f"Python {platform.python_version()}"
    )
    print(f"command: python benchmarks/bench_prepare.py --data {args.data} --size {args.size}")
    print(
        f"images: {n}, failed: {cache.manifest['n_failed']}, "
        f"missing labelled: {cache.manifest['n_missing_labelled']}"
    )
    print(
        f"prepare (end to end incl. indexing, process start, split): "
        f"median {sorted(rates)[len(rates) // 2]:.0f} img/s over {args.repeats} runs "
        f"{[round(r) for r in rates]}"
    )
    dicoms = sorted(args.data.glob("stage_2_train_images/*.dcm"))
    if dicoms:
        print(
            f"pydicom default decode (1 core, {min(len(dicoms), args.pydicom_limit)} files): "
            f"{pydicom_default_rate(dicoms, args.pydicom_limit):.0f} img/s"
        )


if __name__ == "__main__":
    main()
