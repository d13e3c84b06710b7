"""Report figures (PNG) with matplotlib's object API: no pyplot, so no global figure state.

Every function takes the plain lists/dicts that ``pneumoloc.metrics`` returns, writes one PNG
and returns its path. A curve that is undefined for the data (one class only, no boxes) gives
a figure that says so rather than an error, so a report is always complete.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from matplotlib.axes import Axes
from matplotlib.figure import Figure

__all__ = ["plot_box_sweep", "plot_calibration", "plot_pr", "plot_roc"]

_SIZE = (4.8, 4.2)
_DPI = 100


def _figure(
    nrows: int = 1, height_ratios: Sequence[float] | None = None
) -> tuple[Figure, list[Axes]]:
    fig = Figure(figsize=_SIZE if nrows == 1 else (_SIZE[0], _SIZE[1] * 1.25), dpi=_DPI)
    axes = fig.subplots(
        nrows,
        1,
        squeeze=False,
        gridspec_kw={"height_ratios": height_ratios} if height_ratios else None,
    )
    return fig, [ax for row in axes for ax in row]


def _save(fig: Figure, path: str | Path) -> Path:
    path = Path(path)
    fig.tight_layout()
    fig.savefig(path, format="png")
    return path


def _undefined(ax: Axes, message: str) -> None:
    ax.text(0.5, 0.5, message, ha="center", va="center", wrap=True, transform=ax.transAxes)


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def plot_roc(
    curves: Mapping[str, Sequence[float]],
    path: str | Path,
    *,
    auroc: float | None = None,
    ci: tuple[float | None, float | None] | None = None,
    operating_point: tuple[float, float] | None = None,
) -> Path:
    """ROC curve.

    Args:
        curves: ``roc_pr_curves`` output (``fpr``, ``tpr``); empty lists when undefined.
        path: PNG to write.
        auroc: Shown in the legend.
        ci: Bootstrap interval of the AUROC, shown in the legend.
        operating_point: ``(fpr, tpr)`` at the model's threshold, marked on the curve.
    """
    fig, (ax,) = _figure()
    fpr, tpr = list(curves.get("fpr", [])), list(curves.get("tpr", []))
    ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=1, label="chance")
    if fpr:
        label = f"AUROC {_fmt(auroc)}"
        if ci is not None and ci[0] is not None and ci[1] is not None:
            label += f" (95% CI {ci[0]:.3f}-{ci[1]:.3f})"
        ax.plot(fpr, tpr, color="C0", lw=2, label=label)
        if operating_point is not None:
            ax.plot(*operating_point, "o", color="C3", label="model threshold")
        ax.legend(loc="lower right", fontsize=8)
    else:
        _undefined(ax, "ROC undefined: the data hold only one class")
    ax.set(
        xlim=(0, 1),
        ylim=(0, 1.01),
        xlabel="1 - specificity (false positive rate)",
        ylabel="sensitivity (true positive rate)",
        title="ROC",
    )
    return _save(fig, path)


def plot_pr(
    curves: Mapping[str, Sequence[float]],
    path: str | Path,
    *,
    auprc: float | None = None,
    prevalence: float | None = None,
    operating_point: tuple[float, float] | None = None,
) -> Path:
    """Precision-recall curve.

    Args:
        curves: ``roc_pr_curves`` output (``precision``, ``recall``).
        path: PNG to write.
        auprc: Average precision, shown in the legend.
        prevalence: Drawn as the no-skill line.
        operating_point: ``(recall, precision)`` at the model's threshold.
    """
    fig, (ax,) = _figure()
    precision, recall = list(curves.get("precision", [])), list(curves.get("recall", []))
    if recall:
        ax.step(recall, precision, where="post", color="C0", lw=2, label=f"AP {_fmt(auprc)}")
        if prevalence is not None:
            ax.axhline(
                prevalence, ls="--", color="grey", lw=1, label=f"prevalence {prevalence:.3f}"
            )
        if operating_point is not None:
            ax.plot(*operating_point, "o", color="C3", label="model threshold")
        ax.legend(loc="lower left", fontsize=8)
    else:
        _undefined(ax, "precision-recall undefined: the data hold only one class")
    ax.set(
        xlim=(0, 1),
        ylim=(0, 1.01),
        xlabel="recall (sensitivity)",
        ylabel="precision (PPV)",
        title="Precision-recall",
    )
    return _save(fig, path)


def plot_calibration(
    bins: Mapping[str, Sequence[Any]], path: str | Path, *, ece: float | None = None
) -> Path:
    """Reliability diagram (observed fraction of positives per probability bin) with counts.

    Args:
        bins: ``calibration_curve_bins`` output.
        path: PNG to write.
        ece: Expected calibration error, shown in the title.
    """
    fig, (ax, hist) = _figure(2, height_ratios=(3, 1))
    centres = list(bins["bin_centers"])
    observed = list(bins["observed_fraction"])
    predicted = list(bins["mean_predicted"])
    counts = list(bins["counts"])
    width = 1.0 / max(len(centres), 1)
    kept = [
        (p, o) for p, o in zip(predicted, observed, strict=True) if p is not None and o is not None
    ]
    ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=1, label="perfect calibration")
    if kept:
        ax.plot([p for p, _ in kept], [o for _, o in kept], "o-", color="C0", label="model")
    ax.set(
        xlim=(0, 1),
        ylim=(0, 1),
        ylabel="observed fraction with pneumonia",
        title="Calibration" + (f" (ECE {ece:.3f})" if ece is not None else ""),
    )
    ax.legend(loc="upper left", fontsize=8)
    hist.bar(centres, counts, width=width * 0.9, color="C0")
    hist.set(xlim=(0, 1), xlabel="predicted probability", ylabel="images")
    return _save(fig, path)


def plot_box_sweep(curve: Mapping[str, Sequence[float]], path: str | Path) -> Path:
    """MaxBoxAcc sweep: box accuracy against the CAM threshold, one line per IoU threshold.

    Args:
        curve: ``max_box_acc(...)["curve"]``: ``cam_thresholds`` and ``iou_<d>`` lists.
        path: PNG to write.
    """
    fig, (ax,) = _figure()
    cams = list(curve.get("cam_thresholds", []))
    drawn = False
    for i, (key, values) in enumerate((k, v) for k, v in curve.items() if k.startswith("iou_")):
        values = list(values)
        if not values:
            continue
        best = max(range(len(values)), key=values.__getitem__)
        d = key.removeprefix("iou_")
        ax.plot(cams, values, color=f"C{i}", lw=2, label=f"IoU >= {d}: max {values[best]:.3f}")
        ax.plot(cams[best], values[best], "o", color=f"C{i}")
        drawn = True
    if drawn:
        ax.legend(loc="upper right", fontsize=8)
    else:
        _undefined(ax, "no ground-truth boxes in these images")
    ax.set(
        xlim=(0, 1),
        ylim=(0, 1.01),
        xlabel="CAM threshold (fraction of the heatmap's range)",
        ylabel="box accuracy (images with truth)",
        title="MaxBoxAcc sweep",
    )
    return _save(fig, path)
