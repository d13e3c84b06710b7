"""Human-readable outputs: overlays of heatmaps and boxes, figures, the HTML report."""

from pneumoloc.report.html import GalleryItem, render_html, write_report
from pneumoloc.report.overlay import GT_COLOUR, PRED_COLOUR, render_overlay, save_png

__all__ = [
    "GT_COLOUR",
    "PRED_COLOUR",
    "GalleryItem",
    "render_html",
    "render_overlay",
    "save_png",
    "write_report",
]
