"""Anatomy baselines and the label-gated localisation figures (issue 13)."""

from __future__ import annotations

import numpy as np
import pytest

from pneumoloc.localise.anatomy import anatomy_boxes, lung_field_boxes
from pneumoloc.localise.boxes import BoxConfig, cam_to_boxes
from pneumoloc.metrics.anatomy import (
    anatomy_comparison,
    box_accuracy,
    lung_coverage,
    median_box_area,
    random_in_lung_pointing,
    top_box_pointing,
)


def two_lungs(size: int = 64) -> np.ndarray:
    """Two rectangular 'lungs': columns 8-23 and 40-55, rows 10-53."""
    mask = np.zeros((size, size), bool)
    mask[10:54, 8:24] = True
    mask[10:54, 40:56] = True
    return mask


def test_lung_field_boxes_one_box_per_half() -> None:
    boxes = lung_field_boxes(two_lungs())
    np.testing.assert_allclose(boxes, [[8, 10, 16, 44], [40, 10, 16, 44]])
    lower = lung_field_boxes(two_lungs(), lower_fraction=0.5)
    np.testing.assert_allclose(lower, [[8, 32, 16, 22], [40, 32, 16, 22]])
    assert lung_field_boxes(np.zeros((8, 8), bool)).shape == (0, 4)


def test_anatomy_boxes_gated_and_scaled() -> None:
    masks = [two_lungs(), two_lungs(), None]
    out = anatomy_boxes(
        masks, np.array([0.9, 0.1, 0.9]), threshold=0.5, out_shapes=[(128, 128)] * 3
    )
    np.testing.assert_allclose(out[0].boxes[0], [16, 20, 32, 88])
    assert len(out[1]) == 0 and len(out[2]) == 0  # below the gate; no lungs found
    with pytest.raises(ValueError, match="unknown anatomy rule"):
        anatomy_boxes(masks, np.ones(3), threshold=0.5, out_shapes=[(1, 1)] * 3, rule="x")


def test_random_in_lung_pointing_is_the_exact_share_of_lung_inside_truth() -> None:
    # Truth covers rows 10-31 of the left lung: 16 x 22 of 2 x 16 x 44 lung pixels = 0.25.
    gt = np.array([[8.0, 10.0, 16.0, 22.0]])
    assert random_in_lung_pointing([two_lungs()], [gt], [(64, 64)]) == pytest.approx(0.25)
    # Boxes at 4x the mask's resolution give the same share.
    assert random_in_lung_pointing([two_lungs()], [gt * 4], [(256, 256)]) == pytest.approx(0.25)
    assert random_in_lung_pointing([two_lungs()], [np.zeros((0, 4))], [(64, 64)]) is None


def test_box_accuracy_coverage_and_area() -> None:
    gts = [np.array([[0.0, 0.0, 10.0, 10.0]]), np.zeros((0, 4)), np.array([[50, 50, 4, 4.0]])]
    preds = [np.array([[0.0, 0.0, 10.0, 12.0]]), np.array([[1, 1, 2, 2.0]]), np.zeros((0, 4))]
    assert box_accuracy(preds, gts, 0.5) == pytest.approx(0.5)  # 1 hit of 2 images with truth
    assert box_accuracy(preds, gts, 0.9) == pytest.approx(0.0)
    shapes = [(64, 64)] * 3
    assert median_box_area(preds, shapes) == pytest.approx(np.median([120, 4]) / 64**2)
    lungs = [two_lungs()] * 3
    left = lung_field_boxes(two_lungs())[:1]
    cov = lung_coverage([left, np.zeros((0, 4)), np.zeros((0, 4))], lungs, shapes)
    assert cov == pytest.approx(0.5)


def test_anatomy_comparison_credits_a_focused_map_and_not_a_flooded_one() -> None:
    """On images whose truth is a small box in the lower left lung, a heatmap peaked there
    beats the lung-field boxes label-gated; a map flooding both lungs does not."""
    n, size = 6, 64
    mask = two_lungs(size)
    gts = [np.array([[10.0, 36.0, 10.0, 10.0]]) for _ in range(n)]
    focused = np.zeros((size, size), np.float32)
    focused[36:46, 10:20] = 1.0
    flooded = mask.astype(np.float32)
    common = {
        "probs": np.full(n, 0.9),
        "labels": np.ones(n, int),
        "gts": gts,
        "shapes": [(size, size)] * n,
        "masks": [mask] * n,
        "box_threshold": 0.5,
        "box_config": BoxConfig(rule="peak", peak_fraction=0.5, max_boxes=2, split_midline=True),
        "pointing": 1.0,
    }

    def run(heatmap: np.ndarray) -> dict:
        boxes = [
            cam_to_boxes(heatmap, 0.9, threshold=0.5, config=common["box_config"]) for _ in range(n)
        ]
        return anatomy_comparison(heatmaps=[heatmap] * n, model_boxes=boxes, **common)

    good, bad = run(focused), run(flooded)
    lungs = good["lung_fields"]["rsna_map_label_gated"]
    assert good["model"]["rsna_map_label_gated"] > 2 * max(lungs, 1e-9)
    # The lung boxes score 0 here (IoU 0.14 < 0.4), so the ratio is undefined, not infinite.
    assert lungs == 0.0 and good["ratios"]["rsna_map_label_gated_vs_lung_fields"] is None
    assert good["model"]["lung_coverage"] < 0.2
    assert bad["model"]["rsna_map_label_gated"] <= lungs + 1e-9
    assert bad["model"]["lung_coverage"] > 0.9
    # The baselines' pointing game is the random point in the lung: 100 / (2 * 16 * 44).
    assert good["lung_fields"]["pointing_game"] == pytest.approx(100 / (2 * 16 * 44))


def test_label_gated_boxes_given_are_scored_instead_of_the_box_rule() -> None:
    """A self-trained detector's boxes (forced on every truly positive image) are what the
    label-gated figures score when given; the heatmap's box rule is not consulted (a flooded
    map that would score nothing, with perfect given boxes, scores 1)."""
    from pneumoloc.localise.boxes import ScoredBoxes

    n, size = 4, 64
    mask = two_lungs(size)
    gts = [np.array([[10.0, 36.0, 10.0, 10.0]]) for _ in range(n)]
    flooded = mask.astype(np.float32)
    common = {
        "heatmaps": [flooded] * n,
        "probs": np.full(n, 0.9),
        "labels": np.array([1, 1, 1, 0]),
        "model_boxes": [ScoredBoxes() for _ in range(n)],
        "gts": [*gts[:3], np.zeros((0, 4))],
        "shapes": [(size, size)] * n,
        "masks": [mask] * n,
        "box_threshold": 0.5,
        "box_config": BoxConfig(rule="peak", peak_fraction=0.5, max_boxes=2, split_midline=True),
        "pointing": 0.0,
    }
    from_rule = anatomy_comparison(**common)
    perfect = [ScoredBoxes(gts[0].astype(np.float32), np.ones(1, np.float32))] * 3
    given = anatomy_comparison(**common, label_gated_boxes=[*perfect, ScoredBoxes()])
    assert from_rule["model"]["rsna_map_label_gated"] < 0.5
    assert given["model"]["rsna_map_label_gated"] == pytest.approx(1.0)
    assert given["model"]["box_acc_iou50"] == pytest.approx(1.0)
    assert given["model"]["top_box_pointing_label_gated"] == pytest.approx(1.0)
    # the lung-field box's centre (x 16, y 32) is outside the truth (x 10-20, y 36-46)
    assert given["lung_fields"]["top_box_pointing_label_gated"] == pytest.approx(0.0)


def test_top_box_pointing_uses_the_best_scored_box_only() -> None:
    """The centre of the highest-scoring box counts, not any box; no box is a miss; images
    without truth are skipped."""
    from pneumoloc.localise.boxes import ScoredBoxes

    truth = np.array([[10.0, 10.0, 10.0, 10.0]])
    on, off = [12.0, 12.0, 6.0, 6.0], [40.0, 40.0, 6.0, 6.0]
    best_on = ScoredBoxes(np.array([off, on]), np.array([0.2, 0.9]))
    best_off = ScoredBoxes(np.array([off, on]), np.array([0.9, 0.2]))
    gts = [truth, truth, truth, np.zeros((0, 4))]
    assert top_box_pointing([best_on, best_off, ScoredBoxes(), best_on], gts) == pytest.approx(
        1 / 3
    )
    assert top_box_pointing([best_on], [np.zeros((0, 4))]) is None


def test_evaluate_forces_a_detectors_boxes_on_the_truly_positive_images() -> None:
    """``evaluate``'s label-gated boxes for a detector checkpoint: the predictor's own
    ``draw_boxes`` on the truly positive images with the gate open (probability 1), nothing on
    the others; for the box rule, None (the heatmaps are used)."""
    from types import SimpleNamespace

    from pneumoloc.evaluate import EvalPredictions, _detector_label_gated
    from pneumoloc.localise.boxes import ScoredBoxes

    calls = []

    def draw_boxes(images, probs, maps, shapes):  # type: ignore[no-untyped-def]
        calls.append((images.shape, list(probs), maps.shape, list(shapes)))
        return [ScoredBoxes(np.array([[1.0, 2.0, 3.0, 4.0]]), np.ones(1)) for _ in probs]

    heat = np.zeros((8, 8), np.float16)
    preds = EvalPredictions(
        rows=np.array([0, 1, 2]),
        labels=np.array([1, 0, 1]),
        probs=np.array([0.1, 0.9, 0.2]),
        boxes=[ScoredBoxes() for _ in range(3)],
        heatmaps=[heat, heat, heat],
        gts=[np.zeros((0, 4))] * 3,
        shapes=np.array([[16, 16], [16, 16], [32, 32]]),
    )
    cache = SimpleNamespace(images=np.zeros((3, 8, 8), np.uint8))
    detector = SimpleNamespace(box_source="detector", draw_boxes=draw_boxes)
    out = _detector_label_gated(preds, detector, cache)  # type: ignore[arg-type]
    assert out is not None and [len(b) for b in out] == [1, 0, 1]
    assert calls == [((2, 8, 8), [1.0, 1.0], (2, 8, 8), [(16, 16), (32, 32)])]
    rule = SimpleNamespace(box_source="cam", draw_boxes=draw_boxes)
    assert _detector_label_gated(preds, rule, cache) is None  # type: ignore[arg-type]
