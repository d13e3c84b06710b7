"""A self-contained HTML report: one file, inline CSS, PNGs beside it by relative link.

No script, no external asset, no CDN: it opens from a file share or an e-mail attachment. Every
value that came from data (paths, image ids, model names) is HTML-escaped; image links are
file names the caller made safe, URL-quoted once more here.
"""

from __future__ import annotations

import html
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

from pneumoloc import DISCLAIMER
from pneumoloc.report.subgroups import subgroups_table

__all__ = ["GalleryItem", "render_html", "write_report"]

_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;max-width:1100px;
margin:2em auto;padding:0 1em;color:#222;line-height:1.45}
h1{font-size:1.6em}h2{border-bottom:1px solid #ccc;padding-bottom:.2em;margin-top:1.6em}
.disclaimer{background:#fff3cd;border:1px solid #e0b200;padding:.6em 1em;font-weight:600}
.limits{background:#f1f3f5;border-left:4px solid #868e96;padding:.5em 1em}
table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ddd;padding:.25em .6em;
text-align:left;vertical-align:top}th{background:#f8f9fa}td.num{text-align:right;
font-variant-numeric:tabular-nums}
.figs{display:flex;flex-wrap:wrap;gap:1em}.figs figure{margin:0}
.gallery{display:flex;flex-wrap:wrap;gap:1em}.gallery figure{margin:0;width:260px}
.gallery img{width:260px;height:auto;border:1px solid #ccc}
figcaption{font-size:.85em;color:#444;word-break:break-all}
.note{color:#555;font-size:.9em}code{font-size:.9em}
"""

# Plain-language meaning of each metric shown, so the report reads without the code.
_CLASSIFICATION_ROWS: list[tuple[str, str, str]] = [
    (
        "auroc",
        "AUROC",
        "probability that a random pneumonia image scores above a random normal one",
    ),
    ("auprc", "AUPRC (average precision)", "area under the precision-recall curve"),
    ("accuracy", "Accuracy", "fraction of images classified correctly at the threshold"),
    ("sensitivity", "Sensitivity (recall)", "fraction of pneumonia images flagged"),
    ("specificity", "Specificity", "fraction of images without pneumonia not flagged"),
    ("precision", "Precision (PPV)", "fraction of flagged images that have pneumonia"),
    ("f1", "F1", "harmonic mean of precision and sensitivity"),
    ("ece", "ECE", "expected calibration error (10 bins; 0 is perfectly calibrated)"),
    ("brier", "Brier score", "mean squared error of the probability (lower is better)"),
    ("threshold", "Decision threshold", "probability at or above which an image is flagged"),
]

_LOCALISATION_ROWS: list[tuple[str, str, str]] = [
    (
        "rsna_map",
        "RSNA challenge score",
        "Kaggle metric: per image TP/(TP+FP+FN) over IoU 0.40-0.75, averaged",
    ),
    (
        "notebook_mean_iou",
        "Mean best IoU (notebook)",
        "per image the best IoU of any predicted with any true box, 0 when either is missing",
    ),
    (
        "pointing_game",
        "Pointing game",
        "fraction of images with boxes whose heatmap peak lies inside a true box",
    ),
]


_ANATOMY_ROWS: list[tuple[str, str]] = [
    ("model", "This model"),
    ("lung_fields", "Lung fields (one box per half of the lung mask; no heatmap)"),
    ("lower_lung_fields", "Lower lung fields (their lower two thirds; no heatmap)"),
]
_ANATOMY_COLUMNS: list[tuple[str, str]] = [
    ("rsna_map", "RSNA score"),
    ("rsna_map_label_gated", "RSNA score, label-gated"),
    ("pointing_game", "Pointing game"),
    ("top_box_pointing_label_gated", "Top-box pointing"),
    ("box_acc_iou30", "Box acc. IoU 0.3"),
    ("box_acc_iou50", "Box acc. IoU 0.5"),
    ("median_box_area", "Median box area"),
    ("lung_coverage", "Lung covered"),
]


@dataclass(frozen=True)
class GalleryItem:
    """One overlay in the gallery.

    Attributes:
        file: Its file name relative to the report folder (already made safe by the caller).
        category: Group heading, e.g. "True positives".
        caption: Text under the picture (escaped here).
    """

    file: str
    category: str
    caption: str


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _num(value: Any, digits: int = 3) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return _e(value)


def _table(rows: Sequence[tuple[str, str]], header: tuple[str, str] | None = None) -> str:
    out = ["<table>"]
    if header:
        out.append(f"<tr><th>{_e(header[0])}</th><th>{_e(header[1])}</th></tr>")
    for key, value in rows:
        out.append(f"<tr><th>{_e(key)}</th><td>{value}</td></tr>")
    out.append("</table>")
    return "\n".join(out)


def _provenance(p: Mapping[str, Any]) -> str:
    split = p.get("split", {})
    tuning = p.get("box_tuning") or {}
    box = json.dumps(p.get("box_config"), sort_keys=True)
    rows = [
        ("Data", f"<code>{_e(p.get('data_source'))}</code>"),
        (
            "Cache",
            f"<code>{_e(p.get('cache_path'))}</code> "
            f"(fingerprint {_e(p.get('cache_fingerprint'))})",
        ),
        (
            "Split",
            f"{_e(split.get('name'))}: {_e(split.get('n_images'))} images "
            f"(patient-level split, seed {_e(split.get('seed'))})",
        ),
        (
            "Images not evaluated",
            f"{_e(p.get('n_unreadable', 0))} unreadable in the cache, "
            f"{_e(p.get('n_missing_labelled', 0))} labelled but missing on disk",
        ),
        ("Checkpoint", f"<code>{_e(p.get('checkpoint'))}</code>"),
        ("Model", _e(p.get("model_id"))),
        ("Image size", f"{_e(p.get('image_size'))} px"),
        (
            "Heatmap method",
            f"{_e(p.get('cam_method'))}"
            + (" with test-time augmentation" if p.get("tta") else "")
            + (
                "; on flagged films the self-trained detector's own score map"
                if p.get("heatmap_source") == "detector"
                else ""
            ),
        ),
        (
            "Boxes drawn by",
            "a self-trained detector (pneumoloc selftrain: learnt from the model's own CAM "
            "boxes, no ground-truth box); the box rule below only where it finds none"
            if p.get("box_source") == "detector"
            else "the box rule on the heatmap",
        ),
        ("Box rule", f"<code>{_e(box)}</code>"),
        (
            "Box settings tuned on validation boxes",
            (
                "yes: chosen by the RSNA score on the validation split "
                f"({_e(tuning.get('n_images'))} images), never on the evaluated images"
            )
            if p.get("boxes_tuned_on_val")
            else "no (checkpoint or default settings)",
        ),
        ("pneumoloc version", _e(p.get("pneumoloc_version"))),
        ("Evaluated at", _e(p.get("evaluated_at"))),
    ]
    return _table(rows)


def _classification(c: Mapping[str, Any]) -> str:
    rows = []
    for key, name, meaning in _CLASSIFICATION_ROWS:
        value = _num(c.get(key))
        if key == "auroc" and c.get("auroc_ci_low") is not None:
            value += f" (95% CI {c['auroc_ci_low']:.3f}-{c['auroc_ci_high']:.3f}, bootstrap)"
        rows.append((name, f"{value} <span class='note'>{_e(meaning)}</span>"))
    cm = c.get("confusion", {})
    rows.append(
        (
            "Confusion",
            f"TP {_e(cm.get('tp'))}, FP {_e(cm.get('fp'))}, "
            f"FN {_e(cm.get('fn'))}, TN {_e(cm.get('tn'))}",
        )
    )
    rows.append(("Images", f"{_e(c.get('n'))} ({_e(c.get('n_positive'))} with pneumonia)"))
    return _table(rows)


def _auroc_ci(m: Mapping[str, Any]) -> str:
    value = _num(m.get("auroc"))
    if m.get("auroc") is not None and m.get("auroc_ci_low") is not None:
        value += f" ({m['auroc_ci_low']:.3f}-{m['auroc_ci_high']:.3f})"
    return value


def _subgroup_row(name: str, m: Mapping[str, Any], n: Any) -> str:
    cells = [
        _e(n),
        _e(m.get("n_positive")),
        _auroc_ci(m),
        _num(m.get("sensitivity")),
        _num(m.get("specificity")),
    ]
    return (
        f"<tr><th>{_e(name)}</th>" + "".join(f"<td class='num'>{c}</td>" for c in cells) + "</tr>"
    )


def _subgroups(c: Mapping[str, Any]) -> str:
    """Within-view and patient-level metrics: one table, or a note when neither applies."""
    by_view = c.get("by_view")
    patient = c.get("patient_level")
    if not by_view and not patient:
        return (
            "<p class='note'>No view position recorded and one image per patient: no "
            "within-view or patient-level breakdown.</p>"
        )
    out = [
        "<table>",
        "<tr><th>Group</th><th>Cases</th><th>With pneumonia</th><th>AUROC (95% CI)</th>"
        "<th>Sensitivity</th><th>Specificity</th></tr>",
    ]
    if by_view:
        for view, m in (by_view.get("views") or {}).items():
            out.append(_subgroup_row(f"View {view}", m, f"{m.get('n')} images"))
    if patient:
        out.append(
            _subgroup_row(
                "Patients (mean probability)", patient, f"{patient.get('n_patients')} patients"
            )
        )
    out.append("</table>")
    notes = []
    if by_view:
        notes.append(
            f"View alone as a predictor of pneumonia (AP = 1, PA = 0): AUROC "
            f"{_num(by_view.get('view_only_auroc'))}, the shortcut baseline. The model's "
            f"probability as a predictor of the view (AP vs PA): AUROC "
            f"{_num(by_view.get('view_predictability_auroc'))}; above 0.5 its score also "
            "tracks the view, as even a sound model's does when one view is more often "
            "positive, so read it beside the within-view AUROCs, each computed on that view's "
            "images only."
        )
    if patient:
        notes.append(
            f"Patient level: {_e(patient.get('n_patients'))} patients "
            f"({_e(patient.get('n_multi_image_patients'))} with several images); a patient's "
            f"probability is the {_e(patient.get('aggregate'))} of its images', its label "
            f"positive if any image is. AUPRC {_num(patient.get('auprc'))}."
        )
    out.extend(f"<p class='note'>{n}</p>" for n in notes)
    return "\n".join(out)


def _localisation(loc: Mapping[str, Any] | None, reason: str | None) -> str:
    if loc is None:
        return f"<p class='limits'>{_e(reason or 'Ground-truth boxes are unavailable.')}</p>"
    rows = [
        (name, f"{_num(loc.get(key))} <span class='note'>{_e(meaning)}</span>")
        for key, name, meaning in _LOCALISATION_ROWS
    ]
    mba = loc.get("max_box_acc") or {}
    for key in sorted(k for k in mba if k.startswith("iou_") and not k.endswith("_cam_threshold")):
        d = key.removeprefix("iou_")
        rows.append(
            (
                f"MaxBoxAcc @ IoU {d}",
                f"{_num(mba.get(key))} <span class='note'>best over CAM thresholds "
                f"(at {_num(mba.get(key + '_cam_threshold'), 2)}) of the fraction of images "
                f"whose largest heatmap region's box has IoU &ge; {_e(d)} with a true box"
                "</span>",
            )
        )
    rows.append(("Images", f"{_e(loc.get('n_images'))} ({_e(loc.get('n_with_truth'))} with boxes)"))
    return _table(rows)


def _anatomy(loc: Mapping[str, Any] | None) -> str:
    """The model beside the evidence-free anatomy baselines on the same films (issue 13): a
    localiser that does not beat them says nothing the lung mask does not."""
    va = (loc or {}).get("vs_anatomy")
    if not va:
        return ""
    head = "".join(f"<th>{_e(name)}</th>" for _, name in _ANATOMY_COLUMNS)
    out = ["<h3>Against anatomy (same films)</h3>", "<table>", f"<tr><th></th>{head}</tr>"]
    for key, name in _ANATOMY_ROWS:
        row = va.get(key) or {}
        cells = "".join(f"<td class='num'>{_num(row.get(k))}</td>" for k, _ in _ANATOMY_COLUMNS)
        out.append(f"<tr><th>{_e(name)}</th>{cells}</tr>")
    out.append("</table>")
    ratios = va.get("ratios") or {}
    out.append(
        "<p class='note'>Label-gated RSNA score: "
        f"{_num(ratios.get('rsna_map_label_gated_vs_lung_fields'), 2)}x the lung fields', "
        f"{_num(ratios.get('rsna_map_label_gated_vs_lower_lung_fields'), 2)}x the lower lung "
        "fields'. Pointing game minus a random point of the lung: "
        f"{_num(ratios.get('pointing_minus_random_in_lung'))}. "
        "(The baselines' pointing game is that random point's exact expectation.) "
        f"{_e(va.get('note', ''))}</p>"
    )
    return "\n".join(out)


def _img(file: str, alt: str) -> str:
    return f'<img src="{_e(quote(file))}" alt="{_e(alt)}">'


def render_html(
    metrics: Mapping[str, Any], figures: Mapping[str, str], gallery: Sequence[GalleryItem]
) -> str:
    """The report's HTML text.

    Args:
        metrics: The ``metrics.json`` content (``provenance``, ``classification``,
            ``localisation`` or ``None`` with ``localisation_unavailable``).
        figures: Caption -> PNG file name relative to the report folder.
        gallery: Overlays, in display order.
    """
    prov = metrics.get("provenance", {})
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>pneumoloc evaluation: {_e(prov.get('model_id', ''))}</title>",
        f"<style>{_CSS}</style></head><body>",
        "<h1>pneumoloc evaluation report</h1>",
        f"<p class='disclaimer'>{_e(prov.get('disclaimer', DISCLAIMER))}</p>",
        "<h2>What was evaluated</h2>",
        _provenance(prov),
        "<h2>Limits</h2>",
        f"<p class='limits'>{_e(prov.get('limits', ''))}</p>",
        "<h2>Classification (image level)</h2>",
        _classification(metrics.get("classification", {})),
        "<h3>By view position and by patient</h3>",
        _subgroups(metrics.get("classification", {})),
        "<h3>By subgroup: view position, sex, age band</h3>",
        subgroups_table(metrics.get("subgroups")),
        "<h2>Localisation (boxes)</h2>",
        _localisation(metrics.get("localisation"), metrics.get("localisation_unavailable")),
        _anatomy(metrics.get("localisation")),
    ]
    if figures:
        parts.append("<h2>Figures</h2><div class='figs'>")
        for caption, file in figures.items():
            parts.append(
                f"<figure>{_img(file, caption)}<figcaption>{_e(caption)}</figcaption></figure>"
            )
        parts.append("</div>")
    parts.append("<h2>Examples</h2>")
    parts.append(
        "<p class='note'>Heatmap: where the model's evidence for pneumonia lies "
        "(yellow strongest). "
        "Cyan boxes: ground truth (when the data have boxes). Green boxes: predicted, with their "
        "confidence. Boxes are only predicted for images at or above the decision threshold.</p>"
    )
    if not gallery:
        parts.append("<p>No example images in these categories.</p>")
    categories: dict[str, list[GalleryItem]] = {}
    for item in gallery:
        categories.setdefault(item.category, []).append(item)
    for category, items in categories.items():
        parts.append(f"<h3>{_e(category)}</h3><div class='gallery'>")
        for item in items:
            parts.append(
                f"<figure>{_img(item.file, item.caption)}"
                f"<figcaption>{_e(item.caption)}</figcaption></figure>"
            )
        parts.append("</div>")
    parts.append(
        f"<hr><p class='note'>{_e(DISCLAIMER)} Generated by pneumoloc "
        f"{_e(prov.get('pneumoloc_version', ''))}; full numbers in "
        "<code>../metrics.json</code>.</p>"
    )
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def write_report(
    report_dir: str | Path,
    metrics: Mapping[str, Any],
    figures: Mapping[str, str],
    gallery: Sequence[GalleryItem],
) -> Path:
    """Write ``index.html`` into ``report_dir`` (which holds the PNGs).

    Returns:
        The path of ``index.html``.
    """
    report_dir = Path(report_dir)
    report_dir.mkdir(parents=True, exist_ok=True)
    path = report_dir / "index.html"
    path.write_text(render_html(metrics, figures, gallery), encoding="utf-8")
    return path
