"""Shared fixtures: small data sets written into tmp folders (never into ../shared)."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
RSNA_SAMPLE = SHARED_DATA / "rsna-pneumonia-sample"
KERMANY = SHARED_DATA / "kermany-pediatric" / "train"


@pytest.fixture(autouse=True)
def _isolated_cache_dir(
    tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Default caches go to a temporary folder, never the user's home."""
    monkeypatch.setenv("PNEUMOLOC_CACHE_DIR", str(tmp_path_factory.mktemp("cache-root")))


def write_folder_dataset(root: Path, n_per_class: int = 6, size: int = 48, seed: int = 0) -> Path:
    """A NORMAL/PNEUMONIA folder of PNG and JPEG files with Kermany-style names."""
    rng = np.random.default_rng(seed)
    for label, cls in enumerate(("NORMAL", "PNEUMONIA")):
        folder = root / cls
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(n_per_class):
            img = rng.integers(0, 120, (size, size), dtype=np.uint8)
            if label:
                img[size // 4 : size // 2, size // 4 : size // 2] = 230
            person = i // 2  # two images per patient
            name = f"person{person}_bacteria_{i}.jpeg" if label else f"IM-{person:04d}-{i:04d}.png"
            Image.fromarray(img).save(folder / name)
    return root


@pytest.fixture
def folder_dataset(tmp_path: Path) -> Path:
    return write_folder_dataset(tmp_path / "kermany-like")


@pytest.fixture(scope="session")
def synth_rsna(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small synthetic RSNA-layout data set (64 px, 40 images), shared by the session."""
    from pneumoloc.data.synthetic import SynthConfig, generate_rsna

    out = tmp_path_factory.mktemp("synth-rsna")
    generate_rsna(out, SynthConfig(n=40, seed=3, image_size=64, prevalence=0.4))
    return out


def png_chunk(kind: bytes, data: bytes) -> bytes:
    """One PNG chunk: length, type, data, CRC."""
    crc = zlib.crc32(kind + data) & 0xFFFFFFFF
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)


def crafted_png(width: int, height: int) -> bytes:
    """A tiny PNG whose IHDR declares ``width`` x ``height`` 8-bit grayscale pixels."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", ihdr)
        + png_chunk(b"IDAT", zlib.compress(b"\x00" * 16))
        + png_chunk(b"IEND", b"")
    )


def save_untrained_checkpoint(
    path: Path,
    name: str = "smallcamnet",
    *,
    size: int,
    threshold: float,
    seed: int = 0,
    **extra: Any,
) -> Path:
    """A seeded, untrained model whose positive head on ReLU features gives non-flat CAMs."""
    import torch

    from pneumoloc.checkpoint import save_checkpoint
    from pneumoloc.models import build_model

    torch.manual_seed(seed)
    model = build_model(name)
    with torch.no_grad():
        model.head.weight.abs_()
        model.head.bias.zero_()
    payload = {
        "model": model.spec,
        "state_dict": model.state_dict(),
        "image_size": size,
        "threshold": threshold,
        **extra,
    }
    save_checkpoint(path, payload)
    return path
