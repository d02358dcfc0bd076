"""Unpack insightface RecordIO into a folder of identity sub-folders (the inverse of ``folder2rec``).

Each image is written byte for byte as ``OUT/<class id>/<record key>.jpg`` (``.png`` for PNG records); class
folders are zero-padded so that sorting by name keeps class order. ``folder2rec`` on the result gives back the
same bytes and labels.

Usage::

    python -m datasets.rec2folder --rec data/mine/train.rec --out faces/
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Optional, Sequence

import numpy as np

from datasets.folder2rec import image_kind
from recognition.common import DefaultsHelpFormatter, ToolkitError, atomic_write, run_cli
from recognition.rec import RecordReader


def rec2folder(rec: str, out_dir: str) -> dict:
    """Write every image record of ``rec`` under ``out_dir``; returns ``{num_images, num_classes}``."""
    with RecordReader(rec) as reader:
        keys = reader.image_keys
        labels = reader.labels(keys)
        if len(keys) == 0:
            raise ToolkitError(f"{reader.path_rec}: holds no image records")
        if np.any(labels < 0) or np.any(labels != np.round(labels)):
            raise ToolkitError(f"{reader.path_rec}: labels are not class ids (non-negative integers)")
        width = len(str(int(labels.max())))
        kwidth = len(str(max(keys)))
        for key, label in zip(keys, labels.astype(np.int64)):
            _, payload = reader.read(key)
            ext = image_kind(payload) or "jpg"
            path = os.path.join(out_dir, str(int(label)).zfill(width), f"{str(key).zfill(kwidth)}.{ext}")
            with atomic_write(path, "wb") as f:
                f.write(payload)
    return {"num_images": len(keys), "num_classes": int(len(np.unique(labels)))}


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m datasets.rec2folder", description=__doc__.split("\n\n")[0],
                                 formatter_class=DefaultsHelpFormatter)
    ap.add_argument("--rec", required=True, help="train.rec (train.idx next to it), or its folder")
    ap.add_argument("--out", required=True, help="output folder")
    args = ap.parse_args(argv)
    info = rec2folder(args.rec, args.out)
    print(f"wrote {info['num_images']} images of {info['num_classes']} identities under {args.out}")
    return 0


def cli() -> None:
    sys.exit(run_cli(main))


if __name__ == "__main__":
    cli()
