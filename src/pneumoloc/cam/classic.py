"""Classic class activation maps (Zhou et al. 2016), exact for ``CamClassifier``.

The heatmap is the model's own CAM ``w · f(y, x) + b`` (see
``pneumoloc.models.classifier``), bilinearly upsampled to the input size and then ReLU'd:
negative evidence (locations voting "no pneumonia") is clipped to 0. Values are in logit
units, not normalised, so they are comparable across images.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pneumoloc.models.classifier import CamClassifier


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


def upsample_cam(cam: Tensor, size: tuple[int, int]) -> Tensor:
    """Bilinearly resize maps (B, h, w) to (B, *size), as float32."""
    resized = F.interpolate(
        cam.float().unsqueeze(1), size=size, mode="bilinear", align_corners=False
    )
    return resized.squeeze(1)


def classic_cam(model: CamClassifier, x: Tensor) -> tuple[Tensor, Tensor]:
    """Probabilities and classic CAM heatmaps from one forward pass, in eval mode.

    Args:
        model: The classifier; its training flags are restored afterwards.
        x: Images (B, 1, H, W); moved to the model's device.

    Returns:
        ``probs`` (B,), the sigmoid of the logits, and ``heatmaps`` (B, H, W) float32 >= 0 in
        logit units at the input resolution, both on the model's device.
    """
    x = prepare_input(model, x)
    with eval_mode(model), torch.no_grad():
        logits, cam = model.forward_with_cam(x)
    heatmaps = upsample_cam(cam, (x.shape[-2], x.shape[-1])).relu()
    return torch.sigmoid(logits.float()), heatmaps
