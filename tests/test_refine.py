"""Heatmap refinement: the image-guided random walk grows a CAM peak into the planted opacity."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import save_untrained_checkpoint
from pneumoloc.errors import ConfigError
from pneumoloc.localise.refine import RandomWalkConfig, random_walk_refine, refine_heatmaps

S = 128
OPACITY = (20, 40, 55, 90)  # x0, y0, x1, y1 of the planted opacity in the left lung


def chest(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A toy chest: two darker lungs, a brighter opacity in the left one, noise; and a CAM that
    only lights up the opacity's centre (the most discriminative part, as real CAMs do)."""
    rng = np.random.default_rng(seed)
    img = np.full((S, S), 70.0)
    img[20:110, 10:60] = 60
    img[20:110, 68:118] = 60
    x0, y0, x1, y1 = OPACITY
    img[y0:y1, x0:x1] = 140
    img = np.clip(img + rng.normal(0, 12, (S, S)), 0, 255).astype(np.uint8)
    yy, xx = np.mgrid[:S, :S]
    cam = np.exp(-((yy - 60) ** 2 + (xx - 38) ** 2) / (2 * 8.0**2)).astype(np.float32)
    return img, cam


def box_at(heatmap: np.ndarray, fraction: float = 0.5) -> tuple[int, int, int, int]:
    ys, xs = np.nonzero(heatmap >= fraction * heatmap.max())
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


def iou(a: tuple[int, ...], b: tuple[int, ...]) -> float:
    ix = max(0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    area = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / area


def test_random_walk_grows_the_peak_into_the_opacity_and_stops_at_its_edge() -> None:
    img, cam = chest()
    before = iou(box_at(cam), OPACITY)
    refined = random_walk_refine(img[None], cam[None])[0]
    after = iou(box_at(refined), OPACITY)
    assert before < 0.3
    assert after > 0.85, (before, after, box_at(refined))
    # Nothing crosses into the other lung or the body outside the opacity.
    x0, y0, x1, y1 = OPACITY
    outside = np.ones_like(refined, bool)
    outside[y0 - 4 : y1 + 4, x0 - 4 : x1 + 4] = False
    assert refined[outside].max() < 0.2
    assert refined.max() == pytest.approx(1.0)


def test_plain_diffusion_without_the_image_leaks_across_edges() -> None:
    """The image guide matters: on a flat image the same walk is a blur that spills out."""
    img, cam = chest()
    flat = np.full_like(img, 100)
    blurred = random_walk_refine(flat[None], cam[None])[0]
    guided = random_walk_refine(img[None], cam[None])[0]
    x0, y0, x1, y1 = OPACITY
    outside = np.ones_like(cam, bool)
    outside[y0:y1, x0:x1] = False
    assert blurred[outside].sum() > 2 * guided[outside].sum()


def test_shapes_dtypes_and_edge_cases() -> None:
    img, cam = chest()
    batch = np.stack([img, img[:, ::-1]])
    maps = np.stack([cam, np.zeros_like(cam)])
    out = random_walk_refine(batch, maps)
    assert out.shape == (2, S, S) and out.dtype == np.float32
    assert np.all(out[1] == 0)  # an all-zero heatmap stays zero
    # Float images in [0, 1] give the same result as uint8.
    as_float = random_walk_refine(torch.from_numpy(batch).float() / 255, torch.from_numpy(maps))
    np.testing.assert_allclose(as_float, out, atol=1e-5)
    # Non-square working sizes are not needed: heatmaps of any square size work.
    small = random_walk_refine(batch[:, ::2, ::2], maps[:, ::2, ::2])
    assert small.shape == (2, S // 2, S // 2)
    assert random_walk_refine(batch[:0], maps[:0]).shape == (0, S, S)
    with pytest.raises(ValueError, match="must both be"):
        random_walk_refine(batch, maps[:1])
    with pytest.raises(ConfigError):
        random_walk_refine(batch, maps, RandomWalkConfig(radius=0))
    with pytest.raises(ConfigError, match="unknown refinement"):
        refine_heatmaps("crf", batch, maps)
    assert refine_heatmaps(None, batch, maps) is maps
    # Zero steps is the identity (up to the resize to the working grid and back).
    same = random_walk_refine(batch, maps, RandomWalkConfig(steps=0, work_size=S))
    np.testing.assert_allclose(same[0], cam / cam.max(), atol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu() -> None:
    img, cam = chest()
    cpu = random_walk_refine(img[None], cam[None])
    gpu = random_walk_refine(torch.from_numpy(img[None]).cuda(), torch.from_numpy(cam[None]).cuda())
    np.testing.assert_allclose(gpu, cpu, atol=1e-4)


def test_predictor_applies_refinement_from_the_checkpoint(tmp_path: Path) -> None:
    from pneumoloc.inference import Predictor

    path = save_untrained_checkpoint(
        tmp_path / "m.pt", size=64, threshold=0.5, refine="randomwalk", lung_mask=False
    )
    refined = Predictor.from_checkpoint(path, device="cpu")
    plain = Predictor.from_checkpoint(path, device="cpu", refine=None)
    assert refined.refine == "randomwalk" and refined.describe()["refine"] == "randomwalk"
    images = np.stack([chest(seed)[0][::2, ::2] for seed in range(2)])
    p1, h1 = refined.heatmaps(images)
    p2, h2 = plain.heatmaps(images)
    np.testing.assert_allclose(p1, p2)
    np.testing.assert_allclose(h1, random_walk_refine(images, h2), atol=1e-6)
    assert not np.allclose(h1, h2)
