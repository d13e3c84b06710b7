"""Facts about the machine this process runs on, shared by every layer: cores and device.

A base module like :mod:`pneumoloc.errors` (the layering test declares both): it imports
nothing from pneumoloc, and torch only inside :func:`resolve_device`.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

__all__ = ["available_cores", "resolve_device"]


def available_cores() -> int:
    """The CPU cores this process may run on (its affinity mask where the OS has one)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


def resolve_device(name: str | torch.device, local_rank: int = 0) -> torch.device:
    """A torch device from a user's choice: "auto" is this rank's GPU when there is one, else
    the CPU; "cuda" is GPU ``local_rank``; anything else is passed to ``torch.device``."""
    import torch

    name = str(name)
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        return torch.device("cuda", local_rank)
    return torch.device(name)
