"""Deprecated alias of :mod:`pneumoloc.inference.recipe` (pneumoloc 0.1's path; goes in the
next release). The recipes were plain dicts in 0.1 and are returned as such here
(``InferenceRecipe.to_meta()``); the new module has them as :class:`InferenceRecipe`.
"""

from pneumoloc._compat import moved_attribute


def __getattr__(name: str) -> object:
    value = moved_attribute(__name__, name, {"*": "pneumoloc.inference.recipe"})
    to_meta = getattr(value, "to_meta", None)
    return to_meta() if callable(to_meta) and not isinstance(value, type) else value
