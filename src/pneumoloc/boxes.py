"""Deprecated alias of :mod:`pneumoloc.localise.boxes`.

pneumoloc 0.1's path, kept for one release with a DeprecationWarning.
"""

from pneumoloc._compat import moved_attribute


def __getattr__(name: str) -> object:
    return moved_attribute(__name__, name, {"*": "pneumoloc.localise.boxes"})
