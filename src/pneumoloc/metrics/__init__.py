"""Evaluation metrics: image-level classification and box/heatmap localisation."""

from pneumoloc.metrics.classification import (
    bootstrap_auroc_ci,
    by_group_metrics,
    calibration_curve_bins,
    classification_metrics,
    expected_calibration_error,
    f1_threshold,
    patient_level_metrics,
    roc_pr_curves,
    view_shortcut_aurocs,
    youden_threshold,
)
from pneumoloc.metrics.localisation import (
    RSNA_IOU_THRESHOLDS,
    as_boxes,
    iou_matrix,
    localisation_metrics,
    max_box_acc,
    notebook_mean_iou,
    pointing_game,
    rsna_image_score,
    rsna_map,
)

__all__ = [
    "RSNA_IOU_THRESHOLDS",
    "as_boxes",
    "bootstrap_auroc_ci",
    "by_group_metrics",
    "calibration_curve_bins",
    "classification_metrics",
    "expected_calibration_error",
    "f1_threshold",
    "iou_matrix",
    "localisation_metrics",
    "max_box_acc",
    "notebook_mean_iou",
    "patient_level_metrics",
    "pointing_game",
    "roc_pr_curves",
    "rsna_image_score",
    "rsna_map",
    "view_shortcut_aurocs",
    "youden_threshold",
]
