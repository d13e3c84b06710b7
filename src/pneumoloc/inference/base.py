"""Everything after the network, shared by every backend: decisions, boxes and records.

A backend (:class:`pneumoloc.inference.torch_backend.Predictor`,
:class:`pneumoloc.inference.onnx_backend.OnnxPredictor`) implements
:meth:`BasePredictor.heatmaps`; the decision threshold, the heatmap post-processing, the box rule
and the record fields live here, so backends can never disagree after the network.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from pneumoloc import DISCLAIMER, __version__
from pneumoloc.errors import CheckpointError
from pneumoloc.inference.calibration import apply_temperature
from pneumoloc.inference.prediction import Prediction
from pneumoloc.inference.recipe import InferenceRecipe
from pneumoloc.io import XrayImage
from pneumoloc.io.preprocess import resize_square
from pneumoloc.localise.boxes import BoxConfig, ScoredBoxes, cam_to_boxes, detector_boxes
from pneumoloc.localise.lungs import estimate_lung_mask, restrict_to_lungs
from pneumoloc.localise.refine import refine_heatmaps

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_MODEL",
    "DEFAULT_WEIGHTS",
    "DETECTOR_MAX_BOXES",
    "DETECTOR_MIN_SCORE",
    "BasePredictor",
    "Detections",
    "pack_detections",
    "prediction_record",
    "resolve_checkpoint",
    "split_settings",
    "unpack_detections",
]

DEFAULT_MODEL = "default"
DEFAULT_WEIGHTS = Path(__file__).resolve().parent.parent / "weights" / "default.pt"
DETECTOR_MIN_SCORE = 0.05
"""Detector boxes scoring below this are dropped (unless the model's detector config says)."""
DETECTOR_MAX_BOXES = 2
"""At most this many detector boxes per image (unless the model's detector config says)."""

Detections = list[tuple[np.ndarray, np.ndarray]]
"""A detector's output per image: boxes (N, 4) xyxy in input pixels and scores (N,), best first."""


def pack_detections(detections: Detections, max_boxes: int) -> np.ndarray:
    """Detections as one float32 array (B, max_boxes, 5): x0, y0, x1, y1, score, best first,
    rows past an image's last box NaN. It travels with the network's other outputs (sliced per
    image, pickled to a worker process) and :func:`unpack_detections` undoes it."""
    out = np.full((len(detections), max_boxes, 5), np.nan, np.float32)
    for i, (boxes, scores) in enumerate(detections):
        k = min(len(scores), max_boxes)
        out[i, :k, :4] = np.asarray(boxes, np.float32)[:k]
        out[i, :k, 4] = np.asarray(scores, np.float32)[:k]
    return out


def unpack_detections(packed: np.ndarray) -> Detections:
    """The inverse of :func:`pack_detections`."""
    out = []
    for rows in np.asarray(packed, np.float32):
        kept = rows[np.isfinite(rows[:, 4])]
        out.append((kept[:, :4].copy(), kept[:, 4].copy()))
    return out


def resolve_checkpoint(name: str | Path | None) -> Path:
    """A checkpoint path; None or "default" is the model shipped inside the package."""
    if name is None or str(name) == DEFAULT_MODEL:
        if not DEFAULT_WEIGHTS.is_file():
            raise CheckpointError(f"{DEFAULT_WEIGHTS}: the default model is not installed")
        return DEFAULT_WEIGHTS
    return Path(name)


def split_settings(
    meta: Mapping[str, Any], kwargs: Mapping[str, Any], **defaults: Any
) -> dict[str, Any]:
    """Predictor keyword arguments from a model's stored recipe and the caller's ``kwargs``.

    Recipe settings given in ``kwargs`` (any :class:`InferenceRecipe` field) replace the stored
    ones, which replace ``defaults``; the other ``kwargs`` (``batch_size``, ...) pass through.
    """
    names = InferenceRecipe.field_names()
    overrides = {k: v for k, v in kwargs.items() if k in names}
    stored = {**defaults, **{k: v for k, v in meta.items() if k in names and v is not None}}
    rest = {k: v for k, v in kwargs.items() if k not in names}
    return {"recipe": InferenceRecipe.from_meta(stored, **overrides), **rest}


@dataclass(kw_only=True)
class BasePredictor:
    """Probabilities and heatmaps -> decisions and boxes, for any backend.

    Attributes:
        meta: The model's metadata (image size, threshold, model spec, ...).
        recipe: How heatmaps and boxes are made (CAM method, refinement, lung mask, box rule).
        batch_size: Images per forward pass.
        threshold_override: Replaces the stored decision threshold when not None.
    """

    backend: ClassVar[str] = "torch"
    meta: dict[str, Any]
    recipe: InferenceRecipe = field(default_factory=InferenceRecipe)
    batch_size: int = 16
    threshold_override: float | None = None

    # The recipe's settings, read-only (change them with ``recipe.replace``).
    @property
    def cam_method(self) -> str:
        """Key of ``pneumoloc.cam.CAM_METHODS``."""
        return self.recipe.cam_method

    @property
    def box_config(self) -> BoxConfig:
        """The heatmap -> boxes rule."""
        return self.recipe.box_config

    @property
    def tta(self) -> bool:
        """Test-time augmentation of the heatmaps."""
        return self.recipe.tta

    @property
    def lung_mask(self) -> bool:
        """Whether heatmaps are zeroed outside an estimated lung mask."""
        return self.recipe.lung_mask

    @property
    def refine(self) -> str | None:
        """Heatmap refinement (None: none)."""
        return self.recipe.refine

    @property
    def cam_layers(self) -> str | None:
        """Multi-stage CAM fusion ("stages") or the final map (None / "final")."""
        return self.recipe.cam_layers

    @property
    def box_gate(self) -> str:
        """Which threshold gates boxes: "decision" or "f1"."""
        return self.recipe.box_gate

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
        """The probability an image needs for boxes (see ``InferenceRecipe.box_gate``)."""
        stored = self.meta.get("box_threshold")
        if self.box_gate == "f1" and stored is not None:
            return max(float(stored), self.threshold)
        return self.threshold

    @property
    def has_detector(self) -> bool:
        """Whether a self-trained box detector (``pneumoloc selftrain``) draws the boxes of
        positive images; backends that can run one override this and :meth:`detect`."""
        return False

    @property
    def box_source(self) -> str:
        """What draws the boxes: "cam" (the box rule) or "detector" (a self-trained one)."""
        return "detector" if self.has_detector else "cam"

    @property
    def heatmap_source(self) -> str:
        """What gives the heatmap of a film that gets boxes: "detector" (its score map: the
        recipe asks for it and the model has a detector) or "cam"."""
        if self.has_detector and self.recipe.heatmap_source == "detector":
            return "detector"
        return "cam"

    @property
    def detector_limits(self) -> tuple[float, int]:
        """The detector's minimum score and most boxes per image (its stored config, else
        :data:`DETECTOR_MIN_SCORE` and :data:`DETECTOR_MAX_BOXES`)."""
        entry = self.meta.get("detector") or {}
        config = entry.get("config") or {} if isinstance(entry, dict) else {}
        return (
            float(config.get("min_score", DETECTOR_MIN_SCORE)),
            int(config.get("max_boxes", DETECTOR_MAX_BOXES)),
        )

    def detect_with_maps(self, images: np.ndarray) -> tuple[Detections, np.ndarray]:
        """The detector's boxes for uint8 images (B, S, S), at most ``detector_limits``, and
        its score map per image (float32 (B, S, S) in [0, 1], from the same pass).

        Raises:
            NotImplementedError: This predictor has no detector.
        """
        raise NotImplementedError(f"this {self.backend} predictor has no box detector")

    def detect(self, images: np.ndarray) -> Detections:
        """The detector's boxes (:meth:`detect_with_maps` without the maps)."""
        return self.detect_with_maps(images)[0]

    def detect_where(self, images: np.ndarray, gate: np.ndarray) -> tuple[Detections, np.ndarray]:
        """:meth:`detect_with_maps` on the images where ``gate`` is true (the ones that get
        boxes); no boxes and a zero map for the others, which are never used."""
        images = np.asarray(images)
        empty = (np.zeros((0, 4), np.float32), np.zeros(0, np.float32))
        found: Detections = [empty] * len(images)
        maps = np.zeros((len(images), *images.shape[-2:]), np.float32)
        picked = np.flatnonzero(np.asarray(gate, bool))
        if len(picked):
            boxes, score_maps = self.detect_with_maps(images[picked])
            for k, i in enumerate(picked):
                found[int(i)] = boxes[k]
            maps[picked] = score_maps
        return found, maps

    def _detector_stage(
        self, probs: np.ndarray, maps: np.ndarray, pixels: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """With a detector: the heatmaps (its score maps, each scaled to its peak, on the
        films that get boxes when ``heatmap_source`` is "detector"; ``maps`` otherwise) and its
        packed boxes (:func:`pack_detections`). Without one: ``maps`` and None."""
        if not self.has_detector or len(probs) == 0:
            return maps, None
        gate = self._calibrated(probs) >= self.box_threshold
        found, score_maps = self.detect_where(pixels, gate)
        if self.heatmap_source == "detector" and gate.any():
            maps = np.array(maps, dtype=np.float32, copy=True)
            peaks = score_maps[gate].reshape(int(gate.sum()), -1).max(axis=1)
            scaled = score_maps[gate] / np.maximum(peaks, 1e-12)[:, None, None]
            maps[gate] = np.where(peaks[:, None, None] > 0, scaled, 0.0)
        return maps, pack_detections(found, self.detector_limits[1])

    @property
    def model_id(self) -> str:
        """A short identifier of the model for outputs."""
        spec = self.meta.get("model", {})
        fp = self.meta.get("data", {}).get("fingerprint", "")
        return f"{spec.get('name', '?')}@{self.image_size}px" + (f"-{fp[:8]}" if fp else "")

    @property
    def temperature(self) -> float:
        """The calibration temperature stored with the model (1.0: uncalibrated)."""
        return float(self.meta.get("temperature") or 1.0)

    def network(self, images: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """What a backend's network says about uint8 images (B, S, S): uncalibrated
        probabilities (B,), heatmaps (B, S, S) in [0, 1], and the images as uint8 numpy."""
        raise NotImplementedError

    def network_with_features(
        self, images: Any
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]:
        """:meth:`network` plus the classifier's pooled features (B, C) of the same pass, or
        None where the backend cannot give them (the ONNX graph outputs no features)."""
        return (*self.network(images), None)

    def probabilities(self, images: Any) -> np.ndarray:
        """Calibrated probabilities (B,) for uint8 images (B, S, S), without post-processing."""
        probs = self.network(images)[0]
        return apply_temperature(probs, self.temperature) if len(probs) else probs

    def heatmaps(self, images: Any) -> tuple[np.ndarray, np.ndarray]:
        """Probabilities (B,) and heatmaps (B, S, S) in [0, 1] for uint8 images (B, S, S).

        The network's probabilities are calibrated with the stored temperature, and its
        heatmaps go through :meth:`postprocess` (the same steps for every backend).
        """
        probs, maps, pixels = self.network(images)
        if self.heatmap_source == "detector":
            maps, _ = self._detector_stage(probs, maps, pixels)
        return self._after_network(probs, maps, pixels)

    def _after_network(
        self, probs: np.ndarray, maps: np.ndarray, pixels: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        probs, maps, _ = self._after_network_with_masks(probs, maps, pixels)
        return probs, maps

    def _after_network_with_masks(
        self, probs: np.ndarray, maps: np.ndarray, pixels: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, list[np.ndarray | None]]:
        if len(probs) == 0:
            return probs, maps, []
        maps, masks = self.postprocess_with_masks(pixels, maps)
        return apply_temperature(probs, self.temperature), maps, masks

    def postprocess(self, images: np.ndarray, heatmaps: np.ndarray) -> np.ndarray:
        """The heatmap steps every backend shares: refinement, then the lung mask.

        Args:
            images: uint8 (B, S, S), the network's inputs.
            heatmaps: float32 (B, S, S) in [0, 1].
        """
        return self.postprocess_with_masks(images, heatmaps)[0]

    def postprocess_with_masks(
        self, images: np.ndarray, heatmaps: np.ndarray
    ) -> tuple[np.ndarray, list[np.ndarray | None]]:
        """:meth:`postprocess`, and the lung masks it used (None per image without one)."""
        heatmaps = refine_heatmaps(self.refine, images, heatmaps)
        masks: list[np.ndarray | None] = [None] * len(heatmaps)
        if self.lung_mask:
            masks = [estimate_lung_mask(image) for image in images]
            heatmaps = restrict_to_lungs(images, heatmaps, masks)
        return heatmaps, masks

    def predict_arrays(
        self,
        images: np.ndarray,
        original_shapes: Sequence[tuple[int, int]],
        *,
        with_features: bool = False,
    ) -> list[Prediction]:
        """Predict uint8 images already at the model's size (e.g. rows of a cache).

        With ``with_features``, each prediction also carries the classifier's pooled features
        of the same forward pass (None where the backend has none), for the input check.
        """
        if len(images) != len(original_shapes):
            raise ValueError("images and original_shapes differ in length")
        return self.finish(images, self.raw_outputs(images, with_features), original_shapes)

    def raw_outputs(
        self, images: Any, with_features: bool = False
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None, np.ndarray | None]:
        """:meth:`network_with_features` (or :meth:`network` with None for the features) and,
        with a detector, its boxes on the images that will get boxes (:func:`pack_detections`;
        None without a detector), its score maps in place of those images' heatmaps when the
        recipe's ``heatmap_source`` is "detector": every network's output, so :meth:`finish`
        needs none."""
        probs, maps, pixels, feats = (
            self.network_with_features(images) if with_features else (*self.network(images), None)
        )
        maps, packed = self._detector_stage(probs, maps, pixels)
        return probs, maps, pixels, feats, packed

    def _calibrated(self, probs: np.ndarray) -> np.ndarray:
        return apply_temperature(probs, self.temperature) if len(probs) else probs

    def finish(
        self,
        images: np.ndarray,
        raw: tuple[np.ndarray | None, ...],
        original_shapes: Sequence[tuple[int, int]],
    ) -> list[Prediction]:
        """Everything after the network (calibration, refinement, lung mask, boxes) for what
        :meth:`raw_outputs` returned on ``images``; any slice of a batch can be finished on
        its own, with the same result (``predict`` finishes image by image in its worker
        threads or processes while the network runs the next batch). Without the packed
        detections (a 4-tuple), a predictor with a detector runs it here."""
        raw_probs, raw_maps, pixels, feats = raw[:4]
        packed = raw[4] if len(raw) > 4 else None
        assert raw_probs is not None and raw_maps is not None and pixels is not None
        if packed is None and self.has_detector:  # what raw_outputs would have added
            raw_maps, packed = self._detector_stage(raw_probs, raw_maps, pixels)
        probs, maps, masks = self._after_network_with_masks(raw_probs, raw_maps, pixels)
        shapes = [(int(s[0]), int(s[1])) for s in original_shapes]
        detections = None if packed is None else unpack_detections(packed)
        all_boxes = self.draw_boxes(images, probs, maps, shapes, detections=detections)
        return [
            Prediction(
                probability=float(p),
                positive=bool(p >= self.threshold),
                threshold=self.threshold,
                heatmap=h,
                boxes=boxes,
                original_shape=shape,
                features=None if feats is None else feats[i],
                lung_mask=masks[i] if masks else None,
            )
            for i, (p, h, boxes, shape) in enumerate(
                zip(probs, maps, all_boxes, shapes, strict=True)
            )
        ]

    def draw_boxes(
        self,
        images: np.ndarray,
        probs: np.ndarray,
        maps: np.ndarray,
        shapes: Sequence[tuple[int, int]],
        *,
        detections: Detections | None = None,
    ) -> list[ScoredBoxes]:
        """Boxes in original pixels for each image (``probs`` calibrated): the box rule on the
        heatmaps or, with a detector, its boxes on the images over the box threshold (the box
        rule's where it finds none). ``detections`` are the detector's boxes when already
        computed (:meth:`raw_outputs`); otherwise the detector runs here."""
        gate = self.box_threshold
        cam_boxes = [
            cam_to_boxes(h, float(p), threshold=gate, config=self.box_config, out_shape=shape)
            for p, h, shape in zip(probs, maps, shapes, strict=True)
        ]
        if not self.has_detector:
            return cam_boxes
        if detections is None:
            detections = self.detect_where(images, np.asarray(probs) >= gate)[0]
        return detector_boxes(
            detections,
            probs,
            threshold=gate,
            input_size=self.image_size,
            out_shapes=shapes,
            fallback=cam_boxes,
        )

    def predict_xrays(
        self, xrays: Sequence[XrayImage], *, with_features: bool = False
    ) -> list[Prediction]:
        """Predict decoded X-rays of any size (resized exactly as the cache does)."""
        s = self.image_size
        arrays = (
            np.stack([resize_square(x.pixels, s) for x in xrays])
            if xrays
            else np.zeros((0, s, s), np.uint8)
        )
        return self.predict_arrays(
            arrays, [x.original_shape for x in xrays], with_features=with_features
        )

    @property
    def can_leave_network(self) -> bool:
        """Whether :meth:`without_network` gives a copy other processes can use."""
        return False

    def without_network(self) -> BasePredictor:
        """A copy that can do everything after the network (:meth:`finish`, records) and can
        be pickled to a worker process, without the network itself.

        Raises:
            NotImplementedError: This backend's predictor cannot leave its network behind.
        """
        raise NotImplementedError(f"the {self.backend} backend keeps its network")

    def describe(self) -> dict[str, Any]:
        """What produced a prediction: model, version, CAM method, box rule, threshold."""
        return {
            "model_id": self.model_id,
            "model": self.meta.get("model"),
            "pneumoloc_version": self.meta.get("pneumoloc_version"),
            "image_size": self.image_size,
            "threshold": self.threshold,
            **self.recipe.to_meta(),
            "box_threshold": self.box_threshold,
            "box_source": self.box_source,
            "heatmap_source": self.heatmap_source,
            "checkpoint": self.meta.get("checkpoint_path"),
            "backend": self.backend,
        }


def prediction_record(
    prediction: Prediction, predictor: BasePredictor, *, image_id: str
) -> dict[str, Any]:
    """The JSON record of one prediction, shared by ``predict`` and the web API.

    ``image_id`` must already be safe to show (the caller decides whether identifiers are kept).
    """
    return {
        "id": image_id,
        **prediction.to_dict(),
        "cam_method": predictor.cam_method,
        "box_source": predictor.box_source,
        "heatmap_source": predictor.heatmap_source,
        "model_id": predictor.model_id,
        "model_version": predictor.meta.get("pneumoloc_version"),
        "pneumoloc_version": __version__,
        "disclaimer": DISCLAIMER,
    }
