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

    from pneumoloc.models import build_model
    from pneumoloc.models.checkpoint import save_checkpoint

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


def planted_square_batch(generator: Any, n: int, size: int = 32) -> tuple[Any, Any, list]:
    """A localisation task with a known answer: uint8 noise images (n, 1, size, size), label 1
    for odd indices, which carry a mid-grey 10x10 square (the "opacity"); every image has a
    BRIGHTER 2-pixel horizontal line elsewhere (a distractor that an untrained network's CAM
    follows). Returns images, float labels and the square's (y, x) top-left corners."""
    import torch

    images = torch.randint(0, 100, (n, 1, size, size), generator=generator, dtype=torch.uint8)
    labels = (torch.arange(n) % 2).float()
    corners = []
    for i in range(n):
        y, x = torch.randint(2, size - 12, (2,), generator=generator).tolist()
        line = (y + size // 2) % (size - 8)
        images[i, :, line : line + 2, :] = 250
        corners.append((y, x))
        if labels[i]:
            images[i, :, y : y + 10, x : x + 10] = 160
    return images, labels, corners


def train_on_planted_squares(model: Any, steps: int, lr: float = 3e-3) -> Any:
    """``steps`` AdamW steps of BCE on fresh ``planted_square_batch`` batches of 16."""
    import torch

    from pneumoloc.io.preprocess import to_model_input

    generator = torch.Generator().manual_seed(1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    for _ in range(steps):
        images, labels, _ = planted_square_batch(generator, 16)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(
            model(to_model_input(images)), labels
        )
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model


def planted_square_hits(heatmaps: Any, corners: list, size: int = 32) -> int:
    """How many positives (odd indices) have their heatmap maximum inside the square (1 px
    tolerance); heatmaps (n, h, w) at any resolution, upsampled bilinearly to ``size``."""
    import torch

    up = torch.nn.functional.interpolate(
        torch.as_tensor(heatmaps, dtype=torch.float32)[:, None], size=(size, size), mode="bilinear"
    )[:, 0]
    hits = 0
    for i in range(1, len(corners), 2):
        yy, xx = divmod(int(up[i].flatten().argmax()), size)
        y, x = corners[i]
        hits += int(y - 1 <= yy <= y + 10 and x - 1 <= xx <= x + 10)
    return hits
