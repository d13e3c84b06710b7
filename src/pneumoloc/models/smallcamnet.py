"""smallcamnet: the small CNN of the original pneumonia-CAM notebook.

Kept faithful on purpose (no BatchNorm, no extra layers) so results can be compared with the
notebook: conv(1->16) ReLU, maxpool 2, conv(16->32) ReLU, maxpool 2, conv(32->64) ReLU,
conv(64->64) ReLU, then global average pooling and Linear(64, 1) in ``CamClassifier``.
All convolutions are 3x3 with padding 1, so the feature map is the input downsampled 4x.
ReLUs are not in-place, so any layer can be a grad-cam target without in-place surprises.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from pneumoloc.errors import ConfigError
from pneumoloc.models.classifier import CamClassifier

SMALLCAMNET_STRIDE = 4
SMALLCAMNET_FEATURES = 64


def smallcamnet_backbone() -> nn.Sequential:
    """The feature extractor: (B, 1, H, W) -> (B, 64, H // 4, W // 4)."""
    return nn.Sequential(
        nn.Conv2d(1, 16, kernel_size=3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(16, 32, kernel_size=3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(32, 64, kernel_size=3, padding=1),
        nn.ReLU(),
        nn.Conv2d(64, SMALLCAMNET_FEATURES, kernel_size=3, padding=1),
        nn.ReLU(),
    )


def build_smallcamnet(
    *,
    drop_rate: float = 0.0,
    output_stride: int | None = None,
    pool: str = "avg",
    **kwargs: Any,
) -> CamClassifier:
    """Build smallcamnet as a ``CamClassifier``.

    Args:
        drop_rate: Channel dropout on the feature map during training.
        output_stride: Must be None or 4 (the network's fixed stride).
        pool: Spatial pooling of the CAM ("avg" as in the notebook, or "lse").
        **kwargs: Not accepted; present so every registry entry has the same signature.

    Raises:
        ConfigError: An unsupported ``output_stride`` or unknown keyword arguments.
    """
    if kwargs:
        raise ConfigError(f"smallcamnet takes no extra arguments, got {sorted(kwargs)}")
    if output_stride not in (None, SMALLCAMNET_STRIDE):
        raise ConfigError(
            f"smallcamnet has a fixed output stride of {SMALLCAMNET_STRIDE}; "
            f"output_stride={output_stride} is not supported (leave it unset)"
        )
    return CamClassifier(
        smallcamnet_backbone(), SMALLCAMNET_FEATURES, pool=pool, drop_rate=drop_rate
    )
