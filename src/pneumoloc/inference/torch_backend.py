"""The PyTorch backend: a checkpoint's classifier (and self-trained detector) run by torch."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pneumoloc._runtime import resolve_device
from pneumoloc.cam import cam_layers_of, compute_cam
from pneumoloc.inference.base import BasePredictor, Detections, resolve_checkpoint, split_settings
from pneumoloc.io.preprocess import to_model_input
from pneumoloc.models.checkpoint import (
    load_checkpoint,
    member_roles,
    models_from_checkpoint,
    role_mean,
)
from pneumoloc.models.detector import detect_with_maps, load_detector

__all__ = ["Predictor"]


@dataclass(kw_only=True)
class Predictor(BasePredictor):
    """A loaded PyTorch model plus how to turn its evidence into boxes.

    Attributes:
        model: The classifier (eval mode).
        meta: The checkpoint's metadata (image size, threshold, model spec, metrics...).
        recipe: How heatmaps and boxes are made (see ``InferenceRecipe``).
        batch_size: Images per forward pass.
        detector: A self-trained box detector (``pneumoloc selftrain``); when set it draws the
            boxes of positive images instead of the box rule (the CAM boxes remain the
            fallback). Loaded from the checkpoint's ``"detector"`` entry; pass
            ``use_detector=False`` to ``from_checkpoint`` to ignore it.
        members: An ensemble's models (``model`` is the first); empty for a single model.
            The ensemble's probability is the mean of its members' probabilities, its heatmap
            the mean of their heatmaps (each scaled to its maximum first), each over the
            members whose role gives it (``meta["members"][i]["role"]``,
            :data:`pneumoloc.models.checkpoint.MEMBER_ROLES`).
    """

    model: torch.nn.Module
    detector: torch.nn.Module | None = None
    members: list[torch.nn.Module] = field(default_factory=list)
    _weights_sha256: str | None = field(default=None, init=False, repr=False)

    @property
    def has_detector(self) -> bool:
        """Whether the self-trained detector draws the boxes (it was loaded)."""
        return self.detector is not None

    @classmethod
    def from_checkpoint(
        cls,
        checkpoint: str | Path | None = None,
        *,
        device: str = "auto",
        use_detector: bool = True,
        **kwargs: Any,
    ) -> Predictor:
        """Load a checkpoint (None or "default": the shipped model).

        The recipe stored in the checkpoint gives the defaults; recipe settings in ``kwargs``
        (``cam_method``, ``box_config``, ``lung_mask``, ...) replace them, and the other
        ``kwargs`` (``batch_size``, ``threshold_override``) are fields of the predictor.
        """
        path = resolve_checkpoint(checkpoint)
        device = str(resolve_device(device))
        payload = load_checkpoint(path, map_location=device)
        models, meta = models_from_checkpoint(payload, device=device)
        if len(models) > 1:
            kwargs = {**kwargs, "members": models}
        meta["checkpoint_path"] = str(path)
        entry = meta.pop("detector", None)
        if isinstance(entry, dict):
            meta["detector"] = {k: v for k, v in entry.items() if k != "state_dict"}
            if use_detector and "detector" not in kwargs:
                kwargs = {**kwargs, "detector": load_detector(entry, device)}
        return cls(model=models[0], meta=meta, **split_settings(meta, kwargs))

    def detect_with_maps(self, images: np.ndarray) -> tuple[Detections, np.ndarray]:
        """The self-trained detector's boxes (xyxy, input pixels) and scores per image, and
        its score maps (:func:`pneumoloc.models.detector.detect_with_maps`)."""
        if self.detector is None:
            return super().detect_with_maps(images)
        min_score, max_boxes = self.detector_limits
        return detect_with_maps(
            self.detector,
            np.asarray(images),
            min_score=min_score,
            max_boxes=max_boxes,
            batch_size=self.batch_size,
        )

    def network(
        self, images: np.ndarray | torch.Tensor
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Uncalibrated probabilities (B,), heatmaps (B, S, S) in [0, 1] and the uint8 images,
        for uint8 images (B, S, S)."""
        probs, maps, pixels, _ = self._run(images, features=False)
        return probs, maps, pixels

    def network_with_features(
        self, images: np.ndarray | torch.Tensor
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]:
        """:meth:`network` plus the pooled features (B, C) of the (first) model's feature map,
        taken from the same forward pass (a hook on its ``feature_tap``)."""
        return self._run(images, features=True)

    @property
    def weights_sha256(self) -> str:
        """Digest of the weights whose features the input check reads (the first model's)."""
        from pneumoloc.inference.ood import weights_digest

        if self._weights_sha256 is None:
            self._weights_sha256 = weights_digest(self.model.state_dict())
        return self._weights_sha256

    def _run(
        self, images: np.ndarray | torch.Tensor, *, features: bool
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]:
        tensor = (
            torch.as_tensor(np.asarray(images)) if not isinstance(images, torch.Tensor) else images
        )
        if tensor.ndim == 3:
            tensor = tensor.unsqueeze(1)
        models = self.members or [self.model]
        roles = member_roles(self.meta)
        if len(roles) != len(models):  # members given without their metadata: all "both"
            roles = ["both"] * len(models)
        device = next(self.model.parameters()).device
        layers = [cam_layers_of(m, self.cam_layers) for m in models]  # type: ignore[arg-type]
        probs, maps, pooled = [], [], []
        for start in range(0, len(tensor), self.batch_size):
            # uint8 travels to the device (4x less than float32), standardised there.
            x = to_model_input(tensor[start : start + self.batch_size].to(device))
            with _first_features(models[0] if features else None, len(x)) as captured:
                outputs = [
                    compute_cam(
                        m,  # type: ignore[arg-type]
                        x,
                        method=self.cam_method,
                        target_layers=target,
                        tta=self.tta,
                        scale_to_max=True,
                        align=self.recipe.cam_align,
                        floor=self.recipe.cam_floor,
                    )
                    for m, target in zip(models, layers, strict=True)
                ]
            if features:
                pooled.append(captured[0] if captured else _pooled_features(models[0], x))
            # An ensemble's mean over the members giving each output; one model: its own.
            probs.append(role_mean([o[0] for o in outputs], roles, "probability").detach().cpu())
            maps.append(role_mean([o[1] for o in outputs], roles, "heatmap").detach().cpu())
        if not probs:
            s = self.image_size
            empty = np.zeros((0, s, s), np.float32)
            return np.zeros(0, np.float32), empty, np.zeros((0, s, s)), None
        feats = torch.cat(pooled).numpy() if features else None
        return (
            torch.cat(probs).numpy(),
            torch.cat(maps).numpy(),
            tensor[:, 0].cpu().numpy(),
            feats,
        )


@contextmanager
def _first_features(model: torch.nn.Module | None, batch: int) -> Iterator[list[torch.Tensor]]:
    """Collect the pooled output of ``model.feature_tap`` at its first call on a whole batch.

    Classic CAM makes one forward pass; test-time augmentation's first view is the image
    itself; the grad-cam methods run the image first too. Nothing is collected when ``model``
    is None or has no tap (the caller then runs :func:`_pooled_features`).
    """
    captured: list[torch.Tensor] = []
    tap = getattr(model, "feature_tap", None)
    if not isinstance(tap, torch.nn.Module):
        yield captured
        return

    def hook(_: torch.nn.Module, __: Any, output: torch.Tensor) -> None:
        if not captured and output.ndim == 4 and output.shape[0] == batch:
            captured.append(output.detach().float().mean(dim=(2, 3)).cpu())

    handle = tap.register_forward_hook(hook)
    try:
        yield captured
    finally:
        handle.remove()


@torch.no_grad()
def _pooled_features(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Pooled features (B, C) of standardised images from a pass of their own."""
    from pneumoloc.cam import eval_mode

    with eval_mode(model):
        feats = model.forward_features(x)  # type: ignore[operator]
    return feats.float().mean(dim=(2, 3)).cpu()
