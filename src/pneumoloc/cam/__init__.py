"""Heatmaps: classic CAM (ours, exact) and pytorch-grad-cam methods, with optional TTA.

Scale of the heatmaps: "cam" is in logit units (ReLU'd, not normalised; comparable across
images); the library methods are normalised per image to [0, 1] by pytorch-grad-cam. Pass
``scale_to_max=True`` to ``compute_cam`` to divide every heatmap by its maximum.

Importing this package does not import torch: the method names (:mod:`~pneumoloc.cam.names`)
are here at once, the rest is loaded on first use (``from pneumoloc.cam import compute_cam``
works as before), so a recipe can be checked on the ONNX Runtime path without torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from pneumoloc.cam.names import (
    CAM_ALIGNS,
    CAM_FLOORS,
    CAM_LAYER_CHOICES,
    CAM_METHODS,
    LIBRARY_METHODS,
    check_cam_floor,
    check_cam_method,
)

if TYPE_CHECKING:
    from pneumoloc.cam.classic import cam_cell_grids, classic_cam, eval_mode, upsample_cam
    from pneumoloc.cam.compute import compute_cam, open_cam
    from pneumoloc.cam.gradcam import (
        SingleLogitAsColumn,
        cam_layers_of,
        library_cam,
        resolve_target_layers,
        stage_layers,
    )
    from pneumoloc.cam.tta import DEFAULT_TTA_SCALES, tta_cam

_LAZY = {
    "cam_cell_grids": "classic",
    "classic_cam": "classic",
    "eval_mode": "classic",
    "upsample_cam": "classic",
    "compute_cam": "compute",
    "open_cam": "compute",
    "SingleLogitAsColumn": "gradcam",
    "cam_layers_of": "gradcam",
    "library_cam": "gradcam",
    "resolve_target_layers": "gradcam",
    "stage_layers": "gradcam",
    "DEFAULT_TTA_SCALES": "tta",
    "tta_cam": "tta",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)


__all__ = [
    "CAM_ALIGNS",
    "CAM_FLOORS",
    "CAM_LAYER_CHOICES",
    "CAM_METHODS",
    "DEFAULT_TTA_SCALES",
    "LIBRARY_METHODS",
    "SingleLogitAsColumn",
    "cam_cell_grids",
    "cam_layers_of",
    "check_cam_floor",
    "check_cam_method",
    "classic_cam",
    "compute_cam",
    "eval_mode",
    "library_cam",
    "open_cam",
    "resolve_target_layers",
    "stage_layers",
    "tta_cam",
    "upsample_cam",
]
