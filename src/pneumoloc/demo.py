"""The main job on an embedded default: synthetic RSNA data, end to end, no download."""

from __future__ import annotations

import logging
from pathlib import Path

logger = logging.getLogger(__name__)


def run_demo(
    out: Path, *, n: int = 400, image_size: int = 256, seed: int = 0, quick: bool = False
) -> int:
    """Generate a synthetic RSNA-layout set, cache it, and report.

    Args:
        out: Output folder (synthetic data, cache, run).
        n: Number of synthetic images.
        image_size: Side of the synthetic images.
        seed: Seed of the generator and the split.
        quick: A smaller run, for tests.

    Returns:
        The process exit status.
    """
    from pneumoloc.data.cache import prepare_cache
    from pneumoloc.data.synthetic import SynthConfig, generate_rsna

    if quick:
        n, image_size = min(n, 80), min(image_size, 96)
    data_dir = out / "synthetic-rsna"
    summary = generate_rsna(data_dir, SynthConfig(n=n, seed=seed, image_size=image_size))
    print(f"[1/2] synthetic RSNA data: {summary.n_images} images -> {data_dir}")
    cache = prepare_cache(data_dir, out / "cache", size=min(image_size, 256), split_seed=seed)
    sizes = cache.manifest["split"]["sizes"]
    print(f"[2/2] cache: {cache.manifest['n_ok']} images at {cache.size} px, split {sizes}")
    return 0
