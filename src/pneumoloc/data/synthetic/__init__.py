"""Synthetic chest radiographs in the exact RSNA Kaggle layout, for the demo and the tests.

:func:`generate_rsna` writes ``stage_2_train_images/<patientId>.dcm`` (JPEG Baseline, 8-bit
MONOCHROME2), ``stage_2_train_labels.csv`` and ``stage_2_detailed_class_info.csv``, like the
real challenge files. The images only resemble a frontal chest X-ray at a coarse level (body,
dark lung fields, mediastinum, heart, diaphragm, ribs, clavicles, vessels, exposure variation,
noise); positives carry 1 to 3 soft opacities inside the lung fields, each filling most of its
box. Distractors that are not pneumonia (electrodes and wires, a small nodule, a side marker)
appear with the same probability in both classes, so "any bright spot" is not the answer.

Everything is drawn from one ``np.random.Generator`` per image, derived from ``(seed, index)``,
so an image depends neither on ``n`` nor on the images before it; the same seed gives
byte-identical files. Smooth structures are rendered at most at ``RENDER_BASE`` pixels and
upsampled; only the noise is drawn at full resolution.

The package is split by concern: :mod:`~pneumoloc.data.synthetic.stats` (statistics of the real
labels, rendering constants), :mod:`~pneumoloc.data.synthetic.config` (what to generate and what
comes out), :mod:`~pneumoloc.data.synthetic.arrays`, :mod:`~pneumoloc.data.synthetic.background`
and :mod:`~pneumoloc.data.synthetic.render` (drawing), :mod:`~pneumoloc.data.synthetic.boxes`
(box sampling) and :mod:`~pneumoloc.data.synthetic.files` (cases, DICOMs, the RSNA layout).
Import from the package: every public name is re-exported here.

Research tool, not a medical device: these images are not radiographs of anyone.
"""

from pneumoloc.data.rsna import CLASS_INFO_CSV, IMAGES_DIR, LABELS_CSV
from pneumoloc.data.synthetic.boxes import sample_boxes
from pneumoloc.data.synthetic.config import SynthCase, SynthConfig, SynthSummary, validate_config
from pneumoloc.data.synthetic.files import (
    case_rng,
    encode_jpeg,
    generate_rsna,
    make_case,
    write_dicom,
)
from pneumoloc.data.synthetic.render import render_chest
from pneumoloc.data.synthetic.stats import (
    BOX_CENTRE_IN_LUNG,
    BOX_COUNT_PROBS,
    BOX_LOG_CORR,
    BOX_LOG_MEAN,
    BOX_LOG_SD,
    BOX_MIN_WH,
    CLASS_NORMAL,
    CLASS_NOT_NORMAL,
    CLASS_POSITIVE,
    LUNG_DEPTH,
    NORMAL_FRACTION_OF_NEGATIVES,
    OPACITY_RANGE,
    REFERENCE_SIZE,
    RENDER_BASE,
    RIGHT_LUNG_FRACTION,
    TWO_BOX_BILATERAL_FRACTION,
)

__all__ = [
    "BOX_CENTRE_IN_LUNG",
    "BOX_COUNT_PROBS",
    "BOX_LOG_CORR",
    "BOX_LOG_MEAN",
    "BOX_LOG_SD",
    "BOX_MIN_WH",
    "CLASS_INFO_CSV",
    "CLASS_NORMAL",
    "CLASS_NOT_NORMAL",
    "CLASS_POSITIVE",
    "IMAGES_DIR",
    "LABELS_CSV",
    "LUNG_DEPTH",
    "NORMAL_FRACTION_OF_NEGATIVES",
    "OPACITY_RANGE",
    "REFERENCE_SIZE",
    "RENDER_BASE",
    "RIGHT_LUNG_FRACTION",
    "TWO_BOX_BILATERAL_FRACTION",
    "SynthCase",
    "SynthConfig",
    "SynthSummary",
    "case_rng",
    "encode_jpeg",
    "generate_rsna",
    "make_case",
    "render_chest",
    "sample_boxes",
    "validate_config",
    "write_dicom",
]
