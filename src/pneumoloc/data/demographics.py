"""Patient sex and age band of a DICOM, for reports by subgroup (aggregated only).

The cache records them per image at prepare time (``index.csv`` columns ``sex`` and
``age_band``, beside ``view``): coarse groups only, never the age itself, and only inside the
cache. ``evaluate`` reports metrics per group, never a group per image
(:mod:`pneumoloc.metrics.subgroups`).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

__all__ = [
    "AGE_BANDS",
    "SUBGROUP_COLUMNS",
    "UNKNOWN",
    "age_band",
    "dicom_demographics",
    "sex_group",
    "subgroup_columns",
]

UNKNOWN = "unknown"
"""The group of images whose tag is missing, empty or unreadable (or that are not DICOM)."""

AGE_BANDS: tuple[tuple[int, str], ...] = (
    (18, "0-17"),
    (40, "18-39"),
    (60, "40-59"),
    (80, "60-79"),
    (10**6, "80+"),
)
"""(upper bound in years, exclusive; band name), youngest first."""

SUBGROUP_COLUMNS = ("view", "sex", "age_band")
"""Cache index columns that hold the subgroup of each image."""

_AGE = re.compile(r"^(\d{1,3})([DWMY]?)$")
_UNIT_YEARS = {"D": 1 / 365.25, "W": 7 / 365.25, "M": 1 / 12, "Y": 1.0, "": 1.0}


def age_band(value: Any) -> str:
    """The band of a DICOM Age String ("051Y", "007M") or a bare number of years ("51").

    Returns:
        One of the :data:`AGE_BANDS` names, or :data:`UNKNOWN`.
    """
    match = _AGE.match(str(value or "").strip().upper())
    if not match:
        return UNKNOWN
    years = int(match.group(1)) * _UNIT_YEARS[match.group(2)]
    if years > 130:
        return UNKNOWN
    return next(name for bound, name in AGE_BANDS if years < bound)


def sex_group(value: Any) -> str:
    """DICOM PatientSex as "F", "M" or "O"; anything else :data:`UNKNOWN`."""
    text = str(value or "").strip().upper()
    return text if text in ("F", "M", "O") else UNKNOWN


def dicom_demographics(path: str | Path) -> dict[str, str]:
    """``{"sex": ..., "age_band": ...}`` of a DICOM file, from two header elements.

    Never raises: a file that is not DICOM, or whose tags are unreadable, is :data:`UNKNOWN`.
    """
    import pydicom

    try:
        ds = pydicom.dcmread(
            str(path),
            stop_before_pixels=True,
            specific_tags=["PatientSex", "PatientAge"],
        )
        sex, age = ds.get("PatientSex"), ds.get("PatientAge")
    except Exception:  # not DICOM (PNG, JPEG) or a malformed header: no group
        return {"sex": UNKNOWN, "age_band": UNKNOWN}
    return {"sex": sex_group(sex), "age_band": age_band(age)}


def subgroup_columns(table: Any, rows: Sequence[int] | np.ndarray) -> dict[str, np.ndarray]:
    """The subgroups of ``rows`` of a cache index (a DataFrame): view, sex and age band.

    A cache prepared before sex and age band were recorded lacks those columns: they are then
    read from the files' headers (``path``), for these rows only.
    """
    rows = np.asarray(rows, dtype=np.int64)
    out: dict[str, np.ndarray] = {}
    if "view" in table.columns:
        views = table["view"].fillna("").astype(str).str.strip().str.upper().to_numpy()[rows]
        out["view"] = np.array([v or UNKNOWN for v in views], dtype=object)
    missing = [c for c in ("sex", "age_band") if c not in table.columns]
    if missing and "path" in table.columns:
        read = [dicom_demographics(p) for p in table["path"].astype(str).to_numpy()[rows]]
        for column in missing:
            out[column] = np.array([r[column] for r in read], dtype=object)
    for column in ("sex", "age_band"):
        if column in table.columns:
            values = table[column].fillna("").astype(str).to_numpy()[rows]
            out[column] = np.array([v or UNKNOWN for v in values], dtype=object)
    return out
