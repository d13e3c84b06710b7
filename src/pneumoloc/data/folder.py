"""A folder of labelled X-rays: ``NORMAL/`` and ``PNEUMONIA/`` sub-folders (the Kermany layout).

Patient ids are parsed from the Kermany file names so that splits are by patient:
``person123_bacteria_456.jpeg`` -> ``person123``; ``IM-0115-0001.jpeg`` -> ``IM-0115``;
``NORMAL2-IM-1427-0001.jpeg`` -> ``NORMAL2-IM-1427``. Other names are their own patient.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

from pneumoloc.data.files import list_images, warn_listing
from pneumoloc.data.records import DatasetIndex, XrayRecord
from pneumoloc.errors import DataError

logger = logging.getLogger(__name__)

CLASS_FOLDERS = {"normal": 0, "pneumonia": 1}
_PERSON = re.compile(r"^(person\d+)_", re.IGNORECASE)
_IM = re.compile(r"^((?:NORMAL2-)?IM-\d+)-\d+", re.IGNORECASE)


def patient_from_filename(name: str) -> str:
    """The patient a Kermany-style file name belongs to (the stem itself when unknown)."""
    stem = Path(name).stem
    for pattern in (_PERSON, _IM):
        match = pattern.match(stem)
        if match:
            return match.group(1)
    return stem


def _class_dirs(root: Path) -> dict[int, Path]:
    found: dict[int, Path] = {}
    if root.is_dir():
        for child in root.iterdir():
            label = CLASS_FOLDERS.get(child.name.lower())
            if child.is_dir() and label is not None:
                found[label] = child
    return found


def is_folder_layout(root: str | Path) -> bool:
    """Whether a folder has NORMAL/ and/or PNEUMONIA/ sub-folders."""
    return bool(_class_dirs(Path(root)))


def index_folder(root: str | Path) -> DatasetIndex:
    """Index a NORMAL/PNEUMONIA folder (recursively inside each class folder).

    Files are listed by :func:`pneumoloc.data.files.list_images`: hidden ones are left out
    (with a warning), broken links are kept so that they get a failed row.

    Raises:
        DataError: If neither class folder exists.
    """
    root = Path(root)
    dirs = _class_dirs(root)
    if not dirs:
        raise DataError(f"{root}: expected NORMAL/ and PNEUMONIA/ sub-folders")
    records = []
    for label, folder in sorted(dirs.items()):
        listing = list_images(folder)
        warn_listing(listing, str(folder))
        for path in listing.files:
            records.append(
                XrayRecord(
                    image_id=path.relative_to(root).as_posix(),
                    patient_id=patient_from_filename(path.name),
                    label=label,
                    path=path,
                    detail=folder.name,
                )
            )
    index = DatasetIndex(kind="folder", root=root, records=records, has_boxes=False)
    logger.info(index.summary())
    return index


UNLABELLED = -1
"""The label of an image nobody labelled (an unlabelled cache's rows)."""


def index_unlabelled(root: str | Path) -> DatasetIndex:
    """Index every supported image under ``root`` (recursively) as unlabelled.

    For semi-supervised training: the records carry label :data:`UNLABELLED` and each file is its
    own patient (RSNA DICOMs are named by patientId). No box is read.

    Raises:
        DataError: The folder does not exist or holds no supported image.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: no such folder")
    listing = list_images(root)
    warn_listing(listing, str(root))
    records = [
        XrayRecord(
            image_id=path.relative_to(root).as_posix(),
            patient_id=path.stem,
            label=UNLABELLED,
            path=path,
        )
        for path in listing.files
    ]
    if not records:
        raise DataError(f"{root}: no DICOM, PNG or JPEG images found")
    index = DatasetIndex(kind="unlabelled", root=root, records=records, has_boxes=False)
    logger.info("unlabelled data at %s: %d images", root, len(records))
    return index


def index_data(root: str | Path) -> DatasetIndex:
    """Index any supported data folder: the RSNA layout or a NORMAL/PNEUMONIA folder."""
    from pneumoloc.data.rsna import index_rsna, is_rsna_layout

    root = Path(root)
    if not root.exists():
        raise DataError(f"{root}: no such folder")
    if is_rsna_layout(root):
        return index_rsna(root)
    if is_folder_layout(root):
        return index_folder(root)
    raise DataError(
        f"{root}: not a data folder pneumoloc knows: expected the RSNA Kaggle layout "
        "(stage_2_train_labels.csv + stage_2_train_images/) or NORMAL/ and PNEUMONIA/ sub-folders"
    )
