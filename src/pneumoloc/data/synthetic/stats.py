"""Statistics of the real RSNA labels, the detailed class names and the rendering constants.

The box statistics drive :mod:`~pneumoloc.data.synthetic.boxes`, the class names fill the
``class`` column of ``stage_2_detailed_class_info.csv``, and the rendering constants set the
scale of :mod:`~pneumoloc.data.synthetic.background` and :mod:`~pneumoloc.data.synthetic.render`.
"""

from __future__ import annotations

import math

# --- Statistics of the real RSNA labels -------------------------------------------------------
# Derived once from the full official /work/shared/data/rsna-pneumonia-sample/
# stage_2_train_labels.csv (26,684 patientIds, 6,012 positives, 9,555 boxes) and
# stage_2_detailed_class_info.csv; all lengths in pixels of the 1024 x 1024 originals.
# Boxes per positive image: 1: 2614 (43.5%), 2: 3266 (54.3%), 3: 119 (2.0%), 4: 13 (0.2%).
# The generator promises 1 to 3 boxes, so the 4-box share is folded into 3.
BOX_COUNT_PROBS: dict[int, float] = {1: 0.4348, 2: 0.5432, 3: 0.0220}
# Box width and height are log-normal: geometric means 209.9 x 291.1 px (medians 217 x 298),
# log-sd 0.291 (width) and 0.514 (height), correlation of the logs 0.611.
BOX_LOG_MEAN: tuple[float, float] = (math.log(209.9), math.log(291.1))
BOX_LOG_SD: tuple[float, float] = (0.291, 0.514)
BOX_LOG_CORR = 0.611
BOX_MIN_WH: tuple[float, float] = (40.0, 45.0)  # smallest real width and height
REFERENCE_SIZE = 1024
# 53.5% of boxes lie in the image-left half (the patient's right lung).
RIGHT_LUNG_FRACTION = 0.535
# 97.9% of 2-box images have one box in each lung.
TWO_BOX_BILATERAL_FRACTION = 0.979
# Box centres: y mean 0.52 x height, sd 0.11 (x: 0.31 / 0.70 of the width, sd 0.06 on each
# side). With the anatomy of pneumoloc.data.anatomy this is about 0.62 +- 0.19 of the lung height.
BOX_CENTRE_IN_LUNG: tuple[float, float] = (0.62, 0.19)
# Negatives: "Normal" 8,818 vs "No Lung Opacity / Not Normal" 11,787 patients -> 42.8% Normal.
NORMAL_FRACTION_OF_NEGATIVES = 0.428
# (Real prevalence is 22.5% positive; SynthConfig defaults to 30% for a friendlier demo.)

CLASS_POSITIVE = "Lung Opacity"
CLASS_NORMAL = "Normal"
CLASS_NOT_NORMAL = "No Lung Opacity / Not Normal"

# --- Rendering constants (density units: 0 = air black, 1 = dense bone white) ------------------
RENDER_BASE = 256  # smooth structures are drawn at most at this size, then upsampled
LUNG_DEPTH = 0.30  # how much darker aerated lung is than the chest wall
# The unit of SynthConfig.opacity_contrast: the full density scale (0 = air black, 1 = white),
# before the per-image exposure. Aerated lung sits at about 0.27 and the heart at about 0.69, so
# the default 0.25 brings an opacity's core about 60% of the way from lung to heart: a clear
# consolidation. (With the narrower lung-to-heart range, 0.42, as the unit, 0.25 is a faint haze
# that a small CNN trained on 400 images at 128 px only takes to AUROC ~0.85 in 4 epochs.)
OPACITY_RANGE = 1.0
