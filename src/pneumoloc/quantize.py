"""``pneumoloc quantize``: an int8 copy of an exported ONNX model, with its parity measured.

ONNX Runtime's post-training static quantisation (``onnxruntime.quantization.quantize_static``,
QDQ format, per-channel int8 weights, uint8 activations calibrated by min-max on real images of
the model's TRAINING split) of the graph's convolutions; the first convolution (raw pixels in)
is left in float32. Everything after the network (refinement, lung mask, boxes) is unchanged.

Parity is measured, not assumed: the probability and heatmap of the int8 file are compared with
the float32 file's on held-out images (the VALIDATION split, never calibrated on), and the
largest and mean differences are printed and stored in the file's metadata
(``pneumoloc.quantization``). The int8 file is never chosen by ``--backend auto``; run it with
``--backend onnx --model FILE``. On the shipped default the differences are large (see
``docs/benchmarks.md``): it is an option to measure, not a recommendation.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pneumoloc.errors import CheckpointError, DataError
from pneumoloc.inference.onnx_backend import META_KEYS

logger = logging.getLogger("pneumoloc.quantize")

__all__ = ["QUANTIZATION_KEY", "QuantizeResult", "quantize_onnx"]

QUANTIZATION_KEY = META_KEYS["quantization"]
"""Metadata entry of an int8 file: JSON with the scheme and the measured parity."""


@dataclass(frozen=True)
class QuantizeResult:
    """What :func:`quantize_onnx` wrote and measured.

    Attributes:
        path: The int8 ``.onnx`` file.
        n_calibration: Images the activation ranges were calibrated on.
        n_parity: Held-out images parity was measured on.
        max_abs_diff_probability: Largest |int8 - float32| probability.
        mean_abs_diff_probability: Mean of the same.
        max_abs_diff_heatmap: Largest |int8 - float32| heatmap value (heatmaps in [0, 1]).
        decisions_changed: Held-out images whose decision differs.
    """

    path: Path
    n_calibration: int
    n_parity: int
    max_abs_diff_probability: float
    mean_abs_diff_probability: float
    max_abs_diff_heatmap: float
    decisions_changed: int


def _images(data: str | Path, size: int, split: str, limit: int) -> np.ndarray:
    from pneumoloc.data.cache import resolve_cache

    cache = resolve_cache(data, size=size, progress=False)
    rows = cache.split.part(split)[:limit]
    if len(rows) == 0:
        raise DataError(f"{data}: its {split} split holds no images to quantise with")
    return np.asarray(cache.images[np.sort(rows)])[:, None]


def _keep_detector_beside(source: Path, out: Path) -> None:
    """The int8 copy names the same detector file as its source (the detector is not
    quantised: only the classifier's convolutions are); copy that file beside ``out`` when
    ``out`` is in another folder, so the copy opens as its source does."""
    import shutil

    from pneumoloc.inference.onnx_backend import detector_file, read_onnx_metadata

    side = detector_file(source, read_onnx_metadata(source))
    if side is None:
        return
    target = out.parent / side.name
    if target.resolve() != side.resolve():
        shutil.copyfile(side, target)
        logger.info("copied the detector file %s beside %s", side.name, out)


def quantize_onnx(
    onnx_path: str | Path,
    out: str | Path,
    data: str | Path,
    *,
    n_calibration: int = 256,
    n_parity: int = 256,
    batch_size: int = 16,
) -> QuantizeResult:
    """Write an int8 copy of an exported model and measure its parity with the original.

    Args:
        onnx_path: A file written by ``pneumoloc export --onnx``.
        out: The int8 ``.onnx`` file to write.
        data: A cache or data folder: its training split calibrates, its validation split
            measures parity.
        n_calibration: Training images to calibrate on, at most.
        n_parity: Validation images to measure parity on, at most.
        batch_size: Images per calibration or parity batch.

    Raises:
        CheckpointError: ``onnx_path`` is not a pneumoloc ONNX model.
        DataError: The data has no training or validation images.
    """
    import onnx
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from pneumoloc.inference.onnx_backend import INPUT_NAME, OnnxPredictor

    source = OnnxPredictor.from_onnx(
        onnx_path, threads=None, use_detector=False, lung_mask=False, refine=None
    )
    size = source.image_size
    calibration = _images(data, size, "train", n_calibration)
    held_out = _images(data, size, "val", n_parity)

    class Reader(CalibrationDataReader):  # type: ignore[misc]
        def __init__(self) -> None:
            self._batches = iter(
                {INPUT_NAME: calibration[i : i + batch_size]}
                for i in range(0, len(calibration), batch_size)
            )

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self._batches, None)

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    pre = out.with_name(out.name + ".pre.tmp")
    tmp = out.with_name(out.name + ".tmp")
    try:
        quant_pre_process(str(onnx_path), str(pre), skip_symbolic_shape=True)
        convs = [n.name for n in onnx.load(str(pre)).graph.node if n.op_type == "Conv"]
        if not convs:
            raise CheckpointError(f"{onnx_path}: no convolution to quantise")
        quantize_static(
            str(pre),
            str(tmp),
            Reader(),
            quant_format=QuantFormat.QDQ,
            op_types_to_quantize=["Conv"],
            per_channel=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            nodes_to_exclude=convs[:1],
            calibrate_method=CalibrationMethod.MinMax,
        )
    finally:
        pre.unlink(missing_ok=True)
    int8 = OnnxPredictor.from_onnx(
        tmp, threads=None, use_detector=False, lung_mask=False, refine=None
    )
    source.batch_size = int8.batch_size = batch_size
    p32, h32, _ = source.network(held_out[:, 0])
    p8, h8, _ = int8.network(held_out[:, 0])
    threshold = source.threshold
    result = QuantizeResult(
        path=out,
        n_calibration=len(calibration),
        n_parity=len(held_out),
        max_abs_diff_probability=float(np.abs(p8 - p32).max()),
        mean_abs_diff_probability=float(np.abs(p8 - p32).mean()),
        max_abs_diff_heatmap=float(np.abs(h8 - h32).max()),
        decisions_changed=int(((p8 >= threshold) != (p32 >= threshold)).sum()),
    )
    proto = onnx.load(str(tmp))
    facts: dict[str, Any] = {
        "scheme": "onnxruntime quantize_static, QDQ, per-channel int8 weights, uint8 "
        "activations (min-max), convolutions but the first",
        "calibration": f"{result.n_calibration} training-split images",
        "parity": f"{result.n_parity} validation-split images, network outputs (uncalibrated)",
        "max_abs_diff_probability": result.max_abs_diff_probability,
        "mean_abs_diff_probability": result.mean_abs_diff_probability,
        "max_abs_diff_heatmap": result.max_abs_diff_heatmap,
        "decisions_changed": result.decisions_changed,
    }
    entry = proto.metadata_props.add()
    entry.key, entry.value = QUANTIZATION_KEY, json.dumps(facts, sort_keys=True)
    onnx.save(proto, str(tmp))
    _keep_detector_beside(Path(onnx_path), out)
    os.replace(tmp, out)
    logger.info("wrote %s: %s", out, facts)
    return result
