"""DICOM results for a PACS: a Structured Report and a Secondary Capture per analysed image.

Written with highdicom (``pneumoloc[pacs]``), for ``predict --dicom-out`` and ``pneumoloc listen``:

* :func:`structured_report`: a Comprehensive SR holding a TID 1500 Measurement Report: one
  image-level measurement group (TID 1501: the probability, the decision at the threshold, the
  threshold, a reference to the source image) and one planar ROI group (TID 1410) per box, its
  region a closed SCOORD POLYLINE in the source image's pixels with the box's confidence; the
  model is the device observer and the algorithm (TID 4019: model id, version, settings) of
  every group; the research-use disclaimer is a TEXT item of the root container;
* :func:`secondary_capture`: an RGB Secondary Capture of the X-ray with the heatmap and boxes
  burned in (:func:`pneumoloc.report.overlay.prediction_overlay`), for viewers without SR.

Both belong to the source image's study: Study Instance UID and the patient and study modules
are copied from the source (:data:`COPIED_KEYWORDS`), with a new Series and SOP Instance UID
each. They are the one output of pneumoloc that carries identifiers, on purpose (that is how a
PACS files them); they are never logged, and no identifier reaches highdicom's own messages
(the patient attributes are copied after construction). docs/pacs.md shows the content tree.
"""

from __future__ import annotations

import io
import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from pneumoloc import DISCLAIMER, __version__
from pneumoloc.errors import PneumolocError

if TYPE_CHECKING:
    from pydicom.dataset import Dataset

    from pneumoloc.inference.base import BasePredictor
    from pneumoloc.inference.prediction import Prediction

__all__ = [
    "COPIED_KEYWORDS",
    "SCHEME",
    "SC_SERIES_NUMBER",
    "SR_SERIES_NUMBER",
    "DicomResultError",
    "DicomResults",
    "ModelInfo",
    "box_polyline",
    "check_source",
    "dataset_bytes",
    "dicom_results",
    "read_source_header",
    "result_summary",
    "secondary_capture",
    "structured_report",
]

SR_SERIES_NUMBER = 9901
"""Series Number of the SR series (a new series per analysed image)."""
SC_SERIES_NUMBER = 9902
"""Series Number of the Secondary Capture series."""
MANUFACTURER = "pneumoloc (research software)"
SCHEME = "99PNEUMOLOC"
"""Private coding scheme of the concepts DICOM has no code for (probability, threshold, ...)."""

COPIED_KEYWORDS = (
    # Patient module
    "PatientName",
    "PatientID",
    "IssuerOfPatientID",
    "PatientBirthDate",
    "PatientSex",
    # General Study module
    "StudyInstanceUID",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
    "StudyID",
    "AccessionNumber",
    "StudyDescription",
    # Patient Study module
    "PatientAge",
)
"""Copied from the source image into both objects when it has them (PatientAge normalised)."""

SR_SERIES_DESCRIPTION = "pneumoloc AI result (research use only)"
SC_SERIES_DESCRIPTION = "pneumoloc heatmap and boxes (research use only)"
SC_TITLE = "pneumoloc: research use only, not a diagnosis"


class DicomResultError(PneumolocError):
    """A source image lacks what a DICOM result needs (its UIDs), or highDICOM is missing."""


@dataclass(frozen=True)
class ModelInfo:
    """What produced a result, as the SR records it.

    Attributes:
        model_id: The model's short id (``BasePredictor.model_id``).
        version: The pneumoloc version that wrote the checkpoint.
        threshold: The decision threshold.
        parameters: ``name=value`` settings (CAM method, box rule, backend, ...).
    """

    model_id: str
    version: str
    threshold: float
    parameters: tuple[str, ...] = ()

    @classmethod
    def from_predictor(cls, predictor: BasePredictor) -> ModelInfo:
        """The model of a predictor: id, checkpoint version, threshold and recipe."""
        described = predictor.describe()
        keys = (
            "cam_method",
            "heatmap_source",
            "lung_mask",
            "refine",
            "box_gate",
            "box_source",
            "backend",
        )
        params = [f"{k}={described.get(k)}" for k in keys if k in described]
        rule = (described.get("box_config") or {}).get("rule")
        if rule:
            params.append(f"box_rule={rule}")
        params.append(f"pneumoloc={__version__}")
        return cls(
            model_id=predictor.model_id,
            version=str(predictor.meta.get("pneumoloc_version") or __version__),
            threshold=float(predictor.threshold),
            parameters=tuple(params),
        )


@dataclass(frozen=True)
class DicomResults:
    """The two objects written for one analysed image."""

    sr: Dataset
    sc: Dataset


def _hd() -> Any:
    """highdicom, its INFO messages (which quote the source's SOP Instance UIDs) left out
    unless the user configured its logger."""
    try:
        import highdicom
    except ImportError as exc:  # pragma: no cover - the extra is installed by `make install`
        raise DicomResultError(
            "DICOM results need highdicom: pip install 'pneumoloc[pacs]'"
        ) from exc
    hd_logger = logging.getLogger("highdicom")
    if hd_logger.level == logging.NOTSET:
        hd_logger.setLevel(logging.WARNING)
    return highdicom


def read_source_header(source: str | Path | bytes) -> Dataset:
    """The source DICOM's header (no pixel data), from a path or the file's bytes.

    Raises:
        DicomResultError: It is not a DICOM, or lacks a UID a result must reference.
    """
    import pydicom

    fp: Any = io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else str(source)
    try:
        ds = pydicom.dcmread(fp, stop_before_pixels=True, force=True)
    except Exception as exc:
        raise DicomResultError(f"not a readable DICOM header ({type(exc).__name__})") from None
    check_source(ds)
    return ds


def check_source(ds: Dataset) -> None:
    """Raise :class:`DicomResultError` unless ``ds`` has the UIDs a result refers to."""
    for keyword in _REFERENCE_KEYWORDS:
        if not str(ds.get(keyword, "") or "").strip():
            raise DicomResultError(f"the source DICOM has no {keyword}; no result can refer to it")


_REFERENCE_KEYWORDS = ("SOPClassUID", "SOPInstanceUID", "SeriesInstanceUID", "StudyInstanceUID")


def _evidence(source: Dataset) -> Dataset:
    """The source's UIDs alone, with empty patient and study attributes.

    highdicom copies (and checks, in messages that quote them) the patient attributes of the
    evidence; it gets none, and :func:`_copy_patient_and_study` copies them afterwards.
    """
    from pydicom.dataset import Dataset as PydicomDataset

    ds = PydicomDataset()
    for keyword in _REFERENCE_KEYWORDS:
        setattr(ds, keyword, source.get(keyword))
    for keyword in (
        "PatientID",
        "PatientName",
        "PatientBirthDate",
        "PatientSex",
        "AccessionNumber",
        "StudyID",
        "StudyDate",
        "StudyTime",
        "ReferringPhysicianName",
    ):
        setattr(ds, keyword, None)
    return ds


_AGE = re.compile(r"^\d{3}[DWMY]$")


def _age(value: Any) -> str | None:
    """A valid Age String: "051Y" as is, a bare number of years ("51") as "051Y", else None."""
    text = str(value or "").strip().upper()
    if _AGE.match(text):
        return text
    if text.isdigit() and int(text) <= 999:
        return f"{int(text):03d}Y"
    return None


def _copy_patient_and_study(source: Dataset, target: Dataset) -> None:
    """Copy :data:`COPIED_KEYWORDS` (and the character set) from ``source`` to ``target``."""
    if "SpecificCharacterSet" in source:
        target.SpecificCharacterSet = source.SpecificCharacterSet
    for keyword in COPIED_KEYWORDS:
        if keyword not in source:
            continue
        value = source.get(keyword)
        if keyword == "PatientAge":
            value = _age(value)
            if value is None:  # not an Age String and not a bare number: left out
                if keyword in target:
                    del target[keyword]
                continue
        setattr(target, keyword, value if value is not None else "")


def _codes() -> dict[str, Any]:
    from highdicom.sr import CodedConcept

    return {
        "pneumonia": CodedConcept("233604007", "SCT", "Pneumonia"),
        "yes": CodedConcept("373066001", "SCT", "Yes"),
        "no": CodedConcept("373067005", "SCT", "No"),
        "chest_xray": CodedConcept("399208008", "SCT", "Plain chest X-ray"),
        "comment": CodedConcept("121106", "DCM", "Comment"),
        "probability": CodedConcept("PNL001", SCHEME, "Probability of pneumonia"),
        "threshold": CodedConcept("PNL002", SCHEME, "Decision threshold"),
        "confidence": CodedConcept("PNL003", SCHEME, "Region confidence"),
        "unitless": CodedConcept("1", "UCUM", "no units"),
    }


def _coding_schemes() -> list[Any]:
    from highdicom.coding_schemes import CodingSchemeIdentificationItem

    return [
        CodingSchemeIdentificationItem(
            designator=SCHEME, name="pneumoloc concepts", responsible_organization="pneumoloc"
        )
    ]


def box_polyline(box: Any) -> np.ndarray:
    """A box (x, y, width, height) as a closed 5-point polyline (column, row) in image pixels.

    DICOM SCOORD puts (0, 0) at the top-left corner of the top-left pixel, as the boxes do.
    """
    x, y, w, h = (float(v) for v in box)
    return np.array([[x, y], [x + w, y], [x + w, y + h], [x, y + h], [x, y]], dtype=np.float32)


def structured_report(
    source: Dataset,
    prediction: Prediction,
    model: ModelInfo,
    *,
    series_instance_uid: str | None = None,
    sop_instance_uid: str | None = None,
) -> Dataset:
    """The Comprehensive SR (TID 1500) of one prediction on ``source`` (a DICOM header).

    Raises:
        DicomResultError: ``source`` lacks a UID the report must reference.
    """
    check_source(source)
    hd = _hd()
    sr = hd.sr
    from pydicom.sr.codedict import codes as dcm_codes

    c = _codes()
    algorithm = sr.AlgorithmIdentification(
        name=model.model_id[:64], version=model.version[:64], parameters=list(model.parameters)
    )
    unitless = c["unitless"]
    image_group = sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=sr.TrackingIdentifier(uid=hd.UID(), identifier="image-level result"),
        finding_type=c["pneumonia"],
        algorithm_id=algorithm,
        measurements=[
            sr.Measurement(name=c["probability"], value=prediction.probability, unit=unitless),
            sr.Measurement(name=c["threshold"], value=prediction.threshold, unit=unitless),
        ],
        qualitative_evaluations=[
            sr.QualitativeEvaluation(c["pneumonia"], c["yes"] if prediction.positive else c["no"])
        ],
        source_images=[sr.SourceImageForMeasurementGroup.from_source_image(source)],
    )
    groups: list[Any] = [image_group]
    boxes = prediction.boxes
    for i, (box, score) in enumerate(zip(boxes.boxes, boxes.scores, strict=True)):
        region = sr.ImageRegion(
            graphic_type=sr.GraphicTypeValues.POLYLINE,
            graphic_data=box_polyline(box),
            source_image=sr.SourceImageForRegion.from_source_image(source),
        )
        groups.append(
            sr.PlanarROIMeasurementsAndQualitativeEvaluations(
                tracking_identifier=sr.TrackingIdentifier(uid=hd.UID(), identifier=f"box {i + 1}"),
                referenced_region=region,
                finding_type=c["pneumonia"],
                algorithm_id=algorithm,
                measurements=[
                    sr.Measurement(name=c["confidence"], value=float(score), unit=unitless)
                ],
            )
        )
    observer = sr.ObserverContext(
        observer_type=dcm_codes.DCM.Device,
        observer_identifying_attributes=sr.DeviceObserverIdentifyingAttributes(
            uid=_device_uid(model.model_id),
            name="pneumoloc",
            manufacturer_name=MANUFACTURER,
            model_name=model.model_id[:64],
        ),
    )
    report = sr.MeasurementReport(
        observation_context=sr.ObservationContext(observer_device_context=observer),
        procedure_reported=c["chest_xray"],
        imaging_measurements=groups,
    )
    root = report[0]
    root.ContentSequence.append(
        sr.TextContentItem(
            name=c["comment"],
            value=DISCLAIMER,
            relationship_type=sr.RelationshipTypeValues.CONTAINS,
        )
    )
    ds = sr.ComprehensiveSR(
        evidence=[_evidence(source)],
        content=root,
        series_instance_uid=series_instance_uid or hd.UID(),
        series_number=SR_SERIES_NUMBER,
        sop_instance_uid=sop_instance_uid or hd.UID(),
        instance_number=1,
        manufacturer=MANUFACTURER,
        is_complete=True,
        is_final=False,
        is_verified=False,
        series_description=SR_SERIES_DESCRIPTION,
        coding_schemes=_coding_schemes(),
        software_versions=__version__,
        manufacturer_model_name=model.model_id[:64],
    )
    _copy_patient_and_study(source, ds)
    return ds


def _device_uid(model_id: str) -> str:
    """A UID of the model, the same on every run (``2.25`` + a hash of its id)."""
    from pydicom.uid import generate_uid

    return str(generate_uid(prefix=None, entropy_srcs=["pneumoloc", model_id]))


def secondary_capture(
    source: Dataset,
    prediction: Prediction,
    display: np.ndarray,
    *,
    series_instance_uid: str | None = None,
    sop_instance_uid: str | None = None,
) -> Dataset:
    """An RGB Secondary Capture of the heatmap and boxes over ``display`` (the X-ray, uint8).

    Raises:
        DicomResultError: ``source`` lacks a UID the image must reference.
    """
    check_source(source)
    hd = _hd()
    from pydicom.dataset import Dataset as PydicomDataset
    from pydicom.sequence import Sequence
    from pydicom.uid import ExplicitVRLittleEndian

    from pneumoloc.report.overlay import prediction_overlay

    rgb = np.ascontiguousarray(prediction_overlay(prediction, display, title=SC_TITLE))
    ds = hd.sc.SCImage(
        pixel_array=rgb,
        photometric_interpretation="RGB",
        bits_allocated=8,
        coordinate_system="PATIENT",
        study_instance_uid=str(source.StudyInstanceUID),
        series_instance_uid=series_instance_uid or hd.UID(),
        series_number=SC_SERIES_NUMBER,
        sop_instance_uid=sop_instance_uid or hd.UID(),
        instance_number=1,
        manufacturer=MANUFACTURER,
        # Required by highdicom for the PATIENT coordinate system; replaced just below by the
        # source's own value (often empty): the picture is not re-oriented, only annotated.
        patient_orientation=("L", "F"),
        transfer_syntax_uid=ExplicitVRLittleEndian,
        series_description=SC_SERIES_DESCRIPTION,
        software_versions=__version__,
    )
    ds.PatientOrientation = source.get("PatientOrientation", "") or ""
    _copy_patient_and_study(source, ds)
    if "Modality" in source:
        ds.Modality = source.Modality
    if "BodyPartExamined" in source:
        ds.BodyPartExamined = source.BodyPartExamined
    ds.ConversionType = "WSD"  # workstation: drawn by software, not digitised
    ds.BurnedInAnnotation = "YES"
    ds.ImageComments = DISCLAIMER
    ds.DerivationDescription = "pneumoloc heatmap and predicted boxes burned into the X-ray"
    ref = PydicomDataset()
    ref.ReferencedSOPClassUID = source.SOPClassUID
    ref.ReferencedSOPInstanceUID = source.SOPInstanceUID
    ds.SourceImageSequence = Sequence([ref])
    return ds


def dicom_results(
    source: Dataset, prediction: Prediction, display: np.ndarray, model: ModelInfo
) -> DicomResults:
    """The SR and the Secondary Capture of one prediction on ``source``."""
    return DicomResults(
        sr=structured_report(source, prediction, model),
        sc=secondary_capture(source, prediction, display),
    )


def dataset_bytes(ds: Dataset) -> bytes:
    """A DICOM file (preamble, file meta, data set) as bytes."""
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def result_summary(ds: Dataset) -> Mapping[str, Any]:
    """Probability, decision, threshold, boxes and model of an SR this module wrote.

    Read back with highdicom; for tests and for checking what a PACS holds. No identifier
    is returned except the referenced source SOP Instance UID.
    """
    hd = _hd()
    c = _codes()
    document = hd.sr.ComprehensiveSR.from_dataset(ds, copy=True)
    content = document.content
    image_groups = content.get_image_measurement_groups()
    if len(image_groups) != 1:
        raise DicomResultError(f"expected one image-level group, found {len(image_groups)}")
    group = image_groups[0]

    def value(g: Any, concept: Any) -> float:
        found = g.get_measurements(name=concept)
        if len(found) != 1:
            raise DicomResultError(f"expected one {concept.meaning!r} measurement")
        return float(found[0].value)

    (decision,) = group.get_qualitative_evaluations(name=c["pneumonia"])
    boxes = []
    for roi in content.get_planar_roi_measurement_groups():
        points = np.asarray(roi.roi.value, dtype=np.float64)
        x0, y0 = points.min(axis=0)
        x1, y1 = points.max(axis=0)
        boxes.append(
            {
                "x": float(x0),
                "y": float(y0),
                "width": float(x1 - x0),
                "height": float(y1 - y0),
                "confidence": value(roi, c["confidence"]),
                "referenced_sop_instance_uid": str(
                    roi.roi.ContentSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID
                ),
            }
        )
    return {
        "probability": value(group, c["probability"]),
        "threshold": value(group, c["threshold"]),
        "decision": "pneumonia" if decision.value == c["yes"] else "no pneumonia",
        "boxes": boxes,
        "referenced_sop_instance_uid": str(group.source_images[0].referenced_sop_instance_uid),
        "model_id": str(ds.get("ManufacturerModelName", "")),
    }
