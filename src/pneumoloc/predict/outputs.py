"""What ``predict`` writes: per image a JSON record and an overlay, per run ``summary.csv``.

Every output goes through :func:`_write_inside`: a temporary file in the output folder, moved
into place only when the target is a plain file name directly inside that folder. A
:class:`PredictRow` is one line of the summary, with the columns of :data:`SUMMARY_COLUMNS`.
"""

from __future__ import annotations

import csv
import io
import json
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from pneumoloc.predict.inputs import InputFile, ReadResult

if TYPE_CHECKING:
    from pneumoloc.inference import BasePredictor, Prediction
    from pneumoloc.inference.input_check import InputCheckResult

__all__ = [
    "STATUS_FAILED",
    "STATUS_OK",
    "STATUS_REFUSED",
    "SUMMARY_COLUMNS",
    "SUMMARY_NAME",
    "PredictRow",
]

SUMMARY_NAME = "summary.csv"
SUMMARY_COLUMNS = ("id", "source", "probability", "decision", "n_boxes", "status", "error")
STATUS_OK = "ok"
STATUS_FAILED = "failed"
STATUS_REFUSED = "refused"  # read, but not a frontal chest radiograph: no probability shown


@dataclass(frozen=True)
class PredictRow:
    """One line of ``summary.csv``.

    Attributes:
        id: Output id (file names ``<id>.json`` and ``<id>.png``).
        source: The sanitised relative input path.
        probability: Of pneumonia (None when failed).
        decision: ``"pneumonia"`` or ``"no pneumonia"`` (None when failed).
        n_boxes: Boxes predicted (None when failed).
        status: ``"ok"``, ``"failed"`` (unreadable) or ``"refused"`` (the input check says it
            is not a frontal chest radiograph; no probability is given).
        error: Why it failed or was refused, else "".
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


# --------------------------------------------------------------------------------------
# Safe output paths
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


# --------------------------------------------------------------------------------------
# Records, overlays and the summary
# --------------------------------------------------------------------------------------


def _png_bytes(rgb: np.ndarray) -> bytes:
    # No text chunks: nothing but pixels leaves through the PNG. Encoding was the overlay's
    # largest cost (noisy radiographs compress poorly): pneumoloc.io.png, ISA-L level 1.
    from pneumoloc.io.png import encode_png

    return encode_png(rgb)


def _write_outputs(
    out: Path,
    image_id: str,
    item: InputFile,
    prediction: Prediction,
    read: ReadResult,
    predictor: BasePredictor,
    overlays: bool,
    dicom_out: Path | None = None,
    input_check: InputCheckResult | None = None,
) -> PredictRow:
    """Write the JSON record (and overlay, and DICOM results into ``dicom_out`` for a DICOM
    input) of one prediction; return its summary row. ``input_check`` (the image passed it)
    goes into the record."""
    from pneumoloc.inference import prediction_record
    from pneumoloc.report.overlay import prediction_overlay

    record: dict[str, Any] = {"id": image_id, "source": item.source}
    record.update(prediction_record(prediction, predictor, image_id=image_id))
    record["backend"] = predictor.backend
    if input_check is not None:
        record["input_check"] = input_check.to_dict()
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
        if dicom_out is not None:
            from pneumoloc.predict.dicom_out import dicom_result_files

            files = dicom_result_files(image_id, item.path, prediction, read.display, predictor)
            for name, data in files:
                _write_inside(dicom_out, name, data)
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


def _write_refused(
    out: Path,
    image_id: str,
    item: InputFile,
    verdict: InputCheckResult,
    read: ReadResult,
    predictor: BasePredictor,
) -> PredictRow:
    """The record of an image the input check refused: the reasons, and no probability, no
    decision, no boxes and no overlay (nothing that could be read as a finding)."""
    from pneumoloc import DISCLAIMER, __version__

    record: dict[str, Any] = {
        "id": image_id,
        "source": item.source,
        "status": STATUS_REFUSED,
        "refused": verdict.reason,
        "input_check": verdict.to_dict(),
        "image_height": read.original_shape[0],
        "image_width": read.original_shape[1],
        "model_id": predictor.model_id,
        "pneumoloc_version": __version__,
        "backend": predictor.backend,
        "disclaimer": DISCLAIMER,
    }
    if read.identifiers is not None:
        record["dicom_identifiers"] = read.identifiers
    try:
        json_path = _write_inside(
            out, f"{image_id}.json", (json.dumps(record, indent=2) + "\n").encode("utf-8")
        )
    except _UnsafeOutputError as exc:
        return PredictRow(image_id, item.source, status=STATUS_FAILED, error=str(exc))
    return PredictRow(
        image_id, item.source, status=STATUS_REFUSED, error=verdict.reason, json_path=json_path
    )


def _write_summary(out: Path, rows: Sequence[PredictRow]) -> Path:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(SUMMARY_COLUMNS)
    writer.writerows(r.csv_fields() for r in rows)
    return _write_inside(out, SUMMARY_NAME, buffer.getvalue().encode("utf-8"))
