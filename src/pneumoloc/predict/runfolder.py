"""A ``predict`` output folder across runs: earlier outputs, resuming, and pseudonyms.

* Every run writes ``summary.csv`` before the first record (every input "interrupted" until
  done), again when interrupted (Ctrl-C) and at the end, so a later run always knows what an
  earlier one left, even after a kill.
* A new run refuses a folder holding an earlier run's outputs, unless ``resume`` (finished
  records are kept and their inputs skipped) or ``overwrite`` (the earlier run's records,
  overlays, summary and marker are deleted first; nothing else in the folder is touched).
  Either way, the half-written files a killed run leaves (``.partial-*``, the temporary names
  of :func:`pneumoloc.predict.outputs._write_inside`) are deleted.
* With ``pseudonymise``, output ids and the ``source`` field are ``img-`` plus 16 hex digits
  of HMAC-SHA256(key, the input's path relative to its argument): stable for the same key
  and input, and revealing nothing of the file name without the key. The key is the user's
  (``pseudonym_key``), or a random one kept in ``.pseudonym-key`` in the output folder
  (readable by its owner only) so that a resumed run gives the same pseudonyms.
"""

from __future__ import annotations

import csv
import hashlib
import hmac
import logging
import os
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from pneumoloc.errors import ConfigError
from pneumoloc.predict.inputs import InputFile
from pneumoloc.predict.outputs import (
    STATUS_OK,
    STATUS_REFUSED,
    SUMMARY_NAME,
    PredictRow,
    _write_summary,
)

logger = logging.getLogger("pneumoloc.predict")

__all__ = [
    "PSEUDONYM_KEY_NAME",
    "STATUS_PENDING",
    "claim_output_folder",
    "pending_row",
    "pseudonymise",
]

PSEUDONYM_KEY_NAME = ".pseudonym-key"
STATUS_PENDING = "interrupted"  # in summary.csv until the input is done


def pending_row(image_id: str, source: str) -> PredictRow:
    """The summary row of an input not done (yet)."""
    return PredictRow(
        image_id,
        source,
        status=STATUS_PENDING,
        error="not done: the run was interrupted (continue with --resume)",
    )


def _earlier_ids(out: Path) -> list[str]:
    """Ids an earlier run wrote or was about to write (its summary lists them all)."""
    return list(dict.fromkeys(row["id"] for row in _summary_rows(out)))


def _summary_rows(out: Path) -> list[dict[str, str]]:
    path = out / SUMMARY_NAME
    if not path.is_file():
        return []
    try:
        with path.open(newline="", encoding="utf-8") as fh:
            return [row for row in csv.DictReader(fh) if row.get("id")]
    except (OSError, csv.Error, UnicodeDecodeError):
        logger.warning("%s: unreadable summary of an earlier run", path)
        return []


@dataclass(frozen=True)
class Claim:
    """What an output folder holds for this run: rows of inputs finished earlier (resume)."""

    finished: dict[str, PredictRow]


def claim_output_folder(
    out: Path, ids: Sequence[str], files: Sequence[InputFile], *, resume: bool, overwrite: bool
) -> Claim:
    """Check ``out`` against an earlier run, clean or resume it, and mark it as this run's.

    Raises:
        ConfigError: Earlier outputs without ``resume`` or ``overwrite``, or both given.
    """
    if resume and overwrite:
        raise ConfigError("--resume and --overwrite exclude each other")
    earlier = _earlier_ids(out)
    finished: dict[str, PredictRow] = {}
    if earlier and not (resume or overwrite):
        raise ConfigError(
            f"{out}: holds the outputs of an earlier predict run ({len(earlier)} record(s)); "
            "pass --resume to finish that run (finished inputs are skipped), --overwrite to "
            "replace its outputs, or choose another --out"
        )
    if earlier and overwrite:
        for image_id in earlier:
            for suffix in (".json", ".png"):
                (out / f"{image_id}{suffix}").unlink(missing_ok=True)
        (out / SUMMARY_NAME).unlink(missing_ok=True)
        logger.info("--overwrite: removed %d earlier record(s) from %s", len(earlier), out)
    if earlier and (resume or overwrite):
        _remove_partial_files(out)
    if earlier and resume:
        sources = dict(zip(ids, (f.source for f in files), strict=True))
        for row in _summary_rows(out):
            image_id = row["id"]
            if (
                row.get("status") in (STATUS_OK, STATUS_REFUSED)
                and sources.get(image_id) == row.get("source")
                and (out / f"{image_id}.json").is_file()
            ):
                finished[image_id] = _row_from_summary(out, row)
        logger.info("--resume: %d of %d input(s) already done", len(finished), len(ids))
    _write_summary(
        out,
        [
            finished.get(image_id) or pending_row(image_id, f.source)
            for image_id, f in zip(ids, files, strict=True)
        ],
    )
    return Claim(finished=finished)


def _remove_partial_files(out: Path) -> None:
    """Delete the temporary files of writes a killed run did not finish (never a record)."""
    stale = [p for p in out.glob(".partial-*") if p.is_file() and not p.is_symlink()]
    for path in stale:
        path.unlink(missing_ok=True)
    if stale:
        logger.info("removed %d half-written file(s) of an earlier run from %s", len(stale), out)


def _row_from_summary(out: Path, row: dict[str, str]) -> PredictRow:
    image_id = row["id"]
    png = out / f"{image_id}.png"
    return PredictRow(
        id=image_id,
        source=row["source"],
        probability=float(row["probability"]) if row.get("probability") else None,
        decision=row.get("decision") or None,
        n_boxes=int(row["n_boxes"]) if row.get("n_boxes") else None,
        status=row["status"],
        error=row.get("error", ""),
        json_path=out / f"{image_id}.json",
        overlay_path=png if png.is_file() else None,
    )


def _folder_key(out: Path) -> bytes:
    path = out / PSEUDONYM_KEY_NAME
    if path.is_file():
        return path.read_text().strip().encode("ascii")
    key = secrets.token_hex(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(key + "\n")
    logger.info("pseudonym key created in %s (keep it to map pseudonyms back)", path)
    return key.encode("ascii")


def pseudonymise(
    files: Sequence[InputFile], out: Path, key: str | None = None
) -> tuple[list[InputFile], list[str]]:
    """The inputs with pseudonymous sources, and their ids (the same pseudonyms).

    Args:
        files: The inputs.
        out: The output folder (holds the generated key when ``key`` is None).
        key: A secret of the user's; None: the output folder's own.
    """
    if key is not None and not key.strip():
        raise ConfigError("the pseudonym key is empty")
    secret = key.encode("utf-8") if key else _folder_key(out)
    renamed, ids = [], []
    taken: set[str] = set()
    for f in files:
        digest = hmac.new(secret, f.source.encode("utf-8"), hashlib.sha256).hexdigest()
        name, k = f"img-{digest[:16]}", 16
        while name in taken:  # two inputs with the same 64-bit prefix: use more digits
            k += 4
            name = f"img-{digest[:k]}"
        taken.add(name)
        renamed.append(InputFile(f.path, name))
        ids.append(name)
    return renamed, ids
