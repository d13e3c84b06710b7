"""PNG and JPEG decoding with Pillow.

8-bit grayscale passes through exactly, 16/32-bit grayscale is min-max scaled and colour
images become Pillow's ITU-R 601-2 luma. JPEGs are decoded as luma only and, when
``min_size`` is given, with libjpeg's DCT scaling at 1/2, 1/4 or 1/8 resolution while both
sides stay at least ``min_size``.

Decompression bombs (a small PNG or JPEG that declares a huge image) are refused with
:class:`~pneumoloc.errors.ImageTooLargeError` before any pixel is decoded, in two steps on
purpose: ``Image.open`` reads only the header and runs Pillow's own check
(``DecompressionBombError`` above twice ``Image.MAX_IMAGE_PIXELS``, a process-wide setting
that pneumoloc leaves alone); then the declared width x height is compared with the caller's
``max_pixels`` before ``load()``. Pillow also caps what it inflates from PNG text and ICC
chunks (``PngImagePlugin.MAX_TEXT_CHUNK``, ``MAX_TEXT_MEMORY``); hitting those caps is refused
the same way. The decoders then allocate only what the header declared.
"""

from __future__ import annotations

from typing import BinaryIO

import numpy as np
from PIL import Image

from pneumoloc.errors import ImageTooLargeError, TruncatedImageError
from pneumoloc.io.image import (
    _DECODE_ERRORS,
    XrayImage,
    _describe,
    _minmax_to_uint8,
    _Options,
)


def _read_pillow(fp: BinaryIO, name: str, fmt: str, options: _Options) -> XrayImage:
    label = fmt.upper()
    try:
        img = Image.open(fp, formats=("PNG",) if fmt == "png" else ("JPEG", "MPO"))
    except Image.DecompressionBombError as exc:
        raise ImageTooLargeError(name, f"declared {label} size is absurd ({exc})") from exc
    except ValueError as exc:
        if _is_chunk_bomb(exc):
            raise ImageTooLargeError(
                name, f"{label} metadata inflates past Pillow's limit ({exc})"
            ) from exc
        raise TruncatedImageError(
            name, f"truncated or corrupt {label} header ({_describe(exc)})"
        ) from exc
    except _DECODE_ERRORS as exc:  # includes UnidentifiedImageError (an OSError)
        raise TruncatedImageError(
            name, f"truncated or corrupt {label} header ({_describe(exc)})"
        ) from exc
    with img:
        width, height = img.size
        if width * height > options.max_pixels:
            raise ImageTooLargeError(
                name,
                f"declared size {height} x {width} = {width * height} pixels exceeds the "
                f"limit of {options.max_pixels}; refused before decoding",
            )
        if fmt == "jpeg":
            # Asking for "L" also makes libjpeg emit luma only for colour JPEGs (cheaper than
            # decoding RGB and converting); the size request enables DCT scaling.
            target = (options.min_size, options.min_size) if options.min_size else img.size
            img.draft("L", target)
        try:
            img.load()
            pixels = _pillow_to_uint8(img)
        except Image.DecompressionBombError as exc:
            raise ImageTooLargeError(name, str(exc)) from exc
        except ValueError as exc:
            if _is_chunk_bomb(exc):
                raise ImageTooLargeError(
                    name, f"{label} metadata inflates past Pillow's limit ({exc})"
                ) from exc
            raise TruncatedImageError(
                name, f"truncated or corrupt {label} data ({_describe(exc)})"
            ) from exc
        except _DECODE_ERRORS as exc:
            raise TruncatedImageError(
                name, f"truncated or corrupt {label} data ({_describe(exc)})"
            ) from exc
    return XrayImage(
        pixels=pixels,
        original_shape=(height, width),
        source_format=fmt,
        view_position=None,
        photometric=None,
    )


def _is_chunk_bomb(exc: ValueError) -> bool:
    """Whether Pillow refused a PNG chunk for inflating past its text/ICC caps."""
    text = str(exc)
    return "Decompressed data too large" in text or "Too much memory used in text chunks" in text


def _pillow_to_uint8(img: Image.Image) -> np.ndarray:
    """8-bit grayscale passes through; 16/32-bit grayscale is min-max scaled; colour -> L."""
    if img.mode == "L":
        return np.array(img)
    if img.mode.startswith("I") or img.mode == "F":
        return _minmax_to_uint8(np.array(img))
    # RGB, RGBA, LA, P, 1, CMYK, YCbCr: Pillow's ITU-R 601-2 luma, what users expect for
    # X-rays saved in colour.
    return np.array(img.convert("L"))
