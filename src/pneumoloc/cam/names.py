"""The heatmap methods by name, without importing torch (recipes and the command line check
names; the ONNX Runtime path never needs torch)."""

from __future__ import annotations

from pneumoloc.errors import ConfigError

__all__ = [
    "CAM_ALIGNS",
    "CAM_FLOORS",
    "CAM_LAYER_CHOICES",
    "CAM_METHODS",
    "LIBRARY_METHODS",
    "check_cam_method",
]

LIBRARY_METHODS: dict[str, str] = {
    "gradcam": "GradCAM",
    "gradcam++": "GradCAMPlusPlus",
    "hirescam": "HiResCAM",
    "layercam": "LayerCAM",
    "scorecam": "ScoreCAM",
    "eigencam": "EigenCAM",
}
"""Our method names -> pytorch_grad_cam class names (imported lazily: the library pulls in
OpenCV and matplotlib and takes seconds to import)."""

CAM_METHODS: dict[str, str] = {"cam": "classic CAM (exact, pneumoloc)", **LIBRARY_METHODS}
"""Method names (CLI choices) -> what computes them: "cam" is ours, the rest are
pytorch_grad_cam class names."""

CAM_LAYER_CHOICES = ("final", "stages")
"""``cam_layers`` options: the final feature map, or it fused with the two stages before it."""


CAM_ALIGNS = ("centre", "cells")
"""How the classic CAM is upsampled to the input: ``"centre"``, bilinear with
``align_corners=False`` (cell ``j`` drawn at ``s * j + (s - 1) / 2``, every version before 0.3);
``"cells"``, from where each cell's window really is centred (``pneumoloc.models.grid``: for the
TensorFlow-padded ``tf_*`` models ``s * j + s - 1``, half a cell, 15.5 px at stride 32, further
down and right; for symmetric padding ``s * j``)."""


CAM_FLOORS = ("relu", "shift", "auto")
"""How the classic CAM becomes a non-negative heatmap: ``"relu"`` clips negative evidence to 0
(every version before 0.4; a film whose every cell votes "no pneumonia" gets an all-zero map,
no peak and no box); ``"shift"`` subtracts the map's own minimum, so the locations keep their
ranking on every film (docs/localisation.md, round 3f: with global max pooling most truly
positive films of the RSNA sample have an all-negative CAM), but lifts the negative evidence
around a positive region into the map (round 3g); ``"auto"``: ReLU for a map with any
positive location, shift for a map with none."""


def check_cam_floor(floor: str) -> None:
    """Raise :class:`ConfigError` naming the choices unless ``floor`` is in ``CAM_FLOORS``."""
    if floor not in CAM_FLOORS:
        raise ConfigError(f"unknown cam_floor {floor!r}; choose one of {list(CAM_FLOORS)}")


def check_cam_method(method: str) -> None:
    """Raise :class:`ConfigError` naming the choices unless ``method`` is in ``CAM_METHODS``."""
    if method not in CAM_METHODS:
        raise ConfigError(f"unknown CAM method {method!r}; choose one of {list(CAM_METHODS)}")
