"""What pneumoloc says about one image (:class:`Prediction`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pneumoloc.localise.boxes import ScoredBoxes

__all__ = ["Prediction"]


@dataclass
class Prediction:
    """Everything pneumoloc says about one image.

    Attributes:
        probability: Of pneumonia, from the classifier.
        positive: ``probability >= threshold`` (the model's stored decision threshold).
        threshold: The decision threshold used.
        heatmap: float32 (S, S) at the model's input size, normalised to [0, 1] per image.
        boxes: Scored boxes in ORIGINAL image pixels (x, y, width, height); empty when negative.
        original_shape: (height, width) of the source image.
        features: The classifier's pooled features (C,) of the image, when asked for
            (``predict_arrays(..., with_features=True)``; the input check's evidence), else
            None. Never part of a record.
        lung_mask: The label-free lung mask the heatmap was restricted to (bool (S, S)),
            when the recipe uses one and lungs were found, else None; kept so that callers
            needing it (``evaluate``'s anatomy baselines) do not compute it again. Never part
            of a record.
    """

    probability: float
    positive: bool
    threshold: float
    heatmap: np.ndarray
    boxes: ScoredBoxes
    original_shape: tuple[int, int]
    features: np.ndarray | None = field(default=None, repr=False, compare=False)
    lung_mask: np.ndarray | None = field(default=None, repr=False, compare=False)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready record (no heatmap)."""
        return {
            "probability": round(self.probability, 6),
            "decision": "pneumonia" if self.positive else "no pneumonia",
            "threshold": round(self.threshold, 6),
            "boxes": [
                {
                    "x": round(float(b[0]), 1),
                    "y": round(float(b[1]), 1),
                    "width": round(float(b[2]), 1),
                    "height": round(float(b[3]), 1),
                    "confidence": round(float(s), 4),
                }
                for b, s in zip(self.boxes.boxes, self.boxes.scores, strict=True)
            ],
            "image_height": self.original_shape[0],
            "image_width": self.original_shape[1],
        }
