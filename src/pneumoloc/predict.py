"""``pneumoloc predict``: DICOM, PNG or JPEG files in; per image a JSON record and an overlay.

For every input image, under ``--out``:

* ``<id>.json``: :func:`pneumoloc.inference.prediction_record` (probability, decision at the
  model's threshold, boxes in ORIGINAL pixel coordinates with confidences, CAM method, model
  id and versions) plus the sanitised ``source`` and the ``backend``;
* ``<id>.png`` (unless ``overlays=False``): the X-ray with the heatmap and its colour scale,
  the boxes, the probability and the decision (:func:`pneumoloc.report.overlay.prediction_overlay`);

and one ``summary.csv`` for the run, one row per input in input order, with the columns of
:data:`SUMMARY_COLUMNS`. A file that cannot be read (corrupt, truncated, not an image,
unsupported) gets a ``failed`` row with the reason and no other output; the run goes on.

Output names never come from file content: ``<id>`` is the input's file name without its
suffix, passed through :func:`pneumoloc.data.records.safe_name` (letters, digits, ``._-``;
never ``..`` or hidden) and made unique in the run (``x``, ``x_2``, ``x_3``...,
case-insensitively). Every output is written through a temporary file in ``--out`` and moved
into place only when its resolved path is directly inside ``--out``.

Identifying DICOM values (patient name, id, birth date, UIDs, ...) are never read or written
unless ``keep_identifiers=True``; then the JSON record gets a ``dicom_identifiers`` block with
those of :data:`IDENTIFIER_KEYWORDS` that the file has. They are never logged.

Speed: files are decoded at reduced resolution (``read_xray(min_size=S)``) and resized to the
model's side ``S`` by a pool of threads (Pillow's decoders and resizers release the GIL, and a
decode takes ~2 ms per RSNA image, so threads avoid the seconds a process pool takes to start),
which also renders and writes the outputs, while the calling thread runs the model in batches
(on the GPU when ``device="auto"`` finds one).

Folders are searched recursively for files with a supported suffix (``.dcm``, ``.dicom``,
``.png``, ``.jpg``, ``.jpeg``, any case), skipping hidden files and folders, symbolic links to
folders and ``--out`` itself; files named on the command line are always tried (the format is
detected from the content).
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import tempfile
import time
import unicodedata
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np

from pneumoloc.errors import ConfigError, DataError, ImageReadError

if TYPE_CHECKING:
    from pneumoloc.inference import BasePredictor, Prediction

logger = logging.getLogger(__name__)

__all__ = [
    "IDENTIFIER_KEYWORDS",
    "SUMMARY_COLUMNS",
    "SUMMARY_NAME",
    "InputFile",
    "PredictRow",
    "PredictRunResult",
    "ReadResult",
    "assign_ids",
    "collect_inputs",
    "dicom_identifiers",
    "predict_paths",
    "read_input",
]

SUMMARY_NAME = "summary.csv"
SUMMARY_COLUMNS = ("id", "source", "probability", "decision", "n_boxes", "status", "error")
STATUS_OK = "ok"
STATUS_FAILED = "failed"

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
_T = TypeVar("_T")


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
        error: The reason of a failure (already safe to show), else None.
    """

    pixels: np.ndarray | None = None
    display: np.ndarray | None = None
    original_shape: tuple[int, int] = (0, 0)
    identifiers: dict[str, str] | None = None
    error: str | None = None


@dataclass(frozen=True)
class PredictRow:
    """One line of ``summary.csv``.

    Attributes:
        id: Output id (file names ``<id>.json`` and ``<id>.png``).
        source: The sanitised relative input path.
        probability: Of pneumonia (None when failed).
        decision: ``"pneumonia"`` or ``"no pneumonia"`` (None when failed).
        n_boxes: Boxes predicted (None when failed).
        status: ``"ok"`` or ``"failed"``.
        error: Why it failed, else "".
        json_path: The record written, if any.
        overlay_path: The overlay written, if any.
    """

    id: str
    source: str
    probability: float | None = None
    decision: str | None = None
    n_boxes: int | None = None
    status: str = STATUS_OK
    error: str = ""
    json_path: Path | None = None
    overlay_path: Path | None = None

    def csv_fields(self) -> list[str]:
        """The row as ``summary.csv`` writes it (empty strings for missing values)."""
        return [
            self.id,
            self.source,
            "" if self.probability is None else f"{self.probability:.6f}",
            self.decision or "",
            "" if self.n_boxes is None else str(self.n_boxes),
            self.status,
            self.error,
        ]


@dataclass
class PredictRunResult:
    """What :func:`predict_paths` did.

    Attributes:
        out: The output folder (resolved).
        summary: The ``summary.csv`` written.
        rows: One per input, in input order.
        backend: ``"torch"`` or ``"onnx"``.
        model_id: The model's short id.
        seconds: Wall time, model loading included.
    """

    out: Path
    summary: Path
    rows: list[PredictRow] = field(default_factory=list)
    backend: str = "torch"
    model_id: str = ""
    seconds: float = 0.0

    @property
    def n_failed(self) -> int:
        """Inputs that could not be predicted."""
        return sum(r.status != STATUS_OK for r in self.rows)

    @property
    def n_ok(self) -> int:
        """Inputs predicted."""
        return len(self.rows) - self.n_failed

    @property
    def exit_code(self) -> int:
        """0 when every input was predicted, 1 when any failed (the CLI's exit status)."""
        return 1 if self.n_failed else 0


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


def _is_hidden(name: str) -> bool:
    return name.startswith(".")


def _walk(root: Path, exclude: Path | None) -> Iterator[Path]:
    """Supported files under ``root``, without hidden entries or the folder ``exclude``."""
    from pneumoloc.io import is_supported_file

    for folder, dirs, names in os.walk(root, followlinks=False):
        here = Path(folder)
        dirs[:] = sorted(
            d
            for d in dirs
            if not _is_hidden(d) and (exclude is None or (here / d).resolve() != exclude)
        )
        for name in sorted(names):
            path = here / name
            if not _is_hidden(name) and is_supported_file(name) and path.is_file():
                yield path


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


def assign_ids(files: Sequence[InputFile], out: Path | None = None) -> list[str]:
    """A unique, file-name-safe output id per input, from its file name.

    ``safe_name`` of the name without its suffix; a later input whose id is taken (compared
    case-insensitively, for case-insensitive file systems) gets ``_2``, ``_3``, ...; with
    ``out``, an id whose outputs would overwrite one of the input files is skipped too.
    """
    from pneumoloc.data.records import safe_name

    inputs = {f.path.resolve() for f in files} if out is not None else set()
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
) -> ReadResult:
    """Decode one file for the model exactly as the cache and ``submit`` do, never raising.

    :func:`pneumoloc.io.preprocess.load_resized`: the same pixels as
    :meth:`pneumoloc.inference.Predictor.predict_xrays` and the training cache see.

    Args:
        path: The file.
        size: The model's input side.
        display: Also return the X-ray for the overlay.
        keep_identifiers: Also read the DICOM identifiers (DICOM files only).

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
    except OSError as exc:  # cannot open: permission, vanished, a directory
        return ReadResult(error=_display(f"cannot open the file ({exc.strerror or exc})"))
    except Exception as exc:  # a reader bug must not lose the rest of the run
        logger.debug("unexpected error reading an input", exc_info=True)
        return ReadResult(error=_display(f"{type(exc).__name__}: {exc}"))
    ids = dicom_identifiers(path) if keep_identifiers and image.source_format == "dicom" else None
    return ReadResult(pixels=pixels, display=shown, original_shape=(h, w), identifiers=ids)


# --------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------


class _UnsafeOutputError(Exception):
    """An output's resolved path is not directly inside the output folder."""


def _write_inside(out: Path, name: str, data: bytes) -> Path:
    """Write ``out/name`` atomically, refusing any name that is not a plain file name in ``out``.

    ``name`` is built from a ``safe_name`` id, so the check is defence in depth. The data go to
    a new temporary file (``mkstemp``: created exclusively) that ``os.replace`` renames onto
    the target; a symbolic link already at the target is thereby replaced, never written
    through.
    """
    target = out / name
    if name in ("", ".", "..") or target.name != name or target.parent.resolve() != out:
        raise _UnsafeOutputError(
            f"refusing to write {name!r}: it resolves outside the output folder"
        )
    fd, tmp = tempfile.mkstemp(dir=out, prefix=".partial-", suffix=target.suffix)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the usual permissions
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target


def _umask() -> int:
    """The process umask, read without changing it (``os.umask`` sets it process-wide)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    return 0o022


def _png_bytes(rgb: np.ndarray) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    # No text chunks are added: nothing but pixels leaves through the PNG. Encoding dominates
    # the overlay's cost (noisy radiographs compress poorly): level 1 takes half the time of
    # the default 6 for ~10% larger files.
    Image.fromarray(rgb).save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def _write_outputs(
    out: Path,
    image_id: str,
    item: InputFile,
    prediction: Prediction,
    read: ReadResult,
    predictor: BasePredictor,
    overlays: bool,
) -> PredictRow:
    """Write the JSON record (and overlay) of one prediction; return its summary row."""
    from pneumoloc.inference import prediction_record
    from pneumoloc.report.overlay import prediction_overlay

    record: dict[str, Any] = {"id": image_id, "source": item.source}
    record.update(prediction_record(prediction, predictor, image_id=image_id))
    record["backend"] = predictor.backend
    if read.identifiers is not None:
        record["dicom_identifiers"] = read.identifiers
    try:
        json_path = _write_inside(
            out, f"{image_id}.json", (json.dumps(record, indent=2) + "\n").encode("utf-8")
        )
        overlay_path = None
        if overlays and read.display is not None:
            rgb = prediction_overlay(prediction, read.display, title=image_id)
            overlay_path = _write_inside(out, f"{image_id}.png", _png_bytes(rgb))
    except _UnsafeOutputError as exc:
        return PredictRow(image_id, item.source, status=STATUS_FAILED, error=str(exc))
    return PredictRow(
        id=image_id,
        source=item.source,
        probability=prediction.probability,
        decision="pneumonia" if prediction.positive else "no pneumonia",
        n_boxes=len(prediction.boxes),
        json_path=json_path,
        overlay_path=overlay_path,
    )


def _write_summary(out: Path, rows: Sequence[PredictRow]) -> Path:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(SUMMARY_COLUMNS)
    writer.writerows(r.csv_fields() for r in rows)
    return _write_inside(out, SUMMARY_NAME, buffer.getvalue().encode("utf-8"))


# --------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------


class _InlineExecutor(Executor):
    """Runs each task at submission, in the calling thread (``workers <= 1``)."""

    def submit(self, fn: Callable[..., _T], /, *args: Any, **kwargs: Any) -> Future[_T]:
        future: Future[_T] = Future()
        try:
            future.set_result(fn(*args, **kwargs))
        except BaseException as exc:
            future.set_exception(exc)
        return future


def _ordered(
    pool: Executor, fn: Callable[[InputFile], ReadResult], items: Sequence[InputFile], ahead: int
) -> Iterator[ReadResult]:
    """``fn`` over ``items`` in order, at most ``ahead`` submitted but not yet consumed."""
    pending: deque[Future[ReadResult]] = deque()
    todo = iter(items)
    for item in todo:
        pending.append(pool.submit(fn, item))
        if len(pending) >= ahead:
            break
    while pending:
        result = pending.popleft().result()
        nxt = next(todo, None)
        if nxt is not None:
            pending.append(pool.submit(fn, nxt))
        yield result


@contextmanager
def _torch_threads(n: int | None) -> Iterator[None]:
    """``torch.set_num_threads(n)`` inside the block (nothing when None), restored after."""
    if n is None:
        yield
        return
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def predict_paths(
    inputs: Iterable[str | Path],
    out: str | Path,
    *,
    model: str | Path = "default",
    backend: str = "torch",
    cam_method: str | None = None,
    device: str = "auto",
    batch_size: int | None = None,
    keep_identifiers: bool = False,
    overlays: bool = True,
    workers: int | None = None,
    threads: int | None = None,
    progress: bool = True,
) -> PredictRunResult:
    """Predict every image of ``inputs``; write records, overlays and ``summary.csv`` to ``out``.

    Args:
        inputs: Files and folders (searched recursively) of DICOM, PNG or JPEG images.
        out: Output folder (created).
        model: Checkpoint, exported ``.onnx`` (with ``backend="onnx"``), or "default".
        backend: "torch" or "onnx" (see :func:`pneumoloc.inference.load_predictor`).
        cam_method: Heatmap method (default: the model's).
        device: "auto" (GPU if available), "cpu" or "cuda"; torch backend only.
        batch_size: Images per forward pass (default: see :func:`default_batch_size`).
        keep_identifiers: Add the DICOM identifiers to the JSON records.
        overlays: Write an overlay PNG per image.
        workers: Threads decoding inputs and writing outputs (default: one per core; 1 does
            everything in the calling thread).
        threads: Intra-op threads of the network (default: the library's, one per core). For
            torch this is ``torch.set_num_threads`` for the duration of the call (restored
            after). 1 can be much faster on a machine busy with other work: PyTorch's OpenMP
            threads wait on each other, and one descheduled thread stalls every layer.
        progress: Show a progress bar.

    Returns:
        The rows of the summary (``exit_code`` is 1 when any input failed).

    Raises:
        DataError: An input does not exist, no image was found, or ``out`` is a file.
        ConfigError, CheckpointError: See :func:`pneumoloc.inference.load_predictor`.
    """
    from tqdm.auto import tqdm

    from pneumoloc._runtime import available_cores
    from pneumoloc.inference.loading import default_batch_size, load_predictor

    started = time.perf_counter()
    out_dir = Path(out)
    if out_dir.exists() and not out_dir.is_dir():
        raise DataError(f"{out_dir}: --out must be a folder, and this is a file")
    out_dir.mkdir(parents=True, exist_ok=True)
    out_dir = out_dir.resolve()
    files = collect_inputs(inputs, exclude=out_dir)
    if threads is not None and threads < 1:
        raise ConfigError(f"threads must be at least 1, got {threads}")
    batch_size = default_batch_size(backend, device) if batch_size is None else batch_size
    predictor = load_predictor(
        model, backend, device=device, cam_method=cam_method, batch_size=batch_size, threads=threads
    )
    ids = assign_ids(files, out_dir)
    size = predictor.image_size
    n_workers = workers if workers is not None else available_cores()
    rows: list[PredictRow | None] = [None] * len(files)
    batch: list[tuple[int, ReadResult]] = []
    writes: deque[tuple[int, Future[PredictRow]]] = deque()

    def read(item: InputFile) -> ReadResult:
        return read_input(item.path, size, display=overlays, keep_identifiers=keep_identifiers)

    pool: Executor = ThreadPoolExecutor(n_workers) if n_workers > 1 else _InlineExecutor()
    with (
        _torch_threads(threads if backend == "torch" else None),
        pool,
        tqdm(total=len(files), desc="predict", unit="img", disable=not progress) as bar,
    ):

        def finish(entry: tuple[int, Future[PredictRow]]) -> None:
            rows[entry[0]] = entry[1].result()
            bar.update(1)

        def flush() -> None:
            if not batch:
                return
            stack = np.stack([r.pixels for _, r in batch if r.pixels is not None])
            preds = predictor.predict_arrays(stack, [r.original_shape for _, r in batch])
            for (i, r), pred in zip(batch, preds, strict=True):
                job = pool.submit(
                    _write_outputs, out_dir, ids[i], files[i], pred, r, predictor, overlays
                )
                writes.append((i, job))
                while len(writes) > 2 * max(n_workers, 1):
                    finish(writes.popleft())
            batch.clear()

        ahead = max(2 * batch_size, 2 * n_workers)
        for i, decoded in enumerate(_ordered(pool, read, files, ahead)):
            if decoded.error is not None or decoded.pixels is None:
                logger.warning("%s: skipped: %s", files[i].source, decoded.error)
                rows[i] = PredictRow(
                    ids[i], files[i].source, status=STATUS_FAILED, error=decoded.error or "?"
                )
                bar.update(1)
                continue
            batch.append((i, decoded))
            if len(batch) >= batch_size:
                flush()
        flush()
        while writes:
            finish(writes.popleft())
    done = [r for r in rows if r is not None]
    summary = _write_summary(out_dir, done)
    result = PredictRunResult(
        out=out_dir,
        summary=summary,
        rows=done,
        backend=predictor.backend,
        model_id=predictor.model_id,
        seconds=time.perf_counter() - started,
    )
    if result.n_failed:
        logger.warning(
            "%d of %d inputs could not be read; see %s", result.n_failed, len(done), summary
        )
    return result
