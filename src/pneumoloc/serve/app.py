"""The ``pneumoloc serve`` web app: one page for clinicians and a small JSON API.

Endpoints:

* ``GET /`` and ``GET /static/*``: the page (HTML, JS and CSS shipped with pneumoloc; nothing is
  loaded from another site, so it works offline).
* ``GET /api/health``: ``{"status": "ok"}``; never needs the token.
* ``GET /api/model``: :meth:`Predictor.describe` plus the key facts of the checkpoint.
* ``POST /api/predict``: a multipart upload (field ``file``) of one DICOM, PNG or JPEG; the
  answer is :func:`pneumoloc.inference.prediction_record` plus ``input``, ``model`` and, with
  ``?images=1``, the display images (X-ray and colour-mapped heatmap as base64 PNGs).
* ``GET /openapi.json``: the schema. The interactive ``/docs`` pages of FastAPI are disabled:
  they load scripts from a CDN.

Safety:

* Binding to anything but a loopback address needs a token; with a token every ``/api/*``
  request but ``/api/health`` needs ``Authorization: Bearer <token>`` (compared in constant
  time), else 401.
* The upload is read from the request stream into memory and refused with 413 as soon as it
  passes the limit (``Content-Length`` is checked first but not trusted). Nothing is written to
  disk. Declared image dimensions are checked before decoding (413 when absurd).
* Error statuses (JSON ``{"error": code, "detail": message}``): 400 empty upload, missing
  ``file`` field or malformed multipart body; 401 missing or wrong token; 413 upload over the
  size limit or declared dimensions over ``max_pixels``; 415 request not multipart, or a file
  that is neither DICOM, PNG nor JPEG; 422 a DICOM without pixel data, an unsupported image
  (colour or multi-frame DICOM, odd bit depth, unknown transfer syntax) or a truncated/corrupt
  file; 500 an unexpected failure (no details given).
* Responses carry no DICOM tag but the view position; logs name uploads by a request number
  only (never the file name, never a tag).
* One model instance serves every request. Decoding and PNG encoding run in a bounded thread
  pool (``ServeSettings.workers`` threads); the forward pass and the CAM run under one lock,
  because CAM methods attach hooks to the shared model and parallel CPU forward passes would
  only oversubscribe the cores torch already uses.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hmac
import io
import ipaddress
import itertools
import logging
import os
import re
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import Depends, FastAPI, Query, Request
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field
from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header

from pneumoloc import DISCLAIMER, __version__
from pneumoloc.errors import (
    ConfigError,
    ImageReadError,
    ImageTooLargeError,
    NoPixelDataError,
    NotAnImageError,
    TruncatedImageError,
    UnsupportedImageError,
)
from pneumoloc.inference import Prediction, Predictor, prediction_record
from pneumoloc.io import read_xray_bytes
from pneumoloc.io.reader import DEFAULT_MAX_PIXELS

__all__ = [
    "TOKEN_ENV",
    "ServeSettings",
    "create_app",
    "is_loopback",
    "resolve_token",
]

logger = logging.getLogger(__name__)

TOKEN_ENV = "PNEUMOLOC_TOKEN"
"""Environment variable read for the access token when none is given."""

STATIC_DIR = Path(__file__).parent / "static"
LIMITS_TEXT = (
    "Research use only — not a diagnosis. Probability of pneumonia as estimated by the model; "
    "boxes show where the model's evidence is, not confirmed findings."
)
# Room for the multipart framing (boundaries, part headers) around the file itself.
_MULTIPART_OVERHEAD = 64 * 1024
_FILE_FIELD = "file"
_HEATMAP_CMAP = "inferno"  # the colour map of every pneumoloc overlay (report/overlay.py)
_SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; img-src 'self' data: blob:; style-src 'self'; script-src 'self'; "
        "connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
}


# --------------------------------------------------------------------------------------
# Settings and access control
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ServeSettings:
    """How the app serves.

    Attributes:
        host: The address the server binds to; any non-loopback address requires ``token``.
        token: Bearer token required on ``/api/*`` (but ``/api/health``); None: no token.
        max_upload_bytes: Largest accepted file (413 above).
        max_pixels: Largest declared rows x columns accepted (413 above, before decoding).
        display_size: Long side, in pixels, of the X-ray PNG returned for display.
        workers: Threads decoding uploads and encoding PNGs (inference is serialised anyway).
    """

    host: str = "127.0.0.1"
    token: str | None = None
    max_upload_bytes: int = 32 * 1024 * 1024
    max_pixels: int = DEFAULT_MAX_PIXELS
    display_size: int = 768
    workers: int = 2

    def __post_init__(self) -> None:
        if self.max_upload_bytes < 1:
            raise ConfigError(f"max upload size must be positive, got {self.max_upload_bytes}")
        if self.max_pixels < 1:
            raise ConfigError(f"max_pixels must be positive, got {self.max_pixels}")
        if self.display_size < 16:
            raise ConfigError(f"display_size must be at least 16, got {self.display_size}")
        if self.workers < 1:
            raise ConfigError(f"workers must be at least 1, got {self.workers}")
        if self.token is not None and not self.token.strip():
            raise ConfigError("the access token is empty")
        if not is_loopback(self.host) and not self.token:
            raise ConfigError(
                f"refusing to serve on {self.host!r} without an access token: anyone who can "
                f"reach that address could use the model. Give --token or set {TOKEN_ENV}, or "
                "bind to 127.0.0.1."
            )


def is_loopback(host: str) -> bool:
    """Say whether ``host`` (an IP address or "localhost") is only reachable from this machine."""
    name = host.strip().strip("[]").lower()
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to any interface


def resolve_token(token: str | None) -> str | None:
    """The token given, else the one in the ``PNEUMOLOC_TOKEN`` environment variable, else None."""
    if token:
        return token
    return os.environ.get(TOKEN_ENV) or None


# --------------------------------------------------------------------------------------
# Response models (they make /openapi.json meaningful)
# --------------------------------------------------------------------------------------


class ErrorResponse(BaseModel):
    """Every 4xx/5xx answer of the API."""

    error: str = Field(description="Machine-readable code, e.g. 'not_an_image', 'too_large'.")
    detail: str = Field(description="What is wrong, in words a user can act on.")


class Health(BaseModel):
    """Liveness."""

    status: str = "ok"


class BoxModel(BaseModel):
    """A region where the model's evidence is; not a confirmed finding."""

    x: float = Field(description="Left edge, in pixels of the original image.")
    y: float = Field(description="Top edge, in pixels of the original image.")
    width: float
    height: float
    confidence: float = Field(description="Probability x mean heatmap inside the region.")


class ModelInfo(BaseModel):
    """What produces the predictions (``Predictor.describe()``)."""

    model_config = ConfigDict(protected_namespaces=(), extra="allow")

    model_id: str
    model: dict[str, Any] | None = None
    pneumoloc_version: str | None = None
    image_size: int
    threshold: float
    cam_method: str
    tta: bool
    box_config: dict[str, Any]
    checkpoint: str | None = None


class ModelCard(ModelInfo):
    """``GET /api/model``: the model plus the key facts stored in its checkpoint."""

    metrics: dict[str, dict[str, float | int | str | None]] = Field(
        default_factory=dict, description="Scalar metrics per split, as stored at training time."
    )
    data: dict[str, Any] = Field(
        default_factory=dict, description="The training data: fingerprint, kind, sizes."
    )
    epoch: int | None = None
    label_names: list[str] | None = None
    disclaimer: str = DISCLAIMER
    limits: str = LIMITS_TEXT


class InputInfo(BaseModel):
    """Non-identifying facts about the uploaded file."""

    format: str = Field(description="'dicom', 'png' or 'jpeg' (detected from the content).")
    view_position: str | None = Field(default=None, description="DICOM ViewPosition, if any.")
    bytes: int


class DisplayImages(BaseModel):
    """What the page draws on its canvas; the boxes are drawn from ``boxes``."""

    xray_png_b64: str = Field(description="The X-ray as 8-bit grey PNG, downsized for display.")
    heatmap_png_b64: str = Field(
        description="The heatmap as an RGBA PNG at the model's input size: colour map 'inferno', "
        "alpha = heat, to be stretched over the whole X-ray."
    )
    width: int = Field(description="Width of the X-ray PNG.")
    height: int = Field(description="Height of the X-ray PNG.")


class PredictResponse(BaseModel):
    """``POST /api/predict``: the record ``pneumoloc predict`` writes, plus context."""

    model_config = ConfigDict(protected_namespaces=(), extra="allow")

    id: str = Field(description="The upload's file name, sanitised (never a DICOM tag).")
    probability: float = Field(ge=0.0, le=1.0, description="Of pneumonia, from the model.")
    decision: str = Field(description="'pneumonia' or 'no pneumonia' at the threshold.")
    threshold: float
    boxes: list[BoxModel]
    image_height: int
    image_width: int
    cam_method: str
    model_id: str
    model_version: str | None = None
    pneumoloc_version: str
    disclaimer: str
    limits: str = LIMITS_TEXT
    input: InputInfo
    model: ModelInfo
    images: DisplayImages | None = None


_ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorResponse, "description": "Empty upload or malformed request."},
    401: {"model": ErrorResponse, "description": "Missing or wrong bearer token."},
    413: {"model": ErrorResponse, "description": "Upload or declared image size too large."},
    415: {"model": ErrorResponse, "description": "Not multipart, or not a DICOM/PNG/JPEG."},
    422: {"model": ErrorResponse, "description": "No pixel data, unsupported or corrupt image."},
}

_UPLOAD_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": [_FILE_FIELD],
                    "properties": {
                        _FILE_FIELD: {
                            "type": "string",
                            "format": "binary",
                            "description": "One DICOM, PNG or JPEG chest X-ray.",
                        }
                    },
                }
            }
        },
    }
}


# --------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------


class ApiError(Exception):
    """An error answered as ``{"error": code, "detail": detail}`` with ``status``."""

    def __init__(self, status: int, code: str, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.code = code
        self.detail = detail


# (error class, HTTP status, code); the first match wins.
_READ_ERRORS: tuple[tuple[type[ImageReadError], int, str], ...] = (
    (ImageTooLargeError, 413, "image_too_large"),
    (NotAnImageError, 415, "not_an_image"),
    (NoPixelDataError, 422, "no_pixel_data"),
    (UnsupportedImageError, 422, "unsupported_image"),
    (TruncatedImageError, 422, "truncated_image"),
)


def _api_error_from_read(exc: ImageReadError) -> ApiError:
    for cls, status, code in _READ_ERRORS:
        if isinstance(exc, cls):
            return ApiError(status, code, str(exc))
    return ApiError(422, "unreadable_image", str(exc))


# --------------------------------------------------------------------------------------
# Upload: streamed, size-limited, in memory
# --------------------------------------------------------------------------------------


def _safe_name(filename: str | None) -> str:
    """A short, printable base name of an uploaded file (never used as a path)."""
    base = re.split(r"[\\/]", filename or "")[-1]
    cleaned = re.sub(r"[^A-Za-z0-9._-]+", "_", base).strip("._")[:80]
    return cleaned or "upload"


class _UploadCollector:
    """Callbacks of python-multipart's streaming parser that keep the ``file`` part in memory.

    Hand-written on the parser's callbacks (not Starlette's ``request.form()``) because that
    spools large files to a temporary file on disk and only limits non-file fields.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.data = bytearray()
        self.filename: str | None = None
        self.found = False
        self.finished = False
        self._in_file = False
        self._field = bytearray()
        self._value = bytearray()
        self._headers: dict[str, str] = {}

    def callbacks(self) -> dict[str, Callable[..., None]]:
        return {
            "on_part_begin": self._part_begin,
            "on_part_data": self._part_data,
            "on_part_end": self._part_end,
            "on_header_field": self._header_field,
            "on_header_value": self._header_value,
            "on_header_end": self._header_end,
            "on_headers_finished": self._headers_finished,
            "on_end": self._end,
        }

    def _part_begin(self) -> None:
        self._headers = {}
        self._in_file = False

    def _header_field(self, data: bytes, start: int, end: int) -> None:
        self._field += data[start:end]

    def _header_value(self, data: bytes, start: int, end: int) -> None:
        self._value += data[start:end]

    def _header_end(self) -> None:
        key = self._field.decode("latin-1").strip().lower()
        self._headers[key] = self._value.decode("latin-1")
        self._field.clear()
        self._value.clear()

    def _headers_finished(self) -> None:
        disposition, params = parse_options_header(self._headers.get("content-disposition"))
        if disposition != b"form-data":
            return
        if params.get(b"name", b"").decode("latin-1") != _FILE_FIELD:
            return  # other form fields are ignored (never buffered)
        if self.found:
            raise ApiError(400, "bad_request", "upload one file at a time")
        self.found = True
        self._in_file = True
        raw_name = params.get(b"filename")
        self.filename = raw_name.decode("utf-8", "replace") if raw_name is not None else None

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        if not self._in_file:
            return
        if len(self.data) + (end - start) > self.limit:
            raise _too_large(self.limit)
        self.data += data[start:end]

    def _part_end(self) -> None:
        self._in_file = False

    def _end(self) -> None:
        self.finished = True


def _too_large(limit: int) -> ApiError:
    return ApiError(
        413,
        "too_large",
        f"the upload exceeds the limit of {_megabytes(limit)} (server setting --max-upload-mb)",
    )


def _megabytes(n: int) -> str:
    return f"{n / (1024 * 1024):g} MB"


async def _read_upload(request: Request, limit: int) -> tuple[bytes, str | None]:
    """The bytes and client file name of the ``file`` field, read with a size limit."""
    content_type, params = parse_options_header(request.headers.get("content-type"))
    if content_type != b"multipart/form-data":
        raise ApiError(
            415,
            "unsupported_media_type",
            f"send the image as multipart/form-data in a field named {_FILE_FIELD!r}",
        )
    boundary = params.get(b"boundary")
    if not boundary:
        raise ApiError(400, "bad_request", "the multipart request has no boundary")
    body_limit = limit + _MULTIPART_OVERHEAD
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > body_limit:
        raise _too_large(limit)  # cheap early refusal; the stream is still counted below
    collector = _UploadCollector(limit)
    parser = MultipartParser(boundary, collector.callbacks())  # type: ignore[arg-type]
    received = 0
    try:
        async for chunk in request.stream():
            received += len(chunk)
            if received > body_limit:
                raise _too_large(limit)
            parser.write(chunk)
        parser.finalize()
    except MultipartParseError as exc:
        raise ApiError(400, "bad_request", f"malformed multipart body ({exc})") from None
    if not collector.found:
        raise ApiError(400, "bad_request", f"no file in the form field {_FILE_FIELD!r}")
    if not collector.finished:
        raise ApiError(400, "bad_request", "the multipart body is incomplete")
    return bytes(collector.data), collector.filename


# --------------------------------------------------------------------------------------
# Inference and display images
# --------------------------------------------------------------------------------------


def _png_b64(image: Image.Image) -> str:
    # Level 1: a 768 px X-ray encodes in ~20 ms instead of ~100 ms (level 6) for ~15% more bytes.
    buf = io.BytesIO()
    image.save(buf, format="PNG", compress_level=1)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _heatmap_rgba(heatmap: np.ndarray) -> Image.Image:
    """Colour-mapped heatmap whose alpha is the heat, as ``render_overlay`` blends it."""
    from matplotlib import colormaps

    heat = np.clip(np.nan_to_num(np.asarray(heatmap, np.float32), nan=0.0), 0.0, 1.0)
    rgba = colormaps[_HEATMAP_CMAP](heat)
    rgba[..., 3] = heat
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
class _Engine:
    """The one model instance and what serialises its use."""

    predictor: Predictor
    settings: ServeSettings
    lock: threading.Lock
    executor: ThreadPoolExecutor
    counter: itertools.count[int]

    def process(self, data: bytes, name: str, want_images: bool) -> dict[str, Any]:
        """Decode, predict and (maybe) render one upload (runs in the executor)."""
        xray = read_xray_bytes(
            data, name, min_size=self.predictor.image_size, max_pixels=self.settings.max_pixels
        )
        with self.lock:
            prediction: Prediction = self.predictor.predict_xrays([xray])[0]
        record = prediction_record(prediction, self.predictor, image_id=name)
        record["limits"] = LIMITS_TEXT
        record["input"] = {
            "format": xray.source_format,
            "view_position": xray.view_position,
            "bytes": len(data),
        }
        record["model"] = self.predictor.describe()
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


def _model_card(predictor: Predictor) -> dict[str, Any]:
    meta = predictor.meta
    data = meta.get("data") if isinstance(meta.get("data"), dict) else {}
    labels = meta.get("label_names")
    epoch = meta.get("epoch")
    return {
        **predictor.describe(),
        "metrics": _scalar_metrics(meta.get("metrics")),
        "data": {k: v for k, v in (data or {}).items() if isinstance(v, int | float | str)},
        "epoch": epoch if isinstance(epoch, int) else None,
        "label_names": [str(x) for x in labels] if isinstance(labels, list) else None,
        "disclaimer": DISCLAIMER,
        "limits": LIMITS_TEXT,
    }


# --------------------------------------------------------------------------------------
# The app
# --------------------------------------------------------------------------------------


def create_app(predictor: Predictor, settings: ServeSettings | None = None) -> FastAPI:
    """Build the web app around one loaded model.

    Args:
        predictor: The model every request uses (never rebuilt per request).
        settings: Host, token and limits; default: loopback, no token, 32 MB uploads.

    Returns:
        The ASGI app (serve it with uvicorn, one worker process).

    Raises:
        ConfigError: The settings are invalid, e.g. a non-loopback host without a token.
    """
    settings = settings or ServeSettings()
    engine = _Engine(
        predictor=predictor,
        settings=settings,
        lock=threading.Lock(),
        executor=ThreadPoolExecutor(settings.workers, thread_name_prefix="pneumoloc-serve"),
        counter=itertools.count(1),
    )

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        engine.executor.shutdown(wait=True, cancel_futures=True)

    app = FastAPI(
        title="pneumoloc",
        version=__version__,
        summary="Chest X-ray pneumonia probability and class-activation-map localisation.",
        description=f"{DISCLAIMER} {LIMITS_TEXT}",
        docs_url=None,  # FastAPI's interactive docs load scripts from a CDN
        redoc_url=None,
        lifespan=lifespan,
    )
    app.state.engine = engine

    async def require_token(request: Request) -> None:
        if settings.token is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, given = header.partition(" ")
        ok = scheme.lower() == "bearer" and hmac.compare_digest(
            given.strip().encode("utf-8"), settings.token.encode("utf-8")
        )
        if not ok:
            raise ApiError(401, "unauthorized", "this server needs its access token (Bearer)")

    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
        return JSONResponse(
            {"error": exc.code, "detail": exc.detail}, status_code=exc.status, headers=headers
        )

    @app.middleware("http")
    async def _headers(
        request: Request, call_next: Callable[[Request], Awaitable[Response]]
    ) -> Response:
        response = await call_next(request)
        for key, value in _SECURITY_HEADERS.items():
            response.headers.setdefault(key, value)
        if request.url.path.startswith("/api/"):
            response.headers["Cache-Control"] = "no-store"
        return response

    @app.get("/api/health", response_model=Health, tags=["api"])
    async def health() -> dict[str, str]:
        """Liveness; open even when a token is configured."""
        return {"status": "ok"}

    @app.get(
        "/api/model",
        response_model=ModelCard,
        responses={401: _ERROR_RESPONSES[401]},
        dependencies=[Depends(require_token)],
        tags=["api"],
    )
    async def model_card() -> dict[str, Any]:
        """The model, its decision threshold, heatmap method, box rule and training facts."""
        return _model_card(predictor)

    @app.post(
        "/api/predict",
        response_model=PredictResponse,
        response_model_exclude_none=False,
        responses=_ERROR_RESPONSES,
        dependencies=[Depends(require_token)],
        openapi_extra=_UPLOAD_BODY,
        tags=["api"],
    )
    async def predict(
        request: Request,
        images: bool = Query(False, description="Also return the display images (base64 PNGs)."),
    ) -> dict[str, Any]:
        """Probability of pneumonia, decision, heatmap and boxes for one uploaded X-ray."""
        number = next(engine.counter)
        started = time.perf_counter()
        data, filename = await _read_upload(request, settings.max_upload_bytes)
        if not data:
            raise ApiError(400, "empty_file", "the uploaded file is empty")
        name = _safe_name(filename)
        loop = asyncio.get_running_loop()
        try:
            record = await loop.run_in_executor(engine.executor, engine.process, data, name, images)
        except ImageReadError as exc:
            error = _api_error_from_read(exc)
            logger.info("upload #%d refused: %s (%d bytes)", number, error.code, len(data))
            raise error from None
        except Exception:
            logger.exception("upload #%d: unexpected failure", number)
            raise ApiError(
                500, "internal_error", "the server failed to process this image"
            ) from None
        logger.info(
            "upload #%d: %s, %d bytes, p=%.3f, %d box(es), %.0f ms",
            number,
            record["input"]["format"],
            len(data),
            record["probability"],
            len(record["boxes"]),
            1000 * (time.perf_counter() - started),
        )
        return record

    @app.get("/", include_in_schema=False)
    async def index() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html", media_type="text/html")

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    return app
