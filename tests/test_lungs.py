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


def _reference_lung_mask(pixels: np.ndarray) -> np.ndarray | None:
    """The first version of ``estimate_lung_mask`` (before issue 15), with scipy's iterated
    morphology and direct Gaussian filtering, kept as the reference the faster one must equal."""
    from scipy import ndimage

    from pneumoloc.localise.geometry import otsu_threshold

    image = np.asarray(pixels, dtype=np.float32)
    h, w = image.shape
    side = min(h, w)
    smooth = ndimage.gaussian_filter(image, sigma=max(1.0, side / 100))
    background = ndimage.gaussian_filter(smooth, sigma=side / 8)
    detail = smooth - background
    dark_full = detail < otsu_threshold(detail, bins=64)
    cut = max(1, round(0.025 * side))
    seeds = ndimage.binary_erosion(dark_full, iterations=cut, border_value=1)
    labels, n = ndimage.label(seeds)
    if n == 0:
        return None
    border = np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))
    areas = ndimage.sum_labels(np.ones_like(labels), labels, index=np.arange(1, n + 1))
    centres = ndimage.center_of_mass(seeds, labels, index=np.arange(1, n + 1))
    candidates = [
        (area, i + 1)
        for i, area in enumerate(areas)
        if (i + 1) not in border
        and area >= 0.02 * h * w / 4
        and 0.1 * h < centres[i][0] < 0.85 * h
        and 0.12 * w < centres[i][1] < 0.88 * w
    ]
    if not candidates:
        return None
    keep = [label for _, label in sorted(candidates, reverse=True)[:2]]
    mask = ndimage.binary_dilation(np.isin(labels, keep), iterations=cut, mask=dark_full)
    mask = ndimage.binary_fill_holes(mask)
    mask = mask | mask[:, ::-1]
    close = max(1, round(0.06 * side))
    mask = ndimage.binary_closing(mask, iterations=close, border_value=0)
    grow = round(0.08 * min(h, w))
    if grow > 0:
        mask = ndimage.binary_dilation(mask, iterations=grow)
    return np.asarray(mask, dtype=bool)


def _films(size: int) -> list[np.ndarray]:
    """Synthetic films, and real ones when ../shared/data is there."""
    from conftest import KERMANY, RSNA_SAMPLE

    config = SynthConfig(n=12, image_size=size, seed=size)
    films = [make_case(config, i).image for i in range(12)]
    rng = np.random.default_rng(size)
    films += [rng.integers(0, 256, (size, size), dtype=np.uint8) for _ in range(3)]  # noise
    films.append(np.zeros((size, size), np.uint8))
    real = sorted((RSNA_SAMPLE / "stage_2_train_images").glob("*.dcm"))[:12]
    real += sorted((KERMANY / "PNEUMONIA").glob("*.jpeg"))[:6] if KERMANY.is_dir() else []
    if real:
        from pneumoloc.predict import read_input

        films += [read_input(path, size).pixels for path in real]
    return films


@pytest.mark.parametrize("size", [64, 192, 200, 256])
def test_fast_mask_equals_the_first_version(size: int) -> None:
    for film in _films(size):
        got, want = estimate_lung_mask(film), _reference_lung_mask(film)
        assert (got is None) == (want is None)
        if want is not None:
            assert got is not None and np.array_equal(got, want)
