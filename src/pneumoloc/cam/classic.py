"""Classic class activation maps (Zhou et al. 2016), exact for ``CamClassifier``.

The heatmap is the model's own CAM ``w · f(y, x) + b`` (see
``pneumoloc.models.classifier``), bilinearly upsampled to the input size and then ReLU'd:
negative evidence (locations voting "no pneumonia") is clipped to 0. Values are in logit
units, not normalised, so they are comparable across images.

Upsampling (``align``, :data:`pneumoloc.cam.names.CAM_ALIGNS`): ``"centre"`` is
``F.interpolate(..., align_corners=False)``; ``"cells"`` interpolates from the input pixel each
cell's window is centred on (:func:`cam_cell_grids`, found once per model by a forward pass
at 64 px with hooks on its strided layers, :mod:`pneumoloc.models.grid`), so the heatmap sits
where the evidence was seen.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pneumoloc.cam.names import CAM_ALIGNS, check_cam_floor
from pneumoloc.errors import ConfigError
from pneumoloc.models.classifier import CamClassifier
from pneumoloc.models.grid import CellGrid, Transition, feature_grids, model_transitions, resample

_TRANSITIONS: weakref.WeakKeyDictionary[nn.Module, list[Transition]] = weakref.WeakKeyDictionary()


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put ``model`` in eval mode and restore every submodule's own training flag afterwards.

    Restoring per submodule (not ``model.train(was_training)``) keeps, e.g., BatchNorm layers
    a training loop froze in eval mode frozen.
    """
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for module, training in modes:
            module.training = training


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (CPU for a model without parameters)."""
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def prepare_input(model: nn.Module, x: Tensor) -> Tensor:
    """Check that ``x`` is a (B, 1, H, W) batch and move it to the model's device and dtype.

    Raises:
        ValueError: ``x`` has another shape.
    """
    if x.ndim != 4 or x.shape[1] != 1:
        raise ValueError(f"expected a batch of 1-channel images (B, 1, H, W), got {tuple(x.shape)}")
    param = next(model.parameters(), None)
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    return x.to(device=model_device(model), dtype=dtype)


def cam_cell_grids(model: nn.Module, size: tuple[int, int]) -> tuple[CellGrid, CellGrid]:
    """Where the cells of ``model``'s final feature map sit for an input of ``size`` (H, W):
    the row and the column grids (:class:`pneumoloc.models.grid.CellGrid`).

    Raises:
        ConfigError: The model's strided layers cannot be placed (see
            :func:`pneumoloc.models.grid.model_transitions`).
    """
    transitions = _TRANSITIONS.get(model)
    if transitions is None:
        transitions = model_transitions(model)
        _TRANSITIONS[model] = transitions
    rows, cols = feature_grids(transitions, size[0]), feature_grids(transitions, size[1])
    return rows[max(rows)], cols[max(cols)]


def upsample_cam(
    cam: Tensor, size: tuple[int, int], grids: tuple[CellGrid, CellGrid] | None = None
) -> Tensor:
    """Bilinearly resize maps (B, h, w) to (B, *size), as float32: with ``grids`` (rows,
    columns; :func:`cam_cell_grids`) from the cells' true centres, else with
    ``align_corners=False``."""
    if grids is not None:
        rows = (grids[0], [float(i) for i in range(size[0])])
        cols = (grids[1], [float(i) for i in range(size[1])])
        return resample(cam.float(), rows, cols)
    resized = F.interpolate(
        cam.float().unsqueeze(1), size=size, mode="bilinear", align_corners=False
    )
    return resized.squeeze(1)


def check_cam_align(align: str) -> None:
    """Raise :class:`ConfigError` naming the choices unless ``align`` is in ``CAM_ALIGNS``."""
    if align not in CAM_ALIGNS:
        raise ConfigError(f"unknown cam_align {align!r}; choose one of {list(CAM_ALIGNS)}")


def classic_cam(
    model: CamClassifier, x: Tensor, align: str = "centre", floor: str = "relu"
) -> tuple[Tensor, Tensor]:
    """Probabilities and classic CAM heatmaps from one forward pass, in eval mode.

    Args:
        model: The classifier; its training flags are restored afterwards.
        x: Images (B, 1, H, W); moved to the model's device.
        align: How the CAM is upsampled (:data:`pneumoloc.cam.names.CAM_ALIGNS`).
        floor: ``"relu"`` clips negative evidence to 0; ``"shift"`` subtracts each map's
            minimum instead; ``"auto"`` shifts only a map with no positive value
            (:data:`pneumoloc.cam.names.CAM_FLOORS`).

    Returns:
        ``probs`` (B,), the sigmoid of the logits, and ``heatmaps`` (B, H, W) float32 >= 0 in
        logit units at the input resolution, both on the model's device.
    """
    check_cam_align(align)
    check_cam_floor(floor)
    x = prepare_input(model, x)
    size = (int(x.shape[-2]), int(x.shape[-1]))
    grids = cam_cell_grids(model, size) if align == "cells" else None
    with eval_mode(model), torch.no_grad():
        logits, cam = model.forward_with_cam(x)
    return torch.sigmoid(logits.float()), floor_cam(upsample_cam(cam, size, grids), floor)


def floor_cam(heatmaps: Tensor, floor: str) -> Tensor:
    """Maps (B, H, W) made non-negative as ``floor`` says (``CAM_FLOORS``): ReLU'd, minus
    each map's minimum, or ("auto") ReLU'd where the map has a positive value and shifted
    where it has none. The ONNX export computes the same function."""
    shifted = heatmaps - heatmaps.amin(dim=(-2, -1), keepdim=True)
    if floor == "shift":
        return shifted
    if floor == "auto":
        positive = heatmaps.amax(dim=(-2, -1), keepdim=True) > 0
        return torch.where(positive, heatmaps.relu(), shifted)
    return heatmaps.relu()
