"""Binary masks -> connected components: the closing and labelling every box rule shares."""

from __future__ import annotations

import numpy as np
from scipy import ndimage

__all__ = ["close_mask", "label_components"]

_EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)


def close_mask(mask: np.ndarray, size: int) -> np.ndarray:
    """Binary closing with a ``size`` x ``size`` square (sizes 0 and 1 leave the mask as is)."""
    if size <= 1:
        return mask
    # Pad first: scipy's erosion treats outside pixels as 0 and would eat components touching
    # the border.
    padded = np.pad(mask, size)
    closed = ndimage.binary_closing(padded, structure=np.ones((size, size), dtype=bool))
    return np.asarray(closed[size:-size, size:-size], dtype=bool)


def label_components(mask: np.ndarray, split_midline: bool) -> tuple[np.ndarray, int]:
    """8-connected components, optionally cut at the vertical midline; labels 1..n."""
    if not split_midline:
        labels, n = ndimage.label(mask, structure=_EIGHT_CONNECTED)
        return labels, int(n)
    mid = mask.shape[1] // 2
    left, n_left = ndimage.label(mask[:, :mid], structure=_EIGHT_CONNECTED)
    right, n_right = ndimage.label(mask[:, mid:], structure=_EIGHT_CONNECTED)
    right = np.where(right > 0, right + n_left, 0)
    return np.concatenate([left, right], axis=1), int(n_left + n_right)
