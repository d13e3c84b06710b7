"""``predict --dicom-out DIR``: a Structured Report and a Secondary Capture per DICOM input.

Made by :mod:`pneumoloc.report.dicom`; ``predict.outputs`` writes them into ``DIR`` as
``<id>.sr.dcm`` and ``<id>.sc.dcm`` (the same ids as the JSON records), through the same safe
writer as every other output.
Inputs that are not DICOM get none. These files carry the source's patient and study
identifiers, on purpose (a PACS files them by those); nothing else ``predict`` writes does,
and no identifier is ever logged.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from pneumoloc.inference import BasePredictor, Prediction

logger = logging.getLogger("pneumoloc.predict")

__all__ = ["dicom_result_files"]


def dicom_result_files(
    image_id: str,
    path: Path,
    prediction: Prediction,
    display: np.ndarray | None,
    predictor: BasePredictor,
) -> list[tuple[str, bytes]]:
    """The SR and SC of one prediction as (file name, bytes); none (and a debug line) for a
    non-DICOM input or one without the UIDs a result must refer to (a warning)."""
    import pydicom

    from pneumoloc.report.dicom import (
        DicomResultError,
        ModelInfo,
        dataset_bytes,
        dicom_results,
        read_source_header,
    )

    if display is None or not pydicom.misc.is_dicom(str(path)):
        logger.debug("%s: not a DICOM file, no DICOM results", image_id)
        return []
    try:
        results = dicom_results(
            read_source_header(path), prediction, display, ModelInfo.from_predictor(predictor)
        )
    except DicomResultError as exc:
        logger.warning("%s: no DICOM results: %s", image_id, exc)
        return []
    return [
        (f"{image_id}.sr.dcm", dataset_bytes(results.sr)),
        (f"{image_id}.sc.dcm", dataset_bytes(results.sc)),
    ]
