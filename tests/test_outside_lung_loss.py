"""The outside-lung loss (``train --outside-lung-loss``) on a planted task with a shortcut.

The planted-opacity task of ``test_planted_opacity`` (a soft bright disc in one part of one
lung, image labels only), plus a shortcut: every positive also carries a bright square marker
in a top corner of the film, outside the body and the lungs (as a portable film's "AP" marker
or a side letter can be). The marker is a perfect, easy cue. A classifier trained on the image
labels alone (PYLON decoder with top-down drop, the variant that passes the planted test)
learns it and points at the marker: the control fails. With the outside-lung loss (the CAM's
strongest location outside pneumoloc's own label-free lung mask is pushed to "no pneumonia"),
the same model, seed and batches must explain the positives inside the lungs: its peak lands on
the disc. Its default box is not yet small enough to pass the planted test's box bar (a strict
xfail below records the measured shortfall). No box and no true mask reach
training: the loss computes its masks from the pixels (``estimate_lung_mask``).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pneumoloc.io.preprocess import to_model_input
from pneumoloc.localise.boxes import BoxConfig
from pneumoloc.localise.lungs import estimate_lung_mask
from pneumoloc.models import build_model
from pneumoloc.models.pyramid import TOP_DOWN_DROP
from pneumoloc.training.anatomy_loss import outside_lung_cells, outside_lung_loss
from test_planted_opacity import (
    BATCH,
    ENCODER,
    PASS_FRACTION,
    SIZE,
    STEPS,
    Planted,
    _two_threads,  # noqa: F401  (its autouse fixture: two torch threads for this module)
    chest_batch,
    passes,
    score_positives,
)

MARKER = 12  # px, the side of the shortcut's square
WEIGHT = 1.0
N_TEST = 64


def with_marker(
    g: torch.Generator, batch: Planted, labels: torch.Tensor
) -> tuple[Planted, torch.Tensor]:
    """Paint a bright square in a random top corner of every positive; also its xywh box
    (zeros for negatives)."""
    images = batch.images.clone()
    boxes = torch.zeros(len(labels), 4)
    for i in np.flatnonzero(labels.numpy() > 0.5):
        x = int(torch.randint(2, 10, (1,), generator=g))
        if bool(torch.rand(1, generator=g) < 0.5):
            x = SIZE - MARKER - x
        y = int(torch.randint(1, 6, (1,), generator=g))
        images[i, 0, y : y + MARKER, x : x + MARKER] = 235
        boxes[i] = torch.tensor([x, y, MARKER, MARKER], dtype=torch.float32)
    return batch._replace(images=images), boxes


def train(weight: float, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(0)
    model = build_model(ENCODER, decoder="pylon", pool="max", decoder_drop=TOP_DOWN_DROP)
    g = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    labels = (torch.arange(BATCH) % 2).float()
    model.train()
    for _ in range(STEPS):
        images = with_marker(g, chest_batch(g, labels), labels)[0].images
        logits, cam = model(to_model_input(images), with_cam=True)
        loss = F.binary_cross_entropy_with_logits(logits, labels)
        if weight > 0:
            loss = loss + weight * outside_lung_loss(cam, images.float() / 255.0)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


def localisation(model: torch.nn.Module) -> dict[str, Any]:
    """Pointing / box hit on held-out positives with the marker, as the planted test measures
    them, with boxes drawn as the shipped recipe draws them (heatmap restricted to the
    estimated lung mask); plus how often the peak is on the marker (within one stride-8 cell)."""
    g = torch.Generator().manual_seed(12345)
    ones, zeros = torch.ones(N_TEST), torch.zeros(N_TEST)
    pos, markers = with_marker(g, chest_batch(g, ones), ones)
    neg = chest_batch(g, zeros)
    masks = [estimate_lung_mask(pos.images[i, 0].numpy()) for i in range(N_TEST)]
    metrics, heat = score_positives(model, pos, neg, BoxConfig(), masks)
    on_marker = 0
    for i in range(N_TEST):
        py, px = divmod(int(heat[i].argmax()), SIZE)
        mx, my, mw, mh = markers[i].tolist()
        on_marker += mx - 8 <= px <= mx + mw + 8 and my - 8 <= py <= my + mh + 8
    return {**metrics, "on_marker": on_marker / N_TEST}


def test_the_marker_is_outside_the_estimated_lungs() -> None:
    g = torch.Generator().manual_seed(3)
    ones = torch.ones(16)
    batch, _ = with_marker(g, chest_batch(g, ones), ones)
    outside = outside_lung_cells(batch.images.float() / 255.0, (SIZE, SIZE))
    marker = batch.images[:, 0] == 235
    assert bool(outside[marker].all())  # every marker pixel is outside the mask
    # the estimate is not perfect (a bright opacity can drop out of a dark-lung mask), but it
    # leaves out under 1 % of the true lung pixels
    assert float((outside & batch.lungs).sum()) <= 0.01 * float(batch.lungs.sum())


def test_loss_is_zero_without_outside_cells_and_positive_with_them() -> None:
    images = torch.full((2, 1, 32, 32), 0.5)
    cam = torch.zeros(2, 4, 4, requires_grad=True)
    loss = outside_lung_loss(cam, images)  # a flat image has no lung mask: nothing is outside
    assert float(loss.detach()) == 0.0
    loss.backward()  # and it still has a gradient path
    planted = chest_batch(torch.Generator().manual_seed(1), torch.zeros(2))
    hot = torch.full((2, 12, 12), 5.0, requires_grad=True)
    value = outside_lung_loss(hot, planted.images.float() / 255.0)
    assert float(value.detach()) == pytest.approx(float(F.softplus(torch.tensor(5.0))), rel=1e-5)
    value.backward()
    assert hot.grad is not None and float(hot.grad.abs().sum()) > 0


@pytest.fixture(scope="module")
def control() -> dict[str, Any]:
    return localisation(train(0.0))


@pytest.fixture(scope="module")
def constrained() -> dict[str, Any]:
    return localisation(train(WEIGHT))


def test_without_the_loss_the_model_takes_the_shortcut(control: dict[str, Any]) -> None:
    assert control["auroc"] >= 0.95, control  # it learnt the labels...
    assert control["on_marker"] >= 0.9, control  # ...from the marker, not the opacity
    assert control["pointing"] < PASS_FRACTION and not passes(control), control


def test_with_the_loss_the_peak_lands_on_the_opacity(constrained: dict[str, Any]) -> None:
    assert constrained["auroc"] >= 0.95, constrained
    assert constrained["on_marker"] <= 0.05, constrained
    assert constrained["pointing"] >= PASS_FRACTION, constrained


@pytest.mark.xfail(
    strict=True,
    reason="measured (docs/localisation.md round 3f): the constrained map's peak is on the "
    "opacity (pointing 0.89) but its default peak-0.5 box is larger (median 0.30 of the "
    "lung's box): box hit 0.55 < 0.6. Strict: a pass means the docs need updating.",
)
def test_with_the_loss_the_box_is_on_the_opacity_and_far_smaller_than_the_lung(
    constrained: dict[str, Any],
) -> None:
    assert passes(constrained), constrained


if __name__ == "__main__":  # the seed sweep of docs/localisation.md, round 3f
    import sys

    torch.set_num_threads(2)
    for seed in [int(a) for a in sys.argv[1:]] or [0, 1, 2]:
        for weight in (0.0, WEIGHT):
            print(f"seed {seed} weight {weight}:", localisation(train(weight, seed)), flush=True)
