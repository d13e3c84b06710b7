"""Pack the shared real data compactly for a run on the lent GPU machine (which has no ../shared).

Writes, under a git-ignored folder (default ``.devdata/``):
  rsna/   the RSNA sample in the Kaggle layout, images re-encoded as JPEG at --rsna-size px, with
          a labels CSV restricted to the present images and its boxes rescaled to that size;
  kermany/train/{NORMAL,PNEUMONIA}/  the pediatric set re-encoded as JPEG (quality --quality).
This is a transport format for benchmarks only (it is never committed): the re-encoding costs a
little fidelity, which docs/benchmarks.md states next to numbers measured on it.

Usage: python benchmarks/gpu/pack_devdata.py --shared ../shared/data --out .devdata
"""

from __future__ import annotations

import argparse
import csv
import shutil
from pathlib import Path

from PIL import Image

from pneumoloc.data.folder import index_folder
from pneumoloc.data.rsna import CLASS_INFO_CSV, IMAGES_DIR, LABELS_CSV, index_rsna
from pneumoloc.io import read_xray


def pack_rsna(src: Path, out: Path, size: int, quality: int) -> None:
    index = index_rsna(src)
    (out / IMAGES_DIR).mkdir(parents=True, exist_ok=True)
    with (
        (out / LABELS_CSV).open("w", newline="") as fh,
        (out / CLASS_INFO_CSV).open("w", newline="") as ci,
    ):
        labels, classes = csv.writer(fh), csv.writer(ci)
        labels.writerow(["patientId", "x", "y", "width", "height", "Target"])
        classes.writerow(["patientId", "class"])
        for rec in index.records:
            assert rec.path is not None
            image = read_xray(rec.path)
            h, w = image.original_shape
            Image.fromarray(image.pixels).resize((size, size), Image.Resampling.LANCZOS).save(
                out / IMAGES_DIR / f"{rec.image_id}.jpg", quality=quality
            )
            if rec.label:
                for x, y, bw, bh in rec.boxes.tolist():
                    labels.writerow(
                        [rec.image_id, x * size / w, y * size / h, bw * size / w, bh * size / h, 1]
                    )
            else:
                labels.writerow([rec.image_id, "", "", "", "", 0])
            classes.writerow([rec.image_id, rec.detail or ""])


def pack_kermany(src: Path, out: Path, quality: int) -> None:
    index = index_folder(src)
    for rec in index.records:
        assert rec.path is not None
        target = out / "train" / rec.image_id
        target.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(read_xray(rec.path).pixels).save(
            target.with_suffix(".jpeg"), quality=quality
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--shared", type=Path, default=Path("../shared/data"))
    parser.add_argument("--out", type=Path, default=Path(".devdata"))
    parser.add_argument("--rsna-size", type=int, default=512)
    parser.add_argument("--quality", type=int, default=85)
    parser.add_argument("--kermany-quality", type=int, default=50)
    args = parser.parse_args()
    shutil.rmtree(args.out, ignore_errors=True)
    pack_rsna(
        args.shared / "rsna-pneumonia-sample", args.out / "rsna", args.rsna_size, args.quality
    )
    pack_kermany(
        args.shared / "kermany-pediatric" / "train", args.out / "kermany", args.kermany_quality
    )


if __name__ == "__main__":
    main()
