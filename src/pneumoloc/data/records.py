"""One record per X-ray image, whatever layout it came from."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

LABEL_NAMES = ("no_pneumonia", "pneumonia")

_SAFE_ID = re.compile(r"[^A-Za-z0-9._-]+")


def safe_name(value: str, *, max_len: int = 128, fallback: str = "unnamed") -> str:
    """Make a value read from a file (patientId, file name) safe to use as a file name.

    Keeps letters, digits, ``.``, ``_`` and ``-``; everything else becomes ``_``; leading dots
    are dropped so the result can never be ``..`` or a hidden file; never empty (``fallback``
    when nothing is left).
    """
    cleaned = _SAFE_ID.sub("_", value).lstrip(".")[:max_len]
    return cleaned or fallback


def empty_boxes() -> np.ndarray:
    """An empty (0, 4) array of xywh boxes."""
    return np.zeros((0, 4), dtype=np.float32)


@dataclass(frozen=True)
class XrayRecord:
    """One labelled image.

    Attributes:
        image_id: RSNA patientId, or the path relative to the data root for image folders.
        patient_id: Who the image belongs to; splits never put one patient in two parts.
        label: 1 for pneumonia, 0 otherwise.
        path: The file, or None when a labelled image is missing on disk.
        boxes: Ground-truth boxes (x, y, width, height) in original pixels. For evaluation only:
            the training datasets never receive them (see ``pneumoloc.data.datasets``).
        detail: Finer class when known (RSNA's "Normal", "No Lung Opacity / Not Normal", ...).
    """

    image_id: str
    patient_id: str
    label: int
    path: Path | None
    boxes: np.ndarray = field(default_factory=empty_boxes)
    detail: str | None = None


@dataclass
class DatasetIndex:
    """What a data folder holds, and what is wrong with it.

    Attributes:
        kind: "rsna" or "folder".
        root: The data folder.
        records: Labelled images present on disk.
        missing: image_ids that are labelled but have no image on disk.
        unlabelled: Paths of images on disk without a label.
        has_boxes: Whether the layout carries ground-truth boxes (RSNA does).
    """

    kind: str
    root: Path
    records: list[XrayRecord]
    missing: list[str] = field(default_factory=list)
    unlabelled: list[Path] = field(default_factory=list)
    has_boxes: bool = False

    def summary(self) -> str:
        """A one-paragraph, human-readable account of the index."""
        n_pos = sum(r.label for r in self.records)
        lines = [
            f"{self.kind} data at {self.root}: {len(self.records)} labelled images "
            f"({n_pos} pneumonia, {len(self.records) - n_pos} not)."
        ]
        if self.missing:
            lines.append(f"{len(self.missing)} labelled image ids have no image on disk (skipped).")
        if self.unlabelled:
            lines.append(f"{len(self.unlabelled)} images on disk have no label (skipped).")
        return " ".join(lines)
