"""Planted opacity, image labels only: the stride-8 decoder's box lands on it, far smaller than
its lung; the untrained model and PYLON's decoder without top-down drop fail the same test.

The task (:func:`chest_batch`, drawn in torch so every step sees fresh images): a bright body
ellipse with two darker lung ellipses, smooth texture and pixel noise, 96 px; a positive carries
one soft bright disc (the opacity, 13 px across) in a random lung, in a random third of it
(upper, middle, lower), at a random place there. A classifier is trained on the image labels
alone; on held-out positives its classic CAM (``pneumoloc.cam.compute_cam``) goes through
``cam_to_boxes`` (default settings, no gate), and :func:`localisation` measures:

* pointing: the heatmap's maximum lies inside the opacity's box;
* box hit: the best box contains the opacity's centre **and** its area is under a third of the
  bounding box of the lung it is in.

PASS means both in at least :data:`PASS_FRACTION` of the positives. Measured on a 2-core CPU
(numbers and seed spread in docs/localisation.md, "Round 3b"): with top-down drop the decoder
passes at the seed used here (its pointing passes at every seed tried; its boxes at 2 of 3);
PYLON's decoder as published (drop 0) learns the labels just as well (AUROC ~1) but its maxima
sit where the upsampled coarse map peaks, not on the opacity, and it fails; so does the
untrained model. Seeds are fixed; each trained model takes ~15 s on an idle 2-core CPU.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, NamedTuple

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pneumoloc.cam import compute_cam
from pneumoloc.io.preprocess import to_model_input
from pneumoloc.localise.boxes import BoxConfig, cam_to_boxes
from pneumoloc.models import build_model
from pneumoloc.models.pyramid import TOP_DOWN_DROP

SIZE = 96
RADIUS = 0.07  # of the side: the opacity is a disc of 13.4 px
STEPS = 100
BATCH = 32
N_TEST = 64
PASS_FRACTION = 0.6
ENCODER = "test_resnet"  # timm's tiny test ResNet: no squeeze-excitation, so features stay local


def _uniform(g: torch.Generator, n: int, lo: float, hi: float) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(n, generator=g)


def _ellipse(
    u: torch.Tensor, v: torch.Tensor, centre: tuple[torch.Tensor, torch.Tensor], radii: Any
) -> torch.Tensor:
    """Soft (sigmoid-edged) filled ellipses, one per image: (n, SIZE, SIZE) in [0, 1]."""
    (cx, cy), (rx, ry) = centre, radii
    d = torch.sqrt(
        ((u - cx[:, None, None]) / rx[:, None, None]) ** 2
        + ((v - cy[:, None, None]) / ry[:, None, None]) ** 2
    )
    return torch.sigmoid((1.0 - d) * ry[:, None, None] / 0.015)


def _smooth_noise(g: torch.Generator, n: int, cells: int) -> torch.Tensor:
    z = torch.randn(n, 1, cells, cells, generator=g)
    return F.interpolate(z, size=(SIZE, SIZE), mode="bicubic", align_corners=False)[:, 0]


class Planted(NamedTuple):
    """A batch of the planted task; the opacity's box and its lung exist for negatives too
    (drawn, not painted)."""

    images: torch.Tensor  # (n, 1, SIZE, SIZE) uint8
    blob: torch.Tensor  # (n, 4) xywh box of the opacity, pixels
    lung_box: torch.Tensor  # (n, 4) xywh bounding box of the lung the opacity is in
    lungs: torch.Tensor  # (n, SIZE, SIZE) bool, both lung fields


def chest_batch(g: torch.Generator, labels: torch.Tensor) -> Planted:
    """``len(labels)`` images; the opacity is painted where ``labels`` is 1."""
    n = len(labels)
    c = (torch.arange(SIZE, dtype=torch.float32) + 0.5) / SIZE
    v, u = c[None, :, None].expand(n, SIZE, SIZE), c[None, None, :].expand(n, SIZE, SIZE)
    body = _ellipse(
        u,
        v,
        (_uniform(g, n, 0.47, 0.53), _uniform(g, n, 0.55, 0.6)),
        (_uniform(g, n, 0.38, 0.44), _uniform(g, n, 0.5, 0.56)),
    )
    img = 0.05 + body * _uniform(g, n, 0.5, 0.6)[:, None, None]
    sep, cy = _uniform(g, n, 0.17, 0.21), _uniform(g, n, 0.44, 0.5)
    rx, ry = _uniform(g, n, 0.11, 0.14), _uniform(g, n, 0.24, 0.29)
    lung_x = torch.stack([0.5 - sep, 0.5 + sep], dim=1)
    lungs = torch.stack([_ellipse(u, v, (lung_x[:, k], cy), (rx, ry)) for k in range(2)], dim=1)
    img = img - 0.3 * lungs.sum(1)
    img = img + 0.04 * _smooth_noise(g, n, 8) + 0.03 * _smooth_noise(g, n, 20) * lungs.sum(1)
    # the opacity: a random lung, a random third of it (top to bottom), a random place there
    side = torch.randint(0, 2, (n,), generator=g)
    third = torch.randint(0, 3, (n,), generator=g)
    b = -0.7 + (third + torch.rand(n, generator=g)) * (1.4 / 3)  # height in the lung, -1..1
    a = (2 * torch.rand(n, generator=g) - 1) * torch.sqrt(1 - b**2) * 0.55
    rows = torch.arange(n)
    bx, by = lung_x[rows, side] + a * rx, cy + b * ry
    r = torch.full((n,), RADIUS)
    disc = _ellipse(u, v, (bx, by), (r, r)) * lungs[rows, side]
    img = img + 0.35 * disc * labels[:, None, None]
    img = img + 0.03 * torch.randn(n, SIZE, SIZE, generator=g)
    blob = torch.stack([bx - r, by - r, 2 * r, 2 * r], dim=1) * SIZE
    lung = torch.stack([lung_x[rows, side] - rx, cy - ry, 2 * rx, 2 * ry], dim=1) * SIZE
    images = (img.clamp(0, 1) * 255).round().to(torch.uint8)[:, None]
    return Planted(images, blob, lung, lungs.sum(1) > 0.5)


def train(model: torch.nn.Module, steps: int = STEPS, seed: int = 0) -> torch.nn.Module:
    """``steps`` AdamW steps of BCE on fresh balanced batches (image labels only)."""
    g = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    labels = (torch.arange(BATCH) % 2).float()
    model.train()
    for _ in range(steps):
        images = chest_batch(g, labels).images
        loss = F.binary_cross_entropy_with_logits(model(to_model_input(images)), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


def localisation(
    model: torch.nn.Module,
    config: BoxConfig | None = None,
    *,
    lung_mask: bool = False,
    floor: str = "relu",
) -> dict[str, float]:
    """Pointing and box-hit fractions on held-out positives (+ AUROC against as many negatives,
    + median best-box area over the lung's bounding box). ``lung_mask``: boxes from the map
    zeroed outside the (true) lung fields, as the shipped recipe does with its own masks;
    ``floor``: the heatmap's ``cam_floor``."""
    g = torch.Generator().manual_seed(12345)
    pos = chest_batch(g, torch.ones(N_TEST))
    neg = chest_batch(g, torch.zeros(N_TEST))
    masks = [pos.lungs[i].numpy() if lung_mask else None for i in range(N_TEST)]
    return score_positives(model, pos, neg, config or BoxConfig(), masks, floor=floor)[0]


def score_positives(
    model: torch.nn.Module,
    pos: Planted,
    neg: Planted,
    config: BoxConfig,
    masks: list[np.ndarray | None],
    floor: str = "relu",
) -> tuple[dict[str, float], np.ndarray]:
    """:func:`localisation`'s figures for given positives and negatives (``masks``: per
    positive the lung mask its boxes are drawn inside, or None), and the positives' heatmaps."""
    from sklearn.metrics import roc_auc_score

    n = len(pos.images)
    blobs, lungs = pos.blob, pos.lung_box
    probs, heat = compute_cam(
        model, to_model_input(torch.cat([pos.images, neg.images])), floor=floor
    )
    heat_np = heat.numpy()
    pointing = hits = 0
    areas = []
    for i in range(n):
        bx, by, bw, bh = blobs[i].tolist()
        py, px = divmod(int(heat_np[i].argmax()), SIZE)
        pointing += bx <= px + 0.5 <= bx + bw and by <= py + 0.5 <= by + bh
        out = cam_to_boxes(heat_np[i], 1.0, threshold=0.0, config=config, lung_mask=masks[i])
        if len(out) == 0:
            areas.append(float("inf"))
            continue
        x, y, w, h = out.boxes[0]
        area = w * h / float(lungs[i, 2] * lungs[i, 3])
        areas.append(area)
        cx, cy = bx + bw / 2, by + bh / 2
        hits += bool(x <= cx <= x + w and y <= cy <= y + h and area < 1 / 3)
    labels = np.r_[np.ones(n), np.zeros(len(neg.images))]
    metrics = {
        "pointing": pointing / n,
        "box_hit": hits / n,
        "median_area": float(np.median(areas)),
        "auroc": float(roc_auc_score(labels, probs.numpy())),
    }
    return metrics, heat_np[:n]


def passes(m: dict[str, float]) -> bool:
    return m["pointing"] >= PASS_FRACTION and m["box_hit"] >= PASS_FRACTION


@pytest.fixture(scope="module", autouse=True)
def _two_threads() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def _pylon(drop: float) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(ENCODER, decoder="pylon", pool="max", decoder_drop=drop)


@pytest.fixture(scope="module")
def with_drop() -> dict[str, Any]:
    model = train(_pylon(TOP_DOWN_DROP))
    return {"model": model, "peak": localisation(model)}


def test_decoder_with_top_down_drop_finds_the_planted_opacity(with_drop: dict) -> None:
    m = with_drop["peak"]
    assert m["auroc"] >= 0.95, m  # it learnt the labels
    assert passes(m), m
    assert m["median_area"] < 1 / 3, m


def test_the_shipped_floor_keeps_the_peak_on_the_planted_opacity(with_drop: dict) -> None:
    """``cam_floor: shift`` (the default's recipe since issue 13) ranks the same locations:
    its peak is still on the opacity."""
    m = localisation(with_drop["model"], BoxConfig(rule="otsu"), lung_mask=True, floor="shift")
    assert m["pointing"] >= PASS_FRACTION, m


@pytest.mark.xfail(
    strict=True,
    reason="measured (docs/localisation.md, round 3g): on this task the shift map's Otsu and "
    "peak-0.5 regions take in the negative evidence around the opacity, so the box is most of "
    "the lung (median 0.56 of its box with the lung mask; box hit 0.00 vs 0.73 with ReLU). "
    "Strict: a pass means the docs need updating.",
)
def test_the_shipped_recipe_draws_a_box_far_smaller_than_the_lung(with_drop: dict) -> None:
    m = localisation(with_drop["model"], BoxConfig(rule="otsu"), lung_mask=True, floor="shift")
    assert passes(m), m


def test_control_untrained_model_fails() -> None:
    """Untrained, with its head made positive (as ``conftest.save_untrained_checkpoint`` does)
    so that its map is not all zero after the ReLU and has a hot spot to point with."""
    model = _pylon(TOP_DOWN_DROP).eval()
    with torch.no_grad():
        model.head.weight.abs_()
        model.head.bias.zero_()
    m = localisation(model)
    assert m["median_area"] != float("inf"), m  # it does draw boxes...
    assert not passes(m), m  # ...elsewhere
    assert m["box_hit"] < 0.2, m


def test_control_pylon_without_top_down_drop_fails() -> None:
    """The ablation: the same training with PYLON's decoder as published (drop 0)."""
    model = train(_pylon(0.0))
    m = localisation(model)
    assert m["auroc"] >= 0.95, m  # it learns the labels just as well...
    assert not passes(m), m  # ...but not where the opacity is


if __name__ == "__main__":  # the measurements of docs/localisation.md, round 3b (~3 min idle)
    from pneumoloc.inference.recipe import DEFAULT_INFERENCE_RECIPE

    torch.set_num_threads(2)
    rules = {
        "default boxes": (None, False),
        "shipped box rule + lung mask": (DEFAULT_INFERENCE_RECIPE.box_config, True),
        "multi": (BoxConfig(rule="multi"), False),
    }
    pylon = {"decoder": "pylon", "pool": "max"}
    runs: list[tuple[str, dict[str, Any], tuple[int, ...]]] = [
        (f"pylon drop {TOP_DOWN_DROP}", {**pylon, "decoder_drop": TOP_DOWN_DROP}, (0, 1, 2)),
        ("pylon drop 0", {**pylon, "decoder_drop": 0.0}, (0, 1, 2)),
        (
            f"pylon drop {TOP_DOWN_DROP}, corners alignment",
            {**pylon, "decoder_drop": TOP_DOWN_DROP, "decoder_align": "corners"},
            (0,),
        ),
        ("stride-32 CAM, max pooling", {"pool": "max"}, (0,)),
    ]
    for name, kwargs, seeds in runs:
        for seed in seeds:
            torch.manual_seed(seed)
            model = train(build_model(ENCODER, **kwargs), seed=seed)
            for rule, (config, lung_mask) in rules.items():
                m = localisation(model, config, lung_mask=lung_mask)
                values = ", ".join(f"{k} {v:.3f}" for k, v in m.items())
                print(f"{name}, seed {seed}, {rule}: {values}", flush=True)
