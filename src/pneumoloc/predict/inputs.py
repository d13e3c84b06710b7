"""What ``predict`` reads: the input files, their output ids, and each file decoded.

:func:`collect_inputs` finds the files (folders searched recursively), :func:`assign_ids`
gives each a unique, file-name-safe output id, and :func:`read_input` decodes one for the model
(and the overlay) without ever raising. DICOM identifiers are read only on request
(:func:`dicom_identifiers`) and never logged.
"""

from __future__ import annotations

import logging
import unicodedata
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pneumoloc.errors import DataError, ImageReadError

logger = logging.getLogger("pneumoloc.predict")  # the name of the module before the split

__all__ = [
    "IDENTIFIER_KEYWORDS",
    "OVERLAY_SIDE",
    "InputFile",
    "ReadResult",
    "assign_ids",
    "collect_inputs",
    "dicom_identifiers",
    "read_input",
]

OVERLAY_SIDE = 512
"""Long side, in pixels, of the X-ray drawn in an overlay (smaller images are not enlarged
here; :func:`pneumoloc.report.overlay.render_overlay` enlarges them to 384 for legibility)."""

IDENTIFIER_KEYWORDS = (
    "PatientID",
    "PatientName",
    "PatientBirthDate",
    "PatientSex",
    "PatientAge",
    "AccessionNumber",
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "SOPInstanceUID",
    "StudyID",
    "StudyDate",
)
"""DICOM keywords copied into ``dicom_identifiers`` with ``keep_identifiers=True`` (if present)."""

_CSV_FORMULA_START = ("=", "+", "-", "@")


@dataclass(frozen=True)
class InputFile:
    """One file to predict.

    Attributes:
        path: Where it is.
        source: How outputs name it: relative to its command-line argument (a folder
            argument's own name first), sanitised for display.
    """

    path: Path
    source: str


@dataclass(frozen=True)
class ReadResult:
    """A decoded input, or why it could not be.

    Attributes:
        pixels: ``uint8 (S, S)`` model input, or None on failure.
        display: ``uint8`` X-ray for the overlay (long side at most :data:`OVERLAY_SIDE`), or
            None when no overlay is wanted or on failure.
        original_shape: ``(height, width)`` of the stored image.
        identifiers: The DICOM identifiers (only when asked for, and for DICOMs).
        tags: The DICOM tags the input check reads (only when asked for, and for DICOMs).
        error: The reason of a failure (already safe to show), else None.
    """

    pixels: np.ndarray | None = None
    display: np.ndarray | None = None
    original_shape: tuple[int, int] = (0, 0)
    identifiers: dict[str, str] | None = None
    tags: dict[str, str] | None = None
    error: str | None = None


# --------------------------------------------------------------------------------------
# Inputs and output names
# --------------------------------------------------------------------------------------


def _display(text: str) -> str:
    """Printable text for a CSV or JSON cell: controls replaced, no spreadsheet formula."""
    text = unicodedata.normalize("NFC", text)
    text = "".join(c if c.isprintable() else "_" for c in text)
    if text.startswith(_CSV_FORMULA_START):
        text = "'" + text
    return text


def _walk(root: Path, exclude: Path | None) -> Iterator[Path]:
    """Supported files under ``root`` by the rule ``prepare`` follows too
    (:func:`pneumoloc.data.files.list_images`): hidden entries are left out with a warning,
    broken links are kept (their read fails with a row saying so), folders named like images
    are searched and reported."""
    from pneumoloc.data.files import list_images, warn_listing

    listing = list_images(root, exclude=exclude)
    warn_listing(listing, _display(root.name or str(root)))
    yield from listing.files


def collect_inputs(inputs: Iterable[str | Path], *, exclude: Path | None = None) -> list[InputFile]:
    """The files to predict, in argument order (folders searched recursively, sorted by path).

    Args:
        inputs: Files and folders.
        exclude: A folder not to search (the output folder), resolved.

    Raises:
        DataError: An input does not exist, or nothing to predict was found.
    """
    files: list[InputFile] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            label = path.resolve().name or "input"
            found = sorted((f.relative_to(path).as_posix(), f) for f in _walk(path, exclude))
            files.extend(InputFile(f, _display(f"{label}/{rel}")) for rel, f in found)
        elif path.is_file():
            files.append(InputFile(path, _display(path.name)))
        else:
            raise DataError(f"{_display(str(path))}: no such file or folder")
    if not files:
        raise DataError("no DICOM, PNG or JPEG files found in the inputs")
    return files


def _resolved(path: Path) -> Path:
    """``path.resolve()``, or its absolute path for a link that loops."""
    try:
        return path.resolve()
    except (OSError, RuntimeError):  # RuntimeError: a symbolic link loop (Python < 3.13)
        return path.absolute()


def assign_ids(files: Sequence[InputFile], out: Path | None = None) -> list[str]:
    """A unique, file-name-safe output id per input, from its file name.

    ``safe_name`` of the name without its suffix; a later input whose id is taken (compared
    case-insensitively, for case-insensitive file systems) gets ``_2``, ``_3``, ...; with
    ``out``, an id whose outputs would overwrite one of the input files is skipped too.
    """
    from pneumoloc.data.records import safe_name

    inputs = {_resolved(f.path) for f in files} if out is not None else set()
    taken: set[str] = set()
    ids = []
    for f in files:
        base = safe_name(f.path.stem, max_len=100)
        candidate, k = base, 1
        while candidate.lower() in taken or (
            out is not None
            and any((out / f"{candidate}{ext}").resolve() in inputs for ext in (".json", ".png"))
        ):
            k += 1
            candidate = f"{base}_{k}"
        taken.add(candidate.lower())
        ids.append(candidate)
    return ids


# --------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------


def dicom_identifiers(path: str | Path) -> dict[str, str]:
    """The :data:`IDENTIFIER_KEYWORDS` values a DICOM has, as text (pixel data not read)."""
    import pydicom

    try:
        ds = pydicom.dcmread(
            str(path), stop_before_pixels=True, force=True, specific_tags=list(IDENTIFIER_KEYWORDS)
        )
    except Exception as exc:  # the image was readable; a header quirk must not fail the file
        logger.debug("%s: identifiers not readable (%s)", path, type(exc).__name__)
        return {}
    out = {}
    for keyword in IDENTIFIER_KEYWORDS:
        try:
            value = ds.get(keyword)
        except Exception:  # a malformed element value
            continue
        text = "" if value is None else str(value).strip()
        if text:
            out[keyword] = text
    return out


def _display_pixels(path: Path, first: np.ndarray, original: tuple[int, int]) -> np.ndarray:
    """The overlay's X-ray: long side :data:`OVERLAY_SIDE` at most, decoded at that size."""
    from PIL import Image

    from pneumoloc.io.reader import read_xray

    pixels = first
    wanted = min(OVERLAY_SIDE, max(original))
    if max(pixels.shape) < wanted:  # a reduced decode for the model: decode again, larger
        pixels = read_xray(path, min_size=min(wanted, min(original))).pixels
    h, w = pixels.shape
    if max(h, w) > OVERLAY_SIDE:
        scale = OVERLAY_SIDE / max(h, w)
        size = (max(1, round(w * scale)), max(1, round(h * scale)))
        pixels = np.asarray(Image.fromarray(pixels).resize(size, Image.Resampling.BILINEAR))
    return pixels


def read_input(
    path: str | Path,
    size: int,
    *,
    display: bool = False,
    keep_identifiers: bool = False,
    check_tags: bool = False,
) -> ReadResult:
    """Decode one file for the model exactly as the cache and ``submit`` do, never raising.

    :func:`pneumoloc.io.preprocess.load_resized`: the same pixels as
    :meth:`pneumoloc.inference.Predictor.predict_xrays` and the training cache see.

    Args:
        path: The file.
        size: The model's input side.
        display: Also return the X-ray for the overlay.
        keep_identifiers: Also read the DICOM identifiers (DICOM files only).
        check_tags: Also read the tags of the input check (DICOM files only).

    Returns:
        The pixels, or the reason of a failure in ``error``.
    """
    from pneumoloc.io.preprocess import load_resized

    path = Path(path)
    try:
        pixels, image = load_resized(path, size)
        h, w = (int(v) for v in image.original_shape)
        shown = _display_pixels(path, image.pixels, (h, w)) if display else None
    except ImageReadError as exc:
        return ReadResult(error=_display(exc.reason))
    except OSError as exc:  # cannot open: a broken link, a link loop, permission, a directory
        from pneumoloc.data.files import open_error_reason

        return ReadResult(error=_display(open_error_reason(path, exc)))
    except Exception as exc:  # a reader bug must not lose the rest of the run
        logger.debug("unexpected error reading an input", exc_info=True)
        return ReadResult(error=_display(f"{type(exc).__name__}: {exc}"))
    is_dicom = image.source_format == "dicom"
    ids = dicom_identifiers(path) if keep_identifiers and is_dicom else None
    tags = None
    if check_tags and is_dicom:
        from pneumoloc.inference.input_check import read_dicom_tags

        tags = read_dicom_tags(path)
    return ReadResult(
        pixels=pixels, display=shown, original_shape=(h, w), identifiers=ids, tags=tags
    )
