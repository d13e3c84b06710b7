"""Which files of a folder are images to read, and why one cannot be opened.

One rule for every command that lists folders (``prepare``, ``predict``, ``submit``):

* hidden entries (a name starting with ``.``: ``.DS_Store``, macOS ``._x.dcm`` resource forks,
  ``.git``) are left out, files and folders alike, and counted so the caller can warn;
* a symbolic link with a supported suffix is listed even when it is broken or loops, so that
  reading it fails with a row that says so (:func:`open_error_reason`), instead of vanishing;
* a folder whose name has an image suffix (``x.dcm/``) is searched like any folder when the
  walk is recursive, and reported (it is not a file).
"""

from __future__ import annotations

import errno
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from pneumoloc.io import is_supported_file

logger = logging.getLogger(__name__)

__all__ = ["Listing", "is_hidden", "list_images", "open_error_reason", "warn_listing"]


def is_hidden(name: str) -> bool:
    """Whether a file or folder name is hidden (starts with a dot)."""
    return name.startswith(".")


@dataclass
class Listing:
    """What :func:`list_images` found.

    Attributes:
        files: Candidate image files (and links to them, broken ones included), sorted.
        hidden: Hidden entries with a supported suffix, or hidden folders, that were left out.
        image_named_folders: Folders whose names carry an image suffix.
    """

    files: list[Path] = field(default_factory=list)
    hidden: list[Path] = field(default_factory=list)
    image_named_folders: list[Path] = field(default_factory=list)


def _is_file_or_link(path: Path) -> bool:
    """A plain file, or any symbolic link not pointing at a folder (broken and looping too)."""
    try:
        if path.is_symlink():
            return not path.is_dir()
        return path.is_file()
    except OSError:  # a link loop can raise from is_dir on some systems
        return True


def list_images(
    root: str | Path, *, recursive: bool = True, exclude: Path | None = None
) -> Listing:
    """The image files under ``root`` by the rule of this module.

    Args:
        root: The folder.
        recursive: Search sub-folders (never following links to folders).
        exclude: A resolved folder not to search (e.g. an output folder inside the input).
    """
    listing = Listing()
    for folder, dirs, names in _walk(Path(root), recursive):
        here = Path(folder)
        kept = []
        for d in sorted(dirs):
            path = here / d
            if is_hidden(d):
                listing.hidden.append(path)
                continue
            if exclude is not None and path.resolve() == exclude:
                continue
            if is_supported_file(d):
                listing.image_named_folders.append(path)
            kept.append(d)
        dirs[:] = kept
        for name in sorted(names):
            path = here / name
            if not is_supported_file(name):
                continue
            if is_hidden(name):
                listing.hidden.append(path)
            elif _is_file_or_link(path):
                listing.files.append(path)
    listing.files.sort()
    return listing


def _walk(root: Path, recursive: bool) -> Iterator[tuple[str, list[str], list[str]]]:
    if recursive:
        yield from os.walk(root, followlinks=False)
        return
    dirs: list[str] = []
    names: list[str] = []
    for entry in os.scandir(root):
        try:
            is_dir = entry.is_dir(follow_symlinks=False)
        except OSError:
            is_dir = False
        (dirs if is_dir else names).append(entry.name)
    yield str(root), dirs, names


def warn_listing(listing: Listing, what: str) -> None:
    """Log one warning per kind of entry left out or odd in ``listing``."""
    if listing.hidden:
        logger.warning(
            "%s: %d hidden file(s)/folder(s) left out (names starting with '.', e.g. %s)",
            what,
            len(listing.hidden),
            listing.hidden[0].name,
        )
    for folder in listing.image_named_folders:
        logger.warning(
            "%s: %s is a folder, not an image file (its name ends in %s)",
            what,
            folder.name,
            folder.suffix,
        )


def open_error_reason(path: str | Path, exc: OSError) -> str:
    """Why ``path`` could not be opened, in words (broken link, link loop, folder, ...)."""
    path = Path(path)
    if exc.errno == errno.ELOOP:
        return "symbolic link loop: the link points (in the end) back at itself"
    try:
        if path.is_symlink() and not path.exists():
            return "broken symbolic link: its target does not exist"
    except OSError:
        return "symbolic link loop: the link points (in the end) back at itself"
    if exc.errno == errno.EISDIR or path.is_dir():
        return "a folder, not a file"
    if exc.errno == errno.ENOENT:
        return "the file no longer exists"
    return f"cannot open the file ({exc.strerror or exc})"
