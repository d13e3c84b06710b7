"""``cam_align`` (issue 13): the classic CAM upsampled from where its cells look.

A CNN whose strided layers use TensorFlow "SAME" padding (timm's ``tf_*`` models, the shipped
default among them) centres cell ``j`` of its stride-32 map on input pixel ``32 j + 31``;
``align_corners=False`` upsampling draws it at ``32 j + 15.5``, 15.5 px up and left. A model
of fixed averaging layers sees a planted bright square where it is: with ``"cells"`` the
heatmap's centre of mass lands on the square, with ``"centre"`` (the control) it misses.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from pneumoloc.cam import compute_cam
from pneumoloc.cam.classic import cam_cell_grids, upsample_cam
from pneumoloc.errors import ConfigError
from pneumoloc.inference.recipe import InferenceRecipe
from pneumoloc.models.classifier import CamClassifier
from pneumoloc.models.grid import CellGrid


def _averaging_model(same_padding: bool) -> CamClassifier:
    """Five stride-2 3x3 mean filters (TF "SAME" or symmetric padding): the stride-32 map is a
    local average of the image, the head copies it, so the CAM is where the image is bright."""
    from timm.layers import create_conv2d

    layers: list[nn.Module] = []
    for _ in range(5):
        conv = (
            create_conv2d(1, 1, 3, stride=2, padding="same")
            if same_padding
            else nn.Conv2d(1, 1, 3, stride=2, padding=1)
        )
        with torch.no_grad():
            conv.weight.fill_(1.0 / 9.0)
            if conv.bias is not None:
                conv.bias.zero_()
        layers.append(conv)
    model = CamClassifier(nn.Sequential(*layers), num_features=1)
    with torch.no_grad():
        model.head.weight.fill_(1.0)
        model.head.bias.zero_()
    return model.eval()


def _centroid(heatmap: torch.Tensor) -> tuple[float, float]:
    h = heatmap.double()
    rows = torch.arange(h.shape[-2], dtype=torch.float64)[:, None]
    cols = torch.arange(h.shape[-1], dtype=torch.float64)[None, :]
    total = h.sum()
    return float((h * rows).sum() / total), float((h * cols).sum() / total)


@pytest.mark.parametrize("same_padding", [True, False])
def test_cells_centre_the_heat_on_a_planted_square_and_centre_misses(same_padding: bool) -> None:
    model = _averaging_model(same_padding)
    size, side = 192, 24
    misses = {"cells": [], "centre": []}
    for top, left in [(20, 36), (84, 100), (130, 52), (60, 140)]:
        x = torch.zeros(1, 1, size, size)
        x[..., top : top + side, left : left + side] = 1.0
        centre = (top + (side - 1) / 2, left + (side - 1) / 2)
        for align in misses:
            _, heat = compute_cam(model, x, align=align)
            r, c = _centroid(heat[0])
            misses[align].append(float(np.hypot(r - centre[0], c - centre[1])))
    # "cells": within a few pixels (the square by the top border is pulled by the border);
    # "centre": off by about the half-cell offset, sqrt(2) x 15.5 px on TF padding.
    assert max(misses["cells"]) < 9.0 and np.mean(misses["cells"]) < 4.5, misses
    assert min(misses["centre"]) > 15.0, misses


def test_cell_grids_of_the_padding_rules() -> None:
    tf = cam_cell_grids(_averaging_model(True), (192, 160))
    sym = cam_cell_grids(_averaging_model(False), (192, 192))
    assert tf == (CellGrid(32.0, 31.0), CellGrid(32.0, 31.0))
    assert sym == (CellGrid(32.0, 0.0), CellGrid(32.0, 0.0))


def test_cells_upsampling_interpolates_between_true_centres_and_keeps_borders() -> None:
    cam = torch.zeros(1, 6, 6)
    cam[0, 2, 3] = 1.0
    grid = CellGrid(32.0, 31.0)
    heat = upsample_cam(cam, (192, 192), (grid, grid))
    assert heat.shape == (1, 192, 192)
    assert float(heat[0, 2 * 32 + 31, 3 * 32 + 31]) == pytest.approx(1.0)
    assert float(heat[0, 2 * 32 + 31 - 16, 3 * 32 + 31]) == pytest.approx(0.5)
    assert torch.all(heat >= 0) and float(heat.max()) == pytest.approx(1.0)
    ones = upsample_cam(torch.ones(2, 6, 6), (192, 192), (grid, grid))
    assert torch.allclose(ones, torch.ones_like(ones))  # weights sum to one, borders included


def test_a_2x2_pooling_grid_is_where_align_corners_false_puts_it() -> None:
    """SmallCAMNet pools 2x2 with stride 2: cell j at s j + (s - 1) / 2, so "cells" and
    "centre" agree for it (the alignment matters for padded strided convolutions)."""
    from pneumoloc.models import build_model

    rows, cols = cam_cell_grids(build_model("smallcamnet"), (64, 64))
    assert rows == cols and rows.offset == (rows.stride - 1) / 2


def test_the_shipped_default_sits_on_the_tf_grid() -> None:
    from pneumoloc.inference.loading import load_predictor

    predictor = load_predictor("default", "torch", device="cpu")
    grids = cam_cell_grids(predictor.model, (192, 192))  # type: ignore[attr-defined]
    assert grids == (CellGrid(32.0, 31.0), CellGrid(32.0, 31.0))


def test_cam_align_is_checked_and_only_for_the_classic_cam() -> None:
    with pytest.raises(ConfigError, match="cam_align"):
        InferenceRecipe(cam_align="corners")
    with pytest.raises(ConfigError, match="classic CAM"):
        InferenceRecipe(cam_method="gradcam", cam_align="cells")
    assert InferenceRecipe.from_meta({}).cam_align == "centre"  # older checkpoints
    model = _averaging_model(True)
    with pytest.raises(ConfigError, match="classic CAM"):
        compute_cam(model, torch.zeros(1, 1, 64, 64), method="gradcam", align="cells")


def test_onnx_graph_of_a_cells_checkpoint_matches_torch_and_refuses_the_other_alignment(
    tmp_path: Path,
) -> None:
    from conftest import save_untrained_checkpoint
    from pneumoloc.export import export_onnx
    from pneumoloc.inference.loading import load_predictor
    from pneumoloc.inference.onnx_backend import OnnxPredictor
    from pneumoloc.inference.torch_backend import Predictor

    ckpt = save_untrained_checkpoint(
        tmp_path / "m.pt", "tf_efficientnet_lite0", size=64, threshold=0.5, cam_align="cells"
    )
    path = export_onnx(ckpt, tmp_path / "m.onnx").path  # checks ONNX == torch itself
    onnx_pred = OnnxPredictor.from_onnx(path)
    torch_pred = load_predictor(ckpt, "torch", device="cpu")
    assert onnx_pred.recipe.cam_align == torch_pred.recipe.cam_align == "cells"
    images = np.random.default_rng(0).integers(0, 256, (3, 64, 64), dtype=np.uint8)
    _, onnx_maps = onnx_pred.heatmaps(images)
    _, torch_maps = torch_pred.heatmaps(images)
    np.testing.assert_allclose(onnx_maps, torch_maps, atol=1e-4)
    centre = Predictor.from_checkpoint(ckpt, device="cpu", cam_align="centre")
    assert np.abs(centre.heatmaps(images)[1] - torch_maps).max() > 1e-3  # it does change maps
    with pytest.raises(ConfigError, match="cam_align"):
        OnnxPredictor.from_onnx(path, cam_align="centre")
