"""One picture per X-ray: the image, its heatmap, ground-truth and predicted boxes, the probability.

Used by ``evaluate`` (report gallery), ``predict`` and the web page, so that they all draw the
same thing. Drawing is done with Pillow (no figure machinery, thread-safe, fast). The colour
map is matplotlib's "inferno" table, shipped as ``inferno.npy`` (256 x 3, float64, the values of
``matplotlib.colormaps["inferno"]``, checked by a test) so that ``predict`` does not import
matplotlib (~0.14 s) for it.

Colours: ground truth is drawn in cyan, predictions in lime green with their confidence; the
heatmap uses the "inferno" map (black - purple - orange - yellow), which contains neither.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

if TYPE_CHECKING:
    from pneumoloc.inference.prediction import Prediction

__all__ = [
    "GT_COLOUR",
    "PRED_COLOUR",
    "heatmap_colours",
    "prediction_overlay",
    "render_overlay",
    "save_png",
]

GT_COLOUR = (0, 229, 255)
"""Ground-truth boxes (cyan)."""
PRED_COLOUR = (57, 255, 20)
"""Predicted boxes (lime green)."""
_HEATMAP_CMAP = "inferno"
_BANNER_BG = (20, 20, 20)
_TEXT = (240, 240, 240)


def _as_boxes(boxes: Any) -> np.ndarray:
    if boxes is None:
        return np.zeros((0, 4))
    arr = np.asarray(boxes, dtype=np.float64)
    if arr.size == 0:
        return np.zeros((0, 4))
    if arr.ndim != 2 or arr.shape[1] != 4:
        raise ValueError(f"boxes must have shape (N, 4) (x, y, width, height), got {arr.shape}")
    return arr


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has no scalable default font
        return ImageFont.load_default()


def _heat_at(heatmap01: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """The heatmap in [0, 1], float32, resized to ``shape`` (H, W)."""
    hm = np.nan_to_num(np.asarray(heatmap01, dtype=np.float32), nan=0.0, posinf=1.0, neginf=0.0)
    if hm.ndim != 2 or hm.size == 0:
        raise ValueError(f"heatmap must be a non-empty 2-D array, got shape {hm.shape}")
    hm = np.clip(hm, 0.0, 1.0)
    if hm.shape != shape:
        resized = Image.fromarray(hm, mode="F").resize(
            (shape[1], shape[0]), Image.Resampling.BILINEAR
        )
        hm = np.clip(np.asarray(resized, dtype=np.float32), 0.0, 1.0)
    return hm


def _lut_index(values01: np.ndarray, n: int) -> np.ndarray:
    """matplotlib's colormap index of values in [0, 1]: ``int(x * N)``, with x == 1 at N - 1."""
    index = values01 * (np.float32(n) if values01.dtype == np.float32 else float(n))
    index[index == n] = n - 1
    return index.astype(np.intp)


def heatmap_colours(heat01: np.ndarray) -> np.ndarray:
    """RGB float64 (..., 3) of heat values in [0, 1]: ``matplotlib.colormaps["inferno"](heat)``
    without its alpha, value for value, from the shipped table (no matplotlib import)."""
    table = _heatmap_table()
    return table[_lut_index(np.array(heat01, copy=True), len(table))]


def _blend(grey01: np.ndarray, heat: np.ndarray, alpha: float) -> np.ndarray:
    """RGB uint8 of ``(1 - w) * grey + w * colour(heat)`` with ``w = alpha * heat``.

    Channel by channel with 1-D table look-ups, the same float32 operations per pixel as the
    whole-image version (a (H, W, 3) gather took most of an overlay's time).
    """
    weight = alpha * heat
    base = grey01 * (1.0 - weight)
    index = _lut_index(heat, len(_heatmap_lut()))
    out = np.empty((*heat.shape, 3), np.uint8)
    for c, column in enumerate(_heatmap_columns()):
        channel = column.take(index)
        channel *= weight
        channel += base
        channel *= 255.0
        channel += 0.5
        np.clip(channel, 0, 255, out=channel)
        out[..., c] = channel
    return out


@lru_cache(maxsize=1)
def _heatmap_table() -> np.ndarray:
    """The heatmap colormap's table as shipped, RGB float64 (N, 3)."""
    table = np.load(Path(__file__).with_name("inferno.npy"), allow_pickle=False)
    if table.ndim != 2 or table.shape[1] != 3 or table.dtype != np.float64:  # pragma: no cover
        raise RuntimeError(f"inferno.npy: expected (N, 3) float64, got {table.dtype} {table.shape}")
    table.setflags(write=False)
    return table


@lru_cache(maxsize=1)
def _heatmap_lut() -> np.ndarray:
    """The heatmap colormap's table, RGB float32 (N, 3)."""
    table: np.ndarray = _heatmap_table().astype(np.float32)
    table.setflags(write=False)
    return table


@lru_cache(maxsize=1)
def _heatmap_columns() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    lut = _heatmap_lut()
    columns = tuple(np.ascontiguousarray(lut[:, c]) for c in range(3))
    for column in columns:
        column.setflags(write=False)
    return columns  # type: ignore[return-value]


def render_overlay(
    pixels_uint8: np.ndarray,
    heatmap01: np.ndarray | None,
    pred_boxes: Any,
    pred_scores: Sequence[float] | np.ndarray | None,
    gt_boxes: Any = None,
    probability: float | None = None,
    threshold: float | None = None,
    title: str | None = None,
    alpha: float = 0.4,
    *,
    box_shape: tuple[int, int] | None = None,
    min_display: int = 384,
    colour_bar: bool = False,
) -> np.ndarray:
    """Draw an X-ray with its heatmap, boxes and probability.

    Args:
        pixels_uint8: Grey (H, W) uint8 image (0 = black).
        heatmap01: Heatmap in [0, 1], any resolution (resized to the image), or None for none.
            It is blended with a per-pixel opacity ``alpha * heat``, so cold regions leave the
            radiograph untouched.
        pred_boxes: (N, 4) predicted boxes (x, y, width, height) in ``box_shape`` pixels.
        pred_scores: (N,) confidences printed next to the predicted boxes (or None).
        gt_boxes: (M, 4) ground-truth boxes in ``box_shape`` pixels, or None.
        probability: Pneumonia probability shown in the banner.
        threshold: Decision threshold shown in the banner with the decision it implies.
        title: First banner line (e.g. an image id); it is only drawn, never used as a path.
        alpha: Largest opacity of the heatmap.
        box_shape: (H, W) of the boxes' coordinate system (e.g. the original image when the
            pixels are a downsized copy); default the pixels' shape.
        min_display: Images whose long side is smaller are enlarged so text stays legible.
        colour_bar: Add the heatmap's colour scale (0 to 1 of the per-image maximum) to the
            banner when a heatmap is drawn, and list in the box legend only the kinds of box
            drawn (no "truth box" entry without ``gt_boxes``). Off by default: the picture is
            unchanged for existing callers.

    Returns:
        RGB uint8 (H', W' + banner, 3) image: a text banner above the (possibly enlarged)
        picture.
    """
    grey = np.asarray(pixels_uint8)
    if grey.ndim != 2 or grey.size == 0:
        raise ValueError(f"pixels must be a non-empty 2-D grey image, got shape {grey.shape}")
    if grey.dtype != np.uint8:
        raise ValueError(f"pixels must be uint8, got {grey.dtype}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    h, w = grey.shape
    scale = max(1.0, min_display / max(h, w))
    out_h, out_w = round(h * scale), round(w * scale)
    base = Image.fromarray(grey)
    if (out_h, out_w) != (h, w):
        base = base.resize((out_w, out_h), Image.Resampling.BILINEAR)
    # The same float32 operations as ``(1 - w) * grey + w * colours``, in place and with the
    # grey channel broadcast rather than copied three times (the overlay is on predict's path).
    if heatmap01 is not None and alpha > 0:
        grey01 = np.asarray(base, dtype=np.float32) / 255.0
        rgb = _blend(grey01, _heat_at(heatmap01, (out_h, out_w)), alpha)
        picture = Image.fromarray(rgb, mode="RGB")
    else:
        picture = base.convert("RGB")

    bh, bw = box_shape if box_shape is not None else (h, w)
    if bh <= 0 or bw <= 0:
        raise ValueError(f"box_shape must be positive, got {box_shape}")
    sx, sy = out_w / bw, out_h / bh
    draw = ImageDraw.Draw(picture)
    line = max(2, round(out_w / 160))
    font = _font(max(11, out_w // 30))
    for box in _as_boxes(gt_boxes):
        _rectangle(draw, box, sx, sy, GT_COLOUR, line + 1)
    preds = _as_boxes(pred_boxes)
    scores = (
        np.zeros(0) if pred_scores is None else np.asarray(pred_scores, dtype=np.float64).ravel()
    )
    for i, box in enumerate(preds):
        x0, y0 = _rectangle(draw, box, sx, sy, PRED_COLOUR, line)
        if i < scores.size:
            label = f"{scores[i]:.2f}"
            tb = draw.textbbox((x0 + line, y0 + line), label, font=font)
            draw.rectangle(tb, fill=(0, 0, 0))
            draw.text((x0 + line, y0 + line), label, fill=PRED_COLOUR, font=font)
    lines = _banner_lines(
        title, probability, threshold, truth_legend=not colour_bar or gt_boxes is not None
    )
    bar = colour_bar and heatmap01 is not None and alpha > 0
    return np.asarray(_with_banner(picture, lines, font, colour_bar=bar))


def _rectangle(
    draw: ImageDraw.ImageDraw,
    box: np.ndarray,
    sx: float,
    sy: float,
    colour: tuple[int, int, int],
    width: int,
) -> tuple[float, float]:
    x, y, bw, bh = (float(v) for v in box)
    x0, y0 = x * sx, y * sy
    x1, y1 = max(x0 + 1, (x + bw) * sx - 1), max(y0 + 1, (y + bh) * sy - 1)
    draw.rectangle((x0, y0, x1, y1), outline=colour, width=width)
    return x0, y0


Segment = tuple[str, tuple[int, int, int]]


def _banner_lines(
    title: str | None,
    probability: float | None,
    threshold: float | None,
    *,
    truth_legend: bool = True,
) -> list[list[Segment]]:
    lines: list[list[Segment]] = []
    if title:
        lines.append([(title if len(title) <= 60 else title[:57] + "...", _TEXT)])
    if probability is not None:
        text = f"P(pneumonia) = {probability:.3f}"
        if threshold is not None:
            decision = "pneumonia" if probability >= threshold else "no pneumonia"
            text += f"  (threshold {threshold:.3f}: {decision})"
        lines.append([(text, _TEXT)])
    if truth_legend:
        lines.append([("truth box", GT_COLOUR), ("   ", _TEXT), ("predicted box", PRED_COLOUR)])
    else:
        lines.append([("predicted box", PRED_COLOUR)])
    return lines


def _with_banner(
    picture: Image.Image,
    lines: list[list[Segment]],
    font: ImageFont.ImageFont | ImageFont.FreeTypeFont,
    *,
    colour_bar: bool = False,
) -> Image.Image:
    """``picture`` under a banner: ``lines`` (the last is the box legend), then the colour bar.

    The legend and the colour bar are the same on every overlay of a width, so they are drawn
    once and pasted (:func:`_banner_tail`); the result is the same picture, pixel for pixel.
    """
    probe = ImageDraw.Draw(picture)
    heights = [
        math.ceil(probe.textbbox((0, 0), "".join(t for t, _ in segs) or " ", font=font)[3])
        for segs in lines[:-1]
    ]
    pad = 4
    tail = _banner_tail(picture.width, _font_size(font), tuple(lines[-1]), colour_bar, pad)
    banner_h = sum(heights) + pad * len(lines[:-1]) + pad + tail.height
    canvas = Image.new("RGB", (picture.width, picture.height + banner_h), _BANNER_BG)
    canvas.paste(picture, (0, banner_h))
    draw = ImageDraw.Draw(canvas)
    y = pad
    for segs, th in zip(lines[:-1], heights, strict=True):
        _draw_segments(draw, segs, pad, y, font)
        y += th + pad
    canvas.paste(tail, (0, y))
    return canvas


def _font_size(font: ImageFont.ImageFont | ImageFont.FreeTypeFont) -> int:
    return int(getattr(font, "size", 0))


def _draw_segments(
    draw: ImageDraw.ImageDraw,
    segs: Sequence[Segment],
    x0: int,
    y: int,
    font: ImageFont.ImageFont | ImageFont.FreeTypeFont,
) -> None:
    x = float(x0)
    for text, colour in segs:
        draw.text((x, y), text, fill=colour, font=font)
        x += draw.textlength(text, font=font)


@lru_cache(maxsize=32)
def _banner_tail(
    width: int, font_size: int, legend: tuple[Segment, ...], colour_bar: bool, pad: int
) -> Image.Image:
    """The banner's last rows, the same on every overlay of a width: the box legend, then
    (with ``colour_bar``) the heatmap's colour scale, each followed by ``pad`` rows. Read-only
    once made (it is only pasted), so threads may share it."""
    font = _font(font_size)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    text = "".join(t for t, _ in legend) or " "
    legend_h = math.ceil(probe.textbbox((0, 0), text, font=font)[3])
    bar_h = legend_h if colour_bar else 0
    height = legend_h + pad + (bar_h + pad if colour_bar else 0)
    strip = Image.new("RGB", (width, height), _BANNER_BG)
    draw = ImageDraw.Draw(strip)
    _draw_segments(draw, legend, pad, 0, font)
    if colour_bar:
        _draw_colour_bar(strip, draw, font, pad, legend_h + pad, bar_h)
    return strip


def _draw_colour_bar(
    canvas: Image.Image,
    draw: ImageDraw.ImageDraw,
    font: ImageFont.ImageFont | ImageFont.FreeTypeFont,
    x: int,
    y: int,
    height: int,
) -> None:
    """``heatmap 0 [gradient] 1`` on one banner row: the scale of the heatmap's colours."""
    label = "heatmap (fraction of image max)  0 "
    draw.text((x, y), label, fill=_TEXT, font=font)
    x0 = x + math.ceil(draw.textlength(label, font=font))
    end = " 1"
    width = max(16, canvas.width - x0 - math.ceil(draw.textlength(end, font=font)) - 2 * x)
    table = _heatmap_table()
    ramp = table[_lut_index(np.linspace(0.0, 1.0, width), len(table))]
    strip = np.repeat((ramp * 255 + 0.5).astype(np.uint8)[None], max(2, height - 2), axis=0)
    canvas.paste(Image.fromarray(strip, mode="RGB"), (x0, y + 1))
    draw.text((x0 + width, y), end, fill=_TEXT, font=font)


def save_png(rgb: np.ndarray, path: str | Path) -> Path:
    """Write an RGB (or grey) uint8 image as PNG; the parent folder must exist.

    Returns:
        The path written.
    """
    path = Path(path)
    arr = np.asarray(rgb)
    if arr.dtype != np.uint8 or arr.ndim not in (2, 3):
        raise ValueError(f"expected a uint8 (H, W) or (H, W, 3) image, got {arr.dtype} {arr.shape}")
    Image.fromarray(arr).save(path, format="PNG", optimize=False)
    return path


def prediction_overlay(
    prediction: Prediction,
    pixels: np.ndarray,
    *,
    title: str | None = None,
    show_heatmap: bool = True,
    show_boxes: bool = True,
    alpha: float = 0.4,
    colour_bar: bool = True,
) -> np.ndarray:
    """RGB overlay of one prediction on its X-ray (heatmap, boxes, probability and decision).

    ``colour_bar`` adds the heatmap's colour scale and the box legend to the banner.
    """
    boxes = prediction.boxes.boxes if show_boxes else np.zeros((0, 4), np.float32)
    scores = prediction.boxes.scores if show_boxes else np.zeros(0, np.float32)
    return render_overlay(
        pixels,
        prediction.heatmap if show_heatmap else None,
        boxes,
        scores,
        probability=prediction.probability,
        threshold=prediction.threshold,
        title=title,
        alpha=alpha,
        box_shape=prediction.original_shape,
        colour_bar=colour_bar,
    )
