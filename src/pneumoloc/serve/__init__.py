"""``pneumoloc serve``: a local web page and JSON API around one loaded model.

Needs the ``[serve]`` extra (fastapi, uvicorn, python-multipart). See :mod:`pneumoloc.serve.app`
for the endpoints, status codes and safety rules.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from pneumoloc.serve.app import create_app
from pneumoloc.serve.schemas import LIMITS_TEXT
from pneumoloc.serve.settings import TOKEN_ENV, ServeSettings, is_loopback, resolve_token

__all__ = [
    "LIMITS_TEXT",
    "TOKEN_ENV",
    "ServeSettings",
    "create_app",
    "is_loopback",
    "resolve_token",
    "run_server",
]

logger = logging.getLogger(__name__)


def run_server(
    model: str | Path | None = "default",
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    token: str | None = None,
    max_upload_mb: float = 32.0,
    cam_method: str | None = None,
    device: str = "auto",
) -> None:
    """Load the model once and serve the page and API with uvicorn until interrupted.

    Args:
        model: Checkpoint path, or "default"/None for the model shipped with pneumoloc.
        host: Address to bind; anything but loopback needs a token.
        port: TCP port.
        token: Access token; default: the ``PNEUMOLOC_TOKEN`` environment variable.
        max_upload_mb: Largest accepted upload, in MiB.
        cam_method: Heatmap method; None: the checkpoint's.
        device: "auto", "cpu" or "cuda".

    Raises:
        ConfigError: Non-loopback host without a token, or invalid limits (checked before the
            model is loaded).
        CheckpointError: The checkpoint cannot be loaded.
    """
    import uvicorn

    from pneumoloc.inference import Predictor

    settings = ServeSettings(
        host=host,
        token=resolve_token(token),
        max_upload_bytes=max(1, int(max_upload_mb * 1024 * 1024)),
    )
    kwargs: dict[str, Any] = {"cam_method": cam_method} if cam_method else {}
    predictor = Predictor.from_checkpoint(model, device=device, **kwargs)
    app = create_app(predictor, settings)
    shown = f"[{host}]" if ":" in host else host
    logger.info(
        "serving %s on http://%s:%d/ (token %s)",
        predictor.model_id,
        shown,
        port,
        "required" if settings.token else "not required",
    )
    uvicorn.run(app, host=host, port=port, workers=1, log_level="info", server_header=False)
