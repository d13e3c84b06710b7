"""The ONNX Runtime backend: a file written by ``pneumoloc export --onnx``, run on the CPU.

The file format (input and output names, the ``pneumoloc.*`` metadata keys) is defined here,
below both the exporter (``pneumoloc.export``) and the ``predict``/``serve`` commands that run
such files. :class:`OnnxPredictor` shares everything after the network (decision, boxes,
records) with the PyTorch backend through :class:`pneumoloc.inference.base.BasePredictor`.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from pneumoloc._runtime import available_cores
from pneumoloc.errors import CheckpointError, ConfigError
from pneumoloc.inference.base import BasePredictor, split_settings

__all__ = [
    "FEATURES_NAME",
    "GRAPH_REVISION",
    "INPUT_NAME",
    "META_KEYS",
    "ONNX_FORMAT",
    "OUTPUT_NAMES",
    "OnnxPredictor",
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
        meta: The metadata stored in the ONNX file (see :func:`read_onnx_metadata`).
        box_config: The heatmap -> boxes rule (default: the stored one).
        batch_size: Images per ``session.run``.
    """

    backend: ClassVar[str] = "onnx"

    session: Any

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
        cls, path: str | Path, *, threads: int | None = None, **kwargs: Any
    ) -> OnnxPredictor:
        """Open an exported model.

        Args:
            path: The ``.onnx`` file written by :func:`export_onnx`.
            threads: ONNX Runtime intra-op threads (default: the cores this process may use).
            **kwargs: Recipe settings (``box_config``, ``lung_mask``, ...) and predictor fields
                (``batch_size``, ...).

        Raises:
            CheckpointError: Missing file, not a pneumoloc ONNX model.
        """
        import onnxruntime as ort

        path = Path(path)
        if not path.is_file():
            raise CheckpointError(f"{path}: ONNX model not found")
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or available_cores()
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # No busy-waiting between runs: predict decodes files in other threads meanwhile, and
        # spinning threads starve them (and any PyTorch model in the process) for ~1 ms gained.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        try:
            session = ort.InferenceSession(
                str(path), sess_options=options, providers=["CPUExecutionProvider"]
            )
        except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph types
            raise CheckpointError(
                f"{path}: ONNX Runtime cannot load it ({type(exc).__name__})"
            ) from None
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
        # The file's metadata holds only settings this backend runs (cam_method is "cam").
        return cls(session=session, meta=meta, **split_settings(meta, kwargs, cam_method="cam"))

    @property
    def can_leave_network(self) -> bool:
        """True: the session is the only part that stays (:meth:`without_network`)."""
        return True

    def without_network(self) -> OnnxPredictor:
        """This predictor without its ONNX Runtime session (which cannot be pickled): the
        settings, metadata and everything after the network, for a worker process. Its
        ``network`` methods raise."""
        return dataclasses.replace(self, session=_NoSession())

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
