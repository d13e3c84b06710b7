"""Preprocessing cache: every image decoded once into a memory-mapped uint8 array.

Layout of a cache folder::

    manifest.json    size, source, counts, fingerprint, version; "complete" once finished
    files.csv        one row per image: image_id, patient_id, label, path, file size and mtime
    images.npy       uint8 (N, size, size), memory-mapped; row i is files.csv row i
    progress.jsonl   rows finished so far (appended per chunk: an interrupted run resumes here)
    index.csv        files.csv plus status, original height/width, view position, patient
                     sex and age band (DICOM; for reports by subgroup), error
    boxes.json       ground-truth boxes in original pixels, for EVALUATION only
    splits.json      the patient-level train/val/test split, by image id

Decoding runs in worker processes that write straight into the memory map. A corrupt or
unreadable file is reported (``index.csv`` status "failed" and its reason) and skipped.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pneumoloc import __version__
from pneumoloc.data.demographics import dicom_demographics
from pneumoloc.data.files import open_error_reason
from pneumoloc.data.folder import index_data, index_unlabelled
from pneumoloc.data.records import DatasetIndex
from pneumoloc.data.splits import Split, patient_split
from pneumoloc.errors import CacheError, ImageReadError
from pneumoloc.io.preprocess import load_resized

logger = logging.getLogger(__name__)

CACHE_FORMAT = 1
STATUS_TODO, STATUS_OK, STATUS_FAILED = 0, 1, 2
_STATUS_NAMES = {STATUS_TODO: "todo", STATUS_OK: "ok", STATUS_FAILED: "failed"}
INTENSITY = "uint8, 0=air/black 255=bone/white, MONOCHROME1 inverted, modality LUT applied"


def default_cache_root() -> Path:
    """Where caches go unless told otherwise: ``$PNEUMOLOC_CACHE_DIR`` or ``~/.cache/pneumoloc``."""
    env = os.environ.get("PNEUMOLOC_CACHE_DIR")
    return Path(env) if env else Path.home() / ".cache" / "pneumoloc"


def default_cache_dir(data: str | Path, size: int) -> Path:
    """A cache folder named after the data folder's resolved path and the image size."""
    data = Path(data).resolve()
    digest = hashlib.sha1(str(data).encode()).hexdigest()[:8]
    return default_cache_root() / f"{data.name}-{digest}-{size}px"


def _decode_chunk(images_path: str, size: int, rows: list[int], paths: list[str]) -> list[dict]:
    """Decode files into their rows of the memory map (runs in a worker process)."""
    # Opened per chunk (cheap): a cached map could outlive an images.npy replaced by a rebuild.
    out = np.load(images_path, mmap_mode="r+")
    results = []
    for row, path in zip(rows, paths, strict=True):
        try:
            out[row], image = load_resized(path, size)
            h, w = image.original_shape
            results.append(
                {
                    "row": row,
                    "status": STATUS_OK,
                    "h": h,
                    "w": w,
                    "view": image.view_position,
                    **(dicom_demographics(path) if image.source_format == "dicom" else {}),
                }
            )
        except ImageReadError as exc:
            out[row] = 0
            results.append({"row": row, "status": STATUS_FAILED, "error": exc.reason})
        except OSError as exc:  # cannot open: a broken link, a link loop, a folder, permissions
            out[row] = 0
            results.append(
                {"row": row, "status": STATUS_FAILED, "error": open_error_reason(path, exc)}
            )
        except Exception as exc:  # a reader bug must not lose the rest of the folder
            out[row] = 0
            results.append(
                {"row": row, "status": STATUS_FAILED, "error": f"{type(exc).__name__}: {exc}"}
            )
    out.flush()
    return results


def _file_table(index: DatasetIndex) -> pd.DataFrame:
    """One row per record with its file's size and mtime; -1 for both when it cannot be
    looked at (a broken link, a link loop): decoding then fails it with the reason."""
    rows = []
    for rec in index.records:
        assert rec.path is not None
        try:
            stat = rec.path.stat()
            size, mtime = stat.st_size, stat.st_mtime_ns
        except OSError:
            size, mtime = -1, -1
        rows.append(
            {
                "image_id": rec.image_id,
                "patient_id": rec.patient_id,
                "label": rec.label,
                "detail": rec.detail or "",
                "path": str(rec.path),
                "file_size": size,
                "file_mtime_ns": mtime,
            }
        )
    columns = ["image_id", "patient_id", "label", "detail", "path", "file_size", "file_mtime_ns"]
    return pd.DataFrame(rows, columns=columns)


def _read_progress(path: Path) -> dict[int, dict]:
    done: dict[int, dict] = {}
    if not path.is_file():
        return done
    with path.open() as fh:
        for line in fh:
            try:
                for item in json.loads(line):
                    done[int(item["row"])] = item
            except (json.JSONDecodeError, KeyError, TypeError):
                break  # a line cut short by an interruption: the rows after it are redone
    return done


def _signature(df: pd.DataFrame) -> pd.Series:
    return (
        df["image_id"] + "|" + df["file_size"].astype(str) + "|" + df["file_mtime_ns"].astype(str)
    )


@dataclass
class Cache:
    """An opened preprocessing cache. Training and evaluation read only this.

    Attributes:
        root: The cache folder.
        manifest: Its ``manifest.json``.
        images: uint8 (N, size, size) memory map.
        table: One row per image: image_id, patient_id, label, status, orig_h, orig_w, view, ...
        split: The stored patient-level split, over rows whose status is "ok".
    """

    root: Path
    manifest: dict
    images: np.ndarray
    table: pd.DataFrame
    split: Split

    @property
    def size(self) -> int:
        """Side of the cached square images, in pixels."""
        return int(self.manifest["size"])

    @property
    def labels(self) -> np.ndarray:
        """Image-level labels, int64 (N,)."""
        return self.table["label"].to_numpy(dtype=np.int64)

    @property
    def image_ids(self) -> list[str]:
        """Image ids, one per row."""
        return self.table["image_id"].astype(str).tolist()

    @property
    def original_shapes(self) -> np.ndarray:
        """(N, 2) original (height, width) of each image."""
        return self.table[["orig_h", "orig_w"]].to_numpy(dtype=np.int64)

    @property
    def fingerprint(self) -> str:
        """Identifies the cached content (ids, labels and file signatures)."""
        return str(self.manifest["fingerprint"])

    def load_eval_boxes(
        self, rows: Sequence[int] | np.ndarray, *, scale: str = "original"
    ) -> list[np.ndarray]:
        """Ground-truth boxes of the given rows, for EVALUATION only.

        Training code never calls this; the training dataset has no access to it.

        Args:
            rows: Row indices.
            scale: "original" (pixels of the source image) or "cache" (pixels of the cached image).
        """
        path = self.root / "boxes.json"
        if not path.is_file():
            return [np.zeros((0, 4), np.float32) for _ in rows]
        boxes = json.loads(path.read_text())
        out = []
        ids = self.table["image_id"].to_numpy()
        shapes = self.original_shapes
        for row in rows:
            b = np.asarray(boxes.get(str(ids[row]), []), dtype=np.float32).reshape(-1, 4)
            if scale == "cache" and len(b):
                h, w = shapes[row]
                b = b * np.array([self.size / w, self.size / h] * 2, dtype=np.float32)
            out.append(b)
        return out

    @property
    def has_boxes(self) -> bool:
        """Whether the source layout carries ground-truth boxes."""
        return bool(self.manifest.get("has_boxes"))


def open_cache(root: str | Path) -> Cache:
    """Open a finished cache.

    Raises:
        CacheError: If the folder is not a finished cache of a format this version reads.
    """
    root = Path(root)
    manifest_path = root / "manifest.json"
    if not manifest_path.is_file():
        raise CacheError(
            f"{root}: not a pneumoloc cache (no manifest.json); run `pneumoloc prepare`"
        )
    manifest = json.loads(manifest_path.read_text())
    if manifest.get("format") != CACHE_FORMAT:
        raise CacheError(
            f"{root}: cache format {manifest.get('format')} is not {CACHE_FORMAT}; re-run prepare"
        )
    if not manifest.get("complete"):
        raise CacheError(
            f"{root}: cache is incomplete (interrupted?); re-run `pneumoloc prepare` to finish it"
        )
    table = pd.read_csv(
        root / "index.csv", dtype={"image_id": str, "patient_id": str}, keep_default_na=False
    )
    images = np.load(root / "images.npy", mmap_mode="r")
    if images.shape[0] != len(table):
        raise CacheError(
            f"{root}: images.npy has {images.shape[0]} rows but index.csv {len(table)}"
        )
    ids = table["image_id"].astype(str).tolist()
    split = Split.from_dict(json.loads((root / "splits.json").read_text()), ids)
    return Cache(root=root, manifest=manifest, images=images, table=table, split=split)


def _chunks(rows: Sequence[int], size: int) -> Iterator[list[int]]:
    for start in range(0, len(rows), size):
        yield list(rows[start : start + size])


def prepare_cache(
    data: str | Path,
    out: str | Path | None = None,
    *,
    size: int = 256,
    workers: int | None = None,
    split_seed: int = 0,
    fractions: tuple[float, float, float] = (0.7, 0.15, 0.15),
    chunk_size: int = 32,
    progress: bool = True,
    max_rows: int | None = None,
    unlabelled: bool = False,
) -> Cache:
    """Decode a data folder into a cache, resuming and updating an existing one.

    Finished rows of an earlier run whose file is unchanged (same id, size and mtime) are reused;
    changed or new files are decoded; unreadable files are reported and skipped.

    Args:
        data: An RSNA-layout or NORMAL/PNEUMONIA folder.
        out: Cache folder (default: :func:`default_cache_dir`).
        size: Side of the cached square images.
        workers: Decoding processes (default: all cores).
        split_seed: Seed of the patient-level split.
        fractions: Train/validation/test fractions of patients.
        chunk_size: Images per task handed to a worker.
        progress: Show a progress bar.
        max_rows: Only cache the first N labelled images (for quick experiments).
        unlabelled: Cache every image of the folder as unlabelled (label -1, for
            semi-supervised training); all rows are in the "train" part, none in val or test.

    Returns:
        The opened cache.
    """
    from tqdm.auto import tqdm

    if size < 16 or size > 4096:
        raise CacheError(f"cache image size must be between 16 and 4096 px, got {size}")
    index = index_unlabelled(data) if unlabelled else index_data(data)
    if unlabelled:
        fractions = (1.0, 0.0, 0.0)
    if max_rows is not None:
        index.records = index.records[:max_rows]
    if not index.records:
        raise CacheError(f"{data}: no labelled images found")
    if out is None:
        out = default_cache_dir(data, size)
        out = out.with_name(out.name + "-unlabelled") if unlabelled else out
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    files = _file_table(index)
    n = len(files)
    images_path = out / "images.npy"
    progress_path = out / "progress.jsonl"

    # Work out what an earlier run already did.
    done: dict[int, dict] = {}
    old_manifest = _read_json(out / "manifest.json")
    same_size = old_manifest.get("size") == size and old_manifest.get("format") == CACHE_FORMAT
    old_files_path = out / "files.csv"
    if same_size and old_files_path.is_file() and images_path.is_file():
        old_files = pd.read_csv(
            old_files_path, dtype={"image_id": str, "patient_id": str}, keep_default_na=False
        )
        old_done = _old_results(out, old_manifest)
        if (
            len(old_files) == n
            and (_signature(old_files).to_numpy() == _signature(files).to_numpy()).all()
        ):
            done = old_done
        else:
            done = _carry_over(out, old_files, old_done, files, size)
    if not done:  # nothing to reuse: a fresh array
        np.lib.format.open_memmap(
            images_path, mode="w+", dtype=np.uint8, shape=(n, size, size)
        ).flush()
    files.to_csv(old_files_path, index=False)
    manifest = {
        "format": CACHE_FORMAT,
        "size": size,
        "kind": index.kind,
        "has_boxes": index.has_boxes,
        "source": str(Path(data).resolve()),
        "complete": False,
        "pneumoloc_version": __version__,
        "intensity": INTENSITY,
    }
    _write_json(out / "manifest.json", manifest)
    with progress_path.open("w") as fh:
        if done:
            fh.write(json.dumps(list(done.values())) + "\n")

    todo = [i for i in range(n) if i not in done]
    n_workers = workers or os.cpu_count() or 1
    started = time.perf_counter()
    if todo:
        paths = files["path"].tolist()
        bar = tqdm(total=n, initial=n - len(todo), desc="prepare", unit="img", disable=not progress)
        jobs = list(_chunks(todo, chunk_size))
        with progress_path.open("a") as log:
            if n_workers <= 1:
                results_iter: Iterator[list[dict]] = (
                    _decode_chunk(str(images_path), size, rows, [paths[r] for r in rows])
                    for rows in jobs
                )
                _consume(results_iter, done, log, bar)
            else:
                # fork starts workers at once (no re-import); spawn where torch is loaded, since
                # forking a process that runs torch's thread pools is unsafe.
                ctx = get_context("spawn" if "torch" in sys.modules else "fork")
                with ProcessPoolExecutor(max_workers=n_workers, mp_context=ctx) as pool:
                    futures = [
                        pool.submit(
                            _decode_chunk, str(images_path), size, rows, [paths[r] for r in rows]
                        )
                        for rows in jobs
                    ]
                    _consume((f.result() for f in futures), done, log, bar)
        bar.close()
    elapsed = time.perf_counter() - started
    _finish(out, index, files, done, manifest, split_seed, fractions)
    cache = open_cache(out)
    n_failed = int((cache.table["status"] == "failed").sum())
    rate = len(todo) / elapsed if todo and elapsed > 0 else float("nan")
    logger.info(
        "cache %s: %d images (%d decoded now at %.0f img/s, %d reused, %d failed)",
        out,
        n,
        len(todo),
        rate,
        n - len(todo),
        n_failed,
    )
    cache.manifest["last_run"] = {"decoded": len(todo), "seconds": elapsed, "images_per_s": rate}
    return cache


def _consume(results: Iterator[list[dict]], done: dict[int, dict], log, bar) -> None:  # type: ignore[no-untyped-def]
    for chunk in results:
        for item in chunk:
            done[item["row"]] = item
        log.write(json.dumps(chunk) + "\n")
        log.flush()
        bar.update(len(chunk))


def _old_results(out: Path, old_manifest: dict) -> dict[int, dict]:
    if old_manifest.get("complete") and (out / "index.csv").is_file():
        table = pd.read_csv(out / "index.csv", keep_default_na=False)
        has_demographics = "sex" in table.columns and "age_band" in table.columns
        result = {}
        for row, rec in enumerate(table.itertuples(index=False)):
            status = STATUS_OK if rec.status == "ok" else STATUS_FAILED
            result[row] = {
                "row": row,
                "status": status,
                "h": int(rec.orig_h),
                "w": int(rec.orig_w),
                "view": rec.view or None,
                **_demographics_of(rec, has_demographics),
                "error": rec.error,
            }
        return result
    return _read_progress(out / "progress.jsonl")


def _demographics_of(rec: Any, recorded: bool) -> dict[str, str | None]:
    """Sex and age band of an old index row: its own, or (a cache made before they were
    recorded) read from the file's header now."""
    if recorded:
        return {"sex": rec.sex or None, "age_band": rec.age_band or None}
    if rec.status != "ok":
        return {}
    return dict(dicom_demographics(rec.path))


def _carry_over(
    out: Path, old_files: pd.DataFrame, old_done: dict[int, dict], files: pd.DataFrame, size: int
) -> dict[int, dict]:
    """Build a new images array for a changed file list, copying unchanged finished rows."""
    old_sig = {s: i for i, s in enumerate(_signature(old_files))}
    old_images = np.load(out / "images.npy", mmap_mode="r")
    tmp = out / "images.new.npy"
    new = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(len(files), size, size))
    done: dict[int, dict] = {}
    for new_row, sig in enumerate(_signature(files)):
        old_row = old_sig.get(sig)
        item = old_done.get(old_row) if old_row is not None else None
        if item is not None and item["status"] == STATUS_OK:
            new[new_row] = old_images[old_row]
            done[new_row] = {**item, "row": new_row}
    new.flush()
    del new, old_images
    os.replace(tmp, out / "images.npy")
    logger.info("cache %s: data changed; %d unchanged images reused", out, len(done))
    return done


def _finish(
    out: Path,
    index: DatasetIndex,
    files: pd.DataFrame,
    done: dict[int, dict],
    manifest: dict,
    split_seed: int,
    fractions: tuple[float, float, float],
) -> None:
    table = files.copy()
    status = [done[i]["status"] for i in range(len(files))]
    table["status"] = [_STATUS_NAMES[s] for s in status]
    table["orig_h"] = [int(done[i].get("h") or 0) for i in range(len(files))]
    table["orig_w"] = [int(done[i].get("w") or 0) for i in range(len(files))]
    table["view"] = [done[i].get("view") or "" for i in range(len(files))]
    # Coarse subgroups for evaluate's report by subgroup (pneumoloc.data.demographics).
    table["sex"] = [done[i].get("sex") or "" for i in range(len(files))]
    table["age_band"] = [done[i].get("age_band") or "" for i in range(len(files))]
    table["error"] = [done[i].get("error") or "" for i in range(len(files))]
    table.to_csv(out / "index.csv", index=False)
    boxes, n_clipped = _boxes_inside_images(index, table)
    _write_json(out / "boxes.json", boxes)
    ok = np.flatnonzero(table["status"].to_numpy() == "ok")
    if len(ok) < 3:
        raise CacheError(f"{out}: only {len(ok)} images could be read; nothing to split")
    sub = patient_split(
        table["patient_id"].to_numpy()[ok].tolist(),
        table["label"].to_numpy()[ok].tolist(),
        fractions=fractions,
        seed=split_seed,
    )
    split = Split(
        train=ok[sub.train],
        val=ok[sub.val],
        test=ok[sub.test],
        seed=split_seed,
        fractions=fractions,
    )
    _write_json(out / "splits.json", split.to_dict(table["image_id"].astype(str).tolist()))
    fingerprint = hashlib.sha1(
        "\n".join(_signature(files) + "|" + files["label"].astype(str)).encode()
    ).hexdigest()[:16]
    failed = table[table["status"] == "failed"]
    manifest.update(
        {
            "complete": True,
            "n_images": len(table),
            "n_ok": len(ok),
            "n_failed": len(failed),
            "n_positive": int((table["label"].to_numpy()[ok] == 1).sum()),
            "n_missing_labelled": len(index.missing),
            "n_unlabelled": len(index.unlabelled),
            "n_boxes_clipped": n_clipped,
            "fingerprint": fingerprint,
            "split": {
                "seed": split_seed,
                "fractions": list(fractions),
                "sizes": {k: len(getattr(split, k)) for k in ("train", "val", "test")},
            },
        }
    )
    _write_json(out / "manifest.json", manifest)
    (out / "progress.jsonl").unlink(missing_ok=True)
    for row in failed.itertuples(index=False):
        logger.warning("skipped %s: %s", row.path, row.error)


def _boxes_inside_images(
    index: DatasetIndex, table: pd.DataFrame
) -> tuple[dict[str, list[list[float]]], int]:
    """Ground-truth boxes per image id, each clipped to its decoded image (a box that reaches
    outside is warned about with the image id; one wholly outside is dropped)."""
    sizes = {
        str(r.image_id): (int(r.orig_w), int(r.orig_h))
        for r in table.itertuples(index=False)
        if r.status == "ok"
    }
    out: dict[str, list[list[float]]] = {}
    n_clipped = 0
    for rec in index.records:
        if not len(rec.boxes):
            continue
        size = sizes.get(rec.image_id)
        if size is None:  # unreadable image: its boxes are never scored
            out[rec.image_id] = rec.boxes.tolist()
            continue
        w, h = size
        kept = []
        for x, y, bw, bh in rec.boxes.tolist():
            x0, y0, x1, y1 = max(x, 0.0), max(y, 0.0), min(x + bw, w), min(y + bh, h)
            if (x0, y0, x1, y1) == (x, y, x + bw, y + bh):
                kept.append([x, y, bw, bh])
                continue
            n_clipped += 1
            logger.warning(
                "%s: ground-truth box (x=%g, y=%g, width=%g, height=%g) reaches outside the "
                "image (%d x %d px): %s",
                rec.image_id,
                x,
                y,
                bw,
                bh,
                w,
                h,
                "clipped to it" if x1 > x0 and y1 > y0 else "dropped (wholly outside)",
            )
            if x1 > x0 and y1 > y0:
                kept.append([x0, y0, x1 - x0, y1 - y0])
        if kept:
            out[rec.image_id] = kept
    return out, n_clipped


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)


def resolve_cache(data_or_cache: str | Path, *, size: int, **prepare_kwargs) -> Cache:  # type: ignore[no-untyped-def]
    """Open a cache folder, or prepare (or update) the default cache of a data folder."""
    path = Path(data_or_cache)
    if (path / "manifest.json").is_file() and (path / "images.npy").is_file():
        cache = open_cache(path)
        if cache.size != size:
            raise CacheError(
                f"{path}: cache was built at {cache.size} px but {size} px is needed; "
                f"run `pneumoloc prepare DATA --size {size}` or pass a matching --image-size"
            )
        return cache
    return prepare_cache(path, size=size, **prepare_kwargs)
