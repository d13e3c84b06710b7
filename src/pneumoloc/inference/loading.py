"""A predictor by backend name: a checkpoint run by PyTorch, or an exported file by ONNX Runtime.

Used by ``predict``, ``serve`` and ``listen``; the batch-size default is measured, see
:func:`default_batch_size`. Backend ``"auto"`` (the default) runs a checkpoint with ONNX
Runtime on the CPU when an ONNX file exported from exactly that checkpoint lies beside it
(``default.pt`` -> ``default.onnx``, written by ``make install`` for the shipped model, or
``pneumoloc export CKPT --onnx``) and the recipe needs nothing the graph lacks; otherwise with
PyTorch (:func:`choose_backend`). On this project's 2-core machine the ONNX path starts in a
fraction of the time (no torch, timm or torchvision import: about 2 s less) and its network runs
about 4x faster than PyTorch's, with the same probabilities to 1e-6
(``docs/benchmarks.md``).
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Any

from pneumoloc.errors import CheckpointError, ConfigError
from pneumoloc.inference import base
from pneumoloc.inference.base import DEFAULT_MODEL, BasePredictor
from pneumoloc.inference.onnx_backend import file_sha256

__all__ = [
    "BACKENDS",
    "CPU_BATCH_SIZE",
    "GPU_BATCH_SIZE",
    "choose_backend",
    "default_batch_size",
    "file_sha256",
    "load_predictor",
    "onnx_equivalent",
    "onnx_twin",
]

logger = logging.getLogger("pneumoloc.inference")

BACKENDS = ("auto", "torch", "onnx")
GPU_BATCH_SIZE = 8
CPU_BATCH_SIZE = 8


def gpu_present() -> bool:
    """Whether a CUDA GPU can be used, without importing torch when it is not imported yet
    (the NVIDIA driver's files are looked for instead; torch is asked when already loaded)."""
    if "torch" in sys.modules:
        import torch

        return bool(torch.cuda.is_available())
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) in ("", "-1"):
        return False
    return Path("/proc/driver/nvidia/version").exists() or Path("/dev/nvidia0").exists()


def _checkpoint_path(model: str | Path | None) -> Path:
    """The checkpoint file ``model`` names (``"default"``/None: the shipped one), unchecked."""
    return base.DEFAULT_WEIGHTS if model is None or str(model) == DEFAULT_MODEL else Path(model)


def _batch_size(backend: str, device: str, batch_size: int | None) -> int:
    size = default_batch_size(backend, device) if batch_size is None else batch_size
    if size < 1:
        raise ConfigError(f"batch size must be at least 1, got {size}")
    return size


def onnx_twin(checkpoint: str | Path) -> Path | None:
    """The ONNX file beside ``checkpoint`` (``x.pt`` -> ``x.onnx``), or None. Whether it was
    exported from exactly these bytes is checked when it is opened (:func:`load_predictor`)."""
    checkpoint = Path(checkpoint)
    twin = checkpoint.with_suffix(".onnx")
    return twin if twin.is_file() and checkpoint.is_file() and twin != checkpoint else None


def choose_backend(
    model: str | Path, device: str = "auto", cam_method: str | None = None
) -> tuple[str, Path | None]:
    """What ``backend="auto"`` runs: ``("onnx", twin)`` to try the checkpoint's
    :func:`onnx_twin`, ``("onnx", None)`` for an ``.onnx`` model, or ``("torch", None)``.

    ONNX Runtime when the model is an ``.onnx`` file, or when the device is the CPU (``cpu``,
    or ``auto`` without a GPU), the heatmap method is the classic CAM and the checkpoint has
    an ONNX twin. PyTorch otherwise.
    """
    if str(model).lower().endswith(".onnx"):
        return "onnx", None
    if device not in ("auto", "cpu") or (device == "auto" and gpu_present()):
        return "torch", None
    if cam_method not in (None, "cam"):
        return "torch", None
    twin = onnx_twin(_checkpoint_path(model))
    return ("onnx", twin) if twin is not None else ("torch", None)


def _twin_predictor(
    checkpoint: Path,
    twin: Path,
    threads: int | None,
    kwargs: dict[str, Any],
    use_detector: bool = True,
) -> BasePredictor | None:
    """The twin opened with ONNX Runtime when it holds exactly ``checkpoint``'s model and the
    recipe needs nothing the graph lacks; None (PyTorch runs it) otherwise."""
    from pneumoloc.inference.onnx_backend import GRAPH_REVISION, OnnxPredictor

    try:
        predictor = OnnxPredictor.from_onnx(
            twin, threads=threads, use_detector=use_detector, **kwargs
        )
    except (CheckpointError, ConfigError) as exc:
        logger.warning("%s; running %s with PyTorch", exc, checkpoint)
        return None
    meta = predictor.meta
    if meta.get("quantization"):  # pneumoloc quantize's int8 copies are never a twin
        logger.warning("%s is an int8 copy; running %s with PyTorch", twin, checkpoint)
        return None
    if meta.get("graph_revision") != GRAPH_REVISION:
        logger.warning(
            "%s was exported by code computing another graph (revision %r, now %r); running "
            "%s with PyTorch (re-export: pneumoloc export %s --onnx %s, or `make`)",
            twin,
            meta.get("graph_revision"),
            GRAPH_REVISION,
            checkpoint,
            checkpoint,
            twin,
        )
        return None
    if meta.get("checkpoint_sha256") != file_sha256(checkpoint):
        logger.warning(
            "%s was not exported from %s as it is now; running it with PyTorch (re-export: "
            "pneumoloc export %s --onnx %s)",
            twin,
            checkpoint,
            checkpoint,
            twin,
        )
        return None
    recipe = meta.get("source_recipe") or {}
    if use_detector and recipe.get("has_detector") and not predictor.has_detector:
        logger.warning(
            "%s carries no box detector but %s has one (exported before detectors were "
            "exported); running it with PyTorch (re-export: pneumoloc export %s --onnx %s)",
            twin,
            checkpoint,
            checkpoint,
            twin,
        )
        return None
    if (
        recipe.get("tta")
        or recipe.get("cam_method", "cam") != "cam"
        or recipe.get("cam_layers") not in (None, "final")
    ):
        return None  # the checkpoint's own recipe needs PyTorch
    return predictor


def default_batch_size(backend: str, device: str) -> int:
    """Images per forward pass when none is asked for: 8 (GPU and CPU).

    The shipped default (tf_efficientnet_lite0 at 192 px) batches well on the CPU too: with
    ONNX Runtime, one thread, about 13 ms per image at batch 1 and 9 ms at batch 8; PyTorch
    about 36 and 35 ms (``benchmarks/bench_clinician.py``). (The earlier dilated
    efficientnet_b0 was slower batched, so the CPU default was 1.)
    """
    return GPU_BATCH_SIZE if backend != "torch" or device != "cpu" else CPU_BATCH_SIZE


def _cam_kwargs(cam_method: str | None) -> dict[str, Any]:
    return {} if cam_method is None else {"cam_method": cam_method}


def load_predictor(
    model: str | Path = "default",
    backend: str = "auto",
    *,
    device: str = "auto",
    cam_method: str | None = None,
    batch_size: int | None = None,
    threads: int | None = None,
    use_detector: bool = True,
) -> BasePredictor:
    """A predictor for ``backend``: a checkpoint run by PyTorch, or an ``.onnx`` by ONNX Runtime.

    Args:
        model: Checkpoint (torch) or exported ``.onnx`` file (onnx); "default" is the model
            shipped in the package (``weights/default.pt``, or ``weights/default.onnx``).
        backend: "auto" (see :func:`choose_backend`), "torch" or "onnx".
        device: "auto", "cpu" or "cuda" (torch; the onnx backend runs on the CPU).
        cam_method: Heatmap method (default: the model's; the onnx backend has "cam" only).
        batch_size: Images per forward pass (default: see :func:`default_batch_size`).
        threads: ONNX Runtime intra-op threads (default: the available cores). The torch
            backend uses torch's process-wide setting (see :func:`predict_paths`).
        use_detector: Load the model's self-trained detector, if it has one; False leaves it
            out (the box rule draws the boxes and the CAM gives every heatmap: faster, the
            boxes of the models without one).

    Raises:
        ConfigError: Unknown backend, bad batch size, or an option the backend lacks.
        CheckpointError: The model is missing or unreadable.
    """
    if backend not in BACKENDS:
        raise ConfigError(f"unknown backend {backend!r}; choose one of {list(BACKENDS)}")
    if backend == "auto":
        backend, twin = choose_backend(model, device, cam_method)
        if twin is not None:
            settings = {"batch_size": _batch_size("onnx", device, batch_size)}
            chosen = _twin_predictor(
                _checkpoint_path(model),
                twin,
                threads,
                {**settings, **_cam_kwargs(cam_method)},
                use_detector,
            )
            if chosen is not None:
                return chosen
            backend = "torch"
    batch_size = _batch_size(backend, device, batch_size)
    is_default = str(model) == DEFAULT_MODEL
    kwargs: dict[str, Any] = {"batch_size": batch_size, **_cam_kwargs(cam_method)}
    if backend == "onnx":
        from pneumoloc.inference.onnx_backend import OnnxPredictor

        if device not in ("auto", "cpu"):
            raise ConfigError(f"the onnx backend runs on the CPU; --device {device} needs torch")
        path = base.DEFAULT_WEIGHTS.with_suffix(".onnx") if is_default else Path(model)
        if is_default and not path.is_file():
            raise CheckpointError(
                f"{path}: no default ONNX model is installed; make one with "
                "`pneumoloc export default --onnx model.onnx` and pass --model model.onnx"
            )
        return OnnxPredictor.from_onnx(path, threads=threads, use_detector=use_detector, **kwargs)
    if str(model).lower().endswith(".onnx"):
        raise ConfigError(f"{model}: an ONNX model needs --backend onnx")
    if device not in ("auto", "cpu", "cuda") and not device.startswith("cuda:"):
        raise ConfigError(f"unknown device {device!r}; choose auto, cpu or cuda")
    if device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise ConfigError(f"--device {device}: no CUDA GPU is available; use auto or cpu")
    from pneumoloc.inference.torch_backend import Predictor

    try:
        return Predictor.from_checkpoint(
            None if is_default else model, device=device, use_detector=use_detector, **kwargs
        )
    except CheckpointError as exc:
        if is_default:
            raise CheckpointError(
                f"{exc}; pass a checkpoint with --model PATH (train one with `pneumoloc train`)"
            ) from None
        raise


def onnx_equivalent(predictor: Any, checkpoint: str | Path | None) -> BasePredictor | None:
    """The same predictor with its network run by ONNX Runtime, when that is possible and
    exactly the same model: a torch :class:`~pneumoloc.inference.torch_backend.Predictor`
    on the CPU, classic CAM, no test-time augmentation or multi-stage CAM, at its trained
    size, whose checkpoint (one model or an ensemble) has a matching :func:`onnx_twin`
    exported with the recipe's ``cam_align`` and ``cam_floor``, with a detector exactly when
    the torch one has one (the twin's detector file then runs it). Metadata and
    recipe (overrides included) are the torch predictor's, so everything after the network and
    everything reported is unchanged; None otherwise. Used by ``evaluate``.
    """
    from pneumoloc.inference.onnx_backend import OnnxPredictor

    checkpoint = _checkpoint_path(checkpoint)
    model = getattr(predictor, "model", None)
    if model is None:
        return None
    device = next(model.parameters()).device
    recipe = predictor.recipe
    if (
        device.type != "cpu"
        or recipe.cam_method != "cam"
        or recipe.tta
        or recipe.cam_layers not in (None, "final")
    ):
        return None
    twin = onnx_twin(checkpoint)
    if twin is None:
        return None
    from pneumoloc.inference.onnx_backend import read_onnx_metadata

    try:
        graph_meta = read_onnx_metadata(twin)
    except CheckpointError:
        return None
    graph_align = graph_meta.get("cam_align") or "centre"
    graph_floor = graph_meta.get("cam_floor") or "relu"  # files before 0.4
    if graph_align != recipe.cam_align or graph_floor != recipe.cam_floor:
        return None  # the graph upsamples or floors otherwise than this recipe asks
    settings = {"batch_size": predictor.batch_size, "cam_align": graph_align}
    opened = _twin_predictor(checkpoint, twin, None, {**settings, "cam_floor": graph_floor})
    if not isinstance(opened, OnnxPredictor) or opened.image_size != predictor.image_size:
        return None
    if opened.has_detector != predictor.has_detector:  # e.g. use_detector=False on one side
        return None
    meta = dict(predictor.meta)
    meta["weights_sha256"] = opened.meta.get("weights_sha256", "")
    meta["cam_align"] = opened.recipe.cam_align
    meta["cam_floor"] = opened.recipe.cam_floor
    return OnnxPredictor(
        session=opened.session,
        detector_session=opened.detector_session,
        meta=meta,
        recipe=recipe,
        batch_size=predictor.batch_size,
        threshold_override=predictor.threshold_override,
    )
