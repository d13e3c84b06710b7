"""Turn a trained checkpoint into the shipped default model (src/pneumoloc/weights/default.pt).

Weights are stored in float16 (half the size, no measurable change in the outputs: the model runs
in float32 after loading), and the default inference recipe chosen by the localisation ablation
(docs/localisation.md) is written into the checkpoint so predict, evaluate, submit and serve use
it without flags.

Usage: python tools/make_default_model.py CHECKPOINT [--out src/pneumoloc/weights/default.pt]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from pneumoloc.recipe import DEFAULT_INFERENCE_RECIPE


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--out", type=Path, default=Path("src/pneumoloc/weights/default.pt"))
    args = parser.parse_args()
    payload = torch.load(args.checkpoint, map_location="cpu", weights_only=True)
    payload["state_dict"] = {
        k: v.half() if v.is_floating_point() else v for k, v in payload["state_dict"].items()
    }
    payload.pop("training_state", None)
    payload.update(DEFAULT_INFERENCE_RECIPE)
    payload["model_card"] = "docs/model_card.md"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(payload, args.out)
    print(f"wrote {args.out} ({args.out.stat().st_size / 1e6:.1f} MB)")


if __name__ == "__main__":
    main()
