"""The listener: a pynetdicom storage SCP, its bounded queue and worker, and a clean shutdown.

:class:`Listener` starts and stops the parts (usable in-process, e.g. by tests);
:func:`run_listener` is ``pneumoloc listen``: it serves until SIGINT or SIGTERM, then stops
accepting associations, lets the worker finish the queued images (at most
``drain_seconds``) and returns.
"""

from __future__ import annotations

import logging
import queue
import signal
import threading
from collections import Counter
from types import FrameType
from typing import TYPE_CHECKING, Any

from pneumoloc.listen.config import ListenConfig
from pneumoloc.listen.contexts import supported_contexts
from pneumoloc.listen.handler import Job, StoreHandler
from pneumoloc.listen.worker import AnalysisWorker

if TYPE_CHECKING:
    from pneumoloc.inference import BasePredictor

logger = logging.getLogger("pneumoloc.listen")

__all__ = ["Listener", "run_listener"]


def _quiet_pynetdicom() -> None:
    """pynetdicom logs every association and request at INFO, some with UIDs: warnings only,
    unless its logger was configured; and never the identifiers of queries."""
    from pynetdicom import _config

    _config.LOG_REQUEST_IDENTIFIERS = False
    _config.LOG_RESPONSE_IDENTIFIERS = False
    net_logger = logging.getLogger("pynetdicom")
    if net_logger.level == logging.NOTSET:
        net_logger.setLevel(logging.WARNING)


class Listener:
    """A running ``pneumoloc listen``: storage SCP, bounded queue, analysis worker.

    Args:
        config: The settings.
        predictor: The model (default: loaded from ``config`` by :meth:`start`).
    """

    def __init__(self, config: ListenConfig, predictor: BasePredictor | None = None) -> None:
        self.config = config
        self.predictor = predictor
        self.jobs: queue.Queue[Job] = queue.Queue(maxsize=config.queue_size)
        self.handler: StoreHandler | None = None
        self.worker: AnalysisWorker | None = None
        self._server: Any = None
        self._ae: Any = None

    @property
    def address(self) -> tuple[str, int]:
        """(host, port) bound (the real port when ``config.port`` is 0)."""
        if self._server is None:
            raise RuntimeError("the listener is not started")
        host, port = self._server.server_address[:2]
        return str(host), int(port)

    @property
    def counts(self) -> Counter[str]:
        """Received and analysed images by outcome ("accepted", "queue_full", "sent", ...)."""
        out: Counter[str] = Counter()
        if self.handler is not None:
            out.update(self.handler.counts)
        if self.worker is not None:
            out.update(self.worker.counts)
        return out

    def start(self) -> tuple[str, int]:
        """Load the model (if not given), start the worker and the SCP; the address bound."""
        from pynetdicom import AE, evt

        from pneumoloc.inference.loading import load_predictor

        _quiet_pynetdicom()
        if self.predictor is None:
            c = self.config
            self.predictor = load_predictor(
                c.model,
                c.backend,
                device=c.device,
                cam_method=c.cam_method,
                batch_size=1,
                use_detector=c.use_detector,
            )
        self.handler = StoreHandler(self.jobs, self.predictor.image_size)
        self.worker = AnalysisWorker(self.jobs, self.predictor, self.config)
        self.worker.start()
        ae = AE(ae_title=self.config.ae_title)
        ae.require_called_aet = True
        if self.config.allowed_callers:
            ae.require_calling_aet = list(self.config.allowed_callers)
        ae.maximum_associations = 8
        for abstract, transfer in supported_contexts():
            ae.add_supported_context(abstract, transfer)
        self._ae = ae
        self._server = ae.start_server(
            (self.config.host, self.config.port),
            block=False,
            evt_handlers=[(evt.EVT_C_STORE, self.handler), (evt.EVT_C_ECHO, _echo)],
        )
        host, port = self.address
        destination = self.config.destination or "nowhere (--dicom-out only)"
        logger.info(
            "listening on %s:%d as %s; results to %s; model %s",
            host,
            port,
            self.config.ae_title,
            destination,
            self.predictor.model_id,
        )
        return host, port

    def stop(self, drain_seconds: float | None = None) -> None:
        """Stop accepting, finish the queue (at most ``drain_seconds``), stop the worker."""
        if self._server is not None:
            self._server.shutdown()
            self._server = None
        if self.worker is not None:
            wait = self.config.drain_seconds if drain_seconds is None else drain_seconds
            self.worker.stop(wait)
            self.worker.join(wait + 5)
        counts = ", ".join(f"{k} {v}" for k, v in sorted(self.counts.items())) or "nothing"
        logger.info("stopped: %s", counts)


def _echo(event: Any) -> int:
    return 0x0000


def run_listener(config: ListenConfig) -> int:
    """Serve until SIGINT or SIGTERM; 0 after a clean shutdown."""
    listener = Listener(config)
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        logger.info("%s received: shutting down", signal.Signals(signum).name)
        stop.set()

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        listener.start()
        while not stop.wait(0.5):
            if listener.worker is not None and not listener.worker.is_alive():
                logger.error("the analysis worker stopped unexpectedly")
                return 1
    finally:
        listener.stop()
        for s, handler in previous.items():
            signal.signal(s, handler)
    return 0
