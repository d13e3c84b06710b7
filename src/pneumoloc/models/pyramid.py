"""A pyramid decoder over several backbone stages: evidence maps at stride 8 from image labels.

A timm CNN's last feature map has stride 32: at 192-256 px that is a 6x6 to 8x8 grid, each cell
an eighth of the lung field, too coarse to draw a box of 6% of the image (the median RSNA box).
PYLON (Preechakul et al., "Improved image classification explainability with high-accuracy
heatmaps", iScience 2022) keeps the backbone and adds a light top-down decoder: the deepest map
is projected to ``D`` channels, upsampled and added to projections of the stride-16 and stride-8
stages, and a 1x1 head on the result gives a per-location logit map that is pooled (global max
in PYLON) into the image logit. Trained with image labels only, its maps were much sharper than
CAM on ChestX-ray14 (pointing game 0.45 -> 0.62).

:class:`PyramidBackbone` is that decoder as a backbone of :class:`~pneumoloc.models.classifier.
CamClassifier`: it returns the ``(B, D, H/8, W/8)`` decoded feature map, the classifier's
per-location linear head is PYLON's 1x1 segmentation head, and pooling the CAM with ``"max"``
(or ``"lse"``) is PYLON's global pooling. So the heatmap stays exact (``pool(CAM) == logit``)
and every CAM method, the ONNX export and the rest of pneumoloc work unchanged.

Written here rather than taken from segmentation-models-pytorch (which has FPN, PAN and UNet
decoders but not PYLON, and builds its own encoders) because it is three small blocks over
timm's ``forward_intermediates``. Differences from the paper, on purpose: two up-blocks (stride
8, not 4) to bound CPU cost, and no pyramid-attention block on the bottleneck (its three 2x
poolings need a bottleneck of at least 8x8; at 192 px it is 6x6).
"""

from __future__ import annotations

from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn

from pneumoloc.errors import ConfigError

__all__ = ["DECODERS", "PyramidBackbone"]

DECODERS = ("pylon",)
"""Names of the decoders ``build_model(decoder=...)`` accepts."""

DECODER_CHANNELS = 128
"""PYLON's decoder width."""


def _conv_bn_relu(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())


class _Up(nn.Module):
    """PYLON's UP block: ``upsample(deeper) + conv(conv(lateral))`` (1x1 convolutions)."""

    def __init__(self, lateral_channels: int, channels: int) -> None:
        super().__init__()
        self.lateral = nn.Sequential(
            _conv_bn_relu(lateral_channels, lateral_channels),
            _conv_bn_relu(lateral_channels, channels),
        )

    def forward(self, lateral: Tensor, deeper: Tensor) -> Tensor:
        up = F.interpolate(deeper, size=lateral.shape[-2:], mode="bilinear", align_corners=True)
        out: Tensor = up + self.lateral(lateral)
        return out


class PyramidBackbone(nn.Module):
    """A timm encoder plus a PYLON-style decoder; called on (B, 1, H, W), returns
    ``(B, channels, H/8, W/8)``.

    Args:
        encoder: A timm CNN with ``forward_intermediates`` and ``feature_info`` (built with
            ``num_classes=0, global_pool=""``). Its layers after the deepest stage used (the
            head convolution) are pruned, so every parameter is trained (DDP requires it).
        channels: Decoder width ``D``.

    Raises:
        ConfigError: The encoder has no stages at strides 8, 16 and 32.
    """

    def __init__(self, encoder: Any, channels: int = DECODER_CHANNELS) -> None:
        super().__init__()
        info = list(getattr(encoder, "feature_info", []))
        strides = [int(f["reduction"]) for f in info]
        if not callable(getattr(encoder, "forward_intermediates", None)) or not all(
            s in strides for s in (8, 16, 32)
        ):
            raise ConfigError(
                "the pyramid decoder needs a timm CNN with forward_intermediates and stages at "
                f"strides 8, 16 and 32 (this one has strides {strides})"
            )
        # The last stage of each stride (timm lists one entry per stride for CNNs).
        self.indices = [max(i for i, s in enumerate(strides) if s == r) for r in (8, 16, 32)]
        chans = [int(info[i]["num_chs"]) for i in self.indices]
        encoder.prune_intermediate_layers(self.indices, prune_head=True)
        self.encoder = encoder
        self.bottleneck = _conv_bn_relu(chans[2], channels)
        self.up16 = _Up(chans[1], channels)
        self.up8 = _Up(chans[0], channels)
        self.num_features = channels

    def forward(self, x: Tensor) -> Tensor:
        f8, f16, f32 = self.encoder.forward_intermediates(
            x, indices=self.indices, intermediates_only=True
        )
        y = self.bottleneck(f32)
        y = self.up16(f16, y)
        out: Tensor = self.up8(f8, y)
        return out
