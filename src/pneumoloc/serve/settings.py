"""How ``pneumoloc serve`` serves: bind address, allowed Host names, access token and limits."""

from __future__ import annotations

import ipaddress
import logging
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from pneumoloc.errors import ConfigError
from pneumoloc.io import DEFAULT_MAX_PIXELS

__all__ = [
    "LOOPBACK_NAMES",
    "TOKEN_ENV",
    "ServeSettings",
    "host_allowed",
    "is_loopback",
    "read_token_file",
    "resolve_token",
]

logger = logging.getLogger(__name__)

TOKEN_ENV = "PNEUMOLOC_TOKEN"
"""Environment variable read for the access token when none is given."""

LOOPBACK_NAMES: tuple[str, ...] = ("localhost", "127.0.0.1", "::1")
"""Host header names always accepted: this machine's own names for itself."""

_WILDCARDS = ("0.0.0.0", "::", "")
_MAX_TOKEN_FILE_BYTES = 4096


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
        allowed_hosts: Host header names accepted besides :data:`LOOPBACK_NAMES` and the bind
            address (when it is one address, not a wildcard); ``"*"`` accepts any name and
            needs a token. Any other Host is answered 421, which stops DNS-rebinding pages.
        max_concurrent_uploads: Uploads read and decoded at once; more wait their turn, so
            hostile uploads cannot add up past this many times the per-upload memory.
    """

    host: str = "127.0.0.1"
    token: str | None = None
    max_upload_bytes: int = 32 * 1024 * 1024
    max_pixels: int = DEFAULT_MAX_PIXELS
    display_size: int = 768
    workers: int = 2
    allowed_hosts: tuple[str, ...] = ()
    max_concurrent_uploads: int = 4
    input_check: bool = True  # refuse what is not a frontal chest radiograph (422, a reason)

    def __post_init__(self) -> None:
        object.__setattr__(
            self, "allowed_hosts", tuple(_normalise_host(h) for h in self.allowed_hosts)
        )
        if self.max_upload_bytes < 1:
            raise ConfigError(f"max upload size must be positive, got {self.max_upload_bytes}")
        if self.max_concurrent_uploads < 1:
            raise ConfigError(
                f"max_concurrent_uploads must be at least 1, got {self.max_concurrent_uploads}"
            )
        if "" in self.allowed_hosts:
            raise ConfigError("an allowed host name is empty")
        if "*" in self.allowed_hosts and not self.token:
            raise ConfigError(
                "--allowed-host '*' (any Host header) needs an access token: without one, any "
                "web page the user visits could reach the server through DNS rebinding"
            )
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
                f"reach that address could use the model. Set {TOKEN_ENV} or give --token-file, "
                "or bind to 127.0.0.1."
            )

    @property
    def host_names(self) -> frozenset[str]:
        """The Host header names this server answers (``"*"``: any)."""
        names = {*LOOPBACK_NAMES, *self.allowed_hosts}
        bind = _normalise_host(self.host)
        if bind not in _WILDCARDS:
            names.add(bind)
        return frozenset(names)


def _normalise_host(name: str) -> str:
    """A host name or address as compared: lower case, IPv6 without brackets."""
    name = name.strip().lower()
    if name.startswith("[") and name.endswith("]"):
        name = name[1:-1]
    return name


def host_allowed(header: str | None, names: frozenset[str]) -> bool:
    """Say whether a request's Host header (``name[:port]``) names this server.

    Args:
        header: The Host header value; None or empty is refused.
        names: :attr:`ServeSettings.host_names`.
    """
    if not header:
        return False
    if "*" in names:
        return True
    value = header.strip().lower()
    if value.startswith("["):  # [v6]:port
        end = value.find("]")
        if end < 0:
            return False
        name = value[1:end]
    elif value.count(":") == 1:
        name, _, port = value.partition(":")
        if port and not port.isdigit():
            return False
    else:
        name = value
    return name in names


def is_loopback(host: str) -> bool:
    """Say whether ``host`` (an IP address or "localhost") is only reachable from this machine."""
    name = host.strip().strip("[]").lower()
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to any interface


def resolve_token(token: str | None, token_file: str | Path | None = None) -> str | None:
    """The access token: given directly, else read from ``token_file``, else from the
    ``PNEUMOLOC_TOKEN`` environment variable, else None.

    Raises:
        ConfigError: Both a token and a token file were given, or the file is unusable.
    """
    if token and token_file is not None:
        raise ConfigError("give the access token once: --token or --token-file, not both")
    if token:
        return token
    if token_file is not None:
        return read_token_file(token_file)
    return os.environ.get(TOKEN_ENV) or None


def read_token_file(path: str | Path) -> str:
    """The token in a file: its first line, surrounding whitespace removed.

    A file that other users can read is accepted with a warning.

    Raises:
        ConfigError: The file is missing, unreadable, too large or empty.
    """
    path = Path(path)
    try:
        info = path.stat()
        if not stat.S_ISREG(info.st_mode):
            raise ConfigError(f"{path}: the token file is not a regular file")
        if info.st_size > _MAX_TOKEN_FILE_BYTES:
            raise ConfigError(
                f"{path}: the token file is larger than {_MAX_TOKEN_FILE_BYTES} bytes"
            )
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the token file ({exc.strerror or exc})") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: the token file is not UTF-8 text") from exc
    lines = text.strip().splitlines()
    token = lines[0].strip() if lines else ""
    if not token:
        raise ConfigError(f"{path}: the token file is empty")
    if info.st_mode & (stat.S_IRGRP | stat.S_IROTH):
        logger.warning("%s: the token file can be read by other users (chmod 600 it)", path.name)
    return token
