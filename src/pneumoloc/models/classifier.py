"""A single-logit classifier whose class activation map is exact by construction.

The network is ``backbone -> feature map f (B, C, h, w) -> head -> pooling``. The head is a
``Linear(C, 1)`` applied at every location *before* spatial pooling, giving the class
activation map

    CAM(y, x) = w · f[:, y, x] + b            (logit units, bias included)

and the logit is the spatial pooling of that map. For average pooling this is the usual
"global average pooling then Linear" network (the linear head commutes with the mean), and
``mean(CAM) == logit`` holds exactly. Log-sum-exp pooling does *not* commute with a linear
head channel by channel, so it is applied to the CAM itself (class-wise pooling):
``logit == LSE_r(CAM)`` exactly. Attention multiple-instance pooling (Ilse et al. 2018) weights
the CAM by a softmax over locations computed from the features by a small gated-attention
branch: ``logit == sum(a * CAM)`` exactly, with ``sum(a) == 1``. Every way, the map the user
sees is the map the decision was pooled from.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from pneumoloc.errors import ConfigError

LSE_R = 5.0
"""Sharpness of log-sum-exp pooling (r -> 0 is the mean, r -> inf the max)."""


def avg_pool_cam(cam: Tensor) -> Tensor:
    """Pool a CAM (B, h, w) to logits (B,) by its spatial mean."""
    return cam.mean(dim=(-2, -1))


def lse_pool_cam(cam: Tensor, r: float = LSE_R) -> Tensor:
    """Pool a CAM (B, h, w) to logits (B,) by log-sum-exp with sharpness ``r``.

    ``(1/r) * log(mean(exp(r * cam)))``, computed stably with ``torch.logsumexp``.
    """
    n = cam.shape[-2] * cam.shape[-1]
    return (torch.logsumexp(r * cam.flatten(-2), dim=-1) - math.log(n)) / r


TOPK_FRACTION = 0.1
"""Fraction of CAM locations averaged by top-k pooling."""


def topk_pool_cam(cam: Tensor, fraction: float = TOPK_FRACTION) -> Tensor:
    """Pool a CAM (B, h, w) to logits (B,) by the mean of its highest ``fraction`` of locations.

    Top-k multiple-instance pooling (as in WILDCAT, Durand et al. 2017, with no negative
    evidence term): only the strongest evidence decides, so training does not reward spreading
    activation over the whole image. The CAM stays exact: the logit is a function of the CAM.
    """
    flat = cam.flatten(-2)
    k = max(1, round(fraction * flat.shape[-1]))
    return flat.topk(k, dim=-1).values.mean(dim=-1)


def max_pool_cam(cam: Tensor) -> Tensor:
    """Pool a CAM (B, h, w) to logits (B,) by its maximum: PYLON's global max pooling
    (``pneumoloc.models.pyramid``); the image is as positive as its most positive location."""
    return cam.flatten(-2).amax(dim=-1)


POOLS: dict[str, Callable[[Tensor], Tensor]] = {
    "avg": avg_pool_cam,
    "lse": lse_pool_cam,
    "topk": topk_pool_cam,
    "max": max_pool_cam,
}
"""Spatial poolings that are functions of the CAM alone, by name."""

ATTENTION_POOL = "attention"
"""Name of the learned attention MIL pooling (needs the features, so not in ``POOLS``)."""

POOL_NAMES: tuple[str, ...] = (*POOLS, ATTENTION_POOL)
"""Every ``pool`` option of ``build_model``."""


class GatedAttention(nn.Module):
    """Gated attention over locations (Ilse, Tomczak & Welling 2018, "Attention-based Deep
    Multiple Instance Learning"), as 1x1 convolutions on a feature map.

    ``a = softmax_{y,x}( w · (tanh(V f) * sigmoid(U f)) )``: one weight per location, summing to
    1 over each image. Written here because timm and torchvision have no MIL pooling that keeps
    the per-location scores.
    """

    def __init__(self, channels: int, hidden: int = 128) -> None:
        super().__init__()
        self.value = nn.Conv2d(channels, hidden, 1)
        self.gate = nn.Conv2d(channels, hidden, 1)
        self.score = nn.Conv2d(hidden, 1, 1)

    def forward(self, feats: Tensor) -> Tensor:
        """Attention weights (B, h, w) >= 0, each image's summing to 1."""
        hidden = torch.tanh(self.value(feats)) * torch.sigmoid(self.gate(feats))
        scores = self.score(hidden)[:, 0].float()
        weights = scores.flatten(-2).softmax(dim=-1).view_as(scores)
        return weights


class CamClassifier(nn.Module):
    """Pneumonia classifier: feature map -> per-location linear head (the CAM) -> pooling.

    Args:
        backbone: Maps (B, 1, H, W) to a feature map (B, C, h, w): a timm model built with
            ``num_classes=0, global_pool=""`` (``forward_head(forward_features(x),
            pre_logits=True)`` is used), or any module that is simply called.
        num_features: C, the number of feature channels (timm: ``head_hidden_size``).
        pool: Name of the spatial pooling: a key of ``POOLS``, or ``"attention"`` for learned
            gated-attention MIL pooling (adds a small attention branch on the features).
        drop_rate: Channel dropout on the feature map during training (``nn.Dropout2d``). With
            average pooling this equals dropout on the pooled feature vector.
        spec: ``{"name": ..., "kwargs": {...}}`` that rebuilds this architecture via
            ``build_model(spec["name"], **spec["kwargs"])``; filled in by ``build_model``.

    Attributes:
        init: Where the initial weights came from (``{"kind": "random"}``,
            ``"imagenet-offline"`` with package, file and sha256, ``"imagenet-timm"`` or
            ``"file"``); filled in by ``build_model`` and stored in checkpoints.
        cam_target_layer: Default target layer for gradient-based CAM methods. An
            ``nn.Identity`` tap whose output is exactly the feature map that feeds the head
            (for timm models ``feature_info[-1]`` is not always that map: on efficientnet_b0
            it is ``blocks.6`` with 320 channels, before the 1280-channel head conv).
    """

    def __init__(
        self,
        backbone: nn.Module,
        num_features: int,
        *,
        pool: str = "avg",
        drop_rate: float = 0.0,
        spec: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if pool not in POOL_NAMES:
            raise ConfigError(f"unknown pooling {pool!r}; choose one of {list(POOL_NAMES)}")
        if not 0.0 <= drop_rate < 1.0:
            raise ConfigError(f"drop_rate must be in [0, 1), got {drop_rate}")
        self.backbone = backbone
        self.feature_tap = nn.Identity()
        self.dropout = nn.Dropout2d(drop_rate) if drop_rate > 0 else nn.Identity()
        self.head = nn.Linear(num_features, 1)
        self.attention = GatedAttention(num_features) if pool == ATTENTION_POOL else None
        self.pool = pool
        self.num_features = num_features
        self.spec: dict[str, Any] = spec if spec is not None else {}
        self.init: dict[str, Any] = {"kind": "random"}

    @property
    def cam_target_layer(self) -> nn.Module:
        """The layer whose output is the final feature map (for grad-cam methods)."""
        return self.feature_tap

    def forward_features(self, x: Tensor) -> Tensor:
        """Feature map (B, C, h, w) of a batch of 1-channel images (B, 1, H, W)."""
        backbone: Any = self.backbone
        if callable(getattr(backbone, "forward_head", None)):
            # timm, built with num_classes=0 and global_pool="": the unpooled map after any
            # per-location head layers (ConvNeXt's LayerNorm, MobileNetV3's conv_head), so every
            # backbone parameter is used (DDP requires it) and pretrained head norms are kept.
            feats = backbone.forward_head(backbone.forward_features(x), pre_logits=True)
        else:
            feats = backbone(x)
        if feats.ndim != 4 or feats.shape[1] != self.num_features:
            raise ValueError(
                f"backbone returned shape {tuple(feats.shape)}, expected "
                f"(B, {self.num_features}, h, w)"
            )
        out: Tensor = self.feature_tap(feats)
        return out

    def cam_from_features(self, feats: Tensor) -> Tensor:
        """CAM (B, h, w) in logit units: ``w · f(y, x) + b`` at every location."""
        weight = self.head.weight[0].to(feats.dtype)
        bias = self.head.bias[0].to(feats.dtype)
        return torch.einsum("bchw,c->bhw", feats, weight) + bias

    def forward_with_cam(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Logits (B,) and the CAM (B, h, w) they were pooled from, in one pass.

        The CAM is at feature resolution, not ReLU'd, bias included; ``pool(cam) == logits``
        exactly (``cam.mean((1, 2))`` for ``pool="avg"``; ``(attention(f) * cam).sum((1, 2))``
        for ``pool="attention"``).
        """
        logits, cam, _ = self.forward_with_cam_and_features(x)
        return logits, cam

    def forward_with_cam_and_features(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """:meth:`forward_with_cam` plus the feature map (B, C, h, w) it came from (the output
        of ``feature_tap``, before dropout), from the same pass."""
        tapped = self.forward_features(x)
        feats = self.dropout(tapped)
        cam = self.cam_from_features(feats)
        if self.attention is not None:
            weights = self.attention(feats)
            return (weights * cam.float()).sum(dim=(-2, -1)).to(cam.dtype), cam, tapped
        return POOLS[self.pool](cam), cam, tapped

    def forward(self, x: Tensor, *, with_cam: bool = False) -> Any:
        """Logits of shape (B,), squeezed: one pneumonia logit per image.

        Use ``torch.sigmoid`` for probabilities and ``BCEWithLogitsLoss`` on float targets
        of shape (B,) for training. ``with_cam=True`` returns ``(logits, cam)`` as
        :meth:`forward_with_cam` does, through ``__call__``, so a DDP or compiled wrapper
        of the model can give the CAM to a training loss.
        """
        logits, cam = self.forward_with_cam(x)
        return (logits, cam) if with_cam else logits
