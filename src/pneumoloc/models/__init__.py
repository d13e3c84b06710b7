"""Classifiers with exact class activation maps, built by name."""

from pneumoloc.models.classifier import LSE_R, POOL_NAMES, POOLS, CamClassifier
from pneumoloc.models.factory import (
    IMAGENET,
    MODELS,
    build_model,
    build_model_from_spec,
    list_models,
)
from pneumoloc.models.pretrained import LoadReport, load_pretrained_backbone

__all__ = [
    "IMAGENET",
    "LSE_R",
    "MODELS",
    "POOLS",
    "POOL_NAMES",
    "CamClassifier",
    "LoadReport",
    "build_model",
    "build_model_from_spec",
    "list_models",
    "load_pretrained_backbone",
]
