"""``pneumoloc serve``: a local web page and JSON API around one loaded model.

Needs the ``[serve]`` extra (fastapi, uvicorn, python-multipart). See :mod:`pneumoloc.serve.app`
for the endpoints, status codes and safety rules.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from pathlib import Path

from pneumoloc.errors import ConfigError
from pneumoloc.serve.app import create_app
from pneumoloc.serve.schemas import LIMITS_TEXT
from pneumoloc.serve.settings import (
    TOKEN_ENV,
    ServeSettings,
    is_loopback,
    read_token_file,
    resolve_token,
)

__all__ = [
    "LIMITS_TEXT",
    "TOKEN_ENV",
    "ServeSettings",
    "create_app",
    "is_loopback",
    "read_token_file",
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
    token_file: str | Path | None = None,
    allowed_hosts: Sequence[str] = (),
    max_upload_mb: float = 32.0,
    cam_method: str | None = None,
    device: str = "auto",
    backend: str = "auto",
    input_check: bool = True,
    use_detector: bool = True,
) -> None:
    """Load the model once and serve the page and API with uvicorn until interrupted.

    Args:
        model: Checkpoint path, or "default"/None for the model shipped with pneumoloc.
        host: Address to bind; anything but loopback needs a token.
        port: TCP port.
        token: Access token (prefer ``token_file`` or the environment: a command line is
            visible to every user in ``ps``).
        token_file: A file whose first line is the access token.
        allowed_hosts: Host header names accepted besides loopback names and the bind
            address (``"*"``: any, with a token only).
        max_upload_mb: Largest accepted upload, in MiB; must be positive.
        cam_method: Heatmap method; None: the checkpoint's.
        device: "auto", "cpu" or "cuda".
        backend: "auto", "torch" or "onnx" (:func:`pneumoloc.inference.load_predictor`).
        input_check: Refuse uploads that are not frontal chest radiographs (422 with the
            reason, no probability); see :mod:`pneumoloc.inference.input_check`.
        use_detector: Use the model's self-trained detector for boxes and heatmaps, if it has
            one (False: the box rule and the CAM, faster; ``--no-detector``).

    Raises:
        ConfigError: Non-loopback host without a token, an unusable token file, or invalid
            limits (checked before the model is loaded).
        CheckpointError: The checkpoint cannot be loaded.
    """
    import uvicorn

    from pneumoloc.inference.loading import load_predictor

    if not (math.isfinite(max_upload_mb) and max_upload_mb > 0):
        raise ConfigError(
            f"--max-upload-mb must be a positive number of MiB, got {max_upload_mb:g} "
            "(every upload would be refused)"
        )
    settings = ServeSettings(
        host=host,
        token=resolve_token(token, token_file),
        max_upload_bytes=max(1, int(max_upload_mb * 1024 * 1024)),
        allowed_hosts=tuple(allowed_hosts),
        input_check=input_check,
    )
    predictor = load_predictor(
        "default" if model is None else model,
        backend,
        device=device,
        cam_method=cam_method,
        use_detector=use_detector,
    )
    app = create_app(predictor, settings)
    shown = f"[{host}]" if ":" in host else host
    logger.info(
        "serving %s on http://%s:%d/ (token %s; Host names accepted: %s)",
        predictor.model_id,
        shown,
        port,
        "required" if settings.token else "not required",
        ", ".join(sorted(settings.host_names)),
    )
    uvicorn.run(app, host=host, port=port, workers=1, log_level="info", server_header=False)
