"""Label-free lung fields: found on synthetic chests, absent from a blank image."""

from __future__ import annotations

import numpy as np
import pytest

from pneumoloc.data.anatomy import lung_field_mask
from pneumoloc.data.synthetic import SynthConfig, make_case
from pneumoloc.localise.lungs import estimate_lung_mask


def test_covers_the_synthetic_lung_fields() -> None:
    """A heuristic: most images are covered well, none is missed entirely."""
    config = SynthConfig(n=8, image_size=128, seed=4)
    coverage = []
    for index in range(8):
        case = make_case(config, index)
        mask = estimate_lung_mask(case.image)
        truth = lung_field_mask(128, case.anatomy)
        assert mask is not None and mask.shape == truth.shape and mask.dtype == bool
        assert mask.mean() < 0.7  # not the whole image
        corners = np.zeros_like(mask)
        corners[:8, :8] = corners[:8, -8:] = True
        assert not (mask & corners).any()  # never the air around the patient
        coverage.append((mask & truth).sum() / truth.sum())
    assert np.median(coverage) > 0.8, coverage
    assert min(coverage) > 0.4, coverage


def test_blank_image_has_no_lungs() -> None:
    assert estimate_lung_mask(np.full((64, 64), 128, np.uint8)) is None


def test_rejects_non_2d() -> None:
    with pytest.raises(ValueError, match="2-D"):
        estimate_lung_mask(np.zeros((2, 8, 8), np.uint8))


def test_restrict_to_lungs_zeroes_outside_and_renormalises() -> None:
    from pneumoloc.localise.lungs import restrict_to_lungs

    case = make_case(SynthConfig(n=1, image_size=64, seed=2), 0)
    blank = np.full((64, 64), 128, np.uint8)
    images = np.stack([case.image, blank])
    heat = np.zeros((2, 64, 64), np.float32)
    heat[:, 0:4, 0:4] = 1.0  # a hot corner, outside any lung
    heat[:, 32, 20] = 0.5
    out = restrict_to_lungs(images, heat)
    mask = estimate_lung_mask(case.image)
    assert mask is not None
    assert out[0][~mask].max() == 0 and out[0].max() == 1.0  # the in-lung 0.5 rescaled to 1
    np.testing.assert_array_equal(out[1], heat[1])  # no lungs found: unchanged
