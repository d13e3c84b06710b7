"""How ``pneumoloc serve`` serves: bind address, access token and limits."""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass

from pneumoloc.errors import ConfigError
from pneumoloc.io import DEFAULT_MAX_PIXELS

__all__ = ["TOKEN_ENV", "ServeSettings", "is_loopback", "resolve_token"]

TOKEN_ENV = "PNEUMOLOC_TOKEN"
"""Environment variable read for the access token when none is given."""


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
