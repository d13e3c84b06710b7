"""``pneumoloc export --onnx``: the classifier and its classic-CAM heatmap in one ONNX graph.

The graph
---------
* input ``image``: ``uint8`` of shape ``(B, 1, S, S)``, the raw 8-bit grayscale pixels of
  :func:`pneumoloc.io.read_xray` resized to the model's side ``S`` (0 = black air, 255 =
  white bone). The intensity normalisation of :func:`pneumoloc.io.preprocess.to_model_input`
  (``(x / 255 - 0.5) / 0.25``) is *inside* the graph, so a caller cannot get it wrong, and
  uint8 is 4x less to copy than float32.
* output ``probability``: ``float32 (B,)``, the sigmoid of the pneumonia logit.
* output ``heatmap``: ``float32 (B, S, S)`` in ``[0, 1]``, exactly what
  ``Predictor.heatmaps`` gives for method ``"cam"``: the model's CAM (``w · f + b``)
  bilinearly upsampled to ``S`` (as the recipe's ``cam_align`` says), made non-negative as its
  ``cam_floor`` says (ReLU, or minus the map's minimum), then divided by its per-image maximum
  (an all-zero map stays zero). For an ensemble, the mean over the members whose role gives
  each output (a classifier paired with a localiser gives the one's probability and the
  other's heatmap).

The batch axis is dynamic; the spatial size is fixed at the checkpoint's ``image_size``.

A checkpoint with a self-trained box detector (``pneumoloc selftrain``) also gets its detector
file, ``NAME.detector.onnx`` beside ``NAME.onnx`` (format
:data:`~pneumoloc.inference.onnx_backend.DETECTOR_FORMAT`): torchvision's FCOS with its
post-processing (score threshold, top-k, NMS), uint8 ``image`` (1, 1, S, S) in, ``boxes``
(N, 4) xyxy in input pixels, ``scores`` (N,) and ``score_map`` (1, S, S) out, exported with
the TorchScript-based exporter (its Python loop over images traces to a fixed batch of one).
The model file's metadata names it and holds its SHA-256, so the two are opened together or not
at all.

The ONNX file describes itself: its ``metadata_props`` hold the image size, decision
threshold, model spec, intensity convention, box rule and pneumoloc versions (keys
``pneumoloc.*``, see :data:`META_KEYS`), which :class:`OnnxPredictor` reads back.

:class:`OnnxPredictor` runs such a file with ONNX Runtime on the CPU and shares everything after
the network (decision, boxes, records) with the PyTorch :class:`pneumoloc.inference.Predictor`
through :class:`pneumoloc.inference.base.BasePredictor`; it lives in
:mod:`pneumoloc.inference.onnx_backend` (re-exported here).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pneumoloc.errors import CheckpointError, ConfigError
from pneumoloc.inference.onnx_backend import (
    DETECTOR_FORMAT,
    DETECTOR_INPUT,
    DETECTOR_OUTPUTS,
    DETECTOR_SUFFIX,
    FEATURES_NAME,
    GRAPH_REVISION,
    INPUT_NAME,
    META_KEYS,
    ONNX_FORMAT,
    OUTPUT_NAMES,
    OnnxPredictor,
    read_onnx_metadata,
)
from pneumoloc.inference.recipe import ONNX_RECIPE_FIELDS, InferenceRecipe

logger = logging.getLogger(__name__)

__all__ = [
    "FEATURES_NAME",
    "INPUT_NAME",
    "META_KEYS",
    "ONNX_FORMAT",
    "OUTPUT_NAMES",
    "OnnxExportResult",
    "OnnxPredictor",
    "export_onnx",
    "read_onnx_metadata",
]

DEFAULT_OPSET = 18

# Checkpoint metadata copied into the ONNX file (never local paths or the training config).
_META_FIELDS = (
    "model",
    "image_size",
    "threshold",
    "box_threshold",
    "intensity",
    "label_names",
    "cam_layer",
    "temperature",
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
        detector_path: The detector file written beside it (None: the checkpoint has none).
        max_abs_diff_detector_px: Largest |ONNX Runtime - PyTorch| corner of the detector's
            kept boxes on the check images, in input pixels (NaN: none, or unchecked).
    """

    path: Path
    opset: int
    exporter: str
    max_abs_diff_probability: float = math.nan
    max_abs_diff_heatmap: float = math.nan
    detector_path: Path | None = None
    max_abs_diff_detector_px: float = math.nan


def _cam_graph(
    models: list[Any],
    image_size: int,
    align: str = "centre",
    floor: str = "relu",
    roles: list[str] | None = None,
) -> Any:
    """The exported module: uint8 images -> (probability, heatmap), as ``Predictor`` does
    (for an ensemble: the mean of the probabilities of the members whose role gives one, and
    of their heatmaps likewise, ``pneumoloc.models.checkpoint.MEMBER_ROLES``). The CAM's
    upsampling (``align``, ``pneumoloc.cam.names.CAM_ALIGNS``) and floor (``floor``,
    ``CAM_FLOORS``: ReLU, the map minus its minimum, or either by the map) are fixed in the
    graph: with
    ``"cells"`` the interpolation indices and weights are constants of the input size."""
    import torch

    from pneumoloc.cam.classic import cam_cell_grids, check_cam_align, floor_cam, upsample_cam
    from pneumoloc.cam.names import check_cam_floor
    from pneumoloc.io.preprocess import to_model_input
    from pneumoloc.models.checkpoint import role_mean

    size = int(image_size)
    check_cam_align(align)
    check_cam_floor(floor)
    used_roles: list[str] = list(roles or ["both"] * len(models))
    grids = {id(m): cam_cell_grids(m, (size, size)) if align == "cells" else None for m in models}

    Output = tuple[torch.Tensor, torch.Tensor, torch.Tensor]

    def member_output(model: Any, x: torch.Tensor) -> Output:
        logits, cam, feats = model.forward_with_cam_and_features(x)
        # pneumoloc.cam.classic_cam, then compute_cam(scale_to_max=True), line for line.
        heat = floor_cam(upsample_cam(cam, (size, size), grids[id(model)]), floor)
        peak = heat.amax(dim=(-2, -1), keepdim=True)
        heat = torch.where(peak > 0, heat / peak.clamp(min=1e-12), heat)
        # The input check's features, as the torch backend pools them (feature_tap's output).
        return torch.sigmoid(logits.float()), heat, feats.float().mean(dim=(2, 3))

    class CamGraph(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = models[0]

        def forward(self, image: torch.Tensor) -> Output:
            return member_output(self.model, to_model_input(image))

    class EnsembleCamGraph(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.members = torch.nn.ModuleList(models)

        def forward(self, image: torch.Tensor) -> Output:
            x = to_model_input(image)
            outputs = [member_output(m, x) for m in self.members]
            probs = role_mean([o[0] for o in outputs], used_roles, "probability")
            heat = role_mean([o[1] for o in outputs], used_roles, "heatmap")
            # the first member's features, as the torch backend's input check reads them
            return probs, heat, outputs[0][2]

    return (CamGraph() if len(models) == 1 else EnsembleCamGraph()).eval()


def _detector_graph(detector: Any) -> Any:
    """The exported detector: one uint8 image (1, 1, S, S) -> boxes (N, 4), scores (N,) and
    score map (1, S, S), as :func:`pneumoloc.models.detector.detect_with_maps` runs it (same
    scaling as ``detector_input``)."""
    import torch

    from pneumoloc.models.detector import fcos_with_score_map

    class DetectorGraph(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.detector = detector

        def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            x = image[0].float().div(255.0).expand(3, -1, -1)
            detections, score_map = fcos_with_score_map(self.detector, [x])
            return detections[0]["boxes"], detections[0]["scores"], score_map

    return DetectorGraph().eval()


def detector_entry(entry: dict[str, Any], file: Path) -> dict[str, Any]:
    """What the model file's metadata says of its detector file (no weights, no local path)."""
    from pneumoloc.inference.onnx_backend import file_sha256

    return {
        "file": file.name,
        "sha256": file_sha256(file),
        "kind": entry.get("kind"),
        "image_size": int(entry["image_size"]),
        "config": {
            k: v
            for k, v in (entry.get("config") or {}).items()
            if k in ("min_score", "max_boxes", "rounds", "detector_backbone", "epochs")
        },
    }


def _export_detector(
    entry: dict[str, Any], out: Path, opset: int, checkpoint_sha256: str, check: bool
) -> float:
    """Write the detector file ``out`` from a checkpoint's ``"detector"`` entry; returns the
    largest box-corner difference of ONNX Runtime against PyTorch on the check images (NaN
    unchecked).

    Raises:
        CheckpointError: The detector cannot be rebuilt, or ONNX Runtime disagrees.
    """
    import onnx
    import torch

    from pneumoloc import DISCLAIMER, __version__
    from pneumoloc.models.detector import load_detector

    graph = _detector_graph(load_detector(entry, "cpu"))
    size = int(entry["image_size"])
    example = torch.from_numpy(_check_images(size, 1))
    tmp = out.with_name(out.name + ".tmp")
    with warnings.catch_warnings(), _quiet_exporter_logs():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            graph,
            (example,),
            str(tmp),
            input_names=[DETECTOR_INPUT],
            output_names=list(DETECTOR_OUTPUTS),
            opset_version=opset,
            dynamo=False,
        )
    proto = onnx.load(str(tmp))
    props = {
        META_KEYS["format"]: DETECTOR_FORMAT,
        META_KEYS["image_size"]: str(size),
        META_KEYS["input"]: (
            f"{DETECTOR_INPUT}: uint8 (1, 1, {size}, {size}) raw grayscale pixels 0..255, "
            "one image; scaled inside the graph"
        ),
        META_KEYS["exported_by"]: f"pneumoloc {__version__}",
        META_KEYS["checkpoint_sha256"]: checkpoint_sha256,
        "pneumoloc.detector_kind": str(entry.get("kind")),
        "disclaimer": DISCLAIMER,
    }
    doc = (
        f"pneumoloc self-trained box detector ({entry.get('kind')}) at {size} px: uint8 image "
        "-> boxes (xyxy, input pixels), scores, score map"
    )
    _save(proto, props, doc, tmp, out, check)
    if not check:
        return math.nan
    return _compare_detector(out, graph, size, entry)


def _save(proto: Any, props: dict[str, str], doc: str, tmp: Path, out: Path, check: bool) -> None:
    """Write ``proto`` with ``props`` as its metadata (replacing the exporter's) and ``doc`` as
    its doc string to ``tmp``, check it with ``onnx.checker`` when asked, then move it to ``out``
    (never half-written)."""
    import onnx

    del proto.metadata_props[:]
    for key, value in props.items():
        item = proto.metadata_props.add()
        item.key, item.value = key, value
    proto.doc_string = doc
    onnx.save(proto, str(tmp))
    if check:
        onnx.checker.check_model(str(tmp))
    os.replace(tmp, out)


def _check_images(size: int, n: int) -> np.ndarray:
    """``n`` uint8 check images (n, 1, size, size): smooth bright blobs on dark noise, so a
    detector finds something on them and ties between its boxes are rare."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:size, 0:size] / size
    out = np.empty((n, 1, size, size), np.uint8)
    for i in range(n):
        cy, cx = rng.uniform(0.3, 0.7, 2)
        blob = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * rng.uniform(0.05, 0.15) ** 2))
        noisy = 40 + 160 * blob + rng.normal(0, 8, (size, size))
        out[i, 0] = np.clip(noisy, 0, 255).astype(np.uint8)
    return out


def _compare_detector(path: Path, graph: Any, size: int, entry: dict[str, Any]) -> float:
    """Largest |ONNX Runtime - PyTorch| corner (input pixels) of the boxes ``detect`` keeps,
    on 3 check images; raises when they keep different numbers of boxes or differ by more
    than half a pixel or 1e-3 in score, or when their score maps differ by more than 1e-4."""
    import torch

    from pneumoloc.inference.base import DETECTOR_MAX_BOXES, DETECTOR_MIN_SCORE
    from pneumoloc.inference.onnx_backend import _open_session

    config = entry.get("config") or {}
    min_score = float(config.get("min_score", DETECTOR_MIN_SCORE))
    max_boxes = int(config.get("max_boxes", DETECTOR_MAX_BOXES))
    session = _open_session(path, 1)
    worst = 0.0
    for image in _check_images(size, 3):
        feed = {DETECTOR_INPUT: image[None]}
        boxes, scores, score_map = session.run(list(DETECTOR_OUTPUTS), feed)
        with torch.inference_mode():
            ref_boxes, ref_scores, ref_map = (
                t.numpy() for t in graph(torch.from_numpy(image[None]))
            )
        if score_map.shape != ref_map.shape or float(np.abs(score_map - ref_map).max()) > 1e-4:
            raise CheckpointError(f"{path}: ONNX Runtime's detector map differs from PyTorch's")
        keep = np.flatnonzero(scores >= min_score)[:max_boxes]
        ref_keep = np.flatnonzero(ref_scores >= min_score)[:max_boxes]
        if len(keep) != len(ref_keep) or (
            len(keep) and float(np.abs(scores[keep] - ref_scores[ref_keep]).max()) > 1e-3
        ):
            raise CheckpointError(f"{path}: ONNX Runtime's detector boxes differ from PyTorch's")
        if len(keep):
            worst = max(worst, float(np.abs(boxes[keep] - ref_boxes[ref_keep]).max()))
    if worst > 0.5:
        raise CheckpointError(
            f"{path}: ONNX Runtime's detector boxes differ from PyTorch's by {worst:.2f} px"
        )
    return worst


def _metadata(
    meta: dict[str, Any],
    weights_sha256: str = "",
    checkpoint_sha256: str = "",
    detector: dict[str, Any] | None = None,
) -> dict[str, str]:
    from pneumoloc import DISCLAIMER, __version__
    from pneumoloc.io.preprocess import INTENSITY_CONVENTION

    kept = {k: meta[k] for k in _META_FIELDS if k in meta}
    if detector:
        kept["detector"] = detector
    # The recipe settings the graph and the backends run (stored recipe, or its defaults).
    kept.update(InferenceRecipe.from_meta(meta).to_meta(ONNX_RECIPE_FIELDS))
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
        META_KEYS["weights_sha256"]: weights_sha256,
        # The checkpoint file it came from (``predict --backend auto`` runs this file in its
        # place only while the checkpoint is unchanged) and what of its recipe the graph
        # cannot run (then the checkpoint runs with PyTorch).
        META_KEYS["checkpoint_sha256"]: checkpoint_sha256,
        META_KEYS["graph_revision"]: GRAPH_REVISION,
        META_KEYS["source_recipe"]: json.dumps(
            {
                "cam_method": meta.get("cam_method") or "cam",
                "tta": bool(meta.get("tta")),
                "cam_layers": meta.get("cam_layers"),
                "has_detector": bool(meta.get("detector")),
            },
            sort_keys=True,
        ),
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

    from pneumoloc.inference.base import resolve_checkpoint
    from pneumoloc.models.checkpoint import load_checkpoint, models_from_checkpoint

    if opset < 17:
        raise ConfigError(f"opset must be >= 17, got {opset}")
    path = resolve_checkpoint(checkpoint)
    models, meta = models_from_checkpoint(load_checkpoint(path, map_location="cpu"), device="cpu")
    size = int(meta["image_size"])
    if meta.get("cam_method") not in (None, "cam") or meta.get("tta"):
        logger.warning(
            "%s asks for CAM method %r%s by default; the ONNX graph computes the classic CAM "
            "without test-time augmentation",
            path,
            meta.get("cam_method"),
            " with TTA" if meta.get("tta") else "",
        )
    from pneumoloc.inference.onnx_backend import file_sha256
    from pneumoloc.models.checkpoint import member_roles

    recipe = InferenceRecipe.from_meta(meta)
    graph = _cam_graph(models, size, recipe.cam_align, recipe.cam_floor, member_roles(meta))
    example = torch.randint(0, 256, (2, 1, size, size), dtype=torch.uint8)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    checkpoint_sha256 = file_sha256(path)
    detector, detector_path, detector_px = None, None, math.nan
    if isinstance(meta.get("detector"), dict):  # written first: the model file names its hash
        if int(meta["detector"]["image_size"]) != size:
            raise CheckpointError(f"{path}: its detector's image size differs from the model's")
        detector_path = out.with_name(out.name.removesuffix(".onnx") + DETECTOR_SUFFIX)
        detector_px = _export_detector(
            meta["detector"], detector_path, opset, checkpoint_sha256, check
        )
        detector = detector_entry(meta["detector"], detector_path)
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
                output_names=[*OUTPUT_NAMES, FEATURES_NAME],
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
                output_names=[*OUTPUT_NAMES, FEATURES_NAME],
                dynamic_axes={
                    name: {0: "batch"} for name in (INPUT_NAME, *OUTPUT_NAMES, FEATURES_NAME)
                },
                opset_version=opset,
                dynamo=False,
            )
            proto = onnx.load(str(tmp))
    from pneumoloc.inference.ood import weights_digest

    props = _metadata(meta, weights_digest(models[0].state_dict()), checkpoint_sha256, detector)
    doc = (
        f"pneumoloc {meta.get('model', {}).get('name', '?')} at {size} px: "
        "uint8 image -> probability, classic-CAM heatmap in [0, 1]"
    )
    _save(proto, props, doc, tmp, out, check)
    result = OnnxExportResult(
        out,
        opset,
        "dynamo" if dynamo else "torchscript",
        detector_path=detector_path,
        max_abs_diff_detector_px=detector_px,
    )
    if not check:
        return result
    dp, dh = _compare(out, graph, size)
    if not (dp <= 1e-4 and dh <= 1e-3):
        raise CheckpointError(
            f"{out}: ONNX Runtime disagrees with PyTorch (probability {dp:.2e}, heatmap {dh:.2e})"
        )
    logger.info("exported %s (max |diff|: probability %.1e, heatmap %.1e)", out, dp, dh)
    return dataclasses.replace(result, max_abs_diff_probability=dp, max_abs_diff_heatmap=dh)


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
    runner = OnnxPredictor.from_onnx(
        path, threads=1, use_detector=False, lung_mask=False, refine=None
    )
    probs, maps, _, feats = runner.network_with_features(images)
    with torch.inference_mode():
        p_ref, h_ref, f_ref = graph(torch.from_numpy(images))
    if feats is None or feats.shape != tuple(f_ref.shape):
        raise CheckpointError(f"{path}: the ONNX graph's features output is missing or malformed")
    scale = max(float(f_ref.abs().max()), 1.0)
    if float(np.abs(feats - f_ref.numpy()).max()) > 1e-3 * scale:
        raise CheckpointError(f"{path}: ONNX Runtime's features disagree with PyTorch's")
    return (
        float(np.abs(probs - p_ref.numpy()).max()),
        float(np.abs(maps - h_ref.numpy()).max()),
    )
