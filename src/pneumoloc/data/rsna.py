"""The RSNA Pneumonia Detection Challenge layout (Kaggle): DICOMs plus labels CSVs.

``stage_2_train_labels.csv`` has one row per box (positives) or one empty row (negatives);
``stage_2_detailed_class_info.csv`` adds a finer class. Both are validated line by line with the
standard ``csv`` module so that an error names the file, the line and the column (pandas would
give a faster parse but loses the line numbers we promise in errors).
"""

from __future__ import annotations

import codecs
import csv
import io
import logging
import math
from collections import defaultdict
from pathlib import Path

import numpy as np

from pneumoloc.data.files import list_images, warn_listing
from pneumoloc.data.records import DatasetIndex, XrayRecord, empty_boxes
from pneumoloc.errors import CsvValidationError, DataError

logger = logging.getLogger(__name__)

LABELS_CSV = "stage_2_train_labels.csv"
CLASS_INFO_CSV = "stage_2_detailed_class_info.csv"
IMAGES_DIR = "stage_2_train_images"
LABEL_COLUMNS = ("patientId", "x", "y", "width", "height", "Target")
BOX_COLUMNS = ("x", "y", "width", "height")
MAX_BOX_COORDINATE = 100_000.0
"""Largest box coordinate or side accepted, in pixels: no radiograph is that large (the
readers refuse images over 64 megapixels, 8,000 px a side), so a larger value is an error."""

# Byte-order marks, longest first (the UTF-32 LE mark starts with the UTF-16 LE one).
_BOMS = (
    (codecs.BOM_UTF32_LE, "utf-32"),
    (codecs.BOM_UTF32_BE, "utf-32"),
    (codecs.BOM_UTF8, "utf-8-sig"),
    (codecs.BOM_UTF16_LE, "utf-16"),
    (codecs.BOM_UTF16_BE, "utf-16"),
)


def read_csv_text(path: Path) -> str:
    """The text of a CSV file: UTF-8, or UTF-8/16/32 with a byte-order mark.

    Raises:
        CsvValidationError: The file is in another encoding (Latin-1, UTF-16 without a mark,
            ...); the message names the file, the line and what to do.
    """
    data = path.read_bytes()
    for bom, encoding in _BOMS:
        if data.startswith(bom):
            try:
                return data.decode(encoding)
            except UnicodeDecodeError as exc:
                raise CsvValidationError(
                    path,
                    None,
                    None,
                    f"starts with a {encoding.upper()} byte-order mark but is not valid "
                    f"{encoding.upper()} ({exc.reason} at byte {exc.start}); save it as UTF-8",
                ) from None
    head = data[:200]
    if head and head.count(0) >= len(head) // 4:
        raise CsvValidationError(
            path,
            None,
            None,
            "looks like UTF-16 text without a byte-order mark (every other byte is zero); "
            "save it as UTF-8 (or UTF-16 with a byte-order mark)",
        )
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise CsvValidationError(
            path,
            line,
            None,
            f"not UTF-8 text (byte 0x{data[exc.start]:02x} cannot be UTF-8); the file may be "
            "Latin-1 or Windows-1252: save it as UTF-8",
        ) from None


def _parse_float(path: Path, line: int, column: str, text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise CsvValidationError(path, line, column, f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise CsvValidationError(path, line, column, f"expected a finite number, got {text!r}")
    if abs(value) > MAX_BOX_COORDINATE:
        raise CsvValidationError(
            path,
            line,
            column,
            f"{text} is outside any image (box values must be at most {MAX_BOX_COORDINATE:g} px)",
        )
    return value


def read_rsna_labels(path: str | Path) -> dict[str, tuple[int, np.ndarray]]:
    """Read and validate ``stage_2_train_labels.csv``.

    Args:
        path: The labels file.

    A row repeated exactly (same patient, same box) is counted once, with a warning naming the
    first repeated line: a copy-paste must not double a patient's ground-truth boxes.

    Returns:
        patientId -> (label, boxes as an (N, 4) float32 xywh array), in file order.

    Raises:
        CsvValidationError: On a missing column, a bad value (a box value that is not finite
            or larger than any image), a file that is not UTF-8 (or UTF-16/32 with a
            byte-order mark), or a patient whose rows disagree.
        DataError: If the file does not exist.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: labels file not found")
    labels: dict[str, int] = {}
    boxes: dict[str, list[list[float]]] = defaultdict(list)
    seen_rows: set[tuple[str, tuple[float, ...]]] = set()
    duplicates: list[int] = []
    with io.StringIO(read_csv_text(path), newline="") as fh:
        reader = csv.reader(fh)
        try:
            header = next(reader)
        except StopIteration:
            raise CsvValidationError(path, 1, None, "the file is empty") from None
        header = [h.strip() for h in header]
        missing = [c for c in LABEL_COLUMNS if c not in header]
        if missing:
            raise CsvValidationError(
                path, 1, missing[0], f"missing column(s) {missing}; expected {list(LABEL_COLUMNS)}"
            )
        col = {name: header.index(name) for name in LABEL_COLUMNS}
        for line, row in enumerate(reader, start=2):
            if not row or all(not cell.strip() for cell in row):
                continue
            if len(row) < len(header):
                raise CsvValidationError(
                    path, line, None, f"expected {len(header)} fields, got {len(row)}"
                )
            pid = row[col["patientId"]].strip()
            if not pid:
                raise CsvValidationError(path, line, "patientId", "empty patientId")
            target_text = row[col["Target"]].strip()
            if target_text not in ("0", "1"):
                raise CsvValidationError(
                    path, line, "Target", f"expected 0 or 1, got {target_text!r}"
                )
            target = int(target_text)
            if pid in labels and labels[pid] != target:
                raise CsvValidationError(
                    path, line, "Target", f"patientId {pid!r} has rows with different Targets"
                )
            labels[pid] = target
            cells = {c: row[col[c]].strip() for c in BOX_COLUMNS}
            if target == 1:
                box = [_parse_float(path, line, c, cells[c]) for c in BOX_COLUMNS]
                if box[2] <= 0 or box[3] <= 0:
                    column = "width" if box[2] <= 0 else "height"
                    raise CsvValidationError(path, line, column, "box width and height must be > 0")
                if box[0] < 0 or box[1] < 0:
                    raise CsvValidationError(
                        path, line, "x" if box[0] < 0 else "y", "negative box origin"
                    )
                key = (pid, tuple(box))
                if key in seen_rows:
                    duplicates.append(line)
                    continue
                seen_rows.add(key)
                boxes[pid].append(box)
            else:
                filled = [c for c in BOX_COLUMNS if cells[c]]
                if filled:
                    raise CsvValidationError(
                        path, line, filled[0], "a Target 0 row must not carry a box"
                    )
    if duplicates:
        logger.warning(
            "%s: %d duplicated box row(s) ignored (the same patientId and box again; first at "
            "line %d)",
            path,
            len(duplicates),
            duplicates[0],
        )
    return {
        pid: (
            lab,
            np.asarray(boxes[pid], dtype=np.float32).reshape(-1, 4) if lab else empty_boxes(),
        )
        for pid, lab in labels.items()
    }


def read_class_info(path: str | Path) -> dict[str, str]:
    """Read ``stage_2_detailed_class_info.csv`` (patientId -> class), validated like the labels."""
    path = Path(path)
    classes: dict[str, str] = {}
    with io.StringIO(read_csv_text(path), newline="") as fh:
        reader = csv.reader(fh)
        header = [h.strip() for h in next(reader, [])]
        for needed in ("patientId", "class"):
            if needed not in header:
                raise CsvValidationError(path, 1, needed, "missing column")
        i_pid, i_cls = header.index("patientId"), header.index("class")
        for line, row in enumerate(reader, start=2):
            if not row:
                continue
            if len(row) <= max(i_pid, i_cls):
                raise CsvValidationError(path, line, None, f"expected {len(header)} fields")
            pid, cls = row[i_pid].strip(), row[i_cls].strip()
            if not pid:
                raise CsvValidationError(path, line, "patientId", "empty patientId")
            if not cls:
                raise CsvValidationError(path, line, "class", "empty class")
            classes[pid] = cls
    return classes


def is_rsna_layout(root: str | Path) -> bool:
    """Whether a folder holds the RSNA Kaggle layout (its labels file)."""
    return (Path(root) / LABELS_CSV).is_file()


def index_rsna(root: str | Path, *, images_dir: str = IMAGES_DIR) -> DatasetIndex:
    """Index an RSNA Kaggle-layout folder.

    Labelled images missing on disk are counted and reported (a partial download is normal),
    images without labels are reported; neither is fatal.

    Args:
        root: The folder holding ``stage_2_train_labels.csv`` and ``stage_2_train_images/``.
        images_dir: The images sub-folder.

    Raises:
        DataError: If there is no labels file or no images folder.
        CsvValidationError: If a CSV is malformed.
    """
    root = Path(root)
    labels = read_rsna_labels(root / LABELS_CSV)
    info_path = root / CLASS_INFO_CSV
    classes = read_class_info(info_path) if info_path.is_file() else {}
    image_root = root / images_dir
    if not image_root.is_dir():
        raise DataError(f"{image_root}: images folder not found (expected the Kaggle layout)")
    # DICOMs as Kaggle ships them; PNG/JPEG copies (a common conversion) are accepted too, with
    # boxes then in the pixel coordinates of those files. Hidden files are left out (with a
    # warning), broken links kept: they get a failed row (pneumoloc.data.files).
    listing = list_images(image_root, recursive=False)
    warn_listing(listing, str(image_root))
    on_disk = {p.stem: p for p in listing.files + listing.image_named_folders}
    records = [
        XrayRecord(
            image_id=pid,
            patient_id=pid,
            label=label,
            path=on_disk[pid],
            boxes=boxes,
            detail=classes.get(pid),
        )
        for pid, (label, boxes) in labels.items()
        if pid in on_disk
    ]
    missing = [pid for pid in labels if pid not in on_disk]
    unlabelled = [p for stem, p in on_disk.items() if stem not in labels]
    index = DatasetIndex(
        kind="rsna",
        root=root,
        records=records,
        missing=missing,
        unlabelled=unlabelled,
        has_boxes=True,
    )
    logger.info(index.summary())
    return index
