"""cam_to_boxes: planted Gaussian blobs are recovered as boxes, gating, scaling, masks, NMS."""

from __future__ import annotations

import numpy as np
import pytest

from pneumoloc.errors import ConfigError
from pneumoloc.localise.boxes import (
    BOX_RULES,
    BoxConfig,
    ScoredBoxes,
    cam_to_boxes,
    cam_to_boxes_batch,
    nms,
)
from pneumoloc.metrics import iou_matrix

SIZE = 128
SIGMA = 6.0
# Blob centres (row, col), well apart and off the vertical midline.
CENTRES = [(30.0, 30.0), (90.0, 95.0), (95.0, 30.0)]


def gaussian(size: int, cy: float, cx: float, sigma: float, amp: float = 1.0) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size] + 0.5  # pixel centres
    return amp * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * sigma**2))


def planted_box(cy: float, cx: float, sigma: float = SIGMA) -> np.ndarray:
    """The blob's ~1.5-sigma extent as an xywh box."""
    return np.array([cx - 1.5 * sigma, cy - 1.5 * sigma, 3 * sigma, 3 * sigma])


def blobs(
    centres: list[tuple[float, float]], seed: int = 0, amps: list[float] | None = None
) -> np.ndarray:
    rng = np.random.default_rng(seed)
    hm = 0.03 * rng.random((SIZE, SIZE))
    for k, (cy, cx) in enumerate(centres):
        hm += gaussian(SIZE, cy, cx, SIGMA, amp=1.0 if amps is None else amps[k])
    return hm.astype(np.float32)


# Per rule, settings that recover the 1.5-sigma box of these compact blobs. The notebook rule
# needs a higher std factor: with the default 0.5 its threshold (mean + 0.5 std of a mostly
# cold map) is about 0.07-0.15 of the peak, so boxes come out ~1.5x too wide (IoU 0.36-0.5,
# see test_notebook_rule_default_threshold).
RULE_CONFIGS = {
    "multi": BoxConfig(rule="multi"),
    "notebook": BoxConfig(rule="notebook", notebook_std=2.0),
    "otsu": BoxConfig(rule="otsu"),
    "peak": BoxConfig(rule="peak"),
}


def test_every_rule_is_tested() -> None:
    assert set(RULE_CONFIGS) == set(BOX_RULES)


@pytest.mark.parametrize("rule", sorted(RULE_CONFIGS))
@pytest.mark.parametrize("n_blobs", [1, 2, 3])
def test_recovers_planted_blobs(rule: str, n_blobs: int) -> None:
    centres = CENTRES[:n_blobs]
    out = cam_to_boxes(blobs(centres), 0.9, threshold=0.5, config=RULE_CONFIGS[rule])
    assert len(out) == n_blobs
    ious = iou_matrix(np.stack([planted_box(*c) for c in centres]), out.boxes)
    # each planted box is recovered by a distinct predicted box with IoU >= 0.5
    assert np.all(ious.max(axis=1) >= 0.5), ious
    assert len(set(ious.argmax(axis=1).tolist())) == n_blobs
    assert np.all((out.scores > 0) & (out.scores <= 0.9))
    assert np.all(np.diff(out.scores) <= 0)  # best first


def test_notebook_rule_default_threshold() -> None:
    hm = blobs(CENTRES[:2])
    norm = (hm - hm.min()) / (hm.max() - hm.min())
    mask = BOX_RULES["notebook"](norm, BoxConfig(rule="notebook"))
    np.testing.assert_array_equal(mask, norm > norm.mean() + 0.5 * norm.std())
    out = cam_to_boxes(hm, 0.9, threshold=0.5, config=BoxConfig(rule="notebook"))
    assert len(out) == 2
    # boxes too wide but each contains its planted 1.5-sigma box
    for cy, cx in CENTRES[:2]:
        x, y, w, h = planted_box(cy, cx)
        assert any(
            bx <= x and by <= y and bx + bw >= x + w and by + bh >= y + h
            for bx, by, bw, bh in out.boxes
        )


def test_score_is_probability_times_mean_cam() -> None:
    hm = np.zeros((20, 20), dtype=np.float32)
    hm[5:10, 5:10] = 1.0  # normalised: 1 inside, 0 outside
    out = cam_to_boxes(hm, 0.8, threshold=0.5, config=BoxConfig(closing=0))
    np.testing.assert_array_equal(out.boxes, [[5, 5, 5, 5]])
    np.testing.assert_allclose(out.scores, [0.8])


def test_probability_below_threshold_gives_no_boxes() -> None:
    out = cam_to_boxes(blobs(CENTRES[:1]), 0.49, threshold=0.5)
    assert out.boxes.shape == (0, 4) and out.scores.shape == (0,)
    assert len(cam_to_boxes(blobs(CENTRES[:1]), 0.5, threshold=0.5)) == 1


def test_constant_heatmap_gives_no_boxes() -> None:
    assert len(cam_to_boxes(np.full((16, 16), 3.0), 1.0, threshold=0.5)) == 0


def test_out_shape_scales_boxes() -> None:
    hm = np.zeros((64, 64), dtype=np.float32)
    hm[10:20, 30:40] = 1.0
    small = cam_to_boxes(hm, 0.9, threshold=0.5)
    big = cam_to_boxes(hm, 0.9, threshold=0.5, out_shape=(1024, 1024))
    np.testing.assert_array_equal(small.boxes, [[30, 10, 10, 10]])
    np.testing.assert_allclose(big.boxes, small.boxes * 16)
    np.testing.assert_allclose(big.scores, small.scores)
    # per axis: height x16, width x8
    aniso = cam_to_boxes(hm, 0.9, threshold=0.5, out_shape=(1024, 512))
    np.testing.assert_allclose(aniso.boxes, [[240, 160, 80, 160]])


def test_boxes_are_clipped_inside_the_image() -> None:
    hm = np.zeros((32, 32), dtype=np.float32)
    hm[0:8, 24:32] = 1.0
    out = cam_to_boxes(
        hm, 0.9, threshold=0.5, config=BoxConfig(pad_fraction=1.0), out_shape=(64, 64)
    )
    (x, y, w, h) = out.boxes[0]
    assert x >= 0 and y == 0 and x + w == 64 and y + h <= 64
    # the 8x8 box grown by 100% (4 px each side) then clipped: x from 20 to 32 -> 40..64 scaled
    np.testing.assert_allclose(out.boxes, [[40, 0, 24, 24]])


def test_lung_mask_removes_blob_outside_lungs() -> None:
    hm = blobs(CENTRES[:2])
    lung = np.zeros((SIZE, SIZE), dtype=bool)
    lung[60:, 60:] = True  # only the second blob (90, 95) is inside
    out = cam_to_boxes(hm, 0.9, threshold=0.5, lung_mask=lung)
    assert len(out) == 1
    assert iou_matrix(planted_box(*CENTRES[1]), out.boxes)[0, 0] >= 0.5
    # a lung mask at another resolution is resized to the heatmap
    small_lung = lung[::4, ::4]
    out_small = cam_to_boxes(hm, 0.9, threshold=0.5, lung_mask=small_lung)
    np.testing.assert_allclose(out_small.boxes, out.boxes)


def test_max_boxes_keeps_best_scores() -> None:
    hm = blobs(CENTRES, amps=[1.0, 0.6, 0.8])
    cfg = BoxConfig(rule="peak", peak_fraction=0.3, max_boxes=2)
    out = cam_to_boxes(hm, 1.0, threshold=0.5, config=cfg)
    assert len(out) == 2
    ious = iou_matrix(np.stack([planted_box(*c) for c in CENTRES]), out.boxes)
    # kept: blob 0 (amp 1.0) then blob 2 (amp 0.8); blob 1 (amp 0.6) dropped
    assert ious[0, 0] >= 0.5 and ious[2, 1] >= 0.5 and ious[1].max() == 0.0


def test_nms_function_and_config() -> None:
    boxes = np.array([[0, 0, 10, 10], [1, 1, 10, 10], [50, 50, 5, 5]], dtype=float)
    # IoU(box0, box1) = 81 / 119 = 0.68 > 0.3 -> box1 suppressed
    np.testing.assert_array_equal(nms(boxes, np.array([0.9, 0.8, 0.7]), 0.3), [0, 2])
    np.testing.assert_array_equal(nms(boxes, np.array([0.7, 0.8, 0.9]), 0.3), [2, 1])
    np.testing.assert_array_equal(nms(boxes, np.array([0.9, 0.8, 0.7]), 0.9), [0, 1, 2])
    # Two close blobs with large padding overlap; NMS keeps only one of them.
    hm = blobs([(40.0, 40.0), (40.0, 62.0)])
    loose = cam_to_boxes(hm, 0.9, threshold=0.5, config=BoxConfig(pad_fraction=1.5, nms_iou=1.0))
    strict = cam_to_boxes(hm, 0.9, threshold=0.5, config=BoxConfig(pad_fraction=1.5, nms_iou=0.1))
    assert len(loose) == 2 and len(strict) == 1


def test_split_midline_splits_a_spanning_blob() -> None:
    yy, xx = np.mgrid[0:SIZE, 0:SIZE] + 0.5
    # elongated horizontally across the midline x = 64
    hm = np.exp(-((yy - 60) ** 2 / (2 * 8**2) + (xx - 64) ** 2 / (2 * 25**2)))
    whole = cam_to_boxes(hm, 0.9, threshold=0.5, config=BoxConfig())
    split = cam_to_boxes(hm, 0.9, threshold=0.5, config=BoxConfig(split_midline=True))
    assert len(whole) == 1
    assert whole.boxes[0, 0] < 64 < whole.boxes[0, 0] + whole.boxes[0, 2]
    assert len(split) == 2
    left, right = sorted(split.boxes.tolist())
    assert left[0] + left[2] == 64 and right[0] == 64


def test_min_area_drops_small_components() -> None:
    hm = np.zeros((100, 100), dtype=np.float32)
    hm[10:40, 10:40] = 1.0  # 900 px
    hm[70:73, 70:73] = 1.0  # 9 px < 0.005 * 10000 = 50 px
    out = cam_to_boxes(hm, 0.9, threshold=0.5, config=BoxConfig(closing=0))
    np.testing.assert_array_equal(out.boxes, [[10, 10, 30, 30]])
    keep_all = cam_to_boxes(
        hm, 0.9, threshold=0.5, config=BoxConfig(closing=0, min_area_fraction=0)
    )
    assert len(keep_all) == 2


def test_closing_bridges_a_small_gap() -> None:
    hm = np.zeros((40, 40), dtype=np.float32)
    hm[10:20, 5:15] = 1.0
    hm[10:20, 16:26] = 1.0  # 1-px gap at column 15
    assert len(cam_to_boxes(hm, 0.9, threshold=0.5, config=BoxConfig(closing=0))) == 2
    closed = cam_to_boxes(hm, 0.9, threshold=0.5, config=BoxConfig(closing=3))
    np.testing.assert_array_equal(closed.boxes, [[5, 10, 21, 10]])


def test_unknown_rule_raises_config_error() -> None:
    with pytest.raises(ConfigError, match="notebook, otsu, peak"):
        BoxConfig(rule="bogus")
    with pytest.raises(ConfigError, match="max_boxes"):
        BoxConfig(max_boxes=0)


@pytest.mark.parametrize(
    ("heatmap", "match"),
    [
        (np.zeros((2, 8, 8)), "2-D"),
        (np.zeros(8), "2-D"),
        (np.array([[0.0, np.nan], [1.0, 2.0]]), "NaN"),
        (np.array([[0.0, np.inf], [1.0, 2.0]]), "infinite"),
    ],
)
def test_bad_heatmaps_raise(heatmap: np.ndarray, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        cam_to_boxes(heatmap, 0.9, threshold=0.5)


def test_bad_probability_raises() -> None:
    with pytest.raises(ValueError, match="probability"):
        cam_to_boxes(np.zeros((4, 4)), 1.5, threshold=0.5)


def test_batch_matches_single_calls() -> None:
    hms = [blobs(CENTRES[:1]), blobs(CENTRES[:2], seed=1), blobs(CENTRES, seed=2)]
    probs = [0.9, 0.2, 0.7]
    shapes = [(256, 256), None, (512, 512)]
    out = cam_to_boxes_batch(hms, probs, threshold=0.5, config=BoxConfig(), out_shapes=shapes)
    assert [len(o) for o in out] == [1, 0, 3]
    for o, hm, p, s in zip(out, hms, probs, shapes, strict=True):
        single = cam_to_boxes(hm, p, threshold=0.5, out_shape=s)
        assert isinstance(o, ScoredBoxes)
        np.testing.assert_array_equal(o.boxes, single.boxes)
        np.testing.assert_array_equal(o.scores, single.scores)
    with pytest.raises(ValueError, match="probabilities"):
        cam_to_boxes_batch(hms, probs[:2], threshold=0.5)
    with pytest.raises(ValueError, match="lung_masks"):
        cam_to_boxes_batch(hms, probs, threshold=0.5, lung_masks=[None])


def test_smoothing_merges_a_grid_of_peaks_into_one_box() -> None:
    """A dilated backbone's CAM can be a grid of isolated hot pixels over one region."""
    hm = np.zeros((128, 128), np.float32)
    hm[40:80:6, 30:70:6] = 1.0  # a lattice of single hot pixels over a 40 x 40 region
    plain = cam_to_boxes(hm, 0.9, threshold=0.5, config=BoxConfig(closing=0, max_boxes=3))
    smooth = cam_to_boxes(
        hm,
        0.9,
        threshold=0.5,
        config=BoxConfig(closing=0, max_boxes=3, smooth_fraction=0.03),
    )
    assert len(plain) == 0  # each hot pixel alone is under the minimum area
    assert len(smooth) == 1
    x, y, w, h = smooth.boxes[0]
    assert 25 <= x <= 42 and 35 <= y <= 52 and 25 <= w <= 50 and 25 <= h <= 50


def test_smoothing_fraction_is_validated() -> None:
    with pytest.raises(ConfigError, match="smooth_fraction"):
        BoxConfig(smooth_fraction=0.7)


# --- the "multi" rule (issue 13): several thresholds, one box per mode, confidences per box ----


def test_multi_finds_two_blobs_of_different_strength_on_a_ramp() -> None:
    """A strong and a weak blob (amplitudes 1.0 and 0.5, different sizes) on a background ramp:
    both come back, strong first, each box close to its blob's 1.5-sigma box."""
    ramp = np.linspace(0.0, 0.25, SIZE)[None, :] * np.ones((SIZE, 1))
    strong, weak = (40.0, 40.0, 6.0), (88.0, 92.0, 9.0)  # (row, col, sigma)
    hm = ramp + gaussian(SIZE, *strong[:2], strong[2]) + gaussian(SIZE, *weak[:2], weak[2], 0.5)
    hm += 0.02 * np.random.default_rng(3).random((SIZE, SIZE))
    out = cam_to_boxes(hm, 0.9, threshold=0.5, config=BoxConfig(rule="multi", max_boxes=3))
    assert len(out) == 2  # two modes: no third box although max_boxes is 3
    truth = np.stack([planted_box(*strong[:2], strong[2]), planted_box(*weak[:2], weak[2])])
    ious = iou_matrix(truth, out.boxes)
    assert ious[0, 0] >= 0.5 and ious[1, 1] >= 0.5, ious
    assert out.scores[0] > out.scores[1] > 0.0
    assert out.scores[0] <= 0.9  # probability x mean x coverage
    # the one-threshold rule at half the peak cuts the weak blob to a box far inside its own
    peak = cam_to_boxes(hm, 0.9, threshold=0.5, config=BoxConfig(rule="peak", max_boxes=3))
    weak_peak = iou_matrix(truth[1:], peak.boxes)[0].max()
    assert weak_peak < ious[1, 1], (weak_peak, ious[1, 1])


def test_multi_gives_one_box_for_a_flat_topped_map() -> None:
    """A plateau with soft edges has one mode: one box, around the plateau, confidence =
    probability x mean over the box's component (coverage 1 at the lowest threshold)."""
    yy, xx = np.mgrid[0:SIZE, 0:SIZE] + 0.5
    r = np.hypot(yy - 70, xx - 50)
    hm = np.clip((22.0 - r) / 3.0, 0.0, 1.0) + 0.005 * np.random.default_rng(4).random(r.shape)
    out = cam_to_boxes(hm, 0.8, threshold=0.5, config=BoxConfig(rule="multi", max_boxes=3))
    assert len(out) == 1
    plateau = np.array([28.0, 48.0, 44.0, 44.0])  # the disc of radius 22 at (row 70, col 50)
    assert iou_matrix(plateau, out.boxes)[0, 0] >= 0.8, out.boxes
    assert 0.7 < out.scores[0] <= 0.8


def test_multi_keeps_two_modes_that_merge_at_the_lowest_threshold() -> None:
    """Two close blobs joined at 0.3 of the peak but apart at 0.5: the merged component holds
    two modes, so it is no candidate; each blob gets its own box."""
    hm = blobs([(60.0, 44.0), (60.0, 66.0)], amps=[1.0, 0.9])
    merged = cam_to_boxes(hm, 0.9, threshold=0.5, config=BoxConfig(rule="peak", peak_fraction=0.3))
    assert len(merged) == 1  # one component at the lowest threshold
    out = cam_to_boxes(hm, 0.9, threshold=0.5, config=BoxConfig(rule="multi"))
    assert len(out) == 2
    assert np.all(iou_matrix(out.boxes[:1], out.boxes[1:]) == 0.0)
    assert out.boxes[0, 0] < out.boxes[1, 0]  # the stronger (left) blob first


def test_multi_box_grows_with_a_wide_mode_and_shrinks_with_a_peaked_one() -> None:
    """The threshold is chosen per mode from the map: a Gaussian's box is its ~1.5-sigma box
    whatever its width, so two widths give two sizes (a fixed threshold gives them too, but
    here no setting was tuned)."""
    sizes = []
    for sigma in (4.0, 10.0):
        hm = gaussian(SIZE, 64.0, 64.0, sigma)
        out = cam_to_boxes(hm, 1.0, threshold=0.5, config=BoxConfig(rule="multi", closing=0))
        assert len(out) == 1
        assert iou_matrix(planted_box(64.0, 64.0, sigma), out.boxes)[0, 0] >= 0.6
        sizes.append(out.boxes[0, 2])
    assert sizes[1] > 2 * sizes[0]


def test_multi_fractions_are_validated_and_survive_json() -> None:
    import json

    from pneumoloc.inference.recipe import InferenceRecipe

    config = BoxConfig(rule="multi", multi_fractions=[0.7, 0.2, 0.45])
    assert config.multi_fractions == (0.2, 0.45, 0.7)  # sorted, a tuple (hashable)
    recipe = InferenceRecipe(box_config=config)
    back = InferenceRecipe.from_meta(json.loads(json.dumps(recipe.to_meta())))
    assert back.box_config == config
    for bad in ([], [0.0, 0.5], [0.5, 0.5], [1.2], ["x"]):
        with pytest.raises(ConfigError, match="multi_fractions"):
            BoxConfig(rule="multi", multi_fractions=bad)
