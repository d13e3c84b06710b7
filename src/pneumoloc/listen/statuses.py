"""The C-STORE statuses the listener answers with, and why (DICOM PS3.4 Annex B and GG.4).

Every refusal carries an Error Comment (0000,0902) that says what was wrong in words and never
quotes a patient or study attribute.
"""

from __future__ import annotations

from dataclasses import dataclass

from pneumoloc.errors import (
    ImageReadError,
    ImageTooLargeError,
    NoPixelDataError,
    NotAnImageError,
    TruncatedImageError,
    UnsupportedImageError,
)

__all__ = [
    "CANNOT_UNDERSTAND",
    "INPUT_CHECK_FAILED",
    "NOT_MATCHING_SOP_CLASS",
    "OUT_OF_RESOURCES",
    "PROCESSING_FAILURE",
    "SOP_CLASS_NOT_SUPPORTED",
    "SUCCESS",
    "UNSUPPORTED_IMAGE",
    "StoreStatus",
    "status_for_read_error",
]


@dataclass(frozen=True)
class StoreStatus:
    """A C-STORE response status and the reason it was chosen.

    Attributes:
        code: The DIMSE status.
        reason: Short name used in the logs and the counters ("accepted", "queue_full", ...).
        comment: Error Comment sent to the caller (at most 64 characters; never identifiers).
    """

    code: int
    reason: str
    comment: str = ""

    @property
    def ok(self) -> bool:
        """Whether the image was accepted for analysis."""
        return self.code == SUCCESS


SUCCESS = 0x0000
"""Success: accepted; it is analysed and its results sent to the destination."""
SOP_CLASS_NOT_SUPPORTED = 0x0122
"""Refused: SOP Class not supported (not a radiograph pneumoloc analyses: CT, SR, ...)."""
OUT_OF_RESOURCES = 0xA700
"""Refused: out of resources: the queue is full, or the image is too large to decode."""
NOT_MATCHING_SOP_CLASS = 0xA900
"""Error: data set does not match SOP Class: an image without pixel data or without UIDs."""
CANNOT_UNDERSTAND = 0xC000
"""Error: cannot understand: the data set or its pixel data cannot be decoded."""
UNSUPPORTED_IMAGE = 0xC001
"""Error: cannot understand (pneumoloc's C001): a readable image pneumoloc does not analyse
(colour, multi-frame, odd bit depth)."""
INPUT_CHECK_FAILED = 0xC002
"""Error: cannot understand (pneumoloc's C002): refused by the input check
(:mod:`pneumoloc.inference.input_check`: not a frontal chest radiograph by its DICOM tags or
its image statistics)."""
PROCESSING_FAILURE = 0x0110
"""Failure: processing failure (an unexpected error in pneumoloc; the log has the details)."""


def _comment(text: str) -> str:
    text = "".join(c if 32 <= ord(c) < 127 and c != "\\" else "_" for c in text)
    return text if len(text) <= 64 else text[:61] + "..."


def status_for_read_error(exc: ImageReadError) -> StoreStatus:
    """The status of an image that :func:`pneumoloc.io.read_xray_bytes` refused."""
    if isinstance(exc, NoPixelDataError):
        return StoreStatus(NOT_MATCHING_SOP_CLASS, "no_pixel_data", _comment(exc.reason))
    if isinstance(exc, ImageTooLargeError):
        return StoreStatus(OUT_OF_RESOURCES, "too_large", _comment(exc.reason))
    if isinstance(exc, UnsupportedImageError):
        return StoreStatus(UNSUPPORTED_IMAGE, "unsupported_image", _comment(exc.reason))
    if isinstance(exc, (TruncatedImageError, NotAnImageError)):
        return StoreStatus(CANNOT_UNDERSTAND, "undecodable", _comment(exc.reason))
    return StoreStatus(CANNOT_UNDERSTAND, "unreadable", _comment(exc.reason))


def comment(text: str) -> str:
    """``text`` as a valid Error Comment (printable ASCII, at most 64 characters)."""
    return _comment(text)
