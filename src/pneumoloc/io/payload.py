"""Small model files (input-check statistics) as safetensors: arrays and JSON, no pickle, no torch.

The input check's statistics (:mod:`pneumoloc.inference.ood`, :mod:`pneumoloc.inference.layout`)
are a nested dict of numbers, strings and arrays. They were ``torch.save`` files, which need
torch to read: the ONNX Runtime path of ``predict`` and ``serve`` would import torch (1-2 s)
for a few kB. safetensors (the Hugging Face format timm already depends on) stores the arrays
and a string header and reads them with numpy; the nested structure is kept as JSON in the
header, each array replaced by a reference to its tensor. Nothing in the file is executed.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["load_payload", "save_payload"]

_STRUCTURE_KEY = "pneumoloc.payload"
_ARRAY = "__array__"


def _flatten(value: Any, prefix: str, arrays: dict[str, np.ndarray]) -> Any:
    if isinstance(value, np.ndarray):
        arrays[prefix] = np.ascontiguousarray(value)
        return {_ARRAY: prefix}
    if isinstance(value, dict):
        return {
            str(k): _flatten(v, f"{prefix}.{k}" if prefix else str(k), arrays)
            for k, v in value.items()
        }
    if isinstance(value, list | tuple):
        return [_flatten(v, f"{prefix}.{i}", arrays) for i, v in enumerate(value)]
    if isinstance(value, np.generic):
        return value.item()
    return value


def _restore(value: Any, arrays: dict[str, np.ndarray]) -> Any:
    if isinstance(value, dict):
        if set(value) == {_ARRAY}:
            return arrays[value[_ARRAY]]
        return {k: _restore(v, arrays) for k, v in value.items()}
    if isinstance(value, list):
        return [_restore(v, arrays) for v in value]
    return value


def save_payload(path: str | Path, payload: dict[str, Any]) -> Path:
    """Write ``payload`` (JSON-able values and numpy arrays, nested) atomically to ``path``."""
    from safetensors.numpy import save

    path = Path(path)
    arrays: dict[str, np.ndarray] = {}
    structure = _flatten(payload, "", arrays)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(save(arrays, metadata={_STRUCTURE_KEY: json.dumps(structure)}))
    os.replace(tmp, path)
    return path


def load_payload(path: str | Path) -> dict[str, Any]:
    """Read what :func:`save_payload` wrote.

    Raises:
        FileNotFoundError: No such file.
        ValueError: Not a safetensors file, or not one :func:`save_payload` wrote.
    """
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(path)
    try:
        with safe_open(str(path), framework="numpy") as fh:
            header = fh.metadata() or {}
            arrays = {key: fh.get_tensor(key) for key in fh.keys()}  # noqa: SIM118
    except SafetensorError as exc:
        raise ValueError(f"not a safetensors file ({exc})") from None
    if _STRUCTURE_KEY not in header:
        raise ValueError("a safetensors file without pneumoloc's structure")
    try:
        structure = json.loads(header[_STRUCTURE_KEY])
        payload = _restore(structure, arrays)
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"inconsistent structure ({exc})") from None
    if not isinstance(payload, dict):
        raise ValueError("the structure is not a mapping")
    return payload
