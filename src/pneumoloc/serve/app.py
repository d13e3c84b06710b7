"""The ``pneumoloc serve`` web app: one page for clinicians and a small JSON API.

Endpoints:

* ``GET /`` and ``GET /static/*``: the page (HTML, JS and CSS shipped with pneumoloc; nothing is
  loaded from another site, so it works offline).
* ``GET /api/health``: ``{"status": "ok"}``; never needs the token.
* ``GET /api/model``: :meth:`BasePredictor.describe` plus the key facts of the checkpoint.
* ``POST /api/predict``: a multipart upload (field ``file``) of one DICOM, PNG or JPEG; the
  answer is :func:`pneumoloc.inference.prediction_record` plus ``input``, ``model`` and, with
  ``?images=1``, the display images (X-ray and colour-mapped heatmap as base64 PNGs).
* ``GET /openapi.json``: the schema. The interactive ``/docs`` pages of FastAPI are disabled:
  they load scripts from a CDN.

Safety:

* Every request must name this server in its ``Host`` header: loopback names (localhost,
  127.0.0.1, ::1), the bind address, and the names given with ``--allowed-host``; any other
  Host is answered 421 before routing, so a DNS-rebinding page (whose requests carry its own
  host name) cannot reach the API even on loopback without a token.
* Binding to anything but a loopback address needs a token; with a token every ``/api/*``
  request but ``/api/health`` needs ``Authorization: Bearer <token>`` (compared in constant
  time), else 401. The token comes from ``PNEUMOLOC_TOKEN`` or ``--token-file`` (``--token``
  is deprecated: command lines are visible to every user in ``ps``).
* No answer carries an absolute server path: the checkpoint and the training data's source
  are given by their file names.
* The upload is read from the request stream into memory and refused with 413 as soon as it
  passes the limit (``Content-Length`` is checked first but not trusted). Nothing is written to
  disk. Declared image dimensions are checked before decoding (413 when absurd), and
  compressed data (deflated DICOMs, compressed frames) is never expanded past them. At most
  ``ServeSettings.max_concurrent_uploads`` uploads are held at once (the others wait), so the
  memory of hostile uploads cannot add up.
* Error statuses (JSON ``{"error": code, "detail": message}``): 400 empty upload, missing
  ``file`` field or malformed multipart body; 401 missing or wrong token; 421 a Host header
  that does not name this server; 413 upload over the
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

This module builds the app; the pieces live beside it: :mod:`~pneumoloc.serve.settings` (bind
address, token, limits), :mod:`~pneumoloc.serve.schemas` (response models),
:mod:`~pneumoloc.serve.errors` (the JSON errors), :mod:`~pneumoloc.serve.uploads` (the streamed
upload) and :mod:`~pneumoloc.serve.engine` (the model, display images, model card).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

from fastapi import Depends, FastAPI, Query, Request
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles

from pneumoloc import DISCLAIMER, __version__
from pneumoloc.errors import ImageReadError
from pneumoloc.inference import BasePredictor
from pneumoloc.serve.engine import Engine, build_model_card
from pneumoloc.serve.errors import ApiError, api_error_from_read, api_error_response
from pneumoloc.serve.schemas import (
    ERROR_RESPONSES,
    LIMITS_TEXT,
    UPLOAD_BODY,
    Health,
    ModelCard,
    PredictResponse,
)
from pneumoloc.serve.settings import (
    TOKEN_ENV,
    ServeSettings,
    host_allowed,
    is_loopback,
    resolve_token,
)
from pneumoloc.serve.uploads import read_upload, upload_name

__all__ = [
    "LIMITS_TEXT",
    "TOKEN_ENV",
    "ServeSettings",
    "create_app",
    "is_loopback",
    "resolve_token",
]

logger = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).parent / "static"
_SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; img-src 'self' data: blob:; style-src 'self'; script-src 'self'; "
        "connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
}


def create_app(predictor: BasePredictor, settings: ServeSettings | None = None) -> FastAPI:
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
    engine = Engine.start(predictor, settings)
    app = FastAPI(
        title="pneumoloc",
        version=__version__,
        summary="Chest X-ray pneumonia probability and class-activation-map localisation.",
        description=f"{DISCLAIMER} {LIMITS_TEXT}",
        docs_url=None,  # FastAPI's interactive docs load scripts from a CDN
        redoc_url=None,
        lifespan=_lifespan(engine),
    )
    app.state.engine = engine
    app.exception_handler(ApiError)(api_error_response)
    # The last middleware added runs first: the security headers wrap the Host check's 421.
    app.middleware("http")(_host_check(settings.host_names))
    app.middleware("http")(_security_headers)
    auth = [Depends(_token_check(settings.token))]
    _add_api_routes(app, engine, auth)
    _add_predict_route(app, engine, auth)
    _add_page_routes(app)
    return app


# --------------------------------------------------------------------------------------
# Lifespan, access control, headers
# --------------------------------------------------------------------------------------


def _lifespan(engine: Engine) -> Callable[[FastAPI], contextlib.AbstractAsyncContextManager[None]]:
    """The app's lifespan: nothing at start-up; at shut-down, the engine's threads are stopped."""

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        engine.executor.shutdown(wait=True, cancel_futures=True)

    return lifespan


def _token_check(token: str | None) -> Callable[[Request], Awaitable[None]]:
    """The dependency refusing (401) a request without ``Authorization: Bearer <token>``."""

    async def require_token(request: Request) -> None:
        if token is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, given = header.partition(" ")
        ok = scheme.lower() == "bearer" and hmac.compare_digest(
            given.strip().encode("utf-8"), token.encode("utf-8")
        )
        if not ok:
            raise ApiError(401, "unauthorized", "this server needs its access token (Bearer)")

    return require_token


def _host_check(
    names: frozenset[str],
) -> Callable[[Request, Callable[[Request], Awaitable[Response]]], Awaitable[Response]]:
    """Middleware answering 421 to a request whose Host header does not name this server."""

    async def check_host(
        request: Request, call_next: Callable[[Request], Awaitable[Response]]
    ) -> Response:
        if host_allowed(request.headers.get("host"), names):
            return await call_next(request)
        logger.info("refused a request for another host (421)")
        return JSONResponse(
            {
                "error": "host_not_allowed",
                "detail": "the Host header does not name this server; start it with "
                "--allowed-host NAME to accept requests addressed to NAME",
            },
            status_code=421,
        )

    return check_host


async def _security_headers(
    request: Request, call_next: Callable[[Request], Awaitable[Response]]
) -> Response:
    """Middleware: the security headers on every answer, ``no-store`` on the API's."""
    response = await call_next(request)
    for key, value in _SECURITY_HEADERS.items():
        response.headers.setdefault(key, value)
    if request.url.path.startswith("/api/"):
        response.headers["Cache-Control"] = "no-store"
    return response


# --------------------------------------------------------------------------------------
# Routes
# --------------------------------------------------------------------------------------


def _add_api_routes(app: FastAPI, engine: Engine, auth: list[Any]) -> None:
    """``GET /api/health`` (open) and ``GET /api/model`` (behind ``auth``)."""

    @app.get("/api/health", response_model=Health, tags=["api"])
    async def health() -> dict[str, str]:
        """Liveness; open even when a token is configured."""
        return {"status": "ok"}

    @app.get(
        "/api/model",
        response_model=ModelCard,
        responses={401: ERROR_RESPONSES[401]},
        dependencies=auth,
        tags=["api"],
    )
    async def model_card() -> dict[str, Any]:
        """The model, its decision threshold, heatmap method, box rule and training facts."""
        return build_model_card(engine.predictor)


def _add_predict_route(app: FastAPI, engine: Engine, auth: list[Any]) -> None:
    """``POST /api/predict`` (behind ``auth``)."""

    @app.post(
        "/api/predict",
        response_model=PredictResponse,
        response_model_exclude_none=False,
        responses=ERROR_RESPONSES,
        dependencies=auth,
        openapi_extra=UPLOAD_BODY,
        tags=["api"],
    )
    async def predict(
        request: Request,
        images: bool = Query(False, description="Also return the display images (base64 PNGs)."),
    ) -> dict[str, Any]:
        """Probability of pneumonia, decision, heatmap and boxes for one uploaded X-ray."""
        return await _predict(engine, request, images)


async def _predict(engine: Engine, request: Request, images: bool) -> dict[str, Any]:
    """Read, check and process one upload; log it by its request number only."""
    number = next(engine.counter)
    started = time.perf_counter()
    async with engine.uploads:  # bounds the uploads held in memory at once
        data, filename = await read_upload(request, engine.settings.max_upload_bytes)
        if not data:
            raise ApiError(400, "empty_file", "the uploaded file is empty")
        name = upload_name(filename)
        size = len(data)
        loop = asyncio.get_running_loop()
        try:
            record = await loop.run_in_executor(engine.executor, engine.process, data, name, images)
        except ImageReadError as exc:
            error = api_error_from_read(exc)
            logger.info("upload #%d refused: %s (%d bytes)", number, error.code, size)
            raise error from None
        except Exception:
            logger.exception("upload #%d: unexpected failure", number)
            raise ApiError(
                500, "internal_error", "the server failed to process this image"
            ) from None
        finally:
            del data  # a refused upload is not kept alive by the traceback
    logger.info(
        "upload #%d: %s, %d bytes, p=%.3f, %d box(es), %.0f ms",
        number,
        record["input"]["format"],
        size,
        record["probability"],
        len(record["boxes"]),
        1000 * (time.perf_counter() - started),
    )
    return record


def _add_page_routes(app: FastAPI) -> None:
    """``GET /`` (the page) and ``/static/*`` (its scripts and styles)."""

    @app.get("/", include_in_schema=False)
    async def index() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html", media_type="text/html")

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
