"""Typed errors. Each names the file (where there is one) and says what is wrong."""

from __future__ import annotations

from pathlib import Path


class PneumolocError(Exception):
    """Base class of every error pneumoloc raises on purpose."""


class ImageReadError(PneumolocError):
    """An X-ray file could not be read. Subclasses say why.

    Args:
        path: The file that failed.
        reason: What is wrong with it, in words a user can act on.
    """

    def __init__(self, path: str | Path, reason: str) -> None:
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


class NotAnImageError(ImageReadError):
    """The file is neither a DICOM nor an image format pneumoloc reads."""


class NoPixelDataError(ImageReadError):
    """A DICOM file without pixel data (a report, a structured document, ...)."""


class UnsupportedImageError(ImageReadError):
    """A readable image that pneumoloc does not support (RGB, multi-frame, odd bit depth...)."""


class TruncatedImageError(ImageReadError):
    """The file ends before its pixel data does, or its compressed stream is corrupt."""


class ImageTooLargeError(ImageReadError):
    """The declared dimensions are absurd; refused before decoding."""


class NotAChestRadiographError(ImageReadError):
    """A readable image that the input check refuses: not a frontal chest radiograph (see
    :mod:`pneumoloc.inference.input_check`); no probability is given for it."""


class DataError(PneumolocError):
    """A data set (folder, labels file, cache) is unusable as given."""


class CsvValidationError(DataError):
    """A labels CSV is malformed. Names the file, the line and the column."""

    def __init__(self, path: str | Path, line: int | None, column: str | None, reason: str) -> None:
        self.path = str(path)
        self.line = line
        self.column = column
        where = self.path
        if line is not None:
            where += f", line {line}"
        if column is not None:
            where += f", column {column!r}"
        super().__init__(f"{where}: {reason}")


class CacheError(DataError):
    """A preprocessing cache is missing, incomplete or incompatible."""


class CheckpointError(PneumolocError):
    """A checkpoint is missing, corrupt or incompatible with what was asked."""


class ConfigError(PneumolocError):
    """A configuration value is invalid."""
