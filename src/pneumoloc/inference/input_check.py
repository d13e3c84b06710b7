"""Is this a frontal chest radiograph? The check every image passes before a probability is shown.

A classifier scores anything it is given: a black square, noise or a photograph of a cat gets a
"probability of pneumonia" as confidently as a film does. So ``predict`` and ``serve`` first ask
four kinds of evidence, and refuse the image (no probability, no boxes, a reason) when any says
no:

* **DICOM tags**, where present (:func:`check_dicom_tags`): ``Modality`` must be a radiograph
  (CR, DX, DR, RG; others refused, OT/SC flagged), ``BodyPartExamined`` if filled in must name
  the chest, and a lateral ``ViewPosition`` (LL, RL, LAT, LATERAL) is refused;
* **image statistics**, always (:func:`image_statistics`): a blank or near-constant image, one
  with a handful of grey levels (binary, posterised), one dominated by pixel-to-pixel noise, or
  one without fine structure (a smooth gradient);
* **the frontal-film layout**, always (:mod:`pneumoloc.inference.layout`, learnt from real
  films): turned or inverted films, no mediastinum between two lung fields (lateral views),
  pictures not laid out like a chest film;
* **the network's features**, when the model has statistics of real films' features for its
  weights (:mod:`pneumoloc.inference.ood`, written by ``pneumoloc calibrate-ood``): beyond the
  threshold of every source of real films. A model without them (an ONNX export, a checkpoint
  never calibrated, a re-issued default) is checked on the other evidence, and the record says
  so (``"mode": "image-only"`` and a warning).

The label-free lung mask (:func:`pneumoloc.localise.lungs.estimate_lung_mask`) is not used: it
finds no lung field in more than 5% of the real Kermany films, so it cannot refuse, and it
would cost ~20 ms per image. How often each piece refuses which kind of image, and
which real films it takes: ``docs/input_check.md`` (``benchmarks/input_check_eval.py``).
"""

from __future__ import annotations

import functools
import io
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

from pneumoloc.errors import CheckpointError
from pneumoloc.inference.layout import LAYOUT_MODEL_PATH, LayoutModel
from pneumoloc.inference.ood import OodModel
from pneumoloc.io.preprocess import resize_square

logger = logging.getLogger(__name__)

__all__ = [
    "CHECK_SIZE",
    "DICOM_CHECK_TAGS",
    "InputCheck",
    "InputCheckResult",
    "check_dicom_tags",
    "default_layout_model",
    "image_statistics",
    "read_dicom_tags",
]

CHECK_SIZE = 128
"""Side of the square image the statistics are computed on (resized from the model input)."""

MIN_STD = 6.0
"""Below this standard deviation (grey levels of 255) an image is blank. Real films: >= 20."""

MIN_GREY_LEVELS = 40
"""Fewer distinct grey levels than this: binary or posterised, not a radiograph (real: >= 107)."""

MAX_NOISE_RATIO = 0.6
"""Mean |Laplacian| over the standard deviation above this: mostly noise (real films: <= 0.29)."""

MIN_STRUCTURE = 0.06
"""Below this share of the standard deviation in the middle spatial frequencies (difference
of Gaussian blurs of 3 and 8 px at 128 px) there are no ribs, vessels or edges: a smooth ramp
or blob (real films: >= 0.077)."""

RADIOGRAPH_MODALITIES = frozenset({"CR", "DX", "DR", "RG"})
FLAGGED_MODALITIES = frozenset({"OT", "SC", ""})
LATERAL_VIEWS = frozenset({"LL", "RL", "LAT", "LATERAL", "LLAT", "RLAT"})
FRONTAL_VIEWS = frozenset({"PA", "AP", ""})
_CHEST_WORDS = ("CHEST", "THORA", "TORAX", "TORACE", "LUNG", "PULM", "CXR", "POITRINE", "BRUST")

DICOM_CHECK_TAGS = ("Modality", "BodyPartExamined", "ViewPosition")
"""The DICOM keywords the check reads (none of them identifies a person)."""


@dataclass(frozen=True)
class InputCheckResult:
    """The verdict on one image.

    Attributes:
        accepted: True when nothing says it is not a frontal chest radiograph.
        reasons: Why it was refused (empty when accepted), each a sentence.
        warnings: What could not be checked or looks odd without refusing.
        evidence: The numbers and tags behind the verdict.
    """

    accepted: bool
    reasons: tuple[str, ...] = ()
    warnings: tuple[str, ...] = ()
    evidence: dict[str, Any] = field(default_factory=dict)

    @property
    def reason(self) -> str:
        """All reasons in one line ("" when accepted)."""
        return "; ".join(self.reasons)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: ``{"accepted", "reasons", "warnings", "evidence"}``."""
        return {
            "accepted": self.accepted,
            "reasons": list(self.reasons),
            "warnings": list(self.warnings),
            "evidence": self.evidence,
        }


# --------------------------------------------------------------------------------------
# DICOM tags
# --------------------------------------------------------------------------------------


def read_dicom_tags(source: str | Path | bytes) -> dict[str, str]:
    """The :data:`DICOM_CHECK_TAGS` a DICOM has, upper-cased (pixel data not read; {} when the
    file is not a readable DICOM)."""
    import pydicom

    try:
        fp: Any = io.BytesIO(source) if isinstance(source, bytes) else str(source)
        ds = pydicom.dcmread(
            fp, stop_before_pixels=True, force=True, specific_tags=list(DICOM_CHECK_TAGS)
        )
    except Exception as exc:  # the image itself was readable; a header quirk is no verdict
        logger.debug("DICOM tags not readable (%s)", type(exc).__name__)
        return {}
    tags = {}
    for keyword in DICOM_CHECK_TAGS:
        try:
            value = ds.get(keyword)
        except Exception:
            continue
        if value is not None:
            tags[keyword] = str(value).strip().upper()
    return tags


def check_dicom_tags(tags: Mapping[str, str]) -> tuple[list[str], list[str]]:
    """Reasons to refuse and warnings from a DICOM's Modality, BodyPartExamined, ViewPosition."""
    reasons: list[str] = []
    warnings: list[str] = []
    modality = tags.get("Modality")
    if modality is not None:
        if modality in FLAGGED_MODALITIES:
            warnings.append(
                f"DICOM Modality is {modality or 'empty'}: not a radiograph modality; the "
                "image evidence decides"
            )
        elif modality not in RADIOGRAPH_MODALITIES:
            reasons.append(
                f"DICOM Modality is {modality}, not a radiograph (CR, DX): pneumoloc reads chest "
                "X-rays only"
            )
    body = tags.get("BodyPartExamined")
    if body and not any(word in body for word in _CHEST_WORDS):
        reasons.append(f"DICOM BodyPartExamined is {body}, not the chest")
    view = tags.get("ViewPosition")
    if view is not None:
        if view in LATERAL_VIEWS:
            reasons.append(
                f"DICOM ViewPosition is {view}: a lateral view; pneumoloc reads frontal (PA/AP) "
                "films only"
            )
        elif view not in FRONTAL_VIEWS:
            warnings.append(f"DICOM ViewPosition is {view}: not PA or AP")
    return reasons, warnings


# --------------------------------------------------------------------------------------
# Image statistics
# --------------------------------------------------------------------------------------


def image_statistics(pixels: np.ndarray) -> dict[str, float]:
    """Blankness, grey levels, noise and fine structure of one uint8 image (H, W).

    Computed on a :data:`CHECK_SIZE` square resize, so the numbers do not depend on the
    model's input size.
    """
    small = resize_square(np.asarray(pixels, np.uint8), CHECK_SIZE)
    x = small.astype(np.float32)
    std = float(x.std())
    noise = float(np.abs(ndimage.laplace(x)).mean() / std) if std > 0 else 0.0
    band = ndimage.gaussian_filter(x, 3) - ndimage.gaussian_filter(x, 8)
    structure = float(band.std() / std) if std > 0 else 0.0
    return {
        "std": round(std, 3),
        "grey_levels": int(np.unique(small).size),
        "noise_ratio": round(noise, 4),
        "structure": round(structure, 4),
    }


def _statistics_reasons(stats: Mapping[str, float]) -> list[str]:
    if stats["std"] < MIN_STD:
        return [
            f"the image is blank or nearly so (grey-level spread {stats['std']:.1f} of 255): "
            "not a radiograph"
        ]
    reasons = []
    if stats["grey_levels"] < MIN_GREY_LEVELS:
        reasons.append(
            f"the image has only {int(stats['grey_levels'])} grey levels (binary or posterised): "
            "not a radiograph"
        )
    if stats["noise_ratio"] > MAX_NOISE_RATIO:
        reasons.append("the image is mostly pixel noise: not a radiograph")
    elif stats["structure"] < MIN_STRUCTURE:
        reasons.append(
            "the image has no fine structure (no ribs, vessels or edges): a smooth gradient or "
            "shape, not a radiograph"
        )
    return reasons


# --------------------------------------------------------------------------------------
# The check
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class InputCheck:
    """The input check of one model: DICOM tags, image statistics, the frontal-film layout
    and (when fitted for its weights) the distance of its features to real films'.

    Attributes:
        layout: The layout evidence (:class:`pneumoloc.inference.layout.LayoutModel`); None
            leaves it out (only when the shipped file is missing, with a warning).
        ood: Statistics of real films' features for this model's weights, or None (the check
            then uses the image evidence and tags only).
    """

    layout: LayoutModel | None = None
    ood: OodModel | None = None

    @classmethod
    def for_predictor(cls, predictor: Any) -> InputCheck:
        """The check for a loaded predictor: the shipped layout model, and the OOD statistics
        beside its checkpoint (or the ONNX file exported from it) when they were fitted for its
        weights (``predictor.weights_sha256``)."""
        from pneumoloc.inference.ood import legacy_ood_path, load_ood_model, ood_path

        ood = None
        checkpoint = predictor.meta.get("checkpoint_path")
        present = checkpoint and (
            ood_path(checkpoint).is_file() or legacy_ood_path(checkpoint).is_file()
        )
        if present and getattr(predictor, "weights_sha256", None):
            ood = load_ood_model(checkpoint, predictor.weights_sha256)
        return cls(layout=default_layout_model(), ood=ood)

    @property
    def mode(self) -> str:
        """``"features+image"`` with OOD statistics, else ``"image-only"``."""
        return "features+image" if self.ood is not None else "image-only"

    def check(
        self,
        pixels: np.ndarray,
        *,
        features: np.ndarray | None = None,
        tags: Mapping[str, str] | None = None,
    ) -> InputCheckResult:
        """The verdict on one image.

        Args:
            pixels: uint8 (H, W), the model's input.
            features: The model's pooled features (C,) of this image, or None.
            tags: :func:`read_dicom_tags` of a DICOM input, or None for PNG/JPEG.
        """
        return self.check_batch([pixels], [features], [tags])[0]

    def check_batch(
        self,
        pixels: Sequence[np.ndarray] | np.ndarray,
        features: Sequence[np.ndarray | None] | np.ndarray | None = None,
        tags: Sequence[Mapping[str, str] | None] | None = None,
    ) -> list[InputCheckResult]:
        """:meth:`check` for several images (features and tags per image, or None)."""
        n = len(pixels)
        feats = [None] * n if features is None else list(features)
        all_tags = [None] * n if tags is None else list(tags)
        if len(feats) != n or len(all_tags) != n:
            raise ValueError("pixels, features and tags differ in length")
        scores: list[float | None] = [None] * n
        have = [i for i, f in enumerate(feats) if f is not None]
        if self.ood is not None and have:
            values = self.ood.score(np.stack([np.asarray(feats[i]) for i in have]))
            for i, value in zip(have, values, strict=True):
                scores[i] = float(value)
        return [self._verdict(p, scores[i], all_tags[i]) for i, p in enumerate(pixels)]

    def _verdict(
        self, pixels: np.ndarray, ood_score: float | None, tags: Mapping[str, str] | None
    ) -> InputCheckResult:
        reasons: list[str] = []
        warnings: list[str] = []
        evidence: dict[str, Any] = {"mode": self.mode}
        if tags:
            tag_reasons, tag_warnings = check_dicom_tags(tags)
            reasons += tag_reasons
            warnings += tag_warnings
            evidence["dicom"] = dict(tags)
        stats = image_statistics(pixels)
        evidence.update(stats)
        stat_reasons = _statistics_reasons(stats)
        reasons += stat_reasons
        if self.layout is None:
            warnings.append("the frontal-film layout model is missing: layout not checked")
        else:
            layout = self.layout.evidence(pixels)
            evidence.update({k: round(v, 4) for k, v in layout.items()})
            if not stat_reasons:  # a blank or noise image needs no second reason
                reasons += self.layout.reasons(layout)
        if self.ood is None:
            warnings.append(
                "no statistics of real films' features for this model (pneumoloc "
                "calibrate-ood): checked on image evidence and DICOM tags only"
            )
        elif ood_score is None:
            warnings.append("this backend gives no features: checked on image evidence only")
        else:
            evidence["feature_score"] = round(ood_score, 4)
            if ood_score > 1.0 and not stat_reasons:
                reasons.append(
                    "the model's features of this image are unlike those of the real chest "
                    f"films it knows ({ood_score:.2f} times the limit): another kind of image"
                )
        return InputCheckResult(
            accepted=not reasons,
            reasons=tuple(reasons),
            warnings=tuple(warnings),
            evidence=evidence,
        )


@functools.cache
def default_layout_model() -> LayoutModel | None:
    """The shipped layout model (read once), or None with a warning when it is missing."""
    try:
        return LayoutModel.load(LAYOUT_MODEL_PATH)
    except CheckpointError as exc:
        logger.warning("%s; the input check runs without it", exc)
        return None
