"""The ONNX Runtime backend: a file written by ``pneumoloc export --onnx``, run on the CPU.

The file format (input and output names, the ``pneumoloc.*`` metadata keys) is defined here,
below both the exporter (``pneumoloc.export``) and the ``predict``/``serve`` commands that run
such files. :class:`OnnxPredictor` shares everything after the network (decision, boxes,
records) with the PyTorch backend through :class:`pneumoloc.inference.base.BasePredictor`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from pneumoloc._runtime import available_cores
from pneumoloc.errors import CheckpointError, ConfigError
from pneumoloc.inference.base import BasePredictor, split_settings

__all__ = [
    "DETECTOR_FORMAT",
    "DETECTOR_INPUT",
    "DETECTOR_OUTPUTS",
    "DETECTOR_SUFFIX",
    "FEATURES_NAME",
    "GRAPH_REVISION",
    "INPUT_NAME",
    "META_KEYS",
    "ONNX_FORMAT",
    "OUTPUT_NAMES",
    "OnnxPredictor",
    "detector_file",
    "file_sha256",
    "read_onnx_metadata",
]

GRAPH_REVISION = "3"
"""What the exported graph computes, as of this code: bump it with any change of the network or
heatmap code that changes an exported graph's outputs (CAM upsampling, a decoder's resampling,
the features output...). ``--backend auto`` runs a checkpoint's ONNX twin in its place only
when the twin's revision is this one (:func:`pneumoloc.inference.loading.load_predictor`)."""

ONNX_FORMAT = "pneumoloc-cam-onnx/1"
"""Value of the ``pneumoloc.format`` metadata entry of every file :func:`export_onnx` writes."""
INPUT_NAME = "image"
OUTPUT_NAMES = ("probability", "heatmap")
FEATURES_NAME = "features"
"""Optional third output: the (first) model's pooled features (B, C), for the input check.
Files exported before it existed lack it; they are run without it."""

DETECTOR_FORMAT = "pneumoloc-detector-onnx/2"
"""``pneumoloc.format`` of the detector file written beside an exported model whose checkpoint
holds a self-trained detector (``pneumoloc selftrain``): its own graph, because it runs one
image at a time on the images that get boxes, and ONNX Runtime runs every node of a graph
whatever outputs are asked for (measured), so in the classifier's graph it would run on every
image of every batch."""
DETECTOR_SUFFIX = ".detector.onnx"
"""The detector file of ``NAME.onnx`` is ``NAME.detector.onnx``, in the same folder."""
DETECTOR_INPUT = "image"
"""The detector graph's input: uint8 (1, 1, S, S), one image (its scaling is in the graph)."""
DETECTOR_OUTPUTS = ("boxes", "scores", "score_map")
"""Its outputs: boxes float32 (N, 4) xyxy in input pixels and scores (N,), best first, and its
score map (1, S, S) in [0, 1] (:func:`pneumoloc.models.detector.fcos_with_score_map`). (Format
1, from the day before the map, had the first two only.)"""
_DETECTOR_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,199}")

META_KEYS = {
    "format": "pneumoloc.format",
    "meta": "pneumoloc.meta",
    "image_size": "pneumoloc.image_size",
    "threshold": "pneumoloc.threshold",
    "model": "pneumoloc.model",
    "intensity": "pneumoloc.intensity",
    "input": "pneumoloc.input",
    "cam_method": "pneumoloc.cam_method",
    "pneumoloc_version": "pneumoloc.pneumoloc_version",
    "exported_by": "pneumoloc.exported_by",
    "weights_sha256": "pneumoloc.weights_sha256",
    "checkpoint_sha256": "pneumoloc.checkpoint_sha256",
    "graph_revision": "pneumoloc.graph_revision",
    "quantization": "pneumoloc.quantization",
    "source_recipe": "pneumoloc.source_recipe",
}
"""``metadata_props`` keys. ``pneumoloc.meta`` is the JSON of the checkpoint metadata that
describes the model; the others repeat its main fields for tools that show metadata."""


def read_onnx_metadata(path: str | Path) -> dict[str, Any]:
    """The pneumoloc metadata stored in an exported ONNX file.

    Raises:
        CheckpointError: The file is missing, not ONNX, or not written by :func:`export_onnx`.
    """
    import onnx

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: ONNX model not found")
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # onnx raises DecodeError and others on a corrupt file
        raise CheckpointError(f"{path}: not a readable ONNX model ({type(exc).__name__})") from None
    return _parse_metadata(path, {p.key: p.value for p in proto.metadata_props})


def _parse_metadata(path: Path, props: dict[str, str]) -> dict[str, Any]:
    if props.get(META_KEYS["format"]) != ONNX_FORMAT:
        raise CheckpointError(
            f"{path}: not a pneumoloc ONNX model (make one with `pneumoloc export CKPT --onnx`)"
        )
    try:
        meta: dict[str, Any] = json.loads(props[META_KEYS["meta"]])
        meta["image_size"] = int(meta["image_size"])
        meta["threshold"] = float(meta["threshold"])
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{path}: malformed pneumoloc ONNX metadata ({exc})") from None
    return meta


def file_sha256(path: str | Path) -> str:
    """SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def detector_file(path: str | Path, meta: dict[str, Any]) -> Path | None:
    """The detector file an exported model's metadata names (beside it), or None without one.

    The name comes from the file, so it is used only if it is a plain file name ending in
    :data:`DETECTOR_SUFFIX` (no folder, no ``..``, letters, digits, ``._-``).

    Raises:
        CheckpointError: The name is not such a plain name.
    """
    entry = meta.get("detector")
    if not entry:
        return None
    name = entry.get("file") if isinstance(entry, dict) else None
    if (
        not isinstance(name, str)
        or not _DETECTOR_NAME.fullmatch(name)
        or ".." in name
        or not name.endswith(DETECTOR_SUFFIX)
    ):
        raise CheckpointError(
            f"{path}: its metadata names the detector file {str(name)[:80]!r}, which is not a "
            f"plain file name ending in {DETECTOR_SUFFIX!r}"
        )
    return Path(path).parent / name


def _open_session(path: Path, threads: int | None) -> Any:
    """An ONNX Runtime CPU session for ``path`` (``threads`` intra-op threads, no spinning)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or available_cores()
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # No busy-waiting between runs: predict decodes files in other threads meanwhile, and
    # spinning threads starve them (and any PyTorch model in the process) for ~1 ms gained.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    try:
        return ort.InferenceSession(
            str(path), sess_options=options, providers=["CPUExecutionProvider"]
        )
    except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph types
        raise CheckpointError(
            f"{path}: ONNX Runtime cannot load it ({type(exc).__name__})"
        ) from None


def _open_detector(path: Path, meta: dict[str, Any], threads: int | None) -> Any:
    """The session of the detector file ``meta`` names, after checking it is the file the
    model was exported with (its SHA-256 is in the model's metadata)."""
    side = detector_file(path, meta)
    assert side is not None
    if not side.is_file():
        raise CheckpointError(
            f"{path}: its box detector {side.name} is missing from {side.parent} (keep the "
            "two files together, or export again: pneumoloc export CKPT --onnx FILE)"
        )
    if file_sha256(side) != meta["detector"].get("sha256"):
        raise CheckpointError(
            f"{side}: not the detector {path.name} was exported with (its SHA-256 differs); "
            "export again: pneumoloc export CKPT --onnx FILE"
        )
    session = _open_session(side, threads)
    props = dict(session.get_modelmeta().custom_metadata_map)
    if props.get(META_KEYS["format"]) != DETECTOR_FORMAT:
        raise CheckpointError(f"{side}: not a pneumoloc detector file")
    return session


class _NoSession:
    """The session of :meth:`OnnxPredictor.without_network`: any use is a bug, said plainly."""

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):  # pickle and copy probe for special methods
            raise AttributeError(name)
        raise RuntimeError(f"this predictor was copied without its network (session.{name})")


@dataclass(kw_only=True)
class OnnxPredictor(BasePredictor):
    """An exported model run by ONNX Runtime on the CPU.

    Decisions, boxes and records come from :class:`pneumoloc.inference.BasePredictor`, as for
    the PyTorch backend; only :meth:`heatmaps` differs. Only the classic CAM (method "cam",
    no test-time augmentation) is in the graph.

    Attributes:
        session: The ``onnxruntime.InferenceSession``.
        detector_session: The session of the self-trained detector's file when the model has
            one (:data:`DETECTOR_FORMAT`); it then draws the boxes of positive images, as in
            the PyTorch backend. None: the box rule draws them.
        meta: The metadata stored in the ONNX file (see :func:`read_onnx_metadata`).
        box_config: The heatmap -> boxes rule (default: the stored one).
        batch_size: Images per ``session.run``.
    """

    backend: ClassVar[str] = "onnx"

    session: Any
    detector_session: Any = None

    def __post_init__(self) -> None:
        if self.cam_method != "cam":
            raise ConfigError(
                f"the ONNX backend computes the classic CAM only; --cam {self.cam_method!r} "
                "needs the torch backend"
            )
        if self.tta:
            raise ConfigError("the ONNX backend has no test-time augmentation")
        if self.cam_layers not in (None, "final"):
            raise ConfigError("the ONNX backend has no multi-stage CAM fusion (--cam-layers)")
        graph_floor = self.meta.get("cam_floor") or "relu"  # files before 0.4: "relu"
        if self.recipe.cam_floor != graph_floor:
            raise ConfigError(
                f"this ONNX graph floors its CAM with cam_floor {graph_floor!r}; "
                f"{self.recipe.cam_floor!r} needs the torch backend (or a file exported so)"
            )
        graph_align = self.meta.get("cam_align") or "centre"  # files before 0.3: "centre"
        if self.recipe.cam_align != graph_align:
            raise ConfigError(
                f"this ONNX graph upsamples its CAM with cam_align {graph_align!r}; "
                f"{self.recipe.cam_align!r} needs the torch backend (or a file exported so)"
            )

    @classmethod
    def from_onnx(
        cls,
        path: str | Path,
        *,
        threads: int | None = None,
        use_detector: bool = True,
        **kwargs: Any,
    ) -> OnnxPredictor:
        """Open an exported model (and its detector file, when it names one).

        Args:
            path: The ``.onnx`` file written by :func:`export_onnx`.
            threads: ONNX Runtime intra-op threads (default: the cores this process may use).
            use_detector: Open the model's detector file; False ignores it (the box rule
                draws the boxes), as ``Predictor.from_checkpoint(use_detector=False)``.
            **kwargs: Recipe settings (``box_config``, ``lung_mask``, ...) and predictor fields
                (``batch_size``, ...).

        Raises:
            CheckpointError: Missing file, not a pneumoloc ONNX model, or a detector file that
                is missing or is not the one it was exported with.
        """
        path = Path(path)
        if not path.is_file():
            raise CheckpointError(f"{path}: ONNX model not found")
        session = _open_session(path, threads)
        props = dict(session.get_modelmeta().custom_metadata_map)
        meta = _parse_metadata(path, props)
        meta["checkpoint_path"] = str(path)
        meta["weights_sha256"] = props.get(META_KEYS["weights_sha256"], "")
        meta["checkpoint_sha256"] = props.get(META_KEYS["checkpoint_sha256"], "")
        meta["graph_revision"] = props.get(META_KEYS["graph_revision"], "")
        try:
            meta["source_recipe"] = json.loads(props.get(META_KEYS["source_recipe"], "{}"))
            meta["quantization"] = json.loads(props.get(META_KEYS["quantization"], "null"))
        except ValueError:
            meta["source_recipe"], meta["quantization"] = {}, None
        detector = None
        if meta.get("detector") and use_detector:
            detector = _open_detector(path, meta, threads)
        elif meta.get("detector"):
            meta.pop("detector")
        # The file's metadata holds only settings this backend runs (cam_method is "cam").
        settings = split_settings(meta, kwargs, cam_method="cam")
        return cls(session=session, detector_session=detector, meta=meta, **settings)

    @property
    def can_leave_network(self) -> bool:
        """True: the session is the only part that stays (:meth:`without_network`)."""
        return True

    def without_network(self) -> OnnxPredictor:
        """This predictor without its ONNX Runtime sessions (which cannot be pickled): the
        settings, metadata and everything after the network, for a worker process. Its
        ``network`` and ``detect`` methods raise; it still draws detector boxes from the
        detections :meth:`raw_outputs` packed."""
        detector = None if self.detector_session is None else _NoSession()
        return dataclasses.replace(self, session=_NoSession(), detector_session=detector)

    @property
    def has_detector(self) -> bool:
        """Whether the model's detector file was opened (it then draws the boxes)."""
        return self.detector_session is not None

    def detect_with_maps(self, images: Any) -> tuple[list[tuple[np.ndarray, np.ndarray]], Any]:
        """The detector's boxes (xyxy, input pixels) and scores for uint8 images (B, S, S),
        at most ``detector_limits``, and its score maps (B, S, S); one image per run (the
        graph's batch is 1)."""
        if self.detector_session is None:
            return super().detect_with_maps(images)
        arr = np.asarray(images)
        if arr.ndim == 4:
            arr = arr[:, 0]
        min_score, max_boxes = self.detector_limits
        found, maps = [], np.zeros(arr.shape, np.float32)
        for i, image in enumerate(arr):
            feed = {DETECTOR_INPUT: np.ascontiguousarray(image[None, None], dtype=np.uint8)}
            boxes, scores, score_map = self.detector_session.run(list(DETECTOR_OUTPUTS), feed)
            keep = np.flatnonzero(np.asarray(scores) >= min_score)[:max_boxes]
            found.append((boxes[keep].astype(np.float32), scores[keep].astype(np.float32)))
            maps[i] = score_map[0]
        return found, maps

    @property
    def has_features(self) -> bool:
        """Whether the graph outputs the pooled features (files exported since 0.2)."""
        return FEATURES_NAME in {o.name for o in self.session.get_outputs()}

    @property
    def weights_sha256(self) -> str:
        """Digest of the exported weights (as the torch backend computes it; "" when the file
        predates it), so the input check finds the checkpoint's feature statistics."""
        return str(self.meta.get("weights_sha256") or "")

    def network(self, images: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Uncalibrated probabilities (B,), heatmaps (B, S, S) in [0, 1] and the uint8 images,
        for uint8 images (B, S, S)."""
        probs, maps, pixels, _ = self._run(images, features=False)
        return probs, maps, pixels

    def network_with_features(
        self, images: Any
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]:
        """:meth:`network` plus the pooled features (B, C) of the same run (None when the
        file has no such output)."""
        return self._run(images, features=self.has_features)

    def _run(
        self, images: Any, *, features: bool
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]:
        arr = np.asarray(images.numpy() if hasattr(images, "numpy") else images)
        if arr.ndim == 3:
            arr = arr[:, None]
        s = self.image_size
        if arr.ndim != 4 or arr.shape[1:] != (1, s, s):
            raise ValueError(f"expected uint8 images (B, {s}, {s}), got shape {arr.shape}")
        if arr.dtype != np.uint8:
            raise ValueError(f"expected uint8 images, got {arr.dtype}")
        if len(arr) == 0:
            return np.zeros(0, np.float32), np.zeros((0, s, s), np.float32), arr[:, 0], None
        names = [*OUTPUT_NAMES, FEATURES_NAME] if features else list(OUTPUT_NAMES)
        probs, maps, feats = [], [], []
        for start in range(0, len(arr), self.batch_size):
            chunk = np.ascontiguousarray(arr[start : start + self.batch_size])
            outputs = self.session.run(names, {INPUT_NAME: chunk})
            probs.append(outputs[0])
            maps.append(outputs[1])
            if features:
                feats.append(outputs[2])
        heatmaps = np.concatenate(maps).astype(np.float32)
        pooled = np.concatenate(feats).astype(np.float32) if features else None
        return np.concatenate(probs).astype(np.float32), heatmaps, arr[:, 0], pooled
