"""The C-STORE handler: check and decode each received image, queue it, answer with a status.

Runs on pynetdicom's association threads. Everything that decides the status happens here,
before the answer: the SOP class, the decoding (the reader predict uses, at the model's size),
the UIDs a result must reference and the input check (DICOM tags and image statistics). Only
the model and the sending of the results are left to the worker
(:mod:`pneumoloc.listen.worker`), whose failures are logged.

Nothing here logs or answers with a patient or study attribute: an image is named by its
running number (``#12``) and its SOP class.
"""

from __future__ import annotations

import io
import logging
import queue
import threading
from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from pydicom.uid import DeflatedExplicitVRLittleEndian

from pneumoloc.errors import ImageReadError
from pneumoloc.io import read_xray_bytes
from pneumoloc.io.preprocess import resize_square
from pneumoloc.listen import statuses as st
from pneumoloc.listen.contexts import ANALYSED_SOP_CLASSES

if TYPE_CHECKING:
    from pydicom.dataset import Dataset

logger = logging.getLogger("pneumoloc.listen")

__all__ = ["Job", "StoreHandler", "input_check"]


@dataclass
class Job:
    """One accepted image, waiting for the model.

    Attributes:
        number: Its running number in this listener's life (logs name images by it).
        data: The received DICOM file (file meta + data set), as sent.
        pixels: uint8 (S, S), the model's input, decoded exactly as ``predict`` decodes.
        original_shape: (rows, columns) of the image.
        header: Its header (no pixel data): the UIDs and patient module results copy.
    """

    number: int
    data: bytes
    pixels: np.ndarray
    original_shape: tuple[int, int]
    header: Dataset


def input_check(pixels: np.ndarray, data: bytes) -> str | None:
    """The input check of ``predict`` (:mod:`pneumoloc.inference.input_check`): the listener's
    one hook for it, run before the answer.

    Args:
        pixels: uint8 (S, S), the model's input.
        data: The received DICOM file (for its Modality, BodyPartExamined, ViewPosition).

    Returns:
        The reason to refuse the image (answered 0xC002), or None to analyse it. The DICOM
        tags and the image statistics are checked here; the distance of the network's features
        to real films' (when the model has such statistics) needs the model's forward pass,
        which runs after the answer: the worker applies it and sends no result for an image
        it refuses (:class:`pneumoloc.listen.worker.AnalysisWorker`).
    """
    from pneumoloc.inference.input_check import InputCheck, read_dicom_tags

    result = InputCheck().check(pixels, tags=read_dicom_tags(data))
    return None if result.accepted else result.reason


class StoreHandler:
    """``EVT_C_STORE`` handler: a status for every C-STORE, accepted images queued.

    Args:
        jobs: The bounded queue the worker reads.
        image_size: The model's input side.
    """

    def __init__(self, jobs: queue.Queue[Job], image_size: int) -> None:
        self.jobs = jobs
        self.image_size = image_size
        self.counts: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._number = 0

    def _next_number(self) -> int:
        with self._lock:
            self._number += 1
            return self._number

    def _count(self, reason: str) -> None:
        with self._lock:
            self.counts[reason] += 1

    def __call__(self, event: Any) -> Any:
        """Answer one C-STORE request (pynetdicom calls this)."""
        number = self._next_number()
        try:
            status = self._handle(event, number)
        except Exception:  # a bug here must not take the listener down
            logger.exception("#%d: unexpected error while receiving", number)
            status = st.StoreStatus(st.PROCESSING_FAILURE, "error", "internal error; see the log")
        self._count(status.reason)
        if status.ok:
            logger.info("#%d: accepted (%s)", number, _sop_name(event))
        else:
            logger.warning(
                "#%d: refused with 0x%04X (%s): %s",
                number,
                status.code,
                _sop_name(event),
                status.comment or status.reason,
            )
        return _response(status)

    def _handle(self, event: Any, number: int) -> st.StoreStatus:
        sop_class = str(event.request.AffectedSOPClassUID)
        if sop_class not in ANALYSED_SOP_CLASSES:
            return st.StoreStatus(
                st.SOP_CLASS_NOT_SUPPORTED,
                "sop_class_not_supported",
                st.comment("not a radiograph storage class pneumoloc analyses"),
            )
        if self.jobs.full():  # before decoding: a full queue costs the sender nothing
            return _queue_full()
        data = event.encoded_dataset(include_meta=True)
        # A deflated data set is inflated (with a bound) by the reader first; any other is
        # parsed up to its pixel data, which costs nothing, to check what it claims to be.
        deflated = str(event.context.transfer_syntax) == DeflatedExplicitVRLittleEndian
        header: Dataset | None = None
        if not deflated:
            header, status = _header(data, sop_class)
            if status is not None:
                return status
        try:
            image = read_xray_bytes(data, f"#{number}", min_size=self.image_size)
        except ImageReadError as exc:
            return st.status_for_read_error(exc)
        if header is None:
            header, status = _header(data, sop_class)
            if status is not None:
                return status
        assert header is not None
        pixels = resize_square(image.pixels, self.image_size)
        refused = input_check(pixels, data)
        if refused is not None:
            return st.StoreStatus(st.INPUT_CHECK_FAILED, "input_check", st.comment(refused))
        job = Job(
            number=number,
            data=data,
            pixels=pixels,
            original_shape=(int(image.original_shape[0]), int(image.original_shape[1])),
            header=header,
        )
        try:
            self.jobs.put_nowait(job)
        except queue.Full:
            return _queue_full()
        return st.StoreStatus(st.SUCCESS, "accepted")


def _header(data: bytes, sop_class: str) -> tuple[Dataset | None, st.StoreStatus | None]:
    """The data set's header, or the status that refuses it: 0xC000 when it cannot be parsed
    or names no SOP class and instance, 0xA900 when it is not of the requested SOP class or
    lacks the study or series UID a result must refer to."""
    import pydicom

    from pneumoloc.report.dicom import DicomResultError, check_source

    try:
        header = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True, force=True)
        found = str(header.get("SOPClassUID", "") or "").strip()
        instance = str(header.get("SOPInstanceUID", "") or "").strip()
    except Exception as exc:  # pydicom's errors on a corrupt header are of many types
        reason = f"data set cannot be parsed ({type(exc).__name__})"
        return None, st.StoreStatus(st.CANNOT_UNDERSTAND, "undecodable", reason)
    if not found or not instance:
        reason = "not a DICOM data set: no SOP Class or Instance UID"
        return None, st.StoreStatus(st.CANNOT_UNDERSTAND, "undecodable", reason)
    if found != sop_class:
        reason = "the data set's SOP Class UID differs from the request's"
        return None, st.StoreStatus(st.NOT_MATCHING_SOP_CLASS, "sop_class_mismatch", reason)
    try:
        check_source(header)
    except DicomResultError as exc:
        return None, st.StoreStatus(st.NOT_MATCHING_SOP_CLASS, "missing_uids", st.comment(str(exc)))
    return header, None


def _queue_full() -> st.StoreStatus:
    return st.StoreStatus(st.OUT_OF_RESOURCES, "queue_full", "analysis queue is full; retry later")


def _sop_name(event: Any) -> str:
    try:
        sop_class = str(event.request.AffectedSOPClassUID)
    except Exception:
        return "unknown SOP class"
    known = ANALYSED_SOP_CLASSES.get(sop_class)
    if known:
        return known
    from pydicom.uid import UID

    return UID(sop_class).name or "unknown SOP class"


def _response(status: st.StoreStatus) -> Any:
    if status.ok:
        return st.SUCCESS
    from pydicom.dataset import Dataset

    ds = Dataset()
    ds.Status = status.code
    if status.comment:
        ds.ErrorComment = status.comment
    return ds
