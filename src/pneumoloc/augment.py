"""Deprecated alias (pneumoloc 0.1's path; goes in the next release).

Augmentations moved to :mod:`pneumoloc.training.augment`; the intensity convention to
:mod:`pneumoloc.io.preprocess`, where ``normalise`` is now ``to_model_input``.
"""

from pneumoloc._compat import moved_attribute

_MOVES: dict[str, str | tuple[str, str] | None] = {
    "*": "pneumoloc.training.augment",
    "normalise": ("pneumoloc.io.preprocess", "to_model_input"),
    "standardise": "pneumoloc.io.preprocess",
    "INTENSITY_CONVENTION": "pneumoloc.io.preprocess",
    "INTENSITY_MEAN": "pneumoloc.io.preprocess",
    "INTENSITY_STD": "pneumoloc.io.preprocess",
}


def __getattr__(name: str) -> object:
    return moved_attribute(__name__, name, _MOVES)
