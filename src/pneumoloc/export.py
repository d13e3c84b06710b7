"""``pneumoloc export --onnx``: the classifier and its classic-CAM heatmap in one ONNX graph.

The graph
---------
* input ``image``: ``uint8`` of shape ``(B, 1, S, S)``, the raw 8-bit grayscale pixels of
  :func:`pneumoloc.io.read_xray` resized to the model's side ``S`` (0 = black air, 255 =
  white bone). The intensity normalisation of :func:`pneumoloc.augment.normalise`
  (``(x / 255 - 0.5) / 0.25``) is *inside* the graph, so a caller cannot get it wrong, and
  uint8 is 4x less to copy than float32.
* output ``probability``: ``float32 (B,)``, the sigmoid of the pneumonia logit.
* output ``heatmap``: ``float32 (B, S, S)`` in ``[0, 1]``, exactly what
  ``Predictor.heatmaps`` gives for method ``"cam"``: the model's CAM (``w · f + b``)
  bilinearly upsampled to ``S`` (``align_corners=False``), ReLU'd, then divided by its
  per-image maximum (an all-zero map stays zero).

The batch axis is dynamic; the spatial size is fixed at the checkpoint's ``image_size``.
The ONNX file describes itself: its ``metadata_props`` hold the image size, decision
threshold, model spec, intensity convention, box rule and pneumoloc versions (keys
``pneumoloc.*``, see :data:`META_KEYS`), which :class:`OnnxPredictor` reads back.

:class:`OnnxPredictor` runs such a file with ONNX Runtime on the CPU and shares everything after
the network (decision, boxes, records) with the PyTorch :class:`pneumoloc.inference.Predictor`
through :class:`pneumoloc.inference.BasePredictor`.
"""

from __future__ import annotations

import json
import logging
import math
import os
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from pneumoloc.errors import CheckpointError, ConfigError
from pneumoloc.inference import BasePredictor, stored_recipe

logger = logging.getLogger(__name__)

__all__ = [
    "INPUT_NAME",
    "META_KEYS",
    "ONNX_FORMAT",
    "OUTPUT_NAMES",
    "OnnxExportResult",
    "OnnxPredictor",
    "export_onnx",
    "read_onnx_metadata",
]

ONNX_FORMAT = "pneumoloc-cam-onnx/1"
"""Value of the ``pneumoloc.format`` metadata entry of every file :func:`export_onnx` writes."""
INPUT_NAME = "image"
OUTPUT_NAMES = ("probability", "heatmap")
DEFAULT_OPSET = 18

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
}
"""``metadata_props`` keys. ``pneumoloc.meta`` is the JSON of the checkpoint metadata that
describes the model; the others repeat its main fields for tools that show metadata."""

# Checkpoint metadata copied into the ONNX file (never local paths or the training config).
_META_FIELDS = (
    "model",
    "image_size",
    "threshold",
    "box_threshold",
    "box_gate",
    "intensity",
    "label_names",
    "box_config",
    "cam_layer",
    "lung_mask",
    "refine",
    "pneumoloc_version",
    "epoch",
)
_DATA_FIELDS = ("fingerprint", "kind", "n_train", "n_val")


@dataclass(frozen=True)
class OnnxExportResult:
    """What :func:`export_onnx` wrote.

    Attributes:
        path: The ONNX file.
        opset: Its opset version.
        exporter: ``"dynamo"`` or ``"torchscript"``.
        max_abs_diff_probability: Largest |ONNX Runtime - PyTorch| probability on the check
            batch (NaN when the check was skipped).
        max_abs_diff_heatmap: Same for the heatmaps.
    """

    path: Path
    opset: int
    exporter: str
    max_abs_diff_probability: float = math.nan
    max_abs_diff_heatmap: float = math.nan


def _cam_graph(model: Any, image_size: int) -> Any:
    """The exported module: uint8 images -> (probability, heatmap), as ``Predictor`` does."""
    import torch

    from pneumoloc.augment import normalise
    from pneumoloc.cam.classic import upsample_cam

    class CamGraph(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model
            self.size = int(image_size)

        def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            logits, cam = self.model.forward_with_cam(normalise(image))
            # pneumoloc.cam.classic_cam, then compute_cam(normalize=True), line for line.
            heat = upsample_cam(cam, (self.size, self.size)).relu()
            peak = heat.amax(dim=(-2, -1), keepdim=True)
            heat = torch.where(peak > 0, heat / peak.clamp(min=1e-12), heat)
            return torch.sigmoid(logits.float()), heat

    return CamGraph().eval()


def _metadata(meta: dict[str, Any]) -> dict[str, str]:
    from pneumoloc import DISCLAIMER, __version__
    from pneumoloc.augment import INTENSITY_CONVENTION

    kept = {k: meta[k] for k in _META_FIELDS if k in meta}
    data = meta.get("data") or {}
    if isinstance(data, dict) and data:
        kept["data"] = {k: data[k] for k in _DATA_FIELDS if k in data}
    val = (meta.get("metrics") or {}).get("val") if isinstance(meta.get("metrics"), dict) else None
    if isinstance(val, dict):
        kept["metrics"] = {"val": {k: v for k, v in val.items() if isinstance(v, int | float)}}
    kept.setdefault("intensity", INTENSITY_CONVENTION)
    kept["cam_method"] = "cam"
    size = int(meta["image_size"])
    return {
        META_KEYS["format"]: ONNX_FORMAT,
        META_KEYS["meta"]: json.dumps(kept, sort_keys=True, default=str),
        META_KEYS["image_size"]: str(size),
        META_KEYS["threshold"]: repr(float(meta["threshold"])),
        META_KEYS["model"]: json.dumps(meta.get("model"), sort_keys=True, default=str),
        META_KEYS["intensity"]: json.dumps(kept["intensity"], sort_keys=True, default=str),
        META_KEYS["input"]: (
            f"{INPUT_NAME}: uint8 (batch, 1, {size}, {size}) raw grayscale pixels 0..255 "
            "(0 = black); normalised inside the graph"
        ),
        META_KEYS["cam_method"]: "cam",
        META_KEYS["pneumoloc_version"]: str(meta.get("pneumoloc_version", "")),
        META_KEYS["exported_by"]: f"pneumoloc {__version__}",
        "disclaimer": DISCLAIMER,
    }


def export_onnx(
    checkpoint: str | Path | None,
    out: str | Path,
    *,
    opset: int = DEFAULT_OPSET,
    dynamo: bool = True,
    check: bool = True,
) -> OnnxExportResult:
    """Export a checkpoint's classifier and classic-CAM heatmap as one ONNX graph.

    Args:
        checkpoint: Checkpoint path, or None / "default" for the shipped model.
        out: The ``.onnx`` file to write (its folder is created).
        opset: ONNX opset version (>= 17).
        dynamo: Use ``torch.onnx.export(dynamo=True)`` (torch.export based, the maintained
            exporter); False uses the deprecated TorchScript exporter.
        check: Run ``onnx.checker`` and compare ONNX Runtime with PyTorch on a random batch of
            3 images; a disagreement above 1e-4 (probability) or 1e-3 (heatmap) raises.

    Returns:
        The file written and, when checked, the largest differences seen.

    Raises:
        CheckpointError: The checkpoint is missing or unreadable, or the check fails.
        ConfigError: ``opset`` below 17.
    """
    import onnx
    import torch

    from pneumoloc.checkpoint import load_checkpoint, model_from_checkpoint
    from pneumoloc.inference import resolve_checkpoint

    if opset < 17:
        raise ConfigError(f"opset must be >= 17, got {opset}")
    path = resolve_checkpoint(checkpoint)
    model, meta = model_from_checkpoint(load_checkpoint(path, map_location="cpu"), device="cpu")
    size = int(meta["image_size"])
    if meta.get("cam_method") not in (None, "cam") or meta.get("tta"):
        logger.warning(
            "%s asks for CAM method %r%s by default; the ONNX graph computes the classic CAM "
            "without test-time augmentation",
            path,
            meta.get("cam_method"),
            " with TTA" if meta.get("tta") else "",
        )
    if meta.get("detector"):
        logger.warning(
            "%s holds a self-trained box detector; the ONNX file carries the classifier only, "
            "so its boxes come from the CAM box rule",
            path,
        )
    graph = _cam_graph(model, size)
    example = torch.randint(0, 256, (2, 1, size, size), dtype=torch.uint8)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    with warnings.catch_warnings(), _quiet_exporter_logs():
        # The exporters warn about their own internals (deprecations, tracer notes); they are
        # not actionable for a user and this only affects this block.
        warnings.simplefilter("ignore")
        if dynamo:
            batch = torch.export.Dim("batch", min=1, max=4096)
            program = torch.onnx.export(
                graph,
                (example,),
                input_names=[INPUT_NAME],
                output_names=list(OUTPUT_NAMES),
                dynamic_shapes=({0: batch},),
                opset_version=opset,
                dynamo=True,
                external_data=False,
                verbose=False,
            )
            if program is None:  # pragma: no cover - dynamo export always returns a program
                raise CheckpointError(f"{path}: the ONNX exporter returned nothing")
            proto = program.model_proto
        else:
            torch.onnx.export(
                graph,
                (example,),
                str(tmp),
                input_names=[INPUT_NAME],
                output_names=list(OUTPUT_NAMES),
                dynamic_axes={name: {0: "batch"} for name in (INPUT_NAME, *OUTPUT_NAMES)},
                opset_version=opset,
                dynamo=False,
            )
            proto = onnx.load(str(tmp))
    del proto.metadata_props[:]
    for key, value in _metadata(meta).items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    proto.doc_string = (
        f"pneumoloc {meta.get('model', {}).get('name', '?')} at {size} px: "
        "uint8 image -> probability, classic-CAM heatmap in [0, 1]"
    )
    onnx.save(proto, str(tmp))
    if check:
        onnx.checker.check_model(str(tmp))
    os.replace(tmp, out)
    result = OnnxExportResult(out, opset, "dynamo" if dynamo else "torchscript")
    if not check:
        return result
    dp, dh = _compare(out, graph, size)
    if not (dp <= 1e-4 and dh <= 1e-3):
        raise CheckpointError(
            f"{out}: ONNX Runtime disagrees with PyTorch (probability {dp:.2e}, heatmap {dh:.2e})"
        )
    logger.info("exported %s (max |diff|: probability %.1e, heatmap %.1e)", out, dp, dh)
    return OnnxExportResult(out, opset, result.exporter, dp, dh)


@contextmanager
def _quiet_exporter_logs() -> Iterator[None]:
    """Hide the INFO chatter of the ONNX optimiser passes while exporting (levels restored)."""
    loggers = [logging.getLogger(name) for name in ("onnxscript", "onnx_ir", "torch.onnx")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(max(lg.getEffectiveLevel(), logging.WARNING))
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def _compare(path: Path, graph: Any, size: int) -> tuple[float, float]:
    """Largest |ONNX Runtime - PyTorch| of probability and heatmap on 3 random images (the
    networks alone: post-processing such as refinement or the lung mask is switched off)."""
    import torch

    images = np.random.default_rng(0).integers(0, 256, (3, 1, size, size), dtype=np.uint8)
    runner = OnnxPredictor.from_onnx(path, threads=1, lung_mask=False, refine=None)
    probs, maps = runner.heatmaps(images)
    with torch.inference_mode():
        p_ref, h_ref = graph(torch.from_numpy(images))
    return (
        float(np.abs(probs - p_ref.numpy()).max()),
        float(np.abs(maps - h_ref.numpy()).max()),
    )


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

    @classmethod
    def from_onnx(
        cls, path: str | Path, *, threads: int | None = None, **kwargs: Any
    ) -> OnnxPredictor:
        """Open an exported model.

        Args:
            path: The ``.onnx`` file written by :func:`export_onnx`.
            threads: ONNX Runtime intra-op threads (default: the cores this process may use).
            **kwargs: Dataclass fields (``box_config``, ``batch_size``, ...).

        Raises:
            CheckpointError: Missing file, not a pneumoloc ONNX model.
        """
        import onnxruntime as ort

        path = Path(path)
        if not path.is_file():
            raise CheckpointError(f"{path}: ONNX model not found")
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or _available_cores()
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
        meta = _parse_metadata(path, dict(session.get_modelmeta().custom_metadata_map))
        meta["checkpoint_path"] = str(path)
        # The file's metadata holds only settings this backend runs (cam_method is "cam").
        kwargs = stored_recipe(meta, kwargs)
        kwargs.setdefault("cam_method", "cam")
        return cls(session=session, meta=meta, **kwargs)

    def heatmaps(self, images: Any) -> tuple[np.ndarray, np.ndarray]:
        """Probabilities (B,) and heatmaps (B, S, S) in [0, 1] for uint8 images (B, S, S)."""
        arr = np.asarray(images.numpy() if hasattr(images, "numpy") else images)
        if arr.ndim == 3:
            arr = arr[:, None]
        s = self.image_size
        if arr.ndim != 4 or arr.shape[1:] != (1, s, s):
            raise ValueError(f"expected uint8 images (B, {s}, {s}), got shape {arr.shape}")
        if arr.dtype != np.uint8:
            raise ValueError(f"expected uint8 images, got {arr.dtype}")
        if len(arr) == 0:
            return np.zeros(0, np.float32), np.zeros((0, s, s), np.float32)
        probs, maps = [], []
        for start in range(0, len(arr), self.batch_size):
            chunk = np.ascontiguousarray(arr[start : start + self.batch_size])
            p, h = self.session.run(list(OUTPUT_NAMES), {INPUT_NAME: chunk})
            probs.append(p)
            maps.append(h)
        # The same post-processing as the torch backend.
        heatmaps = self.postprocess(arr[:, 0], np.concatenate(maps).astype(np.float32))
        return np.concatenate(probs).astype(np.float32), heatmaps


def _available_cores() -> int:
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)
