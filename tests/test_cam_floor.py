"""``cam_floor`` (issue 13): a heatmap for every film, even one whose every location votes "no".

The classic heatmap was ``relu(CAM)``. With global max pooling every CAM cell of a film scored
under 0.5 is negative, so its heatmap is all zero: no peak, no box, and a pointing game that
"points" at pixel (0, 0). On the RSNA sample that is most truly positive films for the pyramid
decoder (docs/localisation.md, round 3f). ``"shift"`` subtracts each map's minimum instead: the
locations keep their ranking. A model of fixed averaging layers whose CAM is the (negated)
image, shifted to be negative everywhere, shows both behaviours on a planted square.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from pneumoloc.cam import compute_cam
from pneumoloc.errors import ConfigError
from pneumoloc.inference.recipe import InferenceRecipe
from pneumoloc.models.classifier import CamClassifier


def _negative_model() -> CamClassifier:
    """Two stride-2 2x2 means, head weight 1, bias -10: the CAM is the image's local mean minus
    10, negative everywhere for inputs in the model's range, highest where the image is bright."""
    layers = []
    for _ in range(2):
        conv = nn.Conv2d(1, 1, 2, stride=2)
        with torch.no_grad():
            conv.weight.fill_(0.25)
            conv.bias.zero_()
        layers.append(conv)
    model = CamClassifier(nn.Sequential(*layers), num_features=1, pool="max")
    with torch.no_grad():
        model.head.weight.fill_(1.0)
        model.head.bias.fill_(-10.0)
    return model.eval()


def _square() -> tuple[torch.Tensor, tuple[slice, slice]]:
    x = torch.zeros(1, 1, 32, 32)
    where = (slice(8, 16), slice(20, 28))
    x[0, 0, where[0], where[1]] = 2.0
    return x, where


def test_relu_gives_an_empty_map_and_shift_finds_the_square() -> None:
    model = _negative_model()
    x, (rows, cols) = _square()
    p_relu, relu = compute_cam(model, x, floor="relu")
    p_shift, shift = compute_cam(model, x, floor="shift")
    torch.testing.assert_close(p_relu, p_shift)  # the probability does not change
    assert float(p_relu[0]) < 0.01  # the model says "no" everywhere
    assert float(relu.max()) == 0.0  # the control: nothing to point at
    r, c = divmod(int(shift[0].argmax()), 32)
    assert rows.start <= r < rows.stop and cols.start <= c < cols.stop
    assert float(shift.min()) == 0.0 and float(shift.max()) > 0.0


def test_both_floors_agree_where_the_map_has_positive_evidence() -> None:
    model = _negative_model()
    with torch.no_grad():
        model.head.bias.fill_(-0.5)  # the square's cells now vote "yes"
    x, _ = _square()
    _, relu = compute_cam(model, x, floor="relu", scale_to_max=True)
    _, shift = compute_cam(model, x, floor="shift", scale_to_max=True)
    assert int(relu[0].argmax()) == int(shift[0].argmax())


def test_auto_shifts_only_the_maps_without_positive_evidence() -> None:
    """``auto``: the ReLU map where some location votes "yes" (the negative evidence around it
    stays out), the shifted map where none does (never empty)."""
    model = _negative_model()
    x, _ = _square()
    _, all_negative = compute_cam(model, x, floor="auto")
    _, shifted = compute_cam(model, x, floor="shift")
    torch.testing.assert_close(all_negative, shifted)
    with torch.no_grad():
        model.head.bias.fill_(-0.5)  # the square's cells now vote "yes", the rest "no"
    _, auto = compute_cam(model, x, floor="auto")
    _, relu = compute_cam(model, x, floor="relu")
    _, shift = compute_cam(model, x, floor="shift")
    torch.testing.assert_close(auto, relu)
    assert float((relu[0] > 0).float().mean()) < float((shift[0] > 0).float().mean())


def test_cam_floor_is_checked_and_only_for_the_classic_cam() -> None:
    with pytest.raises(ConfigError, match="cam_floor"):
        InferenceRecipe(cam_floor="abs")
    with pytest.raises(ConfigError, match="classic CAM"):
        InferenceRecipe(cam_method="gradcam", cam_floor="shift")
    assert InferenceRecipe.from_meta({}).cam_floor == "relu"  # older checkpoints
    with pytest.raises(ConfigError, match="classic CAM"):
        compute_cam(_negative_model(), torch.zeros(1, 1, 32, 32), method="gradcam", floor="shift")
    with pytest.raises(ConfigError, match="cam_floor"):
        compute_cam(_negative_model(), torch.zeros(1, 1, 32, 32), floor="abs")


def test_torch_predictor_takes_the_floor_and_the_onnx_graph_carries_it(tmp_path: Path) -> None:
    """A graph exported with ``cam_floor`` shift computes the torch backend's shifted maps; a
    ReLU graph refuses a shift override (and evaluate keeps torch for it), and the reverse."""
    from conftest import save_untrained_checkpoint
    from pneumoloc.export import export_onnx
    from pneumoloc.inference.loading import onnx_equivalent
    from pneumoloc.inference.onnx_backend import OnnxPredictor
    from pneumoloc.inference.torch_backend import Predictor

    ckpt = save_untrained_checkpoint(tmp_path / "m.pt", "smallcamnet", size=32, threshold=0.5)
    shifted = Predictor.from_checkpoint(ckpt, device="cpu", cam_floor="shift")
    assert shifted.recipe.cam_floor == "shift"
    images = np.random.default_rng(0).integers(0, 256, (2, 32, 32), dtype=np.uint8)
    _, maps = shifted.heatmaps(images)
    assert np.all(maps.reshape(2, -1).max(axis=1) > 0)  # never empty
    path = export_onnx(ckpt, tmp_path / "m.onnx").path
    with pytest.raises(ConfigError, match="cam_floor"):
        OnnxPredictor.from_onnx(path, cam_floor="shift")
    assert onnx_equivalent(shifted, ckpt) is None  # evaluate keeps the torch backend

    auto_ckpt = save_untrained_checkpoint(
        tmp_path / "a.pt", "smallcamnet", size=32, threshold=0.5, cam_floor="auto"
    )
    assert export_onnx(auto_ckpt, tmp_path / "a.onnx").max_abs_diff_heatmap <= 1e-3
    assert OnnxPredictor.from_onnx(tmp_path / "a.onnx").recipe.cam_floor == "auto"
    # the same with every location voting "no": the graph's shift branch (export compares)
    from pneumoloc.models.checkpoint import load_checkpoint, save_checkpoint

    payload = load_checkpoint(auto_ckpt)
    payload["state_dict"]["head.bias"] = payload["state_dict"]["head.bias"] - 1.0  # CAM < 0
    save_checkpoint(tmp_path / "n.pt", payload)
    assert export_onnx(tmp_path / "n.pt", tmp_path / "n.onnx").max_abs_diff_heatmap <= 1e-3
    _, h_negative = OnnxPredictor.from_onnx(tmp_path / "n.onnx", lung_mask=False).heatmaps(images)
    assert np.all(h_negative.reshape(2, -1).max(axis=1) > 0)  # shifted, not empty
    shift_ckpt = save_untrained_checkpoint(
        tmp_path / "s.pt", "smallcamnet", size=32, threshold=0.5, cam_floor="shift"
    )
    export = export_onnx(shift_ckpt, tmp_path / "s.onnx")
    assert export.max_abs_diff_heatmap <= 1e-3
    onnx_shift = OnnxPredictor.from_onnx(tmp_path / "s.onnx", lung_mask=False)
    torch_shift = Predictor.from_checkpoint(shift_ckpt, device="cpu", lung_mask=False)
    torch_relu = Predictor.from_checkpoint(
        shift_ckpt, device="cpu", lung_mask=False, cam_floor="relu"
    )
    (_, h_onnx), (_, h_torch), (_, h_relu) = (
        p.heatmaps(images) for p in (onnx_shift, torch_shift, torch_relu)
    )
    assert np.abs(h_onnx - h_torch).max() <= 1e-3
    assert np.abs(h_relu - h_torch).max() > 1e-2  # the floors differ on these images
    with pytest.raises(ConfigError, match="cam_floor"):
        OnnxPredictor.from_onnx(tmp_path / "s.onnx", cam_floor="relu")
    twin = onnx_equivalent(torch_shift, tmp_path / "s.pt")
    assert twin is not None and twin.recipe.cam_floor == "shift"
    assert onnx_equivalent(torch_relu, tmp_path / "s.pt") is None
