"""Training throughput (images/s, data pipeline and augmentation included) on this machine.

Usage:
    python benchmarks/bench_train.py --cache CACHE_128 --model smallcamnet --image-size 128
    python benchmarks/bench_train.py --cache CACHE_256 --model resnet18 --image-size 256

Runs the real training loop (`pneumoloc.train.train`) for a few steps per epoch and reports the
images/s of the last epoch (the first one warms up). On a GPU use benchmarks/gpu/experiments.py.
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile

import torch

from pneumoloc.train import train
from pneumoloc.training.config import load_train_config


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--cache", required=True)
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        config = load_train_config(
            None,
            {
                "data": args.cache,
                "out": tmp,
                "model": args.model,
                "image_size": args.image_size,
                "epochs": 2,
                "batch_size": args.batch_size,
                "max_steps_per_epoch": args.steps,
                "progress": False,
                "device": args.device,
            },
        )
        result = train(config)
    rate = result.history[-1]["train_images_per_s"]
    print(
        f"machine: {platform.platform()}, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, load {os.getloadavg()[0]:.2f}"
    )
    print(f"{args.model} @ {args.image_size}px, batch {args.batch_size}: {rate:.1f} train images/s")


if __name__ == "__main__":
    main()
