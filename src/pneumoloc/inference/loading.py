"""A predictor by backend name: a checkpoint run by PyTorch, or an exported file by ONNX Runtime.

Used by ``predict`` and ``serve``; the batch-size default is measured, see
:func:`default_batch_size`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pneumoloc.errors import CheckpointError, ConfigError
from pneumoloc.inference import base
from pneumoloc.inference.base import DEFAULT_MODEL, BasePredictor
from pneumoloc.inference.torch_backend import Predictor

__all__ = ["BACKENDS", "CPU_BATCH_SIZE", "GPU_BATCH_SIZE", "default_batch_size", "load_predictor"]

BACKENDS = ("torch", "onnx")
GPU_BATCH_SIZE = 8
CPU_BATCH_SIZE = 1


def default_batch_size(backend: str, device: str) -> int:
    """Images per forward pass when none is asked for: 8 on a GPU, 1 on the CPU.

    On a 2-core CPU, batching does not pay: per image, the shipped efficientnet_b0 (output
    stride 8) takes ~47 ms at batch 1 and ~105 ms at batch 8 with PyTorch (its large feature
    maps overflow the caches), ONNX Runtime ~26 vs ~29 ms, resnet18 ~19 vs ~22 ms
    (``benchmarks/bench_predict.py``).
    """
    if backend != "torch" or device == "cpu":
        return CPU_BATCH_SIZE
    if device.startswith("cuda"):
        return GPU_BATCH_SIZE
    import torch

    return GPU_BATCH_SIZE if torch.cuda.is_available() else CPU_BATCH_SIZE


def load_predictor(
    model: str | Path = "default",
    backend: str = "torch",
    *,
    device: str = "auto",
    cam_method: str | None = None,
    batch_size: int | None = None,
    threads: int | None = None,
) -> BasePredictor:
    """A predictor for ``backend``: a checkpoint run by PyTorch, or an ``.onnx`` by ONNX Runtime.

    Args:
        model: Checkpoint (torch) or exported ``.onnx`` file (onnx); "default" is the model
            shipped in the package (``weights/default.pt``, or ``weights/default.onnx``).
        backend: "torch" or "onnx".
        device: "auto", "cpu" or "cuda" (torch; the onnx backend runs on the CPU).
        cam_method: Heatmap method (default: the model's; the onnx backend has "cam" only).
        batch_size: Images per forward pass (default: see :func:`default_batch_size`).
        threads: ONNX Runtime intra-op threads (default: the available cores). The torch
            backend uses torch's process-wide setting (see :func:`predict_paths`).

    Raises:
        ConfigError: Unknown backend, bad batch size, or an option the backend lacks.
        CheckpointError: The model is missing or unreadable.
    """
    if backend not in BACKENDS:
        raise ConfigError(f"unknown backend {backend!r}; choose one of {list(BACKENDS)}")
    batch_size = default_batch_size(backend, device) if batch_size is None else batch_size
    if batch_size < 1:
        raise ConfigError(f"batch size must be at least 1, got {batch_size}")
    is_default = str(model) == DEFAULT_MODEL
    kwargs: dict[str, Any] = {"batch_size": batch_size}
    if cam_method is not None:
        kwargs["cam_method"] = cam_method
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
        return OnnxPredictor.from_onnx(path, threads=threads, **kwargs)
    if str(model).lower().endswith(".onnx"):
        raise ConfigError(f"{model}: an ONNX model needs --backend onnx")
    if device not in ("auto", "cpu", "cuda") and not device.startswith("cuda:"):
        raise ConfigError(f"unknown device {device!r}; choose auto, cpu or cuda")
    if device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise ConfigError(f"--device {device}: no CUDA GPU is available; use auto or cpu")
    try:
        return Predictor.from_checkpoint(None if is_default else model, device=device, **kwargs)
    except CheckpointError as exc:
        if is_default:
            raise CheckpointError(
                f"{exc}; pass a checkpoint with --model PATH (train one with `pneumoloc train`)"
            ) from None
        raise
