"""Heatmap refinement: the image-guided random walk grows a CAM peak into the planted opacity."""

from __future__ import annotations

import subprocess
import sys
from functools import cache
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import ndimage

from conftest import save_untrained_checkpoint
from pneumoloc.data.synthetic import SynthConfig, make_case
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
def test_cuda_tensors_are_refined_on_the_host() -> None:
    """Tensors on a GPU are copied to host memory and go through the same numpy walk."""
    img, cam = chest()
    cpu = random_walk_refine(img[None], cam[None])
    gpu = random_walk_refine(torch.from_numpy(img[None]).cuda(), torch.from_numpy(cam[None]).cuda())
    assert gpu.dtype == np.float32
    np.testing.assert_array_equal(gpu, cpu)


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


# --- the numpy walk against the torch code it replaced (issue 15) ----------------------------
#
# PRE-CHANGE REFERENCE: a compact copy of ``random_walk_refine`` as it was written with torch
# before issue 15 (src/pneumoloc/localise/refine.py at commit cefb646; the helpers inlined),
# kept to check that the numpy version computes the same thing. Do not "fix" it: it is the
# definition being matched.


def _torch_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    if sigma <= 0:
        return x
    half = max(1, round(3 * sigma))
    t = torch.arange(-half, half + 1, dtype=x.dtype)
    kernel = torch.exp(-(t**2) / (2 * sigma**2))
    kernel = kernel / kernel.sum()
    x = F.conv2d(F.pad(x, (half, half, 0, 0), mode="replicate"), kernel.view(1, 1, 1, -1))
    return F.conv2d(F.pad(x, (0, 0, half, half), mode="replicate"), kernel.view(1, 1, -1, 1))


def torch_reference_refine(
    images: np.ndarray, heatmaps: np.ndarray, config: RandomWalkConfig | None = None
) -> np.ndarray:
    """The pre-change torch ``random_walk_refine`` (CPU), shapes (B, H, W)."""
    config = config or RandomWalkConfig()
    img = torch.as_tensor(images)
    maps = torch.as_tensor(heatmaps).float()
    img = img.float() / 255.0 if img.dtype == torch.uint8 else img.float()
    size, r = config.work_size, config.radius
    k = 2 * r + 1
    small_img = F.interpolate(img[:, None], size=(size, size), mode="area")
    x = F.interpolate(maps[:, None], size=(size, size), mode="area")
    # transition_matrix
    guide = _torch_blur(small_img, config.smooth)
    centre = guide.flatten(2)
    neighbours = F.unfold(guide, k, padding=r)
    inside = F.unfold(torch.ones_like(guide), k, padding=r)
    affinity = torch.exp(-((neighbours - centre) ** 2) / (2 * config.sigma**2)) * inside
    transition = affinity / affinity.sum(dim=1, keepdim=True).clamp(min=1e-12)
    # random_walk
    for _ in range(config.steps):
        x = (F.unfold(x, k, padding=r) * transition).sum(dim=1).view(-1, 1, size, size)
    refined = F.interpolate(x, size=tuple(maps.shape[-2:]), mode="bilinear", align_corners=False)
    refined = refined[:, 0].clamp(min=0)
    peak = refined.amax(dim=(-2, -1), keepdim=True)
    refined = torch.where(peak > 0, refined / peak.clamp(min=1e-12), torch.zeros_like(refined))
    return refined.numpy().astype(np.float32)


@cache
def synthetic_chest(side: int, index: int) -> np.ndarray:
    """Synthetic chest X-ray ``index`` (uint8, side x side) from ``pneumoloc.data.synthetic``."""
    return make_case(SynthConfig(image_size=side), index).image


def inputs(kind: str, batch: int, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Images and heatmaps (B, H, W): random noise, or chest X-rays with smooth CAM-like maps."""
    h, w = shape
    rng = np.random.default_rng(batch * 1000 + h + w)
    if kind == "noise":
        return rng.integers(0, 256, (batch, h, w), dtype=np.uint8), rng.random((batch, h, w))
    images = np.stack([synthetic_chest(max(h, w), i)[:h, :w] for i in range(batch)])
    maps = ndimage.gaussian_filter(rng.random((batch, h, w)), (0, h / 24, w / 24))
    maps = np.clip((maps - maps.mean()) / maps.std(), 0, None)  # peaks, zero elsewhere
    maps[1::3] = 0  # every third heatmap all zero (stays zero)
    if kind == "float":  # float images in [0, 1], float64 heatmaps
        return images / 255.0, maps
    return images, maps.astype(np.float32)


SHAPES = [(192, 192), (256, 256), (200, 200)]  # 200: area pooling with overlapping windows
# Every kind and shape at batch 1 and 3; batch 16 (the reference takes ~0.5 s on it) for each
# shape once.
CASES = [
    (kind, shape, batch) for kind in ("noise", "chest") for shape in SHAPES for batch in (1, 3)
]
CASES += [("noise", (256, 256), 16), ("chest", (192, 192), 16), ("chest", (200, 200), 16)]


@pytest.mark.parametrize(
    ("kind", "shape", "batch"), CASES, ids=[f"{k}-{h}x{w}-{b}" for k, (h, w), b in CASES]
)
def test_numpy_walk_matches_the_previous_torch_code(
    kind: str, shape: tuple[int, int], batch: int
) -> None:
    images, maps = inputs(kind, batch, shape)
    expected = torch_reference_refine(images, maps)
    got = random_walk_refine(images, maps)
    assert got.shape == expected.shape and got.dtype == np.float32
    assert expected.max() == pytest.approx(1.0)  # not a degenerate all-zero comparison
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize(
    ("kind", "shape", "config"),
    [
        ("float", (200, 200), RandomWalkConfig()),
        ("chest", (50, 50), RandomWalkConfig()),  # grid larger than the image: area upsamples
        ("chest", (192, 200), RandomWalkConfig()),  # one axis divisible by 64, one not
        ("noise", (97, 130), RandomWalkConfig()),
        ("chest", (256, 256), RandomWalkConfig(work_size=48, radius=2, sigma=0.1, steps=7)),
        ("chest", (200, 200), RandomWalkConfig(work_size=80, radius=4, smooth=0, steps=3)),
        ("noise", (192, 192), RandomWalkConfig(steps=0)),
    ],
)
def test_numpy_walk_matches_the_previous_torch_code_off_the_defaults(
    kind: str, shape: tuple[int, int], config: RandomWalkConfig
) -> None:
    images, maps = inputs(kind, 3, shape)
    expected = torch_reference_refine(images, maps, config)
    np.testing.assert_allclose(random_walk_refine(images, maps, config), expected, atol=1e-5)


def test_negative_heatmap_values_are_clamped_like_before() -> None:
    images, maps = inputs("chest", 3, (192, 192))
    signed = maps - 0.3 * maps.max()
    expected = torch_reference_refine(images, signed)
    assert (expected == 0).mean() > 0.1  # the clamp is exercised
    np.testing.assert_allclose(random_walk_refine(images, signed), expected, atol=1e-5)


@pytest.mark.parametrize("shape", [(192, 192), (200, 200)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_a_batch_gives_exactly_what_one_image_at_a_time_gives(shape: tuple[int, int]) -> None:
    images, maps = inputs("chest", 16, shape)
    batched = random_walk_refine(images, maps)
    single = np.concatenate(
        [random_walk_refine(images[i : i + 1], maps[i : i + 1]) for i in range(16)]
    )
    assert np.array_equal(batched, single)


def test_importing_refine_loads_no_torch() -> None:
    code = "import sys, pneumoloc.localise.refine; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
