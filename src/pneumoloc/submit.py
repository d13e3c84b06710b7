"""``pneumoloc submit``: a Kaggle RSNA Pneumonia Detection Challenge submission file.

Format (as ``stage_2_sample_submission.csv``)::

    patientId,PredictionString
    0000a175-0e68-4ca4-b1af-167204a7e0bc,0.9123 264 152 213 379 0.5311 562 152 256 453
    0005d3cc-3c3f-40b9-93c3-46231c3eb813,

One row per image of the folder; ``patientId`` is the file name without its suffix. The
prediction string holds ``confidence x y width height`` per box, confidence first (4 decimals),
box in ORIGINAL pixel coordinates rounded to whole pixels (the labels file's precision); it is
empty when no box is predicted.

An unreadable file is logged and counted, and still gets a row with an empty prediction
string: Kaggle rejects a file that lacks an id, and "no box" is the safe answer. The caller
(the CLI) exits non-zero when any file failed, so the problem is not missed.
"""

from __future__ import annotations

import csv
import dataclasses
import logging
import math
import os
import time
from collections import Counter, deque
from collections.abc import Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from pneumoloc.errors import CsvValidationError, DataError, ImageReadError

if TYPE_CHECKING:
    from pneumoloc.localise.boxes import BoxConfig

logger = logging.getLogger(__name__)

__all__ = [
    "HEADER",
    "SubmitResult",
    "format_prediction_string",
    "list_images",
    "submit",
    "validate_submission",
]

HEADER = ("patientId", "PredictionString")

_Read = tuple[np.ndarray | None, tuple[int, int] | None, str | None]


@dataclass
class SubmitResult:
    """What ``submit`` wrote.

    Attributes:
        path: The submission file.
        n_images: Rows written (one per image file).
        n_with_boxes: Rows with at least one box.
        n_boxes: Boxes written.
        failed: ``(file name, reason)`` of each unreadable file (its row is empty).
        seconds: Wall time.
    """

    path: Path
    n_images: int
    n_with_boxes: int
    n_boxes: int
    failed: list[tuple[str, str]] = field(default_factory=list)
    seconds: float = 0.0


def list_images(images_dir: str | Path) -> list[Path]:
    """The supported image files directly inside a folder, sorted by name.

    Raises:
        DataError: The folder does not exist, holds no image, or two files share a stem
            (they would share a patientId).
    """
    from pneumoloc.io import is_supported_file

    root = Path(images_dir)
    if not root.is_dir():
        raise DataError(f"{root}: no such folder")
    files = sorted(p for p in root.iterdir() if p.is_file() and is_supported_file(p))
    if not files:
        raise DataError(f"{root}: no DICOM or image files found")
    counts = Counter(p.stem for p in files)
    dupes = sorted(stem for stem, c in counts.items() if c > 1)
    if dupes:
        raise DataError(
            f"{root}: several files share the patientId {dupes[0]!r} "
            f"({len(dupes)} such ids); keep one file per id"
        )
    return files


def _read_one(path: str, size: int) -> _Read:
    from pneumoloc.io.preprocess import load_resized

    try:
        pixels, image = load_resized(path, size)
    except ImageReadError as exc:
        return None, None, exc.reason
    except Exception as exc:  # a reader bug must not lose the rest of the folder
        return None, None, f"{type(exc).__name__}: {exc}"
    # The same resize as the cache and Predictor.predict_xrays, done here in the worker so
    # only model-size arrays travel between processes.
    h, w = image.original_shape
    return pixels, (int(h), int(w)), None


def _read_chunk(paths: list[str], size: int) -> list[_Read]:
    return [_read_one(p, size) for p in paths]


def _read_all(paths: Sequence[Path], size: int, workers: int, chunk: int) -> Iterator[_Read]:
    """Decoded, model-size images in input order, read by a process pool with bounded lookahead."""
    names = [str(p) for p in paths]
    chunks = [names[i : i + chunk] for i in range(0, len(names), chunk)]
    if workers <= 1:
        for c in chunks:
            yield from _read_chunk(c, size)
        return
    with ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn")) as pool:
        pending: deque[Future[list[_Read]]] = deque()
        todo = iter(chunks)
        for c in todo:
            pending.append(pool.submit(_read_chunk, c, size))
            if len(pending) >= 2 * workers:
                break
        while pending:
            yield from pending.popleft().result()
            nxt = next(todo, None)
            if nxt is not None:
                pending.append(pool.submit(_read_chunk, nxt, size))


def format_prediction_string(
    boxes: np.ndarray, scores: np.ndarray, image_shape: tuple[int, int]
) -> str:
    """``"conf x y w h ..."`` with whole-pixel boxes inside the image, each of width/height >= 1.

    Args:
        boxes: (N, 4) xywh boxes in original pixels.
        scores: (N,) confidences (clipped to [0, 1]).
        image_shape: (height, width) of the original image.
    """
    height, width = image_shape
    parts = []
    for (x, y, w, h), s in zip(
        np.asarray(boxes, dtype=np.float64).reshape(-1, 4),
        np.asarray(scores, dtype=np.float64).reshape(-1),
        strict=True,
    ):
        x0 = min(max(round(x), 0), width - 1)
        y0 = min(max(round(y), 0), height - 1)
        x1 = min(max(round(x + w), x0 + 1), width)
        y1 = min(max(round(y + h), y0 + 1), height)
        conf = min(max(float(s), 0.0), 1.0)
        parts.append(f"{conf:.4f} {x0} {y0} {x1 - x0} {y1 - y0}")
    return " ".join(parts)


def _write_csv(path: Path, rows: Iterable[tuple[str, str]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(HEADER)
        writer.writerows(rows)
    os.replace(tmp, path)


def submit(
    checkpoint: str | Path | None,
    images_dir: str | Path,
    out: str | Path,
    *,
    cam_method: str | None = None,
    box_config: BoxConfig | Mapping[str, Any] | None = None,
    tta: bool = False,
    device: str = "auto",
    batch_size: int = 16,
    workers: int | None = None,
    progress: bool = True,
) -> SubmitResult:
    """Predict every image of a folder and write (and validate) a Kaggle submission file.

    Args:
        checkpoint: Checkpoint path, or None / "default" for the shipped model.
        images_dir: Folder of ``*.dcm`` (or any supported image) files, e.g.
            ``stage_2_test_images``; the file stem is the patientId.
        out: The CSV to write.
        cam_method: Heatmap method (default: the checkpoint's).
        box_config: A :class:`pneumoloc.localise.boxes.BoxConfig`, or a mapping of fields
            replacing the checkpoint's (e.g. ``{"rule": "otsu"}``). Default: the checkpoint's.
        tta: Test-time augmentation of the heatmaps.
        device: "auto", "cpu" or "cuda".
        batch_size: Images per forward pass.
        workers: Decoding processes (default: up to 8, one per core; 1 decodes in-process).
        progress: Show a progress bar.

    Returns:
        What was written; ``failed`` lists unreadable files (written with an empty row).

    Raises:
        DataError: No images, or two files with the same patientId.
        CsvValidationError: If the written file fails :func:`validate_submission` (a bug).
    """
    from tqdm.auto import tqdm

    from pneumoloc.inference import Predictor

    started = time.perf_counter()
    files = list_images(images_dir)
    kwargs: dict[str, Any] = {"tta": tta, "batch_size": batch_size}
    if cam_method is not None:
        kwargs["cam_method"] = cam_method
    predictor = Predictor.from_checkpoint(checkpoint, device=device, **kwargs)
    if isinstance(box_config, Mapping):
        predictor.recipe = predictor.recipe.replace(
            box_config=dataclasses.replace(predictor.box_config, **dict(box_config))
        )
    elif box_config is not None:
        predictor.recipe = predictor.recipe.replace(box_config=box_config)
    size = predictor.image_size
    n_workers = workers if workers is not None else min(8, os.cpu_count() or 1)
    ids = [p.stem for p in files]
    strings = [""] * len(files)
    failed: list[tuple[str, str]] = []
    batch: list[tuple[int, np.ndarray, tuple[int, int]]] = []

    def flush() -> None:
        if not batch:
            return
        preds = predictor.predict_arrays(np.stack([b[1] for b in batch]), [b[2] for b in batch])
        for (i, _, shape), pred in zip(batch, preds, strict=True):
            strings[i] = format_prediction_string(pred.boxes.boxes, pred.boxes.scores, shape)
        batch.clear()

    with tqdm(total=len(files), desc="submit", unit="img", disable=not progress) as bar:
        reads = _read_all(files, size, n_workers, chunk=max(1, batch_size // 2))
        for i, (pixels, shape, error) in enumerate(reads):
            if error is not None or pixels is None or shape is None:
                reason = error or "unreadable"
                logger.warning("%s: unreadable, written with no box: %s", files[i].name, reason)
                failed.append((files[i].name, reason))
            else:
                batch.append((i, pixels, shape))
                if len(batch) >= batch_size:
                    flush()
            bar.update(1)
        flush()
    out = Path(out)
    _write_csv(out, zip(ids, strings, strict=True))
    validate_submission(out, expected_ids=ids)
    with_boxes = sum(1 for s in strings if s)
    n_boxes = sum(len(s.split()) // 5 for s in strings)
    if failed:
        logger.warning(
            "%d of %d files could not be read; their rows are empty", len(failed), len(files)
        )
    return SubmitResult(
        path=out,
        n_images=len(files),
        n_with_boxes=with_boxes,
        n_boxes=n_boxes,
        failed=failed,
        seconds=time.perf_counter() - started,
    )


def _parse_prediction(path: Path, line: int, text: str) -> int:
    tokens = text.split()
    if len(tokens) % 5:
        raise CsvValidationError(
            path,
            line,
            HEADER[1],
            f"expected groups of 5 numbers "
            f"(confidence x y width height), got {len(tokens)} numbers",
        )
    values = []
    for t in tokens:
        try:
            v = float(t)
        except ValueError:
            raise CsvValidationError(path, line, HEADER[1], f"not a number: {t!r}") from None
        if not math.isfinite(v):
            raise CsvValidationError(path, line, HEADER[1], f"not a finite number: {t!r}")
        values.append(v)
    for k in range(0, len(values), 5):
        conf, _, _, w, h = values[k : k + 5]
        if not 0.0 <= conf <= 1.0:
            raise CsvValidationError(path, line, HEADER[1], f"confidence {conf} is not in [0, 1]")
        if w <= 0 or h <= 0:
            raise CsvValidationError(
                path,
                line,
                HEADER[1],
                f"box {k // 5 + 1} has width {w} and height {h}; both must be > 0",
            )
    return len(values) // 5


def validate_submission(path: str | Path, expected_ids: Iterable[str] | None = None) -> int:
    """Check a submission file against the challenge's format.

    Header exactly ``patientId,PredictionString``; two fields per row; ids non-empty and
    unique; each prediction string empty or groups of five finite numbers with the confidence
    in [0, 1] and width and height > 0; with ``expected_ids``, exactly those ids.

    Returns:
        The number of rows.

    Raises:
        CsvValidationError: Naming the file, line and column of the first problem.
    """
    path = Path(path)
    if not path.is_file():
        raise CsvValidationError(path, None, None, "submission file not found")
    seen: set[str] = set()
    with path.open(newline="", encoding="utf-8") as fh:
        reader = csv.reader(fh)
        header = next(reader, None)
        if header is None or tuple(header) != HEADER:
            raise CsvValidationError(
                path, 1, None, f"header must be {','.join(HEADER)!r}, got {header!r}"
            )
        for row in reader:
            line = reader.line_num
            if len(row) != 2:
                raise CsvValidationError(path, line, None, f"expected 2 fields, got {len(row)}")
            pid, pred = row
            if not pid.strip():
                raise CsvValidationError(path, line, HEADER[0], "empty patientId")
            if pid in seen:
                raise CsvValidationError(path, line, HEADER[0], f"duplicate patientId {pid!r}")
            seen.add(pid)
            _parse_prediction(path, line, pred)
    if expected_ids is not None:
        expected = set(expected_ids)
        missing, extra = expected - seen, seen - expected
        if missing or extra:
            what = []
            if missing:
                what.append(f"{len(missing)} expected ids missing (e.g. {sorted(missing)[0]!r})")
            if extra:
                what.append(f"{len(extra)} unexpected ids (e.g. {sorted(extra)[0]!r})")
            raise CsvValidationError(path, None, HEADER[0], "; ".join(what))
    return len(seen)
