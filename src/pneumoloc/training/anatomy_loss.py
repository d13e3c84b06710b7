"""An anatomical constraint for weak supervision: no pneumonia outside the lungs.

``TrainConfig.outside_lung_loss`` (``train --outside-lung-loss W``) adds ``W`` times a binary
cross-entropy that pushes the CAM's strongest location *outside* the lung fields to "no
pneumonia", on every training image, positive or negative. The image-level loss is unchanged,
so a positive film must still be explained, but no longer by the mediastinum, the shoulders or
the borders, where round 1 and the issue-13 diagnostics found small-data CAMs put their peaks.

The lung mask is pneumoloc's own label-free estimate (:func:`pneumoloc.localise.lungs.
estimate_lung_mask`, grown by 8 % of the image side), computed on each augmented training image
(about 9 ms per 192 px image on this project's 2-core CPU, so it costs a few percent of a step).
A CAM cell counts as outside when less than half of it (:data:`OUTSIDE_SHARE`) is lung mask;
images without a mask or without such cells do not enter the term. (A first rule, "no mask
pixel in the cell", was run for one seed and replaced before it was understood that its ReLU'd
heatmaps were mostly empty: docs/localisation.md, round 3f.) No box of any image is used: the
mask comes from the pixels alone. Inference is unchanged (the same network, pooled the same way).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from pneumoloc.localise.lungs import estimate_lung_mask

OUTSIDE_SHARE = 0.5
"""A CAM cell whose share of lung-mask pixels is below this counts as outside the lungs."""


def outside_lung_cells(images: torch.Tensor, cam_shape: tuple[int, int]) -> torch.Tensor:
    """bool (B, h, w): CAM cells less than :data:`OUTSIDE_SHARE` lung mask (all False where
    no mask is found).

    Args:
        images: (B, 1, H, W) training images in [0, 1] (after augmentation, before
            standardisation), on any device.
        cam_shape: ``(h, w)`` of the CAM.
    """
    pixels = (images[:, 0].detach().float().clamp(0, 1) * 255).round().to(torch.uint8).cpu()
    masks = []
    for image in pixels.numpy():
        mask = estimate_lung_mask(image)
        masks.append(np.ones_like(image, bool) if mask is None else mask)
    lung = torch.from_numpy(np.stack(masks)).float().unsqueeze(1)
    share = F.adaptive_avg_pool2d(lung, cam_shape)[:, 0]
    return (share < OUTSIDE_SHARE).to(images.device)


def outside_lung_loss(cam: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
    """Mean BCE of each image's strongest outside-lung CAM cell against "no pneumonia".

    Args:
        cam: (B, h, w) CAM in logit units (``CamClassifier.forward(x, with_cam=True)``).
        images: (B, 1, H, W) the images the CAM came from, in [0, 1].

    Returns:
        A scalar; zero (with a gradient path) when no image has an outside cell.
    """
    outside = outside_lung_cells(images, (cam.shape[-2], cam.shape[-1]))
    has = outside.flatten(1).any(dim=1)
    if not bool(has.any()):
        return cam.sum() * 0.0
    strongest = cam.float().masked_fill(~outside, float("-inf")).flatten(1).amax(dim=1)[has]
    return F.binary_cross_entropy_with_logits(strongest, torch.zeros_like(strongest))
