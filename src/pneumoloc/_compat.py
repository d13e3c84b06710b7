"""Old import paths of pneumoloc 0.1, kept for one release with a ``DeprecationWarning``.

pneumoloc 0.1 laid its code out as flat modules (``pneumoloc.boxes``, ``pneumoloc.checkpoint``,
...); they now live in layers (``pneumoloc.localise.boxes``, ``pneumoloc.models.checkpoint``,
...). Each old module is a few lines that hand every attribute lookup to :func:`moved_attribute`,
which imports the new home, warns once per name, and returns the object. Nothing inside the
package imports an old path (the layering test checks it). These aliases go in the next release.
"""

from __future__ import annotations

import importlib
import warnings
from collections.abc import Mapping

__all__ = ["DEPRECATED_MODULES", "moved_attribute"]

DEPRECATED_MODULES: dict[str, str] = {
    "pneumoloc.augment": "pneumoloc.training.augment (intensity: pneumoloc.io.preprocess)",
    "pneumoloc.boxes": "pneumoloc.localise.boxes",
    "pneumoloc.checkpoint": "pneumoloc.models.checkpoint",
    "pneumoloc.config": "pneumoloc.training.config",
    "pneumoloc.distributed": "pneumoloc.training.distributed",
    "pneumoloc.lungs": "pneumoloc.localise.lungs",
    "pneumoloc.recipe": "pneumoloc.inference.recipe",
    "pneumoloc.refine": "pneumoloc.localise.refine",
}
"""Old module -> where its code lives now."""

Target = str | tuple[str, str] | None


def moved_attribute(module: str, name: str, moves: Mapping[str, Target]) -> object:
    """Resolve ``module.name`` from its new home, warning that the old path is deprecated.

    Args:
        module: The old module's ``__name__``.
        name: The attribute asked for.
        moves: ``name -> new module`` (same name there), ``name -> (new module, new name)``,
            or ``name -> None`` for a name that was removed; a ``"*"`` entry is the default
            new module for names not listed.

    Raises:
        AttributeError: The name never existed, or was removed (the message says what to use).
    """
    if name.startswith("__"):
        raise AttributeError(name)
    target = moves.get(name, moves.get("*"))
    if name not in moves and "*" not in moves:
        raise AttributeError(f"module {module!r} has no attribute {name!r}")
    if target is None:
        raise AttributeError(
            f"{module}.{name} was removed with the layered layout; see the README's Layout section"
        )
    new_module, new_name = (target, name) if isinstance(target, str) else target
    value = getattr(importlib.import_module(new_module), new_name)
    warnings.warn(
        f"{module}.{name} moved to {new_module}.{new_name}; the old path goes in the next release",
        DeprecationWarning,
        stacklevel=3,
    )
    return value
