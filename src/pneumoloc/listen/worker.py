"""The analysis worker: one thread that runs the model on queued images and sends the results.

For each :class:`~pneumoloc.listen.handler.Job`: the prediction (the same
:meth:`~pneumoloc.inference.BasePredictor.predict_arrays` as ``predict``, on the same pixels),
the SR and Secondary Capture (:func:`pneumoloc.report.dicom.dicom_results`), an optional copy
in ``dicom_out``, and a C-STORE of both to the destination (retried). A failure is logged by
the job's number and the listener goes on.
"""

from __future__ import annotations

import logging
import os
import queue
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from pneumoloc.listen.handler import Job
from pneumoloc.listen.sender import send_datasets

if TYPE_CHECKING:
    from pneumoloc.inference import BasePredictor
    from pneumoloc.listen.config import ListenConfig

logger = logging.getLogger("pneumoloc.listen")

__all__ = ["DISPLAY_SIDE", "AnalysisWorker"]

DISPLAY_SIDE = 512
"""Long side of the X-ray in the Secondary Capture (as in ``predict``'s overlays)."""


def display_pixels(data: bytes, number: int, first: np.ndarray) -> np.ndarray:
    """The Secondary Capture's X-ray: long side :data:`DISPLAY_SIDE` at most."""
    from PIL import Image

    from pneumoloc.io import read_xray_bytes

    h, w = first.shape
    pixels = first
    if max(h, w) < DISPLAY_SIDE:
        pixels = read_xray_bytes(data, f"#{number}", min_size=DISPLAY_SIDE).pixels
    h, w = pixels.shape
    if max(h, w) > DISPLAY_SIDE:
        scale = DISPLAY_SIDE / max(h, w)
        size = (max(1, round(w * scale)), max(1, round(h * scale)))
        pixels = np.asarray(Image.fromarray(pixels).resize(size, Image.Resampling.BILINEAR))
    return pixels


class AnalysisWorker(threading.Thread):
    """Takes jobs from ``jobs`` until :meth:`stop`; the queue is drained first.

    Attributes:
        counts: "analysed", "refused" (by the feature part of the input check), "sent",
            "send_failed", "analysis_failed", "written".
    """

    def __init__(
        self, jobs: queue.Queue[Job], predictor: BasePredictor, config: ListenConfig
    ) -> None:
        super().__init__(name="pneumoloc-listen-worker", daemon=True)
        from pneumoloc.report.dicom import ModelInfo

        self.jobs = jobs
        self.predictor = predictor
        self.config = config
        self.model = ModelInfo.from_predictor(predictor)
        # The feature part of predict's input check (the handler checked the tags and the
        # image statistics before answering): it needs the forward pass, so it runs here; a
        # refused image gets no result, so no probability reaches the PACS.
        from pneumoloc.inference.input_check import InputCheck

        self.check: InputCheck | None = InputCheck.for_predictor(predictor)
        if self.check.ood is None:
            self.check = None  # nothing beyond what the handler already checked
        self.counts: Counter[str] = Counter()
        self._stopping = threading.Event()
        self._deadline: float | None = None

    def stop(self, drain_seconds: float) -> None:
        """Finish the queued jobs (for at most ``drain_seconds``), then end."""
        self._deadline = time.monotonic() + drain_seconds
        self._stopping.set()

    def run(self) -> None:
        while True:
            if self._stopping.is_set() and (
                self.jobs.empty()
                or (self._deadline is not None and time.monotonic() > self._deadline)
            ):
                left = self.jobs.qsize()
                if left:
                    logger.warning("shutting down with %d accepted image(s) not analysed", left)
                return
            try:
                job = self.jobs.get(timeout=0.2)
            except queue.Empty:
                continue
            try:
                self.process(job)
            finally:
                self.jobs.task_done()

    def process(self, job: Job) -> None:
        """Analyse one job and deliver its results; never raises."""
        from pneumoloc.report.dicom import dicom_results

        started = time.perf_counter()
        try:
            prediction = self.predictor.predict_arrays(
                job.pixels[None], [job.original_shape], with_features=self.check is not None
            )[0]
            if self.check is not None:
                from pneumoloc.inference.input_check import read_dicom_tags

                verdict = self.check.check(
                    job.pixels, features=prediction.features, tags=read_dicom_tags(job.data)
                )
                if not verdict.accepted:
                    self.counts["refused"] += 1
                    logger.warning(
                        "#%d: refused by the input check after analysis, no result sent: %s",
                        job.number,
                        verdict.reason,
                    )
                    return
            display = display_pixels(job.data, job.number, job.pixels)
            results = dicom_results(job.header, prediction, display, self.model)
        except Exception as exc:
            self.counts["analysis_failed"] += 1
            # The exception's text may quote the data set: only its type, unless debugging.
            logger.error(
                "#%d: analysis failed (%s; -v for details)", job.number, type(exc).__name__
            )
            logger.debug("#%d: analysis failure", job.number, exc_info=True)
            return
        self.counts["analysed"] += 1
        logger.info(
            "#%d: P(pneumonia) = %.3f (%s), %d box(es), in %.2f s",
            job.number,
            prediction.probability,
            "pneumonia" if prediction.positive else "no pneumonia",
            len(prediction.boxes),
            time.perf_counter() - started,
        )
        datasets = [results.sr, results.sc]
        if self.config.dicom_out is not None:
            self._write(job.number, datasets)
        if self.config.destination is not None:
            self._send(job.number, datasets)

    def _write(self, number: int, datasets: list) -> None:  # type: ignore[type-arg]
        from pneumoloc.report.dicom import dataset_bytes

        assert self.config.dicom_out is not None
        out = Path(self.config.dicom_out)
        try:
            out.mkdir(parents=True, exist_ok=True)
            for ds, kind in zip(datasets, ("sr", "sc"), strict=True):
                fd, tmp = tempfile.mkstemp(dir=out, prefix=".partial-", suffix=".dcm")
                with os.fdopen(fd, "wb") as fh:
                    fh.write(dataset_bytes(ds))
                os.replace(tmp, out / f"{number:06d}.{kind}.dcm")
            self.counts["written"] += 1
        except OSError as exc:
            logger.error("#%d: results not written to %s (%s)", number, out, exc.strerror or exc)

    def _send(self, number: int, datasets: list) -> None:  # type: ignore[type-arg]
        destination = self.config.destination
        assert destination is not None
        for attempt in range(self.config.send_retries + 1):
            try:
                send_datasets(datasets, destination, calling_ae=self.config.ae_title)
            except Exception as exc:  # SendError, or pynetdicom's own (no context, socket)
                logger.warning("#%d: send %d failed: %s", number, attempt + 1, exc)
                if attempt < self.config.send_retries:
                    time.sleep(1.0)
                continue
            self.counts["sent"] += 1
            logger.info("#%d: SR and Secondary Capture stored at %s", number, destination)
            return
        self.counts["send_failed"] += 1
        logger.error("#%d: results not delivered to %s; given up", number, destination)
