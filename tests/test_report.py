"""Report building blocks: overlays draw where they should, plots always render, HTML is safe."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from pneumoloc import DISCLAIMER
from pneumoloc.evaluate import gallery_file_name
from pneumoloc.report import (
    GT_COLOUR,
    PRED_COLOUR,
    GalleryItem,
    plots,
    render_html,
    render_overlay,
    save_png,
    write_report,
)


def _banner(rgb: np.ndarray, side: int) -> int:
    return rgb.shape[0] - side


def test_overlay_draws_boxes_at_their_pixels() -> None:
    grey = np.full((400, 400), 100, np.uint8)
    rgb = render_overlay(
        grey,
        None,
        [[200, 50, 100, 100]],
        [0.9],
        gt_boxes=[[100, 100, 50, 80]],
        probability=0.8,
        threshold=0.5,
        title="x",
        min_display=0,
    )
    assert rgb.dtype == np.uint8 and rgb.ndim == 3 and rgb.shape[1:] == (400, 3)
    top = _banner(rgb, 400)
    assert top > 0
    # Left edge of the truth box at x=100, halfway down it; right edge of the prediction.
    assert tuple(rgb[top + 140, 100]) == GT_COLOUR
    assert tuple(rgb[top + 100, 299]) == PRED_COLOUR
    # Far from any box and without a heatmap the radiograph is untouched grey.
    assert tuple(rgb[top + 350, 20]) == (100, 100, 100)


def test_overlay_scales_boxes_from_original_pixels_and_enlarges_small_images() -> None:
    grey = np.zeros((32, 32), np.uint8)
    # Box in 1024-px original coordinates starting at the image's middle.
    rgb = render_overlay(
        grey,
        None,
        None,
        None,
        gt_boxes=[[512, 512, 256, 256]],
        box_shape=(1024, 1024),
        min_display=320,
    )
    assert rgb.shape[1] == 320
    top = _banner(rgb, 320)
    assert tuple(rgb[top + 200, 160]) == GT_COLOUR  # left edge at 0.5 * 320
    assert tuple(rgb[top + 200, 100]) == (0, 0, 0)


def test_overlay_heatmap_tints_only_hot_regions() -> None:
    grey = np.full((64, 64), 128, np.uint8)
    heat = np.zeros((16, 16), np.float32)
    heat[:8, :8] = 1.0
    rgb = render_overlay(grey, heat, None, None, alpha=0.5, min_display=0)
    top = _banner(rgb, 64)
    hot, cold = rgb[top + 10, 10].astype(int), rgb[top + 50, 50].astype(int)
    assert tuple(cold) == (128, 128, 128)
    assert hot.max() - hot.min() > 20  # coloured, not grey


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"pixels_uint8": np.zeros((8, 8), np.float32)}, "uint8"),
        ({"pixels_uint8": np.zeros((8, 8, 3), np.uint8)}, "2-D"),
        ({"pred_boxes": [[1, 2, 3]]}, "shape"),
        ({"alpha": 1.5}, "alpha"),
    ],
)
def test_overlay_rejects_bad_input(kwargs: dict, message: str) -> None:
    args = {
        "pixels_uint8": np.zeros((8, 8), np.uint8),
        "heatmap01": None,
        "pred_boxes": None,
        "pred_scores": None,
        **kwargs,
    }
    with pytest.raises(ValueError, match=message):
        render_overlay(**args)


def test_save_png_round_trip(tmp_path: Path) -> None:
    rgb = np.random.default_rng(0).integers(0, 255, (10, 12, 3), dtype=np.uint8)
    path = save_png(rgb, tmp_path / "a.png")
    assert np.array_equal(np.asarray(Image.open(path)), rgb)


def _is_png(path: Path) -> bool:
    with Image.open(path) as im:
        return im.format == "PNG" and im.width > 100


def test_plots_render_defined_and_undefined_curves(tmp_path: Path) -> None:
    curves = {
        "fpr": [0, 0.2, 1],
        "tpr": [0, 0.7, 1],
        "precision": [0.5, 0.8, 1],
        "recall": [1, 0.5, 0],
    }
    empty: dict[str, list[float]] = {"fpr": [], "tpr": [], "precision": [], "recall": []}
    bins: dict[str, list[Any]] = {
        "bin_centers": [0.25, 0.75],
        "observed_fraction": [0.2, None],
        "mean_predicted": [0.3, None],
        "counts": [5, 0],
    }
    sweep = {
        "cam_thresholds": [0.1, 0.5, 0.9],
        "iou_0.3": [0.2, 0.6, 0.1],
        "iou_0.5": [0.1, 0.3, 0],
    }
    written = [
        plots.plot_roc(
            curves, tmp_path / "roc.png", auroc=0.8, ci=(0.7, 0.9), operating_point=(0.2, 0.7)
        ),
        plots.plot_roc(empty, tmp_path / "roc0.png"),
        plots.plot_pr(curves, tmp_path / "pr.png", auprc=0.7, prevalence=0.3),
        plots.plot_pr(empty, tmp_path / "pr0.png"),
        plots.plot_calibration(bins, tmp_path / "cal.png", ece=0.1),
        plots.plot_box_sweep(sweep, tmp_path / "sweep.png"),
        plots.plot_box_sweep({"cam_thresholds": [], "iou_0.3": []}, tmp_path / "sweep0.png"),
    ]
    assert all(_is_png(p) for p in written)


@pytest.mark.parametrize(
    "hostile", ["../../etc/passwd", "..%2f..%2fx", "a b/é ü", "", "..", "x\\..\\y", "/abs/path"]
)
def test_gallery_file_names_are_plain_file_names(hostile: str) -> None:
    name = gallery_file_name("tp", 0, hostile)
    assert re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*\.png", name), name
    id_part = name.split("_", 2)[2]
    assert not id_part.startswith(".") and "/" not in id_part and "\\" not in id_part


def _metrics(source: str = "/data/x") -> dict:
    return {
        "provenance": {
            "data_source": source,
            "model_id": "m<1>",
            "split": {"name": "test"},
            "disclaimer": DISCLAIMER,
            "limits": "only these images",
            "boxes_tuned_on_val": False,
        },
        "classification": {
            "auroc": 0.9,
            "auroc_ci_low": 0.8,
            "auroc_ci_high": 0.95,
            "n": 3,
            "confusion": {"tp": 1, "fp": 0, "fn": 1, "tn": 1},
        },
        "localisation": None,
        "localisation_unavailable": "Ground-truth boxes are unavailable for this data.",
    }


def test_html_escapes_data_and_links_relatively(tmp_path: Path) -> None:
    gallery = [
        GalleryItem(
            file="tp_00_a b.png", category="True positives", caption="<script>alert(1)</script>"
        )
    ]
    text = render_html(_metrics("<img src=x onerror=alert(1)>"), {"ROC": "roc.png"}, gallery)
    assert "<script>" not in text and "<img src=x" not in text
    assert "&lt;script&gt;" in text
    assert DISCLAIMER in text and "only these images" in text
    assert "boxes are unavailable" in text
    assert 'src="tp_00_a%20b.png"' in text and 'src="roc.png"' in text
    assert "http://" not in text and "https://" not in text  # no external asset
    path = write_report(tmp_path / "r", _metrics(), {}, [])
    assert path == tmp_path / "r" / "index.html" and "No example images" in path.read_text()


def test_html_tables_views_and_patients() -> None:
    metrics = _metrics()
    view = {"n_positive": 4, "auroc_ci_low": 0.6, "auroc_ci_high": 0.9}
    metrics["classification"]["by_view"] = {
        "views": {
            "AP": {**view, "n": 10, "auroc": 0.75, "sensitivity": 0.5, "specificity": 0.8},
            "PA": {"n": 3, "n_positive": 0, "auroc": None, "auroc_ci_low": None},
        },
        "view_only_auroc": 0.6875,
        "view_predictability_auroc": 0.8125,
    }
    metrics["classification"]["patient_level"] = {
        "aggregate": "mean",
        "n_patients": 7,
        "n_multi_image_patients": 2,
        "n_positive": 3,
        "auroc": 0.8333,
        "auroc_ci_low": None,
        "auprc": 0.9,
        "sensitivity": 1.0,
        "specificity": 0.25,
    }
    text = render_html(metrics, {}, [])
    rows = re.findall(r"<tr><th>([^<]+)</th>((?:<td class='num'>[^<]*</td>)+)</tr>", text)
    cells = {name: re.findall(r"<td class='num'>([^<]*)</td>", tds) for name, tds in rows}
    assert cells["View AP"] == ["10 images", "4", "0.750 (0.600-0.900)", "0.500", "0.800"]
    assert cells["View PA"] == ["3 images", "0", "n/a", "n/a", "n/a"]
    assert cells["Patients (mean probability)"] == ["7 patients", "3", "0.833", "1.000", "0.250"]
    assert "AUROC 0.688, the shortcut baseline" in text and "AUROC 0.812;" in text
    assert "the mean of its images'" in text
    plain = render_html(_metrics(), {}, [])
    assert "View AP" not in plain and "no within-view or patient-level breakdown" in plain


def test_shipped_heatmap_table_is_matplotlibs_inferno_and_the_blend_matches_the_formula() -> None:
    """``report/inferno.npy`` holds matplotlib's "inferno" values (so predict need not import
    matplotlib), and the per-channel blend is ``(1 - w) grey + w colour(heat)``, w = a heat."""
    from matplotlib import colormaps

    from pneumoloc.report import overlay

    cmap = colormaps["inferno"]
    assert np.array_equal(overlay._heatmap_table(), cmap(np.arange(cmap.N))[:, :3])
    rng = np.random.default_rng(0)
    grey = rng.integers(0, 256, (37, 29)).astype(np.float32) / 255.0
    heat = rng.random((37, 29), dtype=np.float32)
    heat[0, 0], heat[0, 1] = 1.0, 0.0  # both ends of the table
    colours = cmap(heat)[..., :3].astype(np.float32)  # matplotlib's own look-up
    w = (0.4 * heat)[..., None]
    expected = np.clip((colours * w + grey[..., None] * (1.0 - w)) * 255.0 + 0.5, 0, 255)
    assert np.array_equal(overlay._blend(grey, heat, 0.4), expected.astype(np.uint8))


def test_heatmap_colours_equal_matplotlibs_colormap_call() -> None:
    """The web page's heatmap layer (serve) colours with the shipped table, value for value."""
    from matplotlib import colormaps

    from pneumoloc.report.overlay import heatmap_colours

    heat = np.random.default_rng(2).random((33, 21), dtype=np.float32)
    heat[0, :3] = (0.0, 1.0, 0.5)
    expected = colormaps["inferno"](heat)[..., :3]
    assert np.array_equal(heatmap_colours(heat), expected)
    assert heat[0, 1] == 1.0  # the input is not changed


def test_the_report_says_what_drew_the_boxes() -> None:
    metrics = _metrics()
    assert "the box rule on the heatmap" in render_html(metrics, {}, [])
    metrics["provenance"]["box_source"] = "detector"
    text = render_html(metrics, {}, [])
    assert "self-trained detector" in text and "no ground-truth box" in text
    assert "detector's own score map" not in text
    metrics["provenance"]["heatmap_source"] = "detector"
    assert "on flagged films the self-trained detector's own score map" in render_html(
        metrics, {}, []
    )
