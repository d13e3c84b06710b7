"""Heatmaps: shapes and invariants for every method, side effects undone, planted evidence found."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pneumoloc.cam import CAM_METHODS, classic_cam, compute_cam, library_cam, tta_cam
from pneumoloc.errors import ConfigError
from pneumoloc.models import CamClassifier, build_model

METHODS = list(CAM_METHODS)
GRADIENT_METHODS = ["gradcam", "gradcam++", "hirescam", "layercam"]
SIZE = 64


@pytest.fixture(scope="module")
def nets() -> dict[str, CamClassifier]:
    torch.manual_seed(0)
    return {"smallcamnet": build_model("smallcamnet"), "resnet18": build_model("resnet18")}


def _images(n: int = 3, size: int = SIZE, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 1, size, size, generator=torch.Generator().manual_seed(seed))


HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")


def _no_hooks(module: nn.Module) -> bool:
    # Full backward hooks live in _backward_hooks in this torch (no _full_backward_hooks).
    return all(not getattr(m, attr) for m in module.modules() for attr in HOOK_DICTS)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("name", ["smallcamnet", "resnet18"])
def test_every_method_gives_valid_heatmaps_without_side_effects(
    nets: dict[str, CamClassifier], name: str, method: str
) -> None:
    model = nets[name]
    x = _images(3)
    with torch.no_grad():
        expected = torch.sigmoid(model.eval()(x))
    model.train()
    bn_before = {k: v.clone() for k, v in model.state_dict().items()}
    sentinel = torch.full_like(model.head.weight, 7.0)
    model.head.weight.grad = sentinel.clone()

    # Chunks of 2 images (ScoreCAM would also mask in batches of 2: too slow, keep its default).
    probs, heat = compute_cam(
        model, x, method=method, batch_size=None if method == "scorecam" else 2
    )

    assert heat.shape == (3, SIZE, SIZE)
    assert heat.dtype == torch.float32 and probs.dtype == torch.float32
    assert heat.device == probs.device == next(model.parameters()).device
    assert torch.isfinite(heat).all() and (heat >= 0).all()
    torch.testing.assert_close(probs, expected, atol=1e-5, rtol=0)
    # Side effects undone: training flags, BatchNorm statistics, gradients, freezing, hooks.
    assert all(m.training for m in model.modules())
    for key, value in model.state_dict().items():
        assert torch.equal(value, bn_before[key]), key
    assert torch.equal(model.head.weight.grad, sentinel)
    assert all(p.requires_grad for p in model.parameters())
    assert all(p.grad is None for n, p in model.named_parameters() if n != "head.weight")
    assert _no_hooks(model)
    model.head.weight.grad = None


def test_hooks_live_only_inside_the_block(nets: dict[str, CamClassifier]) -> None:
    model = nets["resnet18"]
    layer = model.backbone.get_submodule("layer3")
    with library_cam(model, "gradcam", target_layers=[layer]) as fn:
        assert layer._forward_hooks  # the library's hooks are there while open
        _, heat = fn(_images(2))
    assert heat.shape == (2, SIZE, SIZE)
    assert not layer._forward_hooks and not layer._backward_hooks
    assert _no_hooks(model)


def test_library_index_error_is_not_swallowed(nets: dict[str, CamClassifier]) -> None:
    # pytorch_grad_cam's __exit__ prints and suppresses IndexError; ours must propagate.
    with pytest.raises(IndexError), library_cam(nets["smallcamnet"], "gradcam"):
        raise IndexError("raised inside the block")


def test_classic_cam_equals_hand_einsum(nets: dict[str, CamClassifier]) -> None:
    model = nets["resnet18"].eval()
    x = _images(2)
    probs, heat = classic_cam(model, x)
    with torch.no_grad():
        feats = model.forward_features(x)
        logits = model(x)
    cam = torch.einsum("bchw,c->bhw", feats, model.head.weight[0]) + model.head.bias[0]
    hand = F.interpolate(cam[:, None], size=(SIZE, SIZE), mode="bilinear", align_corners=False)
    torch.testing.assert_close(heat, hand[:, 0].relu())
    torch.testing.assert_close(probs, torch.sigmoid(logits))


def test_gradcam_is_classic_cam_without_bias_for_avg_pooling() -> None:
    # With average pooling d(logit)/d(feature) = w / (h*w) everywhere, so Grad-CAM weights are
    # proportional to the head weights and Grad-CAM is the bias-free CAM, ReLU'd and normalised.
    # The seed gives a CAM of both signs, so a wrong target sign or a missing ReLU would show.
    torch.manual_seed(2)
    model = build_model("smallcamnet").eval()
    x = _images(2, size=32)
    x[:, :, 4:12, 20:28] += 2.0
    _, grad = compute_cam(model, x, method="gradcam")
    with torch.no_grad():
        feats = model.forward_features(x)
    cam = torch.einsum("bchw,c->bhw", feats, model.head.weight[0])
    assert 0.1 < (cam > 0).float().mean() < 0.9
    cam = cam.relu()
    cam = cam - cam.amin(dim=(1, 2), keepdim=True)
    cam = cam / cam.amax(dim=(1, 2), keepdim=True)
    # The library resizes with OpenCV (bilinear, half-pixel centres), like align_corners=False,
    # then normalises again.
    hand = F.interpolate(cam[:, None], size=(32, 32), mode="bilinear", align_corners=False)[:, 0]
    hand = hand - hand.amin(dim=(1, 2), keepdim=True)
    hand = hand / hand.amax(dim=(1, 2), keepdim=True)
    torch.testing.assert_close(grad, hand, atol=1e-5, rtol=0)


def test_tta_is_flip_equivariant(nets: dict[str, CamClassifier]) -> None:
    model = nets["smallcamnet"]
    with torch.no_grad():  # make the CAM non-trivial: positive bias so the ReLU keeps some map
        model.head.bias.fill_(0.05)
    x = _images(2, seed=3)
    for scales in [(1.0,), (0.9, 1.0, 1.1)]:
        p, heat = compute_cam(model, x, method="cam", tta=True, tta_scales=scales)
        p_flip, heat_flip = compute_cam(
            model, x.flip(-1), method="cam", tta=True, tta_scales=scales
        )
        assert heat.amax() > 0
        torch.testing.assert_close(heat_flip, heat.flip(-1), atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(p_flip, p, atol=1e-6, rtol=0)
    _, plain = classic_cam(model, x)
    assert not torch.allclose(plain, heat)  # TTA did average something
    with torch.no_grad():
        model.head.bias.zero_()


def test_tta_averages_views() -> None:
    x = _images(1, size=8)
    # A fake CAM function whose map is the image itself: flip + flip back is the identity.
    probs, heat = tta_cam(lambda t: (t.mean((1, 2, 3)), t[:, 0]), x)
    torch.testing.assert_close(heat, x[:, 0])
    torch.testing.assert_close(probs, x.mean((1, 2, 3)))
    with pytest.raises(ConfigError):
        tta_cam(lambda t: (t.mean((1, 2, 3)), t[:, 0]), x, scales=())


def _planted_net() -> CamClassifier:
    """smallcamnet whose channel 0 carries local brightness through every layer to the head."""
    model = build_model("smallcamnet").eval()
    convs = [m for m in model.backbone.modules() if isinstance(m, nn.Conv2d)]
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        convs[0].weight[0, 0] = 1.0 / 9.0  # 3x3 box filter of the input
        for conv in convs[1:]:
            conv.weight[0, 0, 1, 1] = 1.0  # pass channel 0 through
        model.head.weight[0, 0] = 1.0
        model.head.bias[0] = -0.1
    return model


def _planted_images() -> tuple[torch.Tensor, tuple[slice, slice]]:
    g = torch.Generator().manual_seed(0)
    x = 0.3 * torch.rand(2, 1, 32, 32, generator=g)
    box = (slice(4, 12), slice(20, 28))  # top right: a transposed or flipped map misses it
    x[:, :, box[0], box[1]] = 1.0
    return x, box


@pytest.mark.parametrize("tta", [False, True])
@pytest.mark.parametrize("method", ["cam", *GRADIENT_METHODS, "scorecam"])
def test_heatmap_peak_lands_on_planted_evidence(method: str, tta: bool) -> None:
    model = _planted_net()
    x, (rows, cols) = _planted_images()
    probs, heat = compute_cam(model, x, method=method, tta=tta)
    assert (probs > 0.5).all()
    for image_heat in heat:
        peak = int(image_heat.argmax())
        row, col = divmod(peak, image_heat.shape[1])
        assert rows.start <= row < rows.stop and cols.start <= col < cols.stop, (method, row, col)
        inside = image_heat[rows, cols].mean()
        outside = image_heat.sum() - image_heat[rows, cols].sum()
        assert inside > 3 * outside / (32 * 32 - 64), method


def test_trained_smallcamnet_localises_the_bright_square() -> None:
    # Trained from scratch for 60 steps on "bright square = positive": the CAM peak must fall in
    # the square on held-out images, at random positions.
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)

    def batch(n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = 0.4 * torch.rand(n, 1, 32, 32, generator=g)
        y = (torch.arange(n) % 2).float()
        corners = torch.randint(0, 24, (n, 2), generator=g)
        for i in range(n):
            if y[i]:
                r, c = corners[i].tolist()
                x[i, :, r : r + 8, c : c + 8] = 1.0
        return x, y, corners

    model = build_model("smallcamnet")
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(60):
        x, y, _ = batch(16)
        loss = F.binary_cross_entropy_with_logits(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    x, y, corners = batch(16)
    probs, heat = classic_cam(model, x)
    assert ((probs > 0.5).float() == y).float().mean() >= 0.9
    hits = 0
    for i in torch.nonzero(y).flatten().tolist():
        row, col = divmod(int(heat[i].argmax()), 32)
        r, c = corners[i].tolist()
        hits += r - 1 <= row < r + 9 and c - 1 <= col < c + 9
    assert hits == int(y.sum())


def test_bad_arguments_raise(nets: dict[str, CamClassifier]) -> None:
    model = nets["smallcamnet"]
    with pytest.raises(ConfigError, match="unknown CAM method"):
        compute_cam(model, _images(1), method="fullgrad")
    with pytest.raises(ConfigError, match="target_layers"):
        compute_cam(
            model, _images(1), method="cam", target_layers=[model.backbone.get_submodule("0")]
        )
    with pytest.raises(ValueError, match=r"\(B, 1, H, W\)"):
        compute_cam(model, torch.rand(1, 3, 16, 16))


def test_eigencam_ignores_target_and_normalize_scales_to_one(
    nets: dict[str, CamClassifier],
) -> None:
    model = _planted_net()
    x, _ = _planted_images()
    _, heat = compute_cam(model, x, method="cam", scale_to_max=True)
    torch.testing.assert_close(heat.amax(dim=(1, 2)), torch.ones(2))
    _, eigen = compute_cam(nets["resnet18"], _images(2), method="eigencam")
    assert eigen.shape == (2, SIZE, SIZE) and torch.isfinite(eigen).all()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("method", METHODS)
def test_methods_on_cuda(method: str) -> None:
    torch.manual_seed(0)
    model = build_model("resnet18").cuda().train()
    x = _images(2)  # on the CPU: compute_cam moves it
    with torch.no_grad():
        expected = torch.sigmoid(model.eval()(x.cuda()))
    model.train()
    probs, heat = compute_cam(model, x, method=method)
    assert heat.is_cuda and probs.is_cuda
    assert heat.shape == (2, SIZE, SIZE) and heat.dtype == torch.float32
    assert torch.isfinite(heat).all() and (heat >= 0).all()
    torch.testing.assert_close(probs, expected, atol=1e-4, rtol=0)
    assert all(m.training for m in model.modules())
    assert _no_hooks(model)


def test_thin_svd_eigencam_matches_the_library_projection() -> None:
    from pytorch_grad_cam.utils.svd_on_activations import get_2d_projection

    from pneumoloc.cam.gradcam import first_component_projection

    acts = torch.rand(2, 8, 5, 6, generator=torch.Generator().manual_seed(0)).numpy()
    ours, theirs = first_component_projection(acts), get_2d_projection(acts)
    assert ours.shape == theirs.shape == (2, 5, 6)
    for a, b in zip(ours, theirs, strict=True):  # singular vectors are defined up to sign
        assert min(abs(a - b).max(), abs(a + b).max()) < 1e-4


@pytest.mark.parametrize("name", ["smallcamnet", "resnet18", "efficientnet_b0"])
def test_stage_layers_are_the_last_three_stages_ending_at_the_feature_map(name: str) -> None:
    from pneumoloc.cam import cam_layers_of, stage_layers

    model = build_model(name).eval()
    layers = stage_layers(model)
    assert len(layers) == 3 and layers[-1] is model.cam_target_layer
    seen: list[tuple[int, ...]] = []
    hooks = [m.register_forward_hook(lambda _m, _i, o: seen.append(tuple(o.shape))) for m in layers]
    with torch.no_grad():
        model(_images(1))
    for h in hooks:
        h.remove()
    # Three distinct layers, the earliest strictly finer than the final map.
    assert len(seen) == 3 and len({id(m) for m in layers}) == 3
    assert seen[0][-1] > seen[-1][-1] and all(s[-1] >= seen[-1][-1] for s in seen)
    assert cam_layers_of(model, None) is None and cam_layers_of(model, "final") is None
    with pytest.raises(ConfigError, match="cam_layers"):
        cam_layers_of(model, "all")


def test_multi_stage_layercam_finds_the_planted_opacity() -> None:
    """LayerCAM fused over three stages of a briefly trained network peaks in the planted square,
    where an untrained one follows the brighter distractor; output shape, range and device are
    the single-layer method's."""
    from conftest import planted_square_batch, planted_square_hits, train_on_planted_squares
    from pneumoloc.cam import stage_layers
    from pneumoloc.io.preprocess import to_model_input

    def hits(steps: int) -> int:
        torch.manual_seed(1)
        model = train_on_planted_squares(build_model("smallcamnet"), steps)
        images, _, corners = planted_square_batch(torch.Generator().manual_seed(2), 16)
        probs, maps = compute_cam(
            model, to_model_input(images), method="layercam", target_layers=stage_layers(model)
        )
        assert probs.shape == (16,) and maps.shape == (16, 32, 32)
        assert maps.min() >= 0 and maps.max() <= 1 + 1e-6
        return planted_square_hits(maps, corners)

    assert hits(0) <= 2
    assert hits(80) >= 6
    with pytest.raises(ConfigError, match="target_layers"):  # classic CAM has no layer choice
        model = build_model("smallcamnet")
        compute_cam(model, _images(1), method="cam", target_layers=stage_layers(model))


def test_predictor_fuses_stages_when_asked(tmp_path: Path) -> None:
    from conftest import save_untrained_checkpoint
    from pneumoloc.inference import Predictor

    path = save_untrained_checkpoint(tmp_path / "m.pt", "resnet18", size=SIZE, threshold=0.5)
    fused = Predictor.from_checkpoint(
        path, device="cpu", cam_method="layercam", cam_layers="stages"
    )
    final = Predictor.from_checkpoint(path, device="cpu", cam_method="layercam")
    x = (_images(2) * 255).to(torch.uint8)[:, 0].numpy()
    p1, h1 = fused.heatmaps(x)
    p2, h2 = final.heatmaps(x)
    assert h1.shape == h2.shape == (2, SIZE, SIZE)
    assert abs(p1 - p2).max() < 1e-5 and abs(h1 - h2).max() > 0.05
    assert fused.describe()["cam_layers"] == "stages"
    with pytest.raises(ConfigError, match="target_layers"):
        Predictor.from_checkpoint(path, device="cpu", cam_layers="stages").heatmaps(x)
