"""Metrics: RSNA score, notebook IoU, pointing game, MaxBoxAcc, classification metrics."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from scipy import ndimage
from sklearn.metrics import roc_auc_score

from pneumoloc.metrics import (
    RSNA_IOU_THRESHOLDS,
    bootstrap_auroc_ci,
    by_group_metrics,
    calibration_curve_bins,
    classification_metrics,
    expected_calibration_error,
    f1_threshold,
    iou_matrix,
    localisation_metrics,
    max_box_acc,
    notebook_mean_iou,
    patient_level_metrics,
    pointing_game,
    roc_pr_curves,
    rsna_image_score,
    rsna_map,
    view_shortcut_aurocs,
    youden_threshold,
)
from pneumoloc.metrics.classification import _weighted_auroc
from pneumoloc.metrics.localisation import as_boxes, component_boxes

EMPTY = np.zeros((0, 4))
G = np.array([[0.0, 0.0, 10.0, 10.0]])  # area 100


def b(*rows: tuple[float, float, float, float]) -> np.ndarray:
    return np.array(rows, dtype=float).reshape(-1, 4)


# --------------------------------------------------------------------------- boxes & IoU


def test_thresholds_are_the_eight_challenge_values() -> None:
    assert RSNA_IOU_THRESHOLDS.shape == (8,)
    assert RSNA_IOU_THRESHOLDS.tolist() == [0.4, 0.45, 0.5, 0.55, 0.6, 0.65, 0.7, 0.75]


def test_iou_matrix_known_values() -> None:
    # (0,0,10,6) inside G: intersection 60, union 100 -> 0.6; disjoint -> 0; itself -> 1.
    ious = iou_matrix(b((0, 0, 10, 6), (20, 20, 5, 5), (0, 0, 10, 10)), G)
    assert ious.shape == (3, 1)
    np.testing.assert_allclose(ious[:, 0], [0.6, 0.0, 1.0])
    assert iou_matrix(EMPTY, G).shape == (0, 1)
    assert iou_matrix(b((0, 0, 0, 0)), b((0, 0, 0, 0)))[0, 0] == 0.0  # degenerate: no NaN


def test_as_boxes_validates() -> None:
    assert as_boxes(None).shape == (0, 4)
    assert as_boxes([]).shape == (0, 4)
    assert as_boxes([1, 2, 3, 4]).shape == (1, 4)
    with pytest.raises(ValueError, match=r"\(N, 4\)"):
        as_boxes(np.zeros((2, 3)))
    with pytest.raises(ValueError, match="negative"):
        as_boxes([[0, 0, -1, 2]])
    with pytest.raises(ValueError, match="NaN"):
        as_boxes([[0, 0, np.nan, 2]])


# --------------------------------------------------------------------------- RSNA score


def test_rsna_perfect_box_scores_one() -> None:
    # IoU 1 > every t: TP=1, FP=0, FN=0 -> 1/1 at all 8 thresholds -> 1.0
    assert rsna_image_score(G, [0.9], G) == 1.0


def test_rsna_empty_cases() -> None:
    assert rsna_image_score(EMPTY, [], EMPTY) is None  # not counted at all
    assert rsna_image_score(G, [0.5], EMPTY) == 0.0  # FP=1 -> 0/1
    assert rsna_image_score(EMPTY, [], G) == 0.0  # FN=1 -> 0/1


def test_rsna_iou_060_hits_four_of_eight_thresholds() -> None:
    # IoU = 60/100 = 0.6. Hit needs IoU > t (strict): t = 0.40, 0.45, 0.50, 0.55 -> TP (1/1);
    # t = 0.60 (0.6 > 0.6 false), 0.65, 0.70, 0.75 -> FP=1, FN=1 -> 0/2. Mean = 4/8 = 0.5.
    assert rsna_image_score(b((0, 0, 10, 6)), [0.9], G) == pytest.approx(0.5)


def test_rsna_iou_exactly_on_threshold_is_a_miss() -> None:
    # IoU = 50/100 = 0.5: hits at 0.40, 0.45 only -> 2/8 = 0.25 (>= would give 3/8).
    assert rsna_image_score(b((0, 0, 10, 5)), [0.9], G) == pytest.approx(0.25)


def test_rsna_two_truths_one_perfect_pred() -> None:
    # TP=1, FP=0, FN=1 -> 1/2 at every threshold -> 0.5
    gts = b((0, 0, 10, 10), (50, 50, 10, 10))
    assert rsna_image_score(G, [0.9], gts) == pytest.approx(0.5)


def test_rsna_two_preds_on_one_truth() -> None:
    # A (conf .9) IoU 0.5, B (conf .8) IoU 0.9 with the single truth G.
    # t = .40, .45: A (first) takes G, B is FP -> 1/(1+1+0) = 1/2.
    # t = .50 .. .75: A misses (0.5 > t false) -> FP; B takes G -> 1/2.  Mean 0.5.
    preds = b((0, 0, 10, 5), (0, 0, 10, 9))
    assert rsna_image_score(preds, [0.9, 0.8], G) == pytest.approx(0.5)


def test_rsna_confidence_order_matters() -> None:
    # G1 = (0,0,10,10), G2 = (10,0,10,10).
    # A = (0,0,19,10): IoU(A,G1) = 100/190 = 0.526, IoU(A,G2) = 90/200 = 0.45.
    # B = (0,0,10,10): IoU(B,G1) = 1, IoU(B,G2) = 0.
    gts = b((0, 0, 10, 10), (10, 0, 10, 10))
    preds = b((0, 0, 19, 10), (0, 0, 10, 10))
    # A more confident: t <= .50: A takes G1 (its best), B has only G1 -> FP; G2 FN -> 1/3.
    #                   t >= .55: A misses (FP), B takes G1, G2 FN -> 1/3.   Mean 1/3.
    assert rsna_image_score(preds, [0.9, 0.8], gts) == pytest.approx(1 / 3)
    # B more confident: B takes G1 everywhere. A then has only G2 (IoU 0.45):
    # t = .40: hit -> TP=2 -> 1;  t >= .45 (0.45 > 0.45 false): TP=1, FP=1, FN=1 -> 1/3.
    # Mean = (1 + 7/3) / 8 = 5/12.
    assert rsna_image_score(preds, [0.8, 0.9], gts) == pytest.approx(5 / 12)


def test_rsna_extra_false_positive() -> None:
    # TP=1 (perfect), FP=1 (far away), FN=0 -> 1/2 at every t -> 0.5
    preds = b((0, 0, 10, 10), (50, 50, 10, 10))
    assert rsna_image_score(preds, [0.9, 0.5], G) == pytest.approx(0.5)


def test_rsna_score_length_mismatch() -> None:
    with pytest.raises(ValueError, match="scores"):
        rsna_image_score(G, [0.1, 0.2], G)


def test_rsna_map_over_mixed_list() -> None:
    preds = [(G, [0.9]), (EMPTY, []), (EMPTY, []), (b((0, 0, 10, 6)), [0.7])]
    gts = [G, EMPTY, G, G]
    # scores 1.0, None (skipped), 0.0, 0.5 -> (1 + 0 + 0.5) / 3 = 0.5
    assert rsna_map(preds, gts) == pytest.approx(0.5)
    assert math.isnan(rsna_map([(EMPTY, [])], [EMPTY]))
    with pytest.raises(ValueError, match="images"):
        rsna_map(preds, gts[:2])


# --------------------------------------------------------------------------- notebook IoU


def test_notebook_mean_iou_counts_negatives_as_zero() -> None:
    preds = [G, EMPTY, G, EMPTY, b((0, 0, 10, 6), (30, 30, 5, 5))]
    gts = [G, G, EMPTY, EMPTY, G]
    # per image: 1.0, 0 (no pred), 0 (no truth), 0 (neither), max(0.6, 0) = 0.6
    # mean over all 5 images: 1.6 / 5 = 0.32
    assert notebook_mean_iou(preds, gts) == pytest.approx(0.32)


# --------------------------------------------------------------------------- pointing game


def _peak_map(size: int, row: int, col: int) -> np.ndarray:
    hm = np.zeros((size, size), dtype=np.float32)
    hm[row, col] = 1.0
    return hm


def test_pointing_game_hits_misses_and_negatives() -> None:
    heatmaps = [_peak_map(32, 5, 5), _peak_map(32, 20, 20), _peak_map(32, 5, 5)]
    gts = [G, G, EMPTY]  # hit, miss, excluded (no truth)
    assert pointing_game(heatmaps, gts) == pytest.approx(0.5)
    assert math.isnan(pointing_game([_peak_map(8, 1, 1)], [EMPTY]))


def test_pointing_game_tolerance_and_scaling() -> None:
    # Peak centre (12.5, 5.5) is 2.5 px right of G's edge at x = 10.
    hm = [_peak_map(32, 5, 12)]
    assert pointing_game(hm, [G]) == 0.0
    assert pointing_game(hm, [G], tolerance_px=3) == 1.0
    # 32-px heatmap for a 128-px image: peak (5, 5) -> centre (22, 22) in image pixels.
    assert (
        pointing_game([_peak_map(32, 5, 5)], [b((16, 16, 10, 10))], image_shapes=[(128, 128)])
        == 1.0
    )
    assert pointing_game([_peak_map(32, 5, 5)], [b((16, 16, 10, 10))]) == 0.0


# --------------------------------------------------------------------------- MaxBoxAcc


def _gaussian(size: int, cy: float, cx: float, sigma: float, amp: float = 1.0) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size] + 0.5  # pixel centres
    return amp * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * sigma**2))


def _blob_box(cy: float, cx: float, sigma: float) -> np.ndarray:
    # The blob's 1.5-sigma extent as an xywh box.
    return b((cx - 1.5 * sigma, cy - 1.5 * sigma, 3 * sigma, 3 * sigma))


def test_component_boxes_largest_and_all() -> None:
    hm = np.zeros((10, 10))
    hm[1:3, 1:3] = 1.0  # 4 px
    hm[5:9, 4:9] = 1.0  # 20 px
    (largest,) = component_boxes(hm, np.array([0.5]))
    np.testing.assert_array_equal(largest, [[4, 5, 5, 4]])
    (both,) = component_boxes(hm, np.array([0.5]), largest_only=False)
    assert sorted(map(tuple, both.tolist())) == [(1, 1, 2, 2), (4, 5, 5, 4)]
    (none,) = component_boxes(hm, np.array([1.0]))
    assert none.shape == (0, 4)


def _naive_component_boxes(hm: np.ndarray, t: float, largest_only: bool) -> set[tuple[float, ...]]:
    labels, n = ndimage.label(hm > t, structure=np.ones((3, 3)))
    if n == 0:
        return set()
    sizes = np.bincount(labels.ravel())[1:]
    keep = [int(np.argmax(sizes))] if largest_only else range(n)
    slices = ndimage.find_objects(labels)
    return {
        (
            float(slices[k][1].start),
            float(slices[k][0].start),
            float(slices[k][1].stop - slices[k][1].start),
            float(slices[k][0].stop - slices[k][0].start),
        )
        for k in keep
    }


@pytest.mark.parametrize("largest_only", [True, False])
def test_component_boxes_matches_naive_labelling(largest_only: bool) -> None:
    rng = np.random.default_rng(4)
    hm = ndimage.gaussian_filter(rng.random((48, 40)), 2)
    hm = (hm - hm.min()) / (hm.max() - hm.min())
    cams = np.linspace(0, 1, 21)[1:-1]
    got = component_boxes(hm, cams, largest_only=largest_only)
    n_regions = [len(_naive_component_boxes(hm, t, False)) for t in cams]
    assert max(n_regions) > 3 and min(n_regions) == 1  # exercises both code paths
    for boxes, t in zip(got, cams, strict=True):
        assert set(map(tuple, boxes.tolist())) == _naive_component_boxes(hm, t, largest_only)


def test_max_box_acc_planted_blob_and_elsewhere() -> None:
    rng = np.random.default_rng(0)
    hms, gts = [], []
    for cy, cx in [(20, 40), (40, 20), (30, 30)]:
        hms.append(_gaussian(64, cy, cx, 5) + 0.01 * rng.random((64, 64)))
        gts.append(_blob_box(cy, cx, 5))
    hms.append(_gaussian(64, 10, 10, 5))  # a negative image: skipped
    gts.append(EMPTY)
    res = max_box_acc(hms, gts)
    assert res["n_images"] == 3
    assert res["iou_0.5"] == 1.0
    assert res["iou_0.3"] == 1.0
    assert 0 < res["iou_0.5_cam_threshold"] < 1
    assert len(res["curve"]["iou_0.5"]) == len(res["curve"]["cam_thresholds"]) == 99
    json.dumps(res, allow_nan=False)

    wrong = max_box_acc([_gaussian(64, 50, 50, 5)], [_blob_box(12, 12, 5)])
    assert wrong["iou_0.3"] == 0.0 and wrong["iou_0.5"] == 0.0


def test_max_box_acc_all_components_and_scaling() -> None:
    # Big blob elsewhere, small blob on the truth: the largest region never matches.
    hm = _gaussian(64, 48, 48, 7) + _gaussian(64, 12, 12, 3)
    truth = _blob_box(12, 12, 3)
    assert max_box_acc([hm], [truth])["iou_0.5"] == 0.0
    assert max_box_acc([hm], [truth], all_components=True)["iou_0.5"] == 1.0
    # Same heatmap against truth given in 256-px image coordinates.
    scaled = max_box_acc([hm], [truth * 4], all_components=True, image_shapes=[(256, 256)])
    assert scaled["iou_0.5"] == 1.0


def test_max_box_acc_box_fn_and_no_truth() -> None:
    calls = []

    def fixed(hm: np.ndarray, cams: np.ndarray) -> list[np.ndarray]:
        calls.append(hm.max())
        return [G if c < 0.5 else EMPTY for c in cams]

    res = max_box_acc([np.random.default_rng(1).random((16, 16))], [G], box_fn=fixed)
    assert calls == [1.0]  # received the min-max normalised map
    assert res["iou_0.5"] == 1.0 and res["iou_0.5_cam_threshold"] == pytest.approx(0.01)
    assert res["curve"]["iou_0.5"][-1] == 0.0
    # IoU exactly 0.5 counts as correct at 0.5 (wsolevaluation uses IoU >= threshold)
    half = max_box_acc([np.eye(4)], [G], box_fn=lambda hm, cams: [b((0, 0, 10, 5))] * len(cams))
    assert half["iou_0.5"] == 1.0
    empty = max_box_acc([np.ones((4, 4))], [EMPTY])
    assert empty["n_images"] == 0 and empty["iou_0.5"] is None and empty["mean"] is None


def test_localisation_metrics_summary_is_json() -> None:
    heatmaps = [_gaussian(32, 5, 5, 2), _gaussian(32, 20, 20, 2)]
    out = localisation_metrics([G, EMPTY], [[0.9], []], heatmaps, [G, EMPTY])
    assert out["n_images"] == 2 and out["n_with_truth"] == 1
    assert out["rsna_map"] == 1.0  # image 2 has neither -> skipped
    assert out["notebook_mean_iou"] == pytest.approx(0.5)
    assert out["pointing_game"] == 1.0
    assert "curve" not in out["max_box_acc"]
    json.dumps(out, allow_nan=False)
    none = localisation_metrics([EMPTY], [[]], None, [EMPTY])
    assert none["rsna_map"] is None and none["pointing_game"] is None
    json.dumps(none, allow_nan=False)


# --------------------------------------------------------------------------- classification

Y_SEP = np.array([0, 0, 0, 1, 1, 1])
P_SEP = np.array([0.1, 0.2, 0.3, 0.7, 0.8, 0.9])


def test_perfect_and_inverted_separation() -> None:
    m = classification_metrics(Y_SEP, P_SEP, 0.5, n_boot=200)
    assert m["auroc"] == 1.0 and m["auprc"] == 1.0
    assert (m["auroc_ci_low"], m["auroc_ci_high"]) == (1.0, 1.0)
    inv = classification_metrics(Y_SEP, 1 - P_SEP, 0.5, n_boot=200)
    assert inv["auroc"] == 0.0
    assert (inv["auroc_ci_low"], inv["auroc_ci_high"]) == (0.0, 0.0)


def test_confusion_counts_handcrafted() -> None:
    y = [1, 1, 1, 0, 0, 0, 0, 1]
    p = [0.9, 0.6, 0.4, 0.2, 0.55, 0.1, 0.5, 0.5]
    # threshold 0.5, positive when p >= 0.5 -> pred = 1 1 0 0 1 0 1 1
    # tp: idx 0,1,7 = 3; fn: idx 2 = 1; fp: idx 4,6 = 2; tn: idx 3,5 = 2
    m = classification_metrics(y, p, 0.5, n_boot=0)
    assert m["confusion"] == {"tn": 2, "fp": 2, "fn": 1, "tp": 3}
    assert m["accuracy"] == pytest.approx(5 / 8)
    assert m["sensitivity"] == pytest.approx(3 / 4)
    assert m["specificity"] == pytest.approx(2 / 4)
    assert m["precision"] == pytest.approx(3 / 5)
    assert m["f1"] == pytest.approx(2 * 3 / (2 * 3 + 2 + 1))
    assert m["n"] == 8 and m["n_positive"] == 4 and m["prevalence"] == 0.5
    assert m["auroc_ci_low"] is None  # n_boot=0 skips the bootstrap
    assert m["brier"] == pytest.approx(np.mean((np.array(p) - np.array(y)) ** 2))
    json.dumps(m, allow_nan=False)


def test_single_class_gives_none() -> None:
    m = classification_metrics([0, 0, 0], [0.1, 0.6, 0.2], 0.5, n_boot=50)
    assert m["auroc"] is None and m["auprc"] is None
    assert m["auroc_ci_low"] is None and m["auroc_ci_high"] is None
    assert m["sensitivity"] is None and m["specificity"] == pytest.approx(2 / 3)
    assert m["confusion"] == {"tn": 2, "fp": 1, "fn": 0, "tp": 0}
    json.dumps(m, allow_nan=False)
    assert all(math.isnan(v) for v in bootstrap_auroc_ci([1, 1], [0.2, 0.3]))


def test_youden_threshold() -> None:
    y = [0, 0, 0, 0, 1, 1, 1]
    p = [0.1, 0.2, 0.3, 0.65, 0.6, 0.8, 0.9]
    # thresholds: .9 J=1/3; .8 J=2/3; .65 J=2/3-1/4; .6 J=1-1/4=0.75 (max); .3 J=1-1/2
    assert youden_threshold(y, p) == pytest.approx(0.6)
    assert youden_threshold(Y_SEP, P_SEP) == pytest.approx(0.7)
    with pytest.warns(UserWarning, match="one class"):
        assert youden_threshold([1, 1], [0.3, 0.9]) == 0.5


def test_ece_calibrated_and_overconfident() -> None:
    # p = 0.8 for 10 cases, 8 positive; p = 0.3 for 10 cases, 3 positive: calibrated.
    y = np.r_[np.ones(8), np.zeros(2), np.ones(3), np.zeros(7)]
    p = np.r_[np.full(10, 0.8), np.full(10, 0.3)]
    assert expected_calibration_error(y, p) == pytest.approx(0.0, abs=1e-12)
    assert expected_calibration_error(y, p, kind="positive") == pytest.approx(0.0, abs=1e-12)
    # p = 0.99 for 10 cases, 5 positive: confidence .99, accuracy .5 -> ECE .49
    y2, p2 = np.r_[np.ones(5), np.zeros(5)], np.full(10, 0.99)
    assert expected_calibration_error(y2, p2) == pytest.approx(0.49)
    assert expected_calibration_error(y2, p2, kind="positive") == pytest.approx(0.49)


def test_weighted_auroc_matches_sklearn_with_ties() -> None:
    rng = np.random.default_rng(2)
    p = rng.integers(0, 10, 300) / 10  # many ties
    y = (rng.random(300) < 0.3 + 0.4 * p).astype(int)
    order = np.argsort(p, kind="stable")
    ps, pos = p[order], y[order].astype(bool)
    starts = np.flatnonzero(np.r_[True, np.diff(ps) != 0])
    w = rng.integers(0, 3, (4, 300)).astype(float)
    got = _weighted_auroc(w * pos, w * ~pos, starts)
    want = [roc_auc_score(pos, ps, sample_weight=wi) for wi in w]
    np.testing.assert_allclose(got, want, rtol=1e-12)


def test_bootstrap_ci_contains_estimate_and_is_deterministic() -> None:
    rng = np.random.default_rng(3)
    y = rng.integers(0, 2, 500)
    p = np.clip(0.25 * y + 0.75 * rng.random(500), 0, 1)
    auc = roc_auc_score(y, p)
    ci = bootstrap_auroc_ci(y, p, n_boot=300, seed=7)
    assert ci[0] < auc < ci[1]
    assert ci[1] - ci[0] < 0.2
    assert bootstrap_auroc_ci(y, p, n_boot=300, seed=7) == ci
    assert bootstrap_auroc_ci(y, p, n_boot=300, seed=8) != ci
    m = classification_metrics(y, p, 0.5, n_boot=300, seed=7)
    assert (m["auroc_ci_low"], m["auroc_ci_high"]) == ci


def test_curves_and_calibration_bins() -> None:
    curves = roc_pr_curves(Y_SEP, P_SEP)
    assert set(curves) == {"fpr", "tpr", "precision", "recall"}
    assert curves["fpr"][0] == 0.0 and curves["tpr"][-1] == 1.0
    json.dumps(curves)
    with pytest.warns(UserWarning):
        assert roc_pr_curves([0, 0], [0.1, 0.2])["fpr"] == []
    cal = calibration_curve_bins([0, 1, 1, 0, 1], [0.05, 0.15, 0.18, 0.95, 1.0], n_bins=10)
    assert cal["counts"] == [1, 2, 0, 0, 0, 0, 0, 0, 0, 2]
    assert cal["observed_fraction"][1] == 1.0 and cal["observed_fraction"][2] is None
    assert cal["observed_fraction"][9] == 0.5
    assert cal["bin_centers"][0] == pytest.approx(0.05)
    json.dumps(cal, allow_nan=False)


@pytest.mark.parametrize(
    ("y", "p", "match"),
    [([0, 2], [0.1, 0.2], "0 and 1"), ([0, 1], [0.1, 1.2], r"\[0, 1\]"), ([0, 1], [0.1], "values")],
)
def test_classification_input_errors(y: list[int], p: list[float], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        classification_metrics(y, p, 0.5)


def test_f1_threshold_maximises_tp_over_tp_fp_fn() -> None:
    """Brute force over every candidate threshold: F1 and TP/(TP+FP+FN) peak at the same one."""
    rng = np.random.default_rng(0)
    y = (rng.random(200) < 0.25).astype(int)
    p = np.clip(0.35 * y + rng.random(200) * 0.65, 0, 1)
    t = f1_threshold(y, p)

    def csi(th: float) -> float:
        pred = p >= th
        tp = int(np.sum(pred & (y == 1)))
        return tp / (tp + int(np.sum(pred & (y == 0))) + int(np.sum(~pred & (y == 1))))

    assert csi(t) == pytest.approx(max(csi(th) for th in np.unique(p)))
    # At 25% prevalence it is stricter than Youden's J here: fewer negatives get boxes.
    assert t > youden_threshold(y, p)
    with pytest.warns(UserWarning, match="one class"):
        assert f1_threshold([1, 1], [0.3, 0.9]) == 0.5


# --------------------------------------------------------------------------- subgroups

# AP: perfectly separated (AUROC 1); PA: every pair tied or inverted half the time (AUROC 0.5);
# LL: negatives only.
G_LAB = np.array([0, 1, 0, 1, 0, 1, 1, 0, 0, 0])
G_PROB = np.array([0.1, 0.9, 0.2, 0.8, 0.5, 0.5, 0.3, 0.3, 0.7, 0.2])
G_VIEW = np.array(["AP"] * 4 + ["PA"] * 4 + ["LL"] * 2)


def test_by_group_metrics_known_aurocs_and_single_class() -> None:
    m = by_group_metrics(G_LAB, G_PROB, G_VIEW, 0.5, n_boot=200)
    assert list(m) == ["AP", "LL", "PA"]
    ap, pa, ll = m["AP"], m["PA"], m["LL"]
    assert (ap["n"], ap["n_positive"], pa["n"], pa["n_positive"]) == (4, 2, 4, 2)
    assert ap["auroc"] == 1.0 and (ap["auroc_ci_low"], ap["auroc_ci_high"]) == (1.0, 1.0)
    assert ap["sensitivity"] == 1.0 and ap["specificity"] == 1.0
    assert pa["auroc"] == 0.5
    # PA at 0.5: positives 0.5 (flagged), 0.3 (missed); negatives 0.5 (flagged), 0.3 (not).
    assert pa["sensitivity"] == 0.5 and pa["specificity"] == 0.5
    assert pa["auroc_ci_low"] is not None and pa["auroc_ci_low"] <= 0.5 <= pa["auroc_ci_high"]
    assert (ll["n"], ll["n_positive"]) == (2, 0)
    assert ll["auroc"] is None and ll["auroc_ci_low"] is None and ll["sensitivity"] is None
    assert ll["specificity"] == 0.5  # 0.7 flagged, 0.2 not
    # Each group's numbers are classification_metrics on that group alone.
    whole = classification_metrics(G_LAB[:4], G_PROB[:4], 0.5, n_boot=200)
    assert all(ap[k] == whole[k] for k in ap)
    assert set(by_group_metrics(G_LAB, G_PROB, G_VIEW, 0.5, n_boot=0)["PA"]) == set(pa)
    assert by_group_metrics(G_LAB, G_PROB, G_VIEW, 0.5, n_boot=0)["PA"]["auroc_ci_low"] is None
    json.dumps(m, allow_nan=False)
    with pytest.raises(ValueError, match="groups"):
        by_group_metrics(G_LAB, G_PROB, G_VIEW[:-1], 0.5)


def test_view_shortcut_aurocs() -> None:
    # The view is the label (AP = positive): the shortcut alone is perfect; a model whose
    # probability is the view's is perfectly view-predictable. LL images are left out.
    views = np.array(["AP", "AP", "PA", "PA", "PA", "LL"])
    labels = np.array([1, 1, 0, 0, 1, 1])
    s = view_shortcut_aurocs(labels, [0.9, 0.8, 0.1, 0.2, 0.3, 0.0], views)
    # view alone: positives AP, AP, PA vs negatives PA, PA -> (2 * 2 + 1 * 2 * 0.5) / 6
    assert s["view_only_auroc"] == pytest.approx(5 / 6)
    assert s["view_predictability_auroc"] == 1.0
    flipped = view_shortcut_aurocs(labels, [0.1, 0.2, 0.9, 0.8, 0.7, 0.0], views)
    assert flipped["view_predictability_auroc"] == 0.0
    one_view = view_shortcut_aurocs([0, 1, 1], [0.1, 0.2, 0.3], ["AP", "AP", ""])
    assert one_view == {"view_only_auroc": None, "view_predictability_auroc": None}
    one_label = view_shortcut_aurocs([0, 0, 1], [0.1, 0.2, 0.3], ["AP", "PA", "LL"])
    assert one_label["view_only_auroc"] is None
    assert one_label["view_predictability_auroc"] == 0.0


def test_patient_level_mean_probability_and_max_label() -> None:
    ids = ["a", "a", "b", "b", "c", "d"]
    labels = [0, 1, 1, 1, 0, 0]
    # a: mean 0.55 >= 0.5 flagged although one image is below; label max = 1.
    # b: mean 0.45 < 0.5 missed although one image is above.
    # c: 0.6 flagged negative (false positive); d: 0.1 true negative.
    probs = [0.3, 0.8, 0.2, 0.7, 0.6, 0.1]
    m = patient_level_metrics(labels, probs, ids, 0.5, n_boot=100)
    assert m is not None
    assert m["aggregate"] == "mean" and m["label_rule"] == "max"
    assert (m["n_patients"], m["n_images"], m["n_multi_image_patients"]) == (4, 6, 2)
    assert m["n_positive"] == 2 and m["prevalence"] == 0.5
    assert m["confusion"] == {"tn": 1, "fp": 1, "fn": 1, "tp": 1}
    assert m["sensitivity"] == 0.5 and m["specificity"] == 0.5
    # positives a 0.55, b 0.45 vs negatives c 0.6, d 0.1: only a > d and b > d, so 2 / 4
    assert m["auroc"] == pytest.approx(0.5)
    assert m["auprc"] is not None and m["auroc_ci_low"] is not None
    json.dumps(m, allow_nan=False)
    # One image per patient: nothing to aggregate.
    assert patient_level_metrics([0, 1], [0.2, 0.8], ["x", "y"], 0.5) is None
    # One class over patients: AUROC undefined.
    single = patient_level_metrics([1, 1, 1], [0.2, 0.9, 0.7], ["p", "p", "q"], 0.5, n_boot=10)
    assert single is not None and single["auroc"] is None and single["auroc_ci_low"] is None
    assert single["sensitivity"] == 1.0  # p: 0.55, q: 0.7
    with pytest.raises(ValueError, match="patient_ids"):
        patient_level_metrics([0, 1], [0.2, 0.8], ["x"], 0.5)
