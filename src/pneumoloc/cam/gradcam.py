"""Heatmaps from the pytorch-grad-cam library (``import pytorch_grad_cam``) for our classifier.

The library expects ``model(x) -> (B, n_classes)``; our single pneumonia logit is exposed as a
one-column output and every image gets the explicit target ``ClassifierOutputTarget(0)``
(that column, i.e. the gradient of the pneumonia logit, positive class). Its heatmaps are
normalised per image to [0, 1] and come back as numpy; they are returned as torch tensors on
the model's device.

Side effects of the library are undone: it puts the model in eval mode (training flags are
restored), it zeroes and accumulates parameter gradients (parameters are frozen during the
call and their ``.grad`` restored), and its hooks are released by its ``with`` block.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from pneumoloc.cam.classic import eval_mode, model_device, prepare_input
from pneumoloc.cam.names import CAM_LAYER_CHOICES, LIBRARY_METHODS
from pneumoloc.errors import ConfigError
from pneumoloc.models.classifier import CamClassifier

SCORECAM_BATCH_SIZE = 32
"""Masked copies per forward pass in ScoreCAM when no batch size is given."""

CamFn = Callable[[Tensor], tuple[Tensor, Tensor]]
"""Maps images (B, 1, H, W) to (probs (B,), heatmaps (B, H, W))."""


class SingleLogitAsColumn(nn.Module):
    """Wraps a model returning logits (B,) so it returns (B, 1), as pytorch_grad_cam expects."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> Tensor:
        """Logits as a (B, 1) column."""
        logits: Tensor = self.model(x)
        return logits.reshape(-1, 1)


def resolve_target_layers(model: nn.Module, names: Sequence[str]) -> list[nn.Module]:
    """Look up target layers by dotted name (``"backbone.layer3"``).

    Raises:
        ConfigError: A name is not a submodule of ``model``.
    """
    layers = []
    for name in names:
        try:
            layers.append(model.get_submodule(name))
        except AttributeError as exc:
            raise ConfigError(f"target layer {name!r} is not a submodule of the model") from exc
    return layers


def stage_layers(model: CamClassifier, count: int = 3) -> list[nn.Module]:
    """The last ``count`` stages of the backbone, the final feature map last, for multi-stage
    CAM fusion (LayerCAM, Jiang et al. 2021: shallower stages see finer detail).

    timm backbones name their stages in ``feature_info``; the final stage is replaced by the
    model's own feature tap (the map the head reads). Plain ``nn.Sequential`` backbones (the
    notebook network) use their last ReLUs. pytorch-grad-cam scales each layer's map to
    [0, 1] and averages them.

    Raises:
        ConfigError: The backbone has fewer than ``count`` identifiable stages.
    """
    backbone = model.backbone
    info = getattr(backbone, "feature_info", None)
    earlier: list[nn.Module]
    if info is not None:
        names = [f["module"] for f in info]
        earlier = [backbone.get_submodule(n) for n in names[:-1]][-(count - 1) :]
    else:
        relus: list[nn.Module] = [m for m in backbone.modules() if isinstance(m, nn.ReLU)]
        earlier = relus[:-1][-(count - 1) :]
    layers = [*earlier, model.cam_target_layer]
    if len(layers) < count:
        raise ConfigError(f"the backbone has fewer than {count} stages to fuse")
    return layers


def cam_layers_of(model: CamClassifier, choice: str | None) -> list[nn.Module] | None:
    """Target layers for a ``cam_layers`` choice (None or "final": the method's default).

    Raises:
        ConfigError: Unknown choice.
    """
    if choice is None or choice == "final":
        return None
    if choice == "stages":
        return stage_layers(model)
    raise ConfigError(f"unknown cam_layers {choice!r}; choose one of {list(CAM_LAYER_CHOICES)}")


@contextmanager
def _library_call_guard(model: nn.Module) -> Iterator[None]:
    """Eval mode, frozen parameters with their gradients restored, autograd on."""
    params = list(model.parameters())
    saved = [(p, p.requires_grad, p.grad) for p in params]
    try:
        with eval_mode(model), torch.inference_mode(False), torch.enable_grad():
            for p in params:
                p.requires_grad_(False)
            yield
    finally:
        for p, requires_grad, grad in saved:
            p.requires_grad_(requires_grad)
            p.grad = grad


@contextmanager
def library_cam(
    model: CamClassifier,
    method: str,
    *,
    target_layers: Sequence[nn.Module] | None = None,
    batch_size: int | None = None,
) -> Iterator[CamFn]:
    """Open a pytorch_grad_cam method on ``model``; yields a function images -> (probs, maps).

    Use as ``with library_cam(model, "gradcam") as fn: probs, maps = fn(x)``. Hooks live only
    inside the block.

    Args:
        model: The classifier.
        method: A key of ``LIBRARY_METHODS``. "eigencam" is class-agnostic (first principal
            component of the feature map, its sign left to the SVD) and ignores the target.
        target_layers: Layers whose activations are used; default ``[model.cam_target_layer]``
            (the final feature map).
        batch_size: Masked copies per forward pass for "scorecam" (default 32).

    Raises:
        ConfigError: Unknown method.
    """
    if method not in LIBRARY_METHODS:
        raise ConfigError(
            f"unknown grad-cam method {method!r}; choose one of {sorted(LIBRARY_METHODS)}"
        )
    import pytorch_grad_cam
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    cam_class: Any = (
        _thin_svd_eigencam()
        if method == "eigencam"
        else getattr(pytorch_grad_cam, LIBRARY_METHODS[method])
    )
    layers = list(target_layers) if target_layers else [model.cam_target_layer]
    uses_gradients = method not in ("scorecam", "eigencam")
    device = model_device(model)
    wrapper = SingleLogitAsColumn(model)

    pending: IndexError | None = None
    with (
        _library_call_guard(model),
        cam_class(model=wrapper, target_layers=layers) as cam,
    ):
        if method == "scorecam":
            cam.batch_size = batch_size or SCORECAM_BATCH_SIZE

        def run(x: Tensor) -> tuple[Tensor, Tensor]:
            x = prepare_input(model, x).detach().clone()
            if uses_gradients:
                # Gradients must reach the feature map even though the parameters are frozen.
                x.requires_grad_(True)
            targets = [ClassifierOutputTarget(0)] * len(x)
            # The library zips targets with outputs: a short list would silently drop images.
            assert len(targets) == len(x)
            maps = cam(input_tensor=x, targets=targets)
            probs = torch.sigmoid(cam.outputs.detach().reshape(-1).float())
            heatmaps = torch.as_tensor(maps, dtype=torch.float32).to(device)
            return probs, heatmaps

        try:
            yield run
        except IndexError as exc:
            # The library's __exit__ prints and swallows IndexError; re-raise it after the block.
            pending = exc
    if pending is not None:
        raise pending


def first_component_projection(activations: np.ndarray) -> np.ndarray:
    """EigenCAM maps (B, h, w): centred activations projected on their first right singular vector.

    Same as ``pytorch_grad_cam.utils.svd_on_activations.get_2d_projection`` but with a thin
    SVD: the library's ``full_matrices=True`` builds an (h*w) x (h*w) matrix, 1 GiB and
    11.5 s per 512 px image for smallcamnet's 128 x 128 feature map.
    """
    activations = np.nan_to_num(np.asarray(activations, dtype=np.float32), nan=0.0)
    projections = []
    for act in activations:
        flat = act.reshape(act.shape[0], -1).T
        flat = flat - flat.mean(axis=0)
        _, _, vt = np.linalg.svd(flat, full_matrices=False)
        projections.append((flat @ vt[0]).reshape(act.shape[1:]))
    return np.stack(projections).astype(np.float32)


def _thin_svd_eigencam() -> Any:
    """``pytorch_grad_cam.EigenCAM`` computing its projection with a thin SVD."""
    from pytorch_grad_cam import EigenCAM

    class ThinSvdEigenCAM(EigenCAM):  # type: ignore[misc]
        def get_cam_image(
            self,
            input_tensor: Tensor,
            target_layer: nn.Module,
            targets: Any,
            activations: np.ndarray,
            grads: Any,
            eigen_smooth: bool,
        ) -> np.ndarray:
            return first_component_projection(activations)

    return ThinSvdEigenCAM
