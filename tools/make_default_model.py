"""Turn a trained checkpoint into the shipped default model (src/pneumoloc/weights/default.pt).

Weights are stored in float16, every member's for an ensemble file and a self-trained detector's
(``pneumoloc selftrain``) too (half the size, no measurable change in the outputs: the model runs
in float32 after loading), and the default inference
recipe chosen by the localisation ablation (docs/localisation.md) is written into the checkpoint
so predict, evaluate, submit and serve use it without flags.

A checkpoint saved before ``train`` stored ``box_threshold`` gets it from ``--data`` (the cache it
was trained on): the F1-optimal threshold on that cache's validation split, from image labels only.

``--set KEY=VALUE`` lays recipe settings over that default recipe (VALUE read as JSON, else
as text; ``none`` is None; ``box_config.NAME`` sets one field of the box rule), for a model
whose own best recipe differs, e.g. the issue-13 default:
``--set refine=none --set cam_floor=shift --set box_config.rule=otsu``.

Usage: python tools/make_default_model.py CHECKPOINT [--data CACHE] [--out ...default.pt]
       [--set KEY=VALUE ...]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path
from typing import Any

import torch

from pneumoloc.inference.recipe import DEFAULT_INFERENCE_RECIPE


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--out", type=Path, default=Path("src/pneumoloc/weights/default.pt"))
    parser.add_argument("--data", type=Path, default=None, help="cache for a missing box_threshold")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()
    overrides: dict[str, Any] = {}
    box: dict[str, Any] = {}
    for item in args.set:
        key, sep, text = item.partition("=")
        if not sep:
            parser.error(f"--set {item!r}: give KEY=VALUE")
        try:
            value = None if text == "none" else json.loads(text)
        except ValueError:
            value = text
        if key.startswith("box_config."):
            box[key.removeprefix("box_config.")] = value
        else:
            overrides[key] = value
    recipe = DEFAULT_INFERENCE_RECIPE.replace(**overrides)  # validated
    if box:
        recipe = recipe.replace(box_config=dataclasses.replace(recipe.box_config, **box))
    payload = torch.load(args.checkpoint, map_location="cpu", weights_only=True)
    if payload.get("box_threshold") is None and args.data is not None:
        import numpy as np

        from pneumoloc.data.cache import open_cache
        from pneumoloc.inference import Predictor
        from pneumoloc.metrics.classification import f1_threshold

        cache = open_cache(args.data)
        rows = cache.split.part("val")
        predictor = Predictor.from_checkpoint(args.checkpoint, device="cpu", lung_mask=False)
        probs, _ = predictor.heatmaps(np.asarray(cache.images[rows]))
        payload["box_threshold"] = f1_threshold(cache.labels[rows], probs)
        payload.setdefault("metrics", {}).setdefault("val", {})["box_threshold"] = payload[
            "box_threshold"
        ]
        print(f"box_threshold {payload['box_threshold']:.4f} (F1-optimal on {args.data} val)")
    detector = payload.get("detector")
    holders = [payload, *payload.get("members", []), *([detector] if detector else [])]
    for holder in holders:  # an ensemble: every member; a self-trained detector too
        holder["state_dict"] = {
            k: v.half() if v.is_floating_point() else v for k, v in holder["state_dict"].items()
        }
    payload.pop("training_state", None)
    payload.update(recipe.to_meta())
    print(f"recipe: {json.dumps(recipe.to_meta(), default=str)}")
    payload["model_card"] = "docs/model_card.md"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(payload, args.out)
    print(f"wrote {args.out} ({args.out.stat().st_size / 1e6:.1f} MB)")


if __name__ == "__main__":
    main()
