"""The one loaded model, what serialises its use, and the images and model card it answers with."""

from __future__ import annotations

import asyncio
import base64
import itertools
import re
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import PurePosixPath, PureWindowsPath
from typing import Any

import numpy as np
from PIL import Image

from pneumoloc import DISCLAIMER
from pneumoloc.errors import NotAChestRadiographError
from pneumoloc.inference import BasePredictor, Prediction, prediction_record
from pneumoloc.inference.input_check import InputCheck, read_dicom_tags
from pneumoloc.io import read_xray_bytes
from pneumoloc.io.preprocess import resize_square
from pneumoloc.serve.schemas import LIMITS_TEXT
from pneumoloc.serve.settings import ServeSettings

__all__ = ["Engine", "build_model_card", "public_describe", "without_server_paths"]


def _png_b64(image: Image.Image) -> str:
    # One row filter and ISA-L's deflate at level 1 (pneumoloc.io.png): a tenth of the time
    # of Pillow's encoder at level 1 for the same size; lossless either way.
    from pneumoloc.io.png import encode_png

    return base64.b64encode(encode_png(np.asarray(image))).decode("ascii")


def _heatmap_rgba(heatmap: np.ndarray) -> Image.Image:
    """Colour-mapped heatmap whose alpha is the heat, as ``render_overlay`` blends it (the
    overlays' "inferno" table, :func:`pneumoloc.report.overlay.heatmap_colours`)."""
    from pneumoloc.report.overlay import heatmap_colours

    heat = np.clip(np.nan_to_num(np.asarray(heatmap, np.float32), nan=0.0), 0.0, 1.0)
    rgba = np.concatenate([heatmap_colours(heat), heat[..., None].astype(np.float64)], axis=-1)
    return Image.fromarray(np.rint(rgba * 255.0).astype(np.uint8), mode="RGBA")


def _display_xray(pixels: np.ndarray, size: int) -> Image.Image:
    image = Image.fromarray(pixels)
    scale = size / max(image.size)
    if scale < 1.0:
        w, h = image.size
        image = image.resize(
            (max(1, round(w * scale)), max(1, round(h * scale))), Image.Resampling.LANCZOS
        )
    return image


@dataclass
class Engine:
    """The one model instance and what serialises its use.

    ``uploads`` bounds the uploads held in memory at once (read, queued or decoding) to
    ``settings.max_concurrent_uploads``, so concurrent hostile uploads cannot add up; at most
    ``settings.workers`` of them decode at the same time.
    """

    predictor: BasePredictor
    settings: ServeSettings
    lock: threading.Lock
    executor: ThreadPoolExecutor
    counter: itertools.count[int]
    uploads: asyncio.Semaphore
    input_check: InputCheck | None = None

    @classmethod
    def start(cls, predictor: BasePredictor, settings: ServeSettings) -> Engine:
        """An engine with its lock, its pool of ``settings.workers`` threads, its upload
        semaphore and its counter."""
        return cls(
            predictor=predictor,
            settings=settings,
            lock=threading.Lock(),
            executor=ThreadPoolExecutor(settings.workers, thread_name_prefix="pneumoloc-serve"),
            counter=itertools.count(1),
            uploads=asyncio.Semaphore(settings.max_concurrent_uploads),
            input_check=InputCheck.for_predictor(predictor) if settings.input_check else None,
        )

    def process(self, data: bytes, name: str, want_images: bool) -> dict[str, Any]:
        """Decode, predict and (maybe) render one upload (runs in the executor)."""
        xray = read_xray_bytes(
            data, name, min_size=self.predictor.image_size, max_pixels=self.settings.max_pixels
        )
        check = self.input_check
        with self.lock:
            prediction: Prediction = self.predictor.predict_xrays(
                [xray], with_features=check is not None
            )[0]
        if check is not None:  # refused: a reason (422), never a probability
            tags = read_dicom_tags(data) if xray.source_format == "dicom" else None
            pixels = resize_square(xray.pixels, self.predictor.image_size)
            verdict = check.check(pixels, features=prediction.features, tags=tags)
            if not verdict.accepted:
                raise NotAChestRadiographError(name, verdict.reason)
        record = prediction_record(prediction, self.predictor, image_id=name)
        record["limits"] = LIMITS_TEXT
        record["input"] = {
            "format": xray.source_format,
            "view_position": xray.view_position,
            "bytes": len(data),
        }
        record["model"] = public_describe(self.predictor)
        if want_images:
            pixels = xray.pixels
            wanted = min(self.settings.display_size, *xray.original_shape)
            if min(pixels.shape) < wanted:  # the model's reduced JPEG decode is too coarse
                pixels = read_xray_bytes(
                    data, name, min_size=wanted, max_pixels=self.settings.max_pixels
                ).pixels
            shown = _display_xray(pixels, self.settings.display_size)
            record["images"] = {
                "xray_png_b64": _png_b64(shown),
                "heatmap_png_b64": _png_b64(_heatmap_rgba(prediction.heatmap)),
                "width": shown.width,
                "height": shown.height,
            }
        return record


def _scalar_metrics(metrics: Any) -> dict[str, dict[str, float | int | str | None]]:
    """Per split, the scalar entries of the checkpoint's metrics (curves etc. dropped)."""
    out: dict[str, dict[str, float | int | str | None]] = {}
    if not isinstance(metrics, dict):
        return out
    for split, values in metrics.items():
        if isinstance(values, dict):
            out[str(split)] = {
                str(k): v
                for k, v in values.items()
                if v is None or (isinstance(v, int | float | str) and not isinstance(v, bool))
            }
    return out


_WINDOWS_ABSOLUTE = re.compile(r"^(?:[A-Za-z]:[\\/]|\\\\)")


def _is_absolute_path(text: str) -> bool:
    return text.startswith(("/", "~")) or bool(_WINDOWS_ABSOLUTE.match(text))


def without_server_paths(value: Any) -> Any:
    """``value`` with every absolute path (POSIX, ``~`` or Windows) cut to its last part.

    The server's folders (where the checkpoint or the training data lie, the user's name in
    a home folder) are nobody's business but the server's; the file name is kept because it
    tells models apart.
    """
    if isinstance(value, str):
        if not _is_absolute_path(value):
            return value
        if "\\" in value and "/" not in value:
            return PureWindowsPath(value).name or value
        return PurePosixPath(value).name
    if isinstance(value, dict):
        return {key: without_server_paths(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [without_server_paths(item) for item in value]
    return value


def public_describe(predictor: BasePredictor) -> dict[str, Any]:
    """``predictor.describe()`` without server paths: the checkpoint by its file name."""
    described: dict[str, Any] = without_server_paths(predictor.describe())
    return described


def build_model_card(predictor: BasePredictor) -> dict[str, Any]:
    """``GET /api/model``: ``predictor.describe()`` plus the key facts stored in the checkpoint.

    No absolute server path appears: the checkpoint and the training data's source are given
    by their last path component (the data set is identified by its fingerprint).
    """
    meta = predictor.meta
    data = meta.get("data") if isinstance(meta.get("data"), dict) else {}
    labels = meta.get("label_names")
    epoch = meta.get("epoch")
    card = {
        **predictor.describe(),
        "metrics": _scalar_metrics(meta.get("metrics")),
        "data": {k: v for k, v in (data or {}).items() if isinstance(v, int | float | str)},
        "epoch": epoch if isinstance(epoch, int) else None,
        "label_names": [str(x) for x in labels] if isinstance(labels, list) else None,
        "disclaimer": DISCLAIMER,
        "limits": LIMITS_TEXT,
    }
    scrubbed: dict[str, Any] = without_server_paths(card)
    return scrubbed
