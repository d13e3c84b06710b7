"""Models by name: shapes, exact CAM identity, spec round trip, pretrained loading, errors."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from safetensors.torch import save_file
from torch import nn

from conftest import planted_square_batch, planted_square_hits, train_on_planted_squares
from pneumoloc.errors import CheckpointError, ConfigError
from pneumoloc.models import (
    LSE_R,
    MODELS,
    CamClassifier,
    build_model,
    build_model_from_spec,
    list_models,
)

NAMES = ["smallcamnet", "resnet18", "resnet50", "densenet121", "efficientnet_b0", "convnext_tiny"]
SIZE = 64
STRIDE = {"smallcamnet": 4}


@pytest.fixture(scope="module")
def models() -> dict[str, CamClassifier]:
    torch.manual_seed(0)
    return {name: build_model(name).eval() for name in NAMES}


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("name", NAMES)
def test_shapes_and_exact_cam(models: dict[str, CamClassifier], name: str, batch: int) -> None:
    model = models[name]
    x = torch.randn(batch, 1, SIZE, SIZE, generator=torch.Generator().manual_seed(batch))
    side = SIZE // STRIDE.get(name, 32)
    with torch.no_grad():
        logits = model(x)
        logits_cam, cam = model.forward_with_cam(x)
        feats = model.forward_features(x)
    assert logits.shape == (batch,)
    assert cam.shape == (batch, side, side)
    assert feats.shape == (batch, model.num_features, side, side)
    torch.testing.assert_close(logits_cam, logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(cam.mean(dim=(1, 2)), logits, atol=1e-5, rtol=0)
    # The CAM is the head applied at each location, bias included.
    hand = torch.einsum("bchw,c->bhw", feats, model.head.weight[0]) + model.head.bias[0]
    torch.testing.assert_close(cam, hand, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", NAMES)
def test_cam_target_layer_outputs_the_feature_map(
    models: dict[str, CamClassifier], name: str
) -> None:
    model = models[name]
    layer = model.cam_target_layer
    assert any(layer is m for m in model.modules())
    seen: list[torch.Tensor] = []
    handle = layer.register_forward_hook(lambda _m, _i, out: seen.append(out))
    x = torch.randn(2, 1, SIZE, SIZE)
    try:
        with torch.no_grad():
            feats = model.forward_features(x)
    finally:
        handle.remove()
    assert len(seen) == 1
    assert torch.equal(seen[0], feats)


@pytest.mark.parametrize("name", NAMES)
def test_every_parameter_gets_a_gradient(models: dict[str, CamClassifier], name: str) -> None:
    # DistributedDataParallel fails on unused parameters (e.g. ConvNeXt's head norm).
    model = models[name]
    model.zero_grad(set_to_none=True)
    model(torch.randn(2, 1, SIZE, SIZE)).sum().backward()
    unused = [n for n, p in model.named_parameters() if p.grad is None]
    model.zero_grad(set_to_none=True)
    assert not unused


@pytest.mark.parametrize("name", NAMES)
def test_spec_rebuilds_identical_architecture(models: dict[str, CamClassifier], name: str) -> None:
    model = models[name]
    assert model.spec["name"] == name
    rebuilt = build_model(**model.spec)
    rebuilt.load_state_dict(model.state_dict(), strict=True)
    again = build_model_from_spec(model.spec)
    assert again.spec == model.spec
    x = torch.randn(2, 1, SIZE, SIZE)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt.eval()(x), model(x))


def test_smallcamnet_is_the_notebook_network() -> None:
    model = build_model("smallcamnet")
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert [(c.in_channels, c.out_channels) for c in convs] == [
        (1, 16),
        (16, 32),
        (32, 64),
        (64, 64),
    ]
    assert all(c.kernel_size == (3, 3) and c.padding == (1, 1) for c in convs)
    assert sum(isinstance(m, nn.MaxPool2d) for m in model.modules()) == 2
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert sum(p.numel() for p in model.parameters()) == 60289
    assert list_models() == ["smallcamnet"] == sorted(MODELS)


def test_lse_pooling_is_exact_on_the_cam() -> None:
    model = build_model("smallcamnet", pool="lse").eval()
    x = torch.randn(3, 1, 32, 32)
    with torch.no_grad():
        logits, cam = model.forward_with_cam(x)
    flat = cam.flatten(1)
    expected = (torch.logsumexp(LSE_R * flat, dim=1) - math.log(flat.shape[1])) / LSE_R
    torch.testing.assert_close(logits, expected)
    assert torch.all(logits >= cam.mean(dim=(1, 2)) - 1e-6)  # LSE lies between mean and max
    assert torch.all(logits <= cam.amax(dim=(1, 2)) + 1e-6)


def test_output_stride_dilates_where_timm_supports_it() -> None:
    model = build_model("resnet18", output_stride=16).eval()
    with torch.no_grad():
        _, cam = model.forward_with_cam(torch.randn(1, 1, SIZE, SIZE))
    assert cam.shape == (1, SIZE // 16, SIZE // 16)
    assert model.spec["kwargs"]["output_stride"] == 16
    with pytest.raises(ConfigError, match="output_stride=16"):
        build_model("densenet121", output_stride=16)
    with pytest.raises(ConfigError, match="fixed output stride"):
        build_model("smallcamnet", output_stride=16)


def test_drop_rate_only_acts_in_training() -> None:
    model = build_model("smallcamnet", drop_rate=0.5)
    x = torch.rand(4, 1, 32, 32)
    with torch.no_grad():
        model.eval()
        a, b = model(x), model(x)
        model.train()
        torch.manual_seed(0)
        c = model(x)
    torch.testing.assert_close(a, b)
    assert not torch.allclose(a, c)


def test_unknown_names_and_options_raise_config_error() -> None:
    with pytest.raises(ConfigError, match=r"smallcamnet.*timm\.list_models"):
        build_model("no_such_net")
    with pytest.raises(ConfigError, match="pooling"):
        build_model("smallcamnet", pool="median")
    with pytest.raises(ConfigError, match="ImageNet"):
        build_model("smallcamnet", pretrained="imagenet")


@pytest.fixture(scope="module")
def imagenet_resnet18() -> dict[str, torch.Tensor]:
    torch.manual_seed(1)
    return timm.create_model("resnet18", in_chans=3, num_classes=1000).state_dict()


def _check_resnet18_loaded(model: CamClassifier, source: dict[str, torch.Tensor]) -> None:
    loaded = model.backbone.state_dict()
    torch.testing.assert_close(loaded["conv1.weight"], source["conv1.weight"].sum(1, keepdim=True))
    for key in ("layer1.0.conv1.weight", "layer4.1.bn2.running_var", "bn1.bias"):
        assert torch.equal(loaded[key], source[key]), key


def test_pretrained_path_adapts_stem_and_drops_classifier(
    imagenet_resnet18: dict[str, torch.Tensor], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "resnet18.pth"
    torch.save(imagenet_resnet18, path)
    with caplog.at_level(logging.INFO, logger="pneumoloc.models.pretrained"):
        model = build_model("resnet18", pretrained=str(path))
    _check_resnet18_loaded(model, imagenet_resnet18)
    assert "conv1.weight" in caplog.text  # the adapted stem is logged
    assert "pretrained" not in model.spec["kwargs"]
    assert model.head.weight.shape == (1, 512)


def test_pretrained_accepts_wrapped_prefixed_and_safetensors(
    imagenet_resnet18: dict[str, torch.Tensor], tmp_path: Path
) -> None:
    wrapped = tmp_path / "ddp.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in imagenet_resnet18.items()}}, wrapped)
    _check_resnet18_loaded(build_model("resnet18", pretrained=wrapped), imagenet_resnet18)
    safe = tmp_path / "resnet18.safetensors"
    save_file({f"model.{k}": v.contiguous() for k, v in imagenet_resnet18.items()}, str(safe))
    _check_resnet18_loaded(build_model("resnet18", pretrained=safe), imagenet_resnet18)


def test_pretrained_of_another_architecture_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "densenet.pth"
    torch.save(timm.create_model("densenet121", num_classes=10).state_dict(), path)
    with pytest.raises(CheckpointError, match=r"densenet\.pth.*another architecture"):
        build_model("resnet18", pretrained=path)


def test_pretrained_missing_or_unreadable_file(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="not found"):
        build_model("resnet18", pretrained=tmp_path / "nope.pth")
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match=r"junk\.pth: cannot read"):
        build_model("resnet18", pretrained=junk)


def test_topk_pooling_is_the_mean_of_the_strongest_locations() -> None:
    from pneumoloc.models.classifier import topk_pool_cam

    cam = torch.arange(100, dtype=torch.float32).reshape(1, 10, 10)
    assert topk_pool_cam(cam, 0.1).item() == pytest.approx(float(np.mean(np.arange(90, 100))))
    model = build_model("smallcamnet", pool="topk")
    x = torch.randn(2, 1, 32, 32)
    logits, cam2 = model.forward_with_cam(x)
    torch.testing.assert_close(logits, topk_pool_cam(cam2))
    torch.testing.assert_close(model(x), logits)


def test_attention_pooling_is_exact_and_trains_to_find_a_planted_opacity() -> None:
    from pneumoloc.io.preprocess import to_model_input

    torch.manual_seed(0)
    model = build_model("smallcamnet", pool="attention")
    assert model.attention is not None
    x = torch.randn(3, 1, 32, 32)
    logits, cam = model.forward_with_cam(x)
    weights = model.attention(model.forward_features(x))
    assert weights.shape == cam.shape
    torch.testing.assert_close(weights.sum(dim=(1, 2)), torch.ones(3))
    torch.testing.assert_close(logits, (weights * cam).sum(dim=(1, 2)))
    # Rebuilds from its spec (so checkpoints load) and every parameter learns.
    again = build_model(model.spec["name"], **model.spec["kwargs"])
    again.load_state_dict(model.state_dict())
    model(x).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())

    # Planted opacity (conftest.planted_square_batch): untrained, the CAM peaks on the brighter
    # distractor line; after a short training the attention-pooled CAM peaks inside the square.
    def hits_after(steps: int) -> int:
        torch.manual_seed(1)
        model = train_on_planted_squares(build_model("smallcamnet", pool="attention"), steps)
        images, _, corners = planted_square_batch(torch.Generator().manual_seed(2), 16)
        model.eval()
        with torch.no_grad():
            _, cam = model.forward_with_cam(to_model_input(images))
        return planted_square_hits(cam, corners)

    assert hits_after(0) <= 2
    assert hits_after(80) >= 6
