"""The one inference path: checkpoint -> probability, heatmap and scored boxes.

Used by ``evaluate`` (images from a cache), ``predict`` (files), ``submit`` and ``serve``
(uploaded bytes), so they can never disagree.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from pneumoloc.augment import normalise
from pneumoloc.boxes import BoxConfig, ScoredBoxes, cam_to_boxes
from pneumoloc.checkpoint import load_checkpoint, model_from_checkpoint
from pneumoloc.data.cache import resize_square
from pneumoloc.errors import CheckpointError, ConfigError
from pneumoloc.io import XrayImage
from pneumoloc.lungs import restrict_to_lungs
from pneumoloc.refine import refine_heatmaps

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "default"
DEFAULT_WEIGHTS = Path(__file__).parent / "weights" / "default.pt"


def resolve_checkpoint(name: str | Path | None) -> Path:
    """A checkpoint path; None or "default" is the model shipped inside the package."""
    if name is None or str(name) == DEFAULT_MODEL:
        if not DEFAULT_WEIGHTS.is_file():
            raise CheckpointError(f"{DEFAULT_WEIGHTS}: the default model is not installed")
        return DEFAULT_WEIGHTS
    return Path(name)


RECIPE_KEYS = ("cam_method", "tta", "lung_mask", "refine", "cam_layers", "box_gate")
"""Inference settings a checkpoint (or ONNX file) may store, besides ``box_config``."""


def stored_recipe(meta: dict[str, Any], kwargs: dict[str, Any]) -> dict[str, Any]:
    """``kwargs`` completed by the recipe stored in a model's metadata (given kwargs win)."""
    out = dict(kwargs)
    if "box_config" not in out and isinstance(meta.get("box_config"), dict):
        out["box_config"] = BoxConfig(**meta["box_config"])
    for key in RECIPE_KEYS:
        if key not in out and meta.get(key) is not None:
            out[key] = meta[key]
    return out


@dataclass
class Prediction:
    """Everything pneumoloc says about one image.

    Attributes:
        probability: Of pneumonia, from the classifier.
        positive: ``probability >= threshold`` (the model's stored decision threshold).
        threshold: The decision threshold used.
        heatmap: float32 (S, S) at the model's input size, normalised to [0, 1] per image.
        boxes: Scored boxes in ORIGINAL image pixels (x, y, width, height); empty when negative.
        original_shape: (height, width) of the source image.
    """

    probability: float
    positive: bool
    threshold: float
    heatmap: np.ndarray
    boxes: ScoredBoxes
    original_shape: tuple[int, int]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready record (no heatmap)."""
        return {
            "probability": round(self.probability, 6),
            "decision": "pneumonia" if self.positive else "no pneumonia",
            "threshold": round(self.threshold, 6),
            "boxes": [
                {
                    "x": round(float(b[0]), 1),
                    "y": round(float(b[1]), 1),
                    "width": round(float(b[2]), 1),
                    "height": round(float(b[3]), 1),
                    "confidence": round(float(s), 4),
                }
                for b, s in zip(self.boxes.boxes, self.boxes.scores, strict=True)
            ],
            "image_height": self.original_shape[0],
            "image_width": self.original_shape[1],
        }


@dataclass(kw_only=True)
class BasePredictor:
    """Everything after the network: probabilities and heatmaps -> decisions and boxes.

    A backend implements :meth:`heatmaps`; the decision threshold, the box rule and the record
    fields are shared, so the PyTorch :class:`Predictor` and the ONNX Runtime backend
    (:class:`pneumoloc.export.OnnxPredictor`) can never disagree after the network.

    Attributes:
        meta: The model's metadata (image size, threshold, model spec, ...).
        cam_method: Key of ``pneumoloc.cam.CAM_METHODS``.
        box_config: The heatmap -> boxes rule.
        tta: Test-time augmentation of the heatmaps.
        threshold_override: Replaces the stored decision threshold when not None.
        lung_mask: Zero the heatmaps outside an estimated lung mask.
        refine: Heatmap refinement before the lung mask (``"randomwalk"``: image-guided random
            walk, ``pneumoloc.refine``); None for none.
        cam_layers: ``"stages"`` fuses the CAM method's maps of the last three backbone stages
            (multi-stage fusion; grad-cam methods only); None or ``"final"``: the final map.
        box_gate: Which probability threshold an image must reach to get boxes: ``"decision"``
            (the decision threshold) or ``"f1"`` (the checkpoint's ``box_threshold``, F1-optimal
            on its validation image labels; see ``metrics.classification.f1_threshold``).
            Boxes never appear on an image decided negative.
    """

    backend: ClassVar[str] = "torch"
    meta: dict[str, Any]
    cam_method: str = "cam"
    box_config: BoxConfig = field(default_factory=BoxConfig)
    tta: bool = False
    batch_size: int = 16
    threshold_override: float | None = None
    lung_mask: bool = False
    refine: str | None = None
    cam_layers: str | None = None
    box_gate: str = "decision"

    @property
    def image_size(self) -> int:
        """Side of the square input the model expects."""
        return int(self.meta["image_size"])

    @property
    def threshold(self) -> float:
        """The decision threshold (stored in the checkpoint unless overridden)."""
        return float(
            self.threshold_override
            if self.threshold_override is not None
            else self.meta["threshold"]
        )

    @property
    def box_threshold(self) -> float:
        """The probability an image needs for boxes (see ``box_gate``)."""
        if self.box_gate not in ("decision", "f1"):
            raise ConfigError(f"box_gate must be 'decision' or 'f1', got {self.box_gate!r}")
        stored = self.meta.get("box_threshold")
        if self.box_gate == "f1" and stored is not None:
            return max(float(stored), self.threshold)
        return self.threshold

    @property
    def box_source(self) -> str:
        """What draws the boxes: "cam" (the box rule) or "detector" (a self-trained one)."""
        return "cam"

    @property
    def model_id(self) -> str:
        """A short identifier of the model for outputs."""
        spec = self.meta.get("model", {})
        fp = self.meta.get("data", {}).get("fingerprint", "")
        return f"{spec.get('name', '?')}@{self.image_size}px" + (f"-{fp[:8]}" if fp else "")

    def heatmaps(self, images: np.ndarray | torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """Probabilities (B,) and heatmaps (B, S, S) in [0, 1] for uint8 images (B, S, S)."""
        raise NotImplementedError

    def postprocess(self, images: np.ndarray, heatmaps: np.ndarray) -> np.ndarray:
        """The heatmap steps every backend shares: refinement, then the lung mask.

        Args:
            images: uint8 (B, S, S), the network's inputs.
            heatmaps: float32 (B, S, S) in [0, 1].
        """
        heatmaps = refine_heatmaps(self.refine, images, heatmaps)
        if self.lung_mask:
            heatmaps = restrict_to_lungs(images, heatmaps)
        return heatmaps

    def predict_arrays(
        self,
        images: np.ndarray,
        original_shapes: Sequence[tuple[int, int]],
    ) -> list[Prediction]:
        """Predict uint8 images already at the model's size (e.g. rows of a cache)."""
        if len(images) != len(original_shapes):
            raise ValueError("images and original_shapes differ in length")
        probs, maps = self.heatmaps(images)
        shapes = [(int(s[0]), int(s[1])) for s in original_shapes]
        all_boxes = self.draw_boxes(images, probs, maps, shapes)
        out = []
        for i, (p, h) in enumerate(zip(probs, maps, strict=True)):
            shape = shapes[i]
            boxes = all_boxes[i]
            out.append(
                Prediction(
                    probability=float(p),
                    positive=bool(p >= self.threshold),
                    threshold=self.threshold,
                    heatmap=h,
                    boxes=boxes,
                    original_shape=shape,
                )
            )
        return out

    def draw_boxes(
        self,
        images: np.ndarray,
        probs: np.ndarray,
        maps: np.ndarray,
        shapes: Sequence[tuple[int, int]],
    ) -> list[ScoredBoxes]:
        """Boxes in original pixels for each image: the box rule on the heatmaps."""
        gate = self.box_threshold
        return [
            cam_to_boxes(h, float(p), threshold=gate, config=self.box_config, out_shape=shape)
            for p, h, shape in zip(probs, maps, shapes, strict=True)
        ]

    def predict_xrays(self, xrays: Sequence[XrayImage]) -> list[Prediction]:
        """Predict decoded X-rays of any size (resized exactly as the cache does)."""
        s = self.image_size
        arrays = (
            np.stack([resize_square(x.pixels, s) for x in xrays])
            if xrays
            else np.zeros((0, s, s), np.uint8)
        )
        return self.predict_arrays(arrays, [x.original_shape for x in xrays])

    def describe(self) -> dict[str, Any]:
        """What produced a prediction: model, version, CAM method, box rule, threshold."""
        return {
            "model_id": self.model_id,
            "model": self.meta.get("model"),
            "pneumoloc_version": self.meta.get("pneumoloc_version"),
            "image_size": self.image_size,
            "threshold": self.threshold,
            "box_gate": self.box_gate,
            "box_threshold": self.box_threshold,
            "cam_method": self.cam_method,
            "tta": self.tta,
            "lung_mask": self.lung_mask,
            "refine": self.refine,
            "cam_layers": self.cam_layers,
            "box_source": self.box_source,
            "box_config": dataclasses.asdict(self.box_config),
            "checkpoint": self.meta.get("checkpoint_path"),
            "backend": self.backend,
        }


@dataclass(kw_only=True)
class Predictor(BasePredictor):
    """A loaded PyTorch model plus how to turn its evidence into boxes.

    Attributes:
        model: The classifier (eval mode).
        meta: The checkpoint's metadata (image size, threshold, model spec, metrics...).
        cam_method: Key of ``pneumoloc.cam.CAM_METHODS``.
        box_config: The heatmap -> boxes rule.
        tta: Test-time augmentation of the heatmaps.
        batch_size: Images per forward pass.
        detector: A self-trained box detector (``pneumoloc.selftrain``); when set it draws the
            boxes of positive images instead of the box rule (the CAM boxes remain the
            fallback). Loaded from the checkpoint's ``"detector"`` entry; pass
            ``use_detector=False`` to ``from_checkpoint`` to ignore it.
    """

    model: torch.nn.Module
    detector: torch.nn.Module | None = None

    @property
    def box_source(self) -> str:
        """What draws the boxes: "cam" (the box rule) or "detector" (a self-trained one)."""
        return "cam" if self.detector is None else "detector"

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

        Box settings stored in the checkpoint (``meta["box_config"]``) are the defaults;
        ``box_config`` in ``kwargs`` replaces them.
        """
        path = resolve_checkpoint(checkpoint)
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        payload = load_checkpoint(path, map_location=device)
        model, meta = model_from_checkpoint(payload, device=device)
        meta["checkpoint_path"] = str(path)
        entry = meta.pop("detector", None)
        if isinstance(entry, dict):
            meta["detector"] = {k: v for k, v in entry.items() if k != "state_dict"}
            if use_detector and "detector" not in kwargs:
                from pneumoloc.selftrain import load_detector

                kwargs["detector"] = load_detector(entry, device)
        return cls(model=model, meta=meta, **stored_recipe(meta, kwargs))

    def draw_boxes(
        self,
        images: np.ndarray,
        probs: np.ndarray,
        maps: np.ndarray,
        shapes: Sequence[tuple[int, int]],
    ) -> list[ScoredBoxes]:
        """The box rule's boxes, or the self-trained detector's when there is one."""
        cam_boxes = super().draw_boxes(images, probs, maps, shapes)
        if self.detector is None:
            return cam_boxes
        from pneumoloc.selftrain import SelfTrainConfig, detect, detector_boxes

        entry = self.meta.get("detector", {}).get("config", {})
        defaults = SelfTrainConfig()
        detections = detect(
            self.detector,
            np.asarray(images),
            min_score=float(entry.get("min_score", defaults.min_score)),
            max_boxes=int(entry.get("max_boxes", defaults.max_boxes)),
            batch_size=self.batch_size,
        )
        return detector_boxes(
            detections,
            probs,
            threshold=self.box_threshold,
            input_size=self.image_size,
            out_shapes=shapes,
            fallback=cam_boxes,
        )

    def heatmaps(self, images: np.ndarray | torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """Probabilities (B,) and heatmaps (B, S, S) in [0, 1] for uint8 images (B, S, S)."""
        from pneumoloc.cam import cam_layers_of, compute_cam

        tensor = (
            torch.as_tensor(np.asarray(images)) if not isinstance(images, torch.Tensor) else images
        )
        if tensor.ndim == 3:
            tensor = tensor.unsqueeze(1)
        device = next(self.model.parameters()).device
        layers = cam_layers_of(self.model, self.cam_layers)  # type: ignore[arg-type]
        probs, maps = [], []
        for start in range(0, len(tensor), self.batch_size):
            # uint8 travels to the device (4x less than float32), normalised there.
            x = normalise(tensor[start : start + self.batch_size].to(device))
            p, h = compute_cam(
                self.model,  # type: ignore[arg-type]
                x,
                method=self.cam_method,
                target_layers=layers,
                tta=self.tta,
                normalize=True,
            )
            probs.append(p.detach().cpu())
            maps.append(h.detach().cpu())
        if not probs:
            s = self.image_size
            return np.zeros(0, np.float32), np.zeros((0, s, s), np.float32)
        heatmaps = self.postprocess(tensor[:, 0].cpu().numpy(), torch.cat(maps).numpy())
        return torch.cat(probs).numpy(), heatmaps


def prediction_record(
    prediction: Prediction, predictor: BasePredictor, *, image_id: str
) -> dict[str, Any]:
    """The JSON record of one prediction, shared by ``predict`` and the web API.

    ``image_id`` must already be safe to show (the caller decides whether identifiers are kept).
    """
    from pneumoloc import DISCLAIMER, __version__

    return {
        "id": image_id,
        **prediction.to_dict(),
        "cam_method": predictor.cam_method,
        "box_source": predictor.box_source,
        "model_id": predictor.model_id,
        "model_version": predictor.meta.get("pneumoloc_version"),
        "pneumoloc_version": __version__,
        "disclaimer": DISCLAIMER,
    }


def prediction_overlay(
    prediction: Prediction,
    pixels: np.ndarray,
    *,
    title: str | None = None,
    show_heatmap: bool = True,
    show_boxes: bool = True,
    alpha: float = 0.4,
    colour_bar: bool = True,
) -> np.ndarray:
    """RGB overlay of one prediction on its X-ray (heatmap, boxes, probability and decision).

    ``colour_bar`` adds the heatmap's colour scale and the box legend to the banner.
    """
    from pneumoloc.report.overlay import render_overlay

    boxes = prediction.boxes.boxes if show_boxes else np.zeros((0, 4), np.float32)
    scores = prediction.boxes.scores if show_boxes else np.zeros(0, np.float32)
    return render_overlay(
        pixels,
        prediction.heatmap if show_heatmap else None,
        boxes,
        scores,
        probability=prediction.probability,
        threshold=prediction.threshold,
        title=title,
        alpha=alpha,
        box_shape=prediction.original_shape,
        colour_bar=colour_bar,
    )
