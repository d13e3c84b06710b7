"""The listener's settings: its own AE, the destination AE, the model and the queue."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from pneumoloc.errors import ConfigError

__all__ = ["DEFAULT_AE_TITLE", "DEFAULT_PORT", "Destination", "ListenConfig", "check_ae_title"]

DEFAULT_AE_TITLE = "PNEUMOLOC"
DEFAULT_PORT = 11112
"""The registered DICOM port is 104; 11112 is the usual unprivileged one."""

_AE_TITLE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")  # 16 printable ASCII characters, no "\"


def check_ae_title(title: str, what: str = "AE title") -> str:
    """``title`` if it is a valid AE title (1 to 16 printable ASCII characters, no backslash,
    not only spaces); otherwise a :class:`ConfigError` that says so."""
    if not _AE_TITLE.match(title) or not title.strip():
        raise ConfigError(
            f"{what} {title!r} is not valid: 1 to 16 printable ASCII characters, no backslash"
        )
    return title.strip()


def _check_port(port: int, what: str) -> int:
    if not 0 <= port <= 65535:
        raise ConfigError(f"{what} {port} is not a TCP port (0 to 65535)")
    return port


@dataclass(frozen=True)
class Destination:
    """Where results go: the PACS's storage SCP.

    Attributes:
        host: Its address.
        port: Its DICOM port.
        ae_title: Its AE title (the "called AE").
    """

    host: str
    port: int
    ae_title: str

    def __post_init__(self) -> None:
        check_ae_title(self.ae_title, "destination AE title")
        _check_port(self.port, "destination port")
        if not self.host:
            raise ConfigError("the destination host is empty")

    @classmethod
    def parse(cls, text: str) -> Destination:
        """``AE@HOST:PORT`` (e.g. ``ORTHANC@127.0.0.1:4242``)."""
        ae, sep, address = text.rpartition("@")
        host, colon, port = address.rpartition(":")
        if not sep or not colon or not port.isdigit():
            raise ConfigError(
                f"destination {text!r}: expected AE@HOST:PORT, e.g. PACS@127.0.0.1:104"
            )
        return cls(host=host.strip("[]"), port=int(port), ae_title=ae)

    def __str__(self) -> str:
        return f"{self.ae_title}@{self.host}:{self.port}"


@dataclass(frozen=True)
class ListenConfig:
    """Everything ``pneumoloc listen`` needs.

    Attributes:
        ae_title: The listener's AE title; callers must call it by this name.
        host: Address to bind (loopback by default).
        port: TCP port to listen on (0: any free port).
        destination: Where SR and Secondary Capture results are sent; None keeps them local
            (``dicom_out`` only), e.g. for a dry run.
        model: Checkpoint, exported ``.onnx`` or "default".
        backend: "auto", "torch" or "onnx" (:func:`pneumoloc.inference.load_predictor`).
        device: "auto", "cpu" or "cuda" (torch).
        cam_method: Heatmap method (default: the model's).
        use_detector: Use the model's self-trained detector for boxes and heatmaps, if it has
            one (False: the box rule and the CAM, faster; ``--no-detector``).
        queue_size: Images accepted but not yet analysed, at most; a C-STORE beyond that is
            refused with 0xA700 (out of resources) and the sender may retry.
        dicom_out: Also write every result here (``<n>.sr.dcm``, ``<n>.sc.dcm``).
        allowed_callers: Calling AE titles accepted (empty: any).
        send_retries: Further tries of a failed send (1 s apart) before the result is given up.
        drain_seconds: On shutdown, how long the queued images may still take.
    """

    ae_title: str = DEFAULT_AE_TITLE
    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    destination: Destination | None = None
    model: str | Path = "default"
    backend: str = "auto"
    device: str = "auto"
    cam_method: str | None = None
    use_detector: bool = True
    queue_size: int = 16
    dicom_out: Path | None = None
    allowed_callers: tuple[str, ...] = ()
    send_retries: int = 2
    drain_seconds: float = 60.0

    def __post_init__(self) -> None:
        check_ae_title(self.ae_title)
        _check_port(self.port, "port")
        for caller in self.allowed_callers:
            check_ae_title(caller, "allowed calling AE title")
        if self.queue_size < 1:
            raise ConfigError(f"the queue size must be at least 1, got {self.queue_size}")
        if self.send_retries < 0:
            raise ConfigError(f"send retries must be 0 or more, got {self.send_retries}")
        if self.destination is None and self.dicom_out is None:
            raise ConfigError(
                "results would go nowhere: give a destination (--dest AE@HOST:PORT) or --dicom-out"
            )
