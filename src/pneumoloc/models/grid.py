"""Where the cells of a CNN's feature map sit in the input image, and resampling between grids.

A cell of a stride-``s`` feature map looks at a window of the input whose centre is at input
pixel ``s * j + offset`` (index coordinates: 0 is the centre of the first pixel). The offset
comes from the padding of the strided layers alone, not from the weights:

* symmetric padding (torchvision, timm's resnets and ``efficientnet_*``): a 3x3, stride-2,
  pad-1 convolution centres output ``j`` on input ``2 j``, so ``offset = 0`` at every stride;
* TensorFlow "SAME" padding (timm's ``tf_*`` models, on even sizes): the padding goes to the
  bottom/right, output ``j`` is centred on ``2 j + 1``, so ``offset = s - 1``.

Bilinear upsampling with ``align_corners=False`` (what ``F.interpolate`` and
``pneumoloc.cam.upsample_cam`` do) puts cell ``j`` at ``s * j + (s - 1) / 2``, half a cell away
from both. At stride 8 that is 3.5 px; at stride 32, 15.5 px. :func:`encoder_transitions`
records the strided layers of an encoder once, :func:`feature_grids` places every stride's
cells for a given input size (pure Python, so tracing for ONNX sees constants), and
:func:`resample` moves a map from one set of cell centres to another.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from pneumoloc.errors import ConfigError

__all__ = [
    "CellGrid",
    "Transition",
    "encoder_transitions",
    "feature_grids",
    "model_transitions",
    "resample",
    "upsampling_centres",
]


@dataclass(frozen=True)
class CellGrid:
    """Cell ``j`` of a feature map is centred on input pixel ``stride * j + offset``."""

    stride: float
    offset: float

    def centres(self, n: int) -> list[float]:
        """Input-pixel positions of the first ``n`` cells."""
        return [self.stride * j + self.offset for j in range(n)]


@dataclass(frozen=True)
class Transition:
    """One strided convolution or pooling, along one axis (square kernels and strides)."""

    kernel: int
    stride: int
    dilation: int
    padding: int
    dynamic_same: bool  # TensorFlow "SAME": padding computed from the input size
    ceil_mode: bool = False

    def left_padding(self, n: int) -> int:
        """Padding before the first input pixel, for an input of ``n`` pixels."""
        if not self.dynamic_same:
            return self.padding
        span = (self.kernel - 1) * self.dilation + 1
        total = max((math.ceil(n / self.stride) - 1) * self.stride + span - n, 0)
        return total // 2

    def out_size(self, n: int) -> int:
        """Output length for an input of ``n`` pixels."""
        if self.dynamic_same:
            return math.ceil(n / self.stride)
        span = (self.kernel - 1) * self.dilation + 1
        rounding = math.ceil if self.ceil_mode else math.floor
        return int(rounding((n + 2 * self.padding - span) / self.stride)) + 1

    def centre_of_first(self, n: int) -> float:
        """Input position of output 0's window centre (input of ``n`` pixels)."""
        return -self.left_padding(n) + (self.kernel - 1) * self.dilation / 2


def _first(value: Any) -> int:
    return int(value[0] if isinstance(value, (tuple, list)) else value)


def _transition(module: nn.Module) -> Transition | None:
    if not isinstance(module, (nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d)):
        return None
    stride = getattr(module, "stride", 1)
    kernel = getattr(module, "kernel_size", 1)
    if isinstance(stride, (tuple, list)) and len(set(stride)) > 1:
        raise ConfigError(f"{type(module).__name__} has unequal strides {stride}: unsupported")
    if _first(stride) <= 1:
        return None
    if isinstance(kernel, (tuple, list)) and len(set(kernel)) > 1:
        raise ConfigError(f"{type(module).__name__} has a non-square kernel {kernel}: unsupported")
    padding = getattr(module, "padding", 0)
    if isinstance(padding, str):
        raise ConfigError(f"{type(module).__name__} with padding={padding!r} and stride > 1")
    # timm's Conv2dSame, MaxPool2dSame, AvgPool2dSame pad in forward; StdConv2dSame says so in
    # its same_pad flag.
    dynamic = bool(getattr(module, "same_pad", type(module).__name__.endswith("Same")))
    return Transition(
        kernel=_first(kernel),
        stride=_first(stride),
        dilation=_first(getattr(module, "dilation", 1)),
        padding=_first(padding),
        dynamic_same=dynamic,
        ceil_mode=bool(getattr(module, "ceil_mode", False)),
    )


def encoder_transitions(
    encoder: Any, indices: Sequence[int], *, in_chans: int = 1, probe_size: int = 64
) -> list[Transition]:
    """The strided layers on an encoder's main path, in order, found by one forward pass.

    A zero image of ``probe_size`` pixels goes through ``encoder.forward_intermediates`` with a
    hook on every convolution and pooling; the first strided layer that leaves each resolution
    is on the main path (a residual block's shortcut runs after its first convolution). Where
    the paths disagree (ResNet-D's average-pooling shortcut sits half a pixel from its strided
    convolution), the main path's geometry is used.

    Raises:
        ConfigError: A layer cannot be placed (non-square strides or kernels, string padding
            with a stride), or an intermediate's resolution is not reached by the hooked layers
            (a functional pooling, say).
    """

    def run(probe: Tensor) -> list[Tensor]:
        return list(
            encoder.forward_intermediates(probe, indices=list(indices), intermediates_only=True)
        )

    return _strided_path(encoder, run, in_chans=in_chans, probe_size=probe_size)


def model_transitions(model: Any, *, in_chans: int = 1, probe_size: int = 64) -> list[Transition]:
    """:func:`encoder_transitions` for the final feature map of any model with a
    ``forward_features`` (``pneumoloc.models.CamClassifier``: timm backbones and the others).

    Raises:
        ConfigError: As :func:`encoder_transitions`.
    """
    return _strided_path(
        model,
        lambda probe: [model.forward_features(probe)],
        in_chans=in_chans,
        probe_size=probe_size,
    )


def _strided_path(model: Any, run: Any, *, in_chans: int, probe_size: int) -> list[Transition]:
    seen: dict[int, tuple[Transition, int]] = {}
    errors: list[ConfigError] = []

    def hook(module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
        try:
            step = _transition(module)
        except ConfigError as exc:
            errors.append(exc)
            return
        size_in = int(inputs[0].shape[-2])
        if step is not None and size_in not in seen:
            seen[size_in] = (step, int(output.shape[-2]))

    handles = [m.register_forward_hook(hook) for m in model.modules()]
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            param = next(model.parameters(), None)
            probe = torch.zeros(1, in_chans, probe_size, probe_size)
            if param is not None:
                probe = probe.to(device=param.device, dtype=param.dtype)
            feats = run(probe)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    if errors:
        raise errors[0]
    wanted = {int(f.shape[-2]) for f in feats}
    steps, size, path = [], probe_size, {probe_size}
    while size > min(wanted):
        if size not in seen:
            break
        step, observed = seen[size]
        if step.out_size(size) != observed:
            raise ConfigError(
                f"a strided layer maps {size} px to {observed} px, not the {step.out_size(size)} "
                "px its padding rule gives: cannot place this encoder's cells"
            )
        steps.append(step)
        size = observed
        path.add(size)
    if not wanted <= path:
        raise ConfigError(
            "cannot place the cells of this encoder's feature maps: its hooked strided layers "
            f"reach {sorted(path, reverse=True)} px from {probe_size} px, the maps have "
            f"{sorted(wanted, reverse=True)} (a functional pooling or an unusual layer?)"
        )
    return steps


def feature_grids(transitions: Sequence[Transition], size: int) -> dict[int, CellGrid]:
    """Cell grids at every stride reached by ``transitions``, for an input side of ``size``.

    Returns:
        ``{stride: CellGrid}``, stride 1 (the input itself) included.
    """
    stride, offset, n = 1, 0.0, size
    grids = {1: CellGrid(1.0, 0.0)}
    for step in transitions:
        offset += stride * step.centre_of_first(n)
        stride *= step.stride
        n = step.out_size(n)
        grids.setdefault(stride, CellGrid(float(stride), offset))
    return grids


def upsampling_centres(n: int, size: int) -> list[float]:
    """Where bilinear ``align_corners=False`` upsampling of ``n`` cells to ``size`` pixels puts
    each cell: ``(j + 0.5) * size / n - 0.5``."""
    return [(j + 0.5) * size / n - 0.5 for j in range(n)]


def _axis_weights(
    source: CellGrid, n_source: int, targets: Sequence[float], device: torch.device
) -> tuple[Tensor, Tensor, Tensor]:
    lows, highs, weights = [], [], []
    for t in targets:
        u = min(max((t - source.offset) / source.stride, 0.0), n_source - 1.0)
        low = min(math.floor(u), n_source - 1)
        lows.append(low)
        highs.append(min(low + 1, n_source - 1))
        weights.append(u - low)
    return (
        torch.tensor(lows, device=device),
        torch.tensor(highs, device=device),
        torch.tensor(weights, device=device),
    )


def resample(
    x: Tensor,
    rows: tuple[CellGrid, Sequence[float]],
    cols: tuple[CellGrid, Sequence[float]],
) -> Tensor:
    """Linear interpolation of a map ``(..., h, w)`` from its cell centres to other positions.

    Args:
        x: The map; its cells sit on ``rows[0]`` (vertically) and ``cols[0]`` (horizontally).
        rows: The source grid and the input-pixel rows to sample at (one output row each).
        cols: The same for columns.

    Returns:
        ``(..., len(rows[1]), len(cols[1]))``; positions outside the source cells take the
        border value. Weights are constants, so the result is linear in ``x`` with weights
        summing to one (a linear head commutes with it, bias included).
    """
    out = x
    for dim, (grid, targets) in ((-2, rows), (-1, cols)):
        low, high, weight = _axis_weights(grid, int(x.shape[dim]), targets, x.device)
        shape = [1] * out.ndim
        shape[dim] = -1
        w = weight.to(out.dtype).view(shape)
        a, b = out.index_select(dim, low), out.index_select(dim, high)
        out = a + (b - a) * w
    return out
