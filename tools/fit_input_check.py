"""Fit the input check's frontal-film layout model (``weights/frontal_layout.safetensors``).

Reads prepared caches (``pneumoloc prepare``) of real films, one per source, and learns from
their TRAINING splits only; their VALIDATION splits set the thresholds (see
:func:`pneumoloc.inference.layout.fit_layout_model`). The test splits are not read. The layout
model does not depend on any classifier: it is fitted once, not per checkpoint.

Usage (the shipped model)::

    pneumoloc prepare ../shared/data/rsna-pneumonia-sample --size 256 --out /tmp/rsna256
    pneumoloc prepare ../shared/data/kermany-pediatric/train --size 256 --out /tmp/kermany256
    PYTHONPATH=src python tools/fit_input_check.py rsna=/tmp/rsna256 kermany=/tmp/kermany256
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from pneumoloc.data.cache import open_cache
from pneumoloc.inference.layout import LAYOUT_MODEL_PATH, fit_layout_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sources", nargs="+", help="NAME=CACHE_FOLDER, one per source")
    parser.add_argument("--out", type=Path, default=LAYOUT_MODEL_PATH)
    args = parser.parse_args()
    sources = {}
    for item in args.sources:
        name, _, folder = item.partition("=")
        cache = open_cache(folder)
        train = [np.asarray(cache.images[i]) for i in cache.split.train]
        val = [np.asarray(cache.images[i]) for i in cache.split.val]
        sources[name] = (train, val)
        print(f"{name}: {len(train)} training films, {len(val)} validation films ({folder})")
    model = fit_layout_model(sources)
    path = model.save(args.out)
    print(f"wrote {path}")
    print(
        json.dumps(
            {
                "orientation_threshold": model.orientation_threshold,
                "midline_threshold": model.midline_threshold,
                "layout": model.layout.info,
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
