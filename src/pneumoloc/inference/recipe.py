"""How a checkpoint's evidence becomes heatmaps and boxes: the inference recipe.

:class:`InferenceRecipe` is a frozen dataclass whose fields are the one list of inference
settings. ``pneumoloc train`` writes one into every checkpoint (as plain top-level keys, see
:meth:`InferenceRecipe.to_meta`; checkpoints load with ``weights_only=True``), the ONNX export
copies the settings its graph can run into the file's metadata, and every predictor reads them
back with :meth:`InferenceRecipe.from_meta`. Checkpoints written before this class existed
store the same keys, so they load unchanged.

The default recipe was chosen by the localisation ablation (docs/localisation.md). Round 1
(GPU, 3 seeds) chose the lung mask, peak-fraction 0.5 boxes, the midline split and at most 2
boxes; round 2 (CPU, 192 px, 3 seeds x 4 training variants) added the image-guided random-walk
refinement, which scored at least as high on the validation split of 4 of the 5 models it was
tried on (higher on 3, the shipped model included) and 0.010 vs 0.011 on the fifth.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from pneumoloc.cam import CAM_ALIGNS, CAM_LAYER_CHOICES, check_cam_floor, check_cam_method
from pneumoloc.errors import ConfigError
from pneumoloc.localise.boxes import BoxConfig
from pneumoloc.localise.refine import REFINE_METHODS

__all__ = [
    "BOX_GATES",
    "DEFAULT_INFERENCE_RECIPE",
    "HEATMAP_SOURCES",
    "NOTEBOOK_BOX_RULE",
    "NOTEBOOK_RECIPE",
    "ONNX_RECIPE_FIELDS",
    "InferenceRecipe",
]

BOX_GATES = ("decision", "f1")
"""``box_gate`` choices: boxes above the decision threshold, or above the F1-optimal
``box_threshold`` of the checkpoint (see ``metrics.classification.f1_threshold``)."""


HEATMAP_SOURCES = ("cam", "detector")
"""``heatmap_source`` choices: the classifier's heatmap (``cam_method``) on every film, or, for a
model with a self-trained detector, the detector's own score map on the films that get boxes
(the CAM elsewhere): its boxes and its map then come from one network."""


@dataclass(frozen=True)
class InferenceRecipe:
    """Inference settings stored with a model. Validated on creation (:class:`ConfigError`).

    Attributes:
        cam_method: Key of ``pneumoloc.cam.CAM_METHODS``.
        tta: Test-time augmentation of the heatmaps.
        lung_mask: Zero the heatmaps outside an estimated lung mask.
        refine: Heatmap refinement before the lung mask (``"randomwalk"``: image-guided random
            walk, ``pneumoloc.localise.refine``); None for none.
        cam_layers: ``"stages"`` fuses the CAM method's maps of the last three backbone stages
            (multi-stage fusion; grad-cam methods only); None or ``"final"``: the final map.
        box_gate: Which probability an image must reach to get boxes: ``"decision"`` (the
            decision threshold) or ``"f1"`` (the checkpoint's ``box_threshold``). Boxes never
            appear on an image decided negative.
        box_config: The heatmap -> boxes rule.
        cam_align: How the classic CAM is upsampled: ``"centre"`` (``align_corners=False``, the
            only way before 0.3) or ``"cells"`` (from each cell's true centre); see
            :data:`pneumoloc.cam.names.CAM_ALIGNS`.
        cam_floor: How the classic CAM is made non-negative: ``"relu"`` (negative evidence
            clipped to 0, the only way before 0.4), ``"shift"`` (each map minus its minimum,
            so a film whose every location votes "no" still ranks them) or ``"auto"`` (ReLU
            for a map with a positive location, shift for one without); see
            :data:`pneumoloc.cam.names.CAM_FLOORS`. An ONNX graph computes the one it was
            exported with (files before 0.4: ``"relu"``).
        heatmap_source: ``"cam"`` or ``"detector"`` (:data:`HEATMAP_SOURCES`): with a
            self-trained detector, ``"detector"`` makes the heatmap of each film that gets
            boxes the detector's score map
            (:func:`pneumoloc.models.detector.fcos_with_score_map`), refined and lung-masked as
            a CAM would be; without a detector it changes nothing.
    """

    cam_method: str = "cam"
    tta: bool = False
    lung_mask: bool = False
    refine: str | None = None
    cam_layers: str | None = None
    box_gate: str = "decision"
    box_config: BoxConfig = field(default_factory=BoxConfig)
    cam_align: str = "centre"
    cam_floor: str = "relu"
    heatmap_source: str = "cam"

    def __post_init__(self) -> None:
        check_cam_method(self.cam_method)
        check_cam_floor(self.cam_floor)
        if self.cam_floor != "relu" and self.cam_method != "cam":
            raise ConfigError(
                f"cam_floor {self.cam_floor!r} is for the classic CAM (cam_method 'cam') only"
            )
        if self.cam_align not in CAM_ALIGNS:
            raise ConfigError(
                f"unknown cam_align {self.cam_align!r}; choose one of {list(CAM_ALIGNS)}"
            )
        if self.cam_align != "centre" and self.cam_method != "cam":
            raise ConfigError(
                f"cam_align {self.cam_align!r} is for the classic CAM (cam_method 'cam') only"
            )
        if self.refine not in (None, *REFINE_METHODS):
            raise ConfigError(
                f"unknown refinement {self.refine!r}; choose one of {list(REFINE_METHODS)}"
            )
        if self.cam_layers not in (None, *CAM_LAYER_CHOICES):
            raise ConfigError(
                f"unknown cam_layers {self.cam_layers!r}; choose one of {list(CAM_LAYER_CHOICES)}"
            )
        if self.heatmap_source not in HEATMAP_SOURCES:
            raise ConfigError(
                f"unknown heatmap_source {self.heatmap_source!r}; choose one of "
                f"{list(HEATMAP_SOURCES)}"
            )
        if self.box_gate not in BOX_GATES:
            raise ConfigError(f"box_gate must be 'decision' or 'f1', got {self.box_gate!r}")
        if not isinstance(self.box_config, BoxConfig):
            raise ConfigError(f"box_config must be a BoxConfig, got {self.box_config!r}")

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        """The settings, in order (the keys :meth:`to_meta` writes)."""
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def from_meta(cls, meta: Mapping[str, Any], **overrides: Any) -> InferenceRecipe:
        """The recipe stored in a model's metadata, with ``overrides`` on top.

        Keys missing from ``meta`` (or stored as None) take the class defaults, as for
        checkpoints written before a setting existed. ``box_config`` may be a dict or a
        :class:`BoxConfig`; an override of None for a non-optional setting is ignored.
        """
        values: dict[str, Any] = {}
        for name in cls.field_names():
            if name in overrides:
                values[name] = overrides[name]
            elif meta.get(name) is not None:
                values[name] = meta[name]
        unknown = set(overrides) - set(cls.field_names())
        if unknown:
            raise ConfigError(f"unknown inference settings: {sorted(unknown)}")
        box = values.get("box_config")
        if isinstance(box, Mapping):
            values["box_config"] = BoxConfig(**box)
        return cls(**values)

    def to_meta(self, fields: tuple[str, ...] | None = None) -> dict[str, Any]:
        """Plain values for a checkpoint or ONNX metadata (``box_config`` as a dict)."""
        out = {name: getattr(self, name) for name in fields or self.field_names()}
        if "box_config" in out:
            out["box_config"] = dataclasses.asdict(self.box_config)
        return out

    def replace(self, **changes: Any) -> InferenceRecipe:
        """A copy with some settings changed (validated)."""
        return dataclasses.replace(self, **changes)


ONNX_RECIPE_FIELDS = (
    "lung_mask",
    "refine",
    "box_gate",
    "box_config",
    "cam_align",
    "cam_floor",
    "heatmap_source",
)
"""The settings an exported ONNX file carries: the graph computes the classic CAM without
test-time augmentation or stage fusion, upsampled as ``cam_align`` says and floored as
``cam_floor`` says (both fixed in the graph), and everything after it runs in every
backend."""

DEFAULT_INFERENCE_RECIPE = InferenceRecipe(
    cam_method="cam",
    lung_mask=True,
    refine="randomwalk",
    cam_layers=None,
    box_gate="decision",
    tta=False,
    box_config=BoxConfig(rule="peak", peak_fraction=0.5, split_midline=True, max_boxes=2),
)

NOTEBOOK_BOX_RULE: dict[str, Any] = {
    "rule": "notebook",
    "notebook_std": 0.5,
    "split_midline": False,
    "max_boxes": 3,
}
"""The notebook's box settings, as ``evaluate --box-rule notebook`` lays them over a
checkpoint's box rule (settings not named here keep the checkpoint's values)."""

NOTEBOOK_RECIPE = InferenceRecipe(
    cam_method="cam",
    lung_mask=False,
    refine=None,
    cam_layers=None,
    box_gate="decision",
    tta=False,
    box_config=BoxConfig(**NOTEBOOK_BOX_RULE),
)
"""The original notebook's rule: CAM thresholded at mean + 0.5 std, connected components."""
