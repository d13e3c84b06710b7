"""The report by subgroup: a table (HTML) and a forest plot (PNG) of
:func:`pneumoloc.metrics.subgroups.subgroup_metrics`.

One row per group of each attribute (view position, sex, age band), with its counts; one panel
per metric (AUROC, sensitivity, specificity and, with truth boxes, the RSNA score), each point
with its 95% bootstrap interval. Aggregates only: nothing here names an image.
"""

from __future__ import annotations

import html
from collections.abc import Mapping
from pathlib import Path
from typing import Any

__all__ = ["METRICS", "plot_subgroups", "subgroups_table"]

METRICS = (
    ("auroc", "AUROC"),
    ("sensitivity", "Sensitivity"),
    ("specificity", "Specificity"),
    ("rsna_map", "RSNA score"),
)
"""(key, heading) of the metrics shown, each with ``<key>_ci``."""


def _metrics(subgroups: Mapping[str, Any]) -> list[tuple[str, str]]:
    return [m for m in METRICS if m[0] != "rsna_map" or subgroups.get("rsna_scored")]


def _rows(subgroups: Mapping[str, Any]) -> list[tuple[str, str, Mapping[str, Any]]]:
    """(attribute label, group name, metrics) in display order."""
    return [
        (attr["label"], group, m)
        for attr in subgroups.get("attributes", {}).values()
        for group, m in attr["groups"].items()
    ]


def _cell(m: Mapping[str, Any], key: str) -> str:
    value = m.get(key)
    if value is None:
        return "n/a"
    text = f"{value:.3f}"
    low, high = (m.get(f"{key}_ci") or [None, None])[:2]
    if low is not None and high is not None:
        text += f" ({low:.3f}-{high:.3f})"
    return text


def subgroups_table(subgroups: Mapping[str, Any] | None) -> str:
    """HTML: one table of every group's counts and metrics, or a note when there is none."""
    if not subgroups:
        return (
            "<p class='note'>No image records a view position, sex or age (DICOM tags): no "
            "report by subgroup.</p>"
        )
    e = html.escape
    metrics = _metrics(subgroups)
    head = "".join(f"<th>{e(name)} (95% CI)</th>" for _, name in metrics)
    out = [
        "<table>",
        f"<tr><th>Attribute</th><th>Group</th><th>Images</th><th>With pneumonia</th>{head}</tr>",
    ]
    for label, group, m in _rows(subgroups):
        cells = [str(m.get("n")), str(m.get("n_positive"))] + [_cell(m, k) for k, _ in metrics]
        out.append(
            f"<tr><th>{e(label)}</th><th>{e(group)}</th>"
            + "".join(f"<td class='num'>{e(c)}</td>" for c in cells)
            + "</tr>"
        )
    out.append("</table>")
    out.append(
        "<p class='note'>Each group's metrics are computed on its images alone, at the same "
        f"decision threshold ({subgroups.get('threshold', 0):.3f}); intervals are 95% percentile "
        f"bootstrap intervals ({e(str(subgroups.get('n_boot')))} resamples of the group's images; "
        f"none for groups under {e(str(subgroups.get('min_bootstrap')))} images). Groups come "
        "from the DICOM tags; 'unknown' means the tag is missing or not DICOM. Small groups "
        "give wide intervals: a difference is only suggested where intervals do not overlap.</p>"
    )
    return "\n".join(out)


def plot_subgroups(subgroups: Mapping[str, Any], path: str | Path) -> Path:
    """A forest plot: one panel per metric, one row per group, the point and its interval."""
    from matplotlib.figure import Figure

    rows = _rows(subgroups)
    metrics = _metrics(subgroups)
    height = max(2.4, 0.32 * len(rows) + 1.2)
    fig = Figure(figsize=(2.6 * len(metrics) + 1.6, height), dpi=100)
    axes = fig.subplots(1, len(metrics), sharey=True, squeeze=False)[0]
    labels = [f"{label.split(' (')[0]}: {group} (n={m.get('n')})" for label, group, m in rows]
    ys = list(range(len(rows)))[::-1]
    for ax, (key, name) in zip(axes, metrics, strict=True):
        for y, (_, _, m) in zip(ys, rows, strict=True):
            value = m.get(key)
            if value is None:
                ax.text(0.5, y, "n/a", ha="center", va="center", fontsize=8, color="grey")
                continue
            low, high = (m.get(f"{key}_ci") or [None, None])[:2]
            if low is not None and high is not None:
                ax.plot([low, high], [y, y], color="tab:blue", lw=2)
            ax.plot([value], [y], "o", color="tab:blue")
        ax.set_xlim(0, 1)
        ax.set_title(name, fontsize=10)
        ax.grid(axis="x", alpha=0.3)
        if key == "auroc":
            ax.axvline(0.5, color="grey", lw=0.8, ls="--")
    axes[0].set_yticks(ys)
    axes[0].set_yticklabels(labels, fontsize=8)
    axes[0].set_ylim(-0.7, len(rows) - 0.3)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, format="png")
    return path
