"""The default inference recipe, chosen by the localisation ablation (docs/localisation.md).

Written into every checkpoint ``pneumoloc train`` saves (and into the shipped default model), so
``evaluate``, ``predict``, ``submit`` and ``serve`` use it unless told otherwise.
"""

from __future__ import annotations

from typing import Any

DEFAULT_INFERENCE_RECIPE: dict[str, Any] = {
    "cam_method": "cam",
    "lung_mask": True,
    "refine": None,
    "cam_layers": None,
    "box_gate": "decision",
    "tta": False,
    "box_config": {"rule": "peak", "peak_fraction": 0.5, "split_midline": True, "max_boxes": 2},
}

NOTEBOOK_RECIPE: dict[str, Any] = {
    "cam_method": "cam",
    "lung_mask": False,
    "refine": None,
    "cam_layers": None,
    "box_gate": "decision",
    "tta": False,
    "box_config": {"rule": "notebook", "notebook_std": 0.5, "split_midline": False, "max_boxes": 3},
}
"""The original notebook's rule: CAM thresholded at mean + 0.5 std, connected components."""
