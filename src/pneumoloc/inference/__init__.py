"""The one inference path: a model -> probability, heatmap and scored boxes per image.

Used by ``evaluate`` (images from a cache), ``predict`` (files), ``submit`` and ``serve``
(uploaded bytes), so they can never disagree.

* :mod:`~pneumoloc.inference.recipe`: :class:`InferenceRecipe`, the settings stored with a model;
* :mod:`~pneumoloc.inference.prediction`: :class:`Prediction`;
* :mod:`~pneumoloc.inference.base`: :class:`BasePredictor`, everything after the network, and
  :func:`prediction_record`, the JSON record of a prediction;
* :mod:`~pneumoloc.inference.torch_backend`: :class:`Predictor` (PyTorch checkpoints);
* :mod:`~pneumoloc.inference.onnx_backend`: :class:`OnnxPredictor` (exported ONNX files);
* :mod:`~pneumoloc.inference.loading`: :func:`load_predictor`, a backend by name.

Importing this package does not import torch (``Predictor`` is loaded on first use).
"""

from typing import TYPE_CHECKING

from pneumoloc.inference.base import (
    DEFAULT_MODEL,
    DEFAULT_WEIGHTS,
    BasePredictor,
    prediction_record,
    resolve_checkpoint,
    split_settings,
)
from pneumoloc.inference.loading import BACKENDS, load_predictor
from pneumoloc.inference.prediction import Prediction
from pneumoloc.inference.recipe import (
    DEFAULT_INFERENCE_RECIPE,
    NOTEBOOK_RECIPE,
    InferenceRecipe,
)

if TYPE_CHECKING:
    from pneumoloc.inference.torch_backend import Predictor

__all__ = [
    "BACKENDS",
    "DEFAULT_INFERENCE_RECIPE",
    "DEFAULT_MODEL",
    "DEFAULT_WEIGHTS",
    "NOTEBOOK_RECIPE",
    "BasePredictor",
    "InferenceRecipe",
    "Prediction",
    "Predictor",
    "load_predictor",
    "prediction_record",
    "resolve_checkpoint",
    "split_settings",
]


def __getattr__(name: str) -> object:
    # The PyTorch backend is imported on first use: the ONNX Runtime path never needs torch.
    if name == "Predictor":
        from pneumoloc.inference.torch_backend import Predictor

        return Predictor
    # Names that left this module in 0.1 (kept for one release, with a warning).
    from pneumoloc._compat import moved_attribute

    return moved_attribute(
        __name__,
        name,
        {
            "OnnxPredictor": "pneumoloc.inference.onnx_backend",
            "prediction_overlay": "pneumoloc.report.overlay",
            "RECIPE_KEYS": None,  # InferenceRecipe.field_names()
            "stored_recipe": None,  # InferenceRecipe.from_meta / split_settings
        },
    )
