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

Cells are placed where they look (``pneumoloc.models.grid``). Each level is resampled from the
centres of its cells to the centres of the next finer level's, and the decoded map is resampled
once more onto the centres that ``align_corners=False`` upsampling to the input assumes (what
``pneumoloc.cam`` and the ONNX export do). Without this (``align="corners"``, the decoder of
pneumoloc 0.x before issue 13's planted test), the stride-8 map lies half a cell (3.5 px) off
its evidence and the coarser levels drift by up to a stride-16/32 cell across the image: on the
planted-opacity test the trained decoder then points at the opacity far less often.

Written here rather than taken from segmentation-models-pytorch (which has FPN, PAN and UNet
decoders but not PYLON, and builds its own encoders) because it is three small blocks over
timm's ``forward_intermediates``. Differences from the paper, on purpose: two up-blocks (stride
8, not 4) to bound CPU cost, and no pyramid-attention block on the bottleneck (its three 2x
poolings need a bottleneck of at least 8x8; at 192 px it is 6x6).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pneumoloc.errors import ConfigError
from pneumoloc.models.grid import (
    CellGrid,
    encoder_transitions,
    feature_grids,
    resample,
    upsampling_centres,
)

__all__ = ["DECODERS", "DECODER_ALIGNS", "TOP_DOWN_DROP", "PyramidBackbone"]

DECODERS = ("pylon",)
"""Names of the decoders ``build_model(decoder=...)`` accepts."""

DECODER_ALIGNS = ("grid", "corners")
"""How the decoder lines its levels up: ``"grid"`` by where each cell looks (the default),
``"corners"`` by ``align_corners=True`` interpolation (kept so older checkpoints rebuild)."""

DECODER_CHANNELS = 128
"""PYLON's decoder width."""

TOP_DOWN_DROP = 0.5
"""The ``decoder_drop`` the planted-opacity test trains with (``tests/test_planted_opacity.py``).
Trained from scratch on that task with image labels, PYLON's decoder (drop 0) lets its
stride-16/32 path carry the image's evidence to wherever the upsampled coarse map peaks (its
nodes and the borders), so the max-pooled map misses the opacity; dropping that path for half
the images makes the stride-8 lateral path find it. Not the default: real films have not been
measured with it."""


def _conv_bn_relu(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())


_Place = tuple[tuple[CellGrid, CellGrid], tuple[int, int]]
"""(row grid, column grid) and (rows, columns) of one level's map."""


class _Up(nn.Module):
    """PYLON's UP block: ``upsample(deeper) + conv(conv(lateral))`` (1x1 convolutions).

    ``drop``: in training, the probability that an image's ``upsample(deeper)`` term is zeroed
    (the kept ones scaled by ``1 / (1 - drop)``, as in stochastic depth); 0 is PYLON's block.
    """

    def __init__(self, lateral_channels: int, channels: int, drop: float = 0.0) -> None:
        super().__init__()
        self.drop = drop
        self.lateral = nn.Sequential(
            _conv_bn_relu(lateral_channels, lateral_channels),
            _conv_bn_relu(lateral_channels, channels),
        )

    def forward(
        self,
        lateral: Tensor,
        deeper: Tensor,
        places: tuple[_Place, _Place] | None = None,
    ) -> Tensor:
        """``places``: where the cells of ``deeper`` and of ``lateral`` are; None aligns corners."""
        if places is None:
            size = lateral.shape[-2:]
            up = F.interpolate(deeper, size=size, mode="bilinear", align_corners=True)
        else:
            (deep_grids, _), (lat_grids, (rows, cols)) = places
            up = resample(
                deeper,
                (deep_grids[0], lat_grids[0].centres(rows)),
                (deep_grids[1], lat_grids[1].centres(cols)),
            )
        if self.training and self.drop > 0:
            keep = torch.rand(up.shape[0], 1, 1, 1, device=up.device) >= self.drop
            up = up * keep.to(up.dtype) / (1.0 - self.drop)
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
        align: A key of :data:`DECODER_ALIGNS`.
        drop: Top-down drop: in training, each UP block zeroes the upsampled deeper map of an
            image with this probability, so the stride-8 lateral path must find the evidence
            on its own (see :data:`TOP_DOWN_DROP`); 0 (the default) is PYLON's decoder.
        in_chans: Input channels (for the one probe pass that places the cells).

    Raises:
        ConfigError: The encoder has no stages at strides 8, 16 and 32, its cells cannot be
            placed, ``align`` is unknown or ``drop`` is not in [0, 1).
    """

    def __init__(
        self,
        encoder: Any,
        channels: int = DECODER_CHANNELS,
        *,
        align: str = "grid",
        drop: float = 0.0,
        in_chans: int = 1,
    ) -> None:
        super().__init__()
        if align not in DECODER_ALIGNS:
            raise ConfigError(f"unknown decoder_align {align!r}; choose one of {DECODER_ALIGNS}")
        if not 0.0 <= drop < 1.0:
            raise ConfigError(f"decoder_drop must be in [0, 1), got {drop}")
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
        self.align = align
        self.transitions = (
            encoder_transitions(encoder, self.indices, in_chans=in_chans) if align == "grid" else []
        )
        if align == "grid" and not {8, 16, 32} <= set(feature_grids(self.transitions, 64)):
            raise ConfigError(
                "the pyramid decoder cannot place this encoder's stride-8/16/32 cells; "
                "use decoder_align='corners'"
            )
        self.encoder = encoder
        self.bottleneck = _conv_bn_relu(chans[2], channels)
        self.up16 = _Up(chans[1], channels, drop)
        self.up8 = _Up(chans[0], channels, drop)
        self.num_features = channels

    def forward(self, x: Tensor) -> Tensor:
        f8, f16, f32 = self.encoder.forward_intermediates(
            x, indices=self.indices, intermediates_only=True
        )
        y = self.bottleneck(f32)
        if self.align == "corners":
            y = self.up16(f16, y)
            corners: Tensor = self.up8(f8, y)
            return corners
        height, width = int(x.shape[-2]), int(x.shape[-1])
        rows, cols = feature_grids(self.transitions, height), feature_grids(self.transitions, width)
        p8, p16, p32 = (
            ((rows[s], cols[s]), (int(f.shape[-2]), int(f.shape[-1])))
            for s, f in ((8, f8), (16, f16), (32, f32))
        )
        y = self.up16(f16, y, (p32, p16))
        y = self.up8(f8, y, (p16, p8))
        # onto the centres that align_corners=False upsampling to the input assumes
        (n_rows, n_cols) = p8[1]
        out: Tensor = resample(
            y,
            (p8[0][0], upsampling_centres(n_rows, height)),
            (p8[0][1], upsampling_centres(n_cols, width)),
        )
        return out
