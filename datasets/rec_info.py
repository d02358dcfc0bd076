"""Describe and check an insightface RecordIO dataset (``train.rec`` + ``train.idx`` + ``property``) or a
verification ``.bin``.

Prints classes, images, images per identity (min/median/max), image size, and checks that rec, idx and property
agree: idx offsets point at records, identity records cover the images, labels < num_classes, identity count ==
num_classes. Any mismatch is an ``error: ...`` line and exit code 2.

Usage::

    python -m datasets.rec_info data/mine/train.rec
    python -m datasets.rec_info data/mine/lfw.bin      # pairs (same/different), images, image size

A folder also lists the ``.bin`` verification sets in it.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Optional, Sequence

import cv2
import numpy as np

from recognition.common import DefaultsHelpFormatter, ToolkitError, run_cli
from recognition.rec import RecordReader, read_property


def rec_info(rec: str, sample: int = 16) -> dict:
    """Check ``rec`` and return ``{num_classes, num_images, identity_records, per_identity (min, median, max),
    image_size (h, w), property}``. ``sample`` images (spread over the file) are decoded to get the size."""
    if os.path.isdir(rec):
        rec = os.path.join(rec, "train.rec")
    if not os.path.isfile(rec):
        raise ToolkitError(f"{rec}: record file does not exist")
    prop = os.path.join(os.path.dirname(os.path.abspath(rec)), "property")
    num_classes, ph, pw = read_property(prop)
    with RecordReader(rec) as reader:
        keys = reader.image_keys
        if not keys:
            raise ToolkitError(f"{rec}: holds no image records")
        labels = reader.labels(keys)
        if np.any(labels < 0) or np.any(labels != np.round(labels)):
            raise ToolkitError(f"{rec}: labels are not class ids (non-negative integers)")
        ids = labels.astype(np.int64)
        if ids.max() >= num_classes:
            raise ToolkitError(f"{rec}: label {int(ids.max())} >= num_classes {num_classes} from {prop}")
        if reader.has_identity_records:
            if len(reader.identities) != num_classes:
                raise ToolkitError(f"{rec}: {len(reader.identities)} identity records but {prop} says "
                                   f"{num_classes} classes")
            pos = {k: i for i, k in enumerate(keys)}
            for c, (a, b) in enumerate(reader.identities):
                wrong = [k for k in range(a, b) if ids[pos[k]] != c]
                if wrong:
                    raise ToolkitError(f"{rec}: identity record of class {c} covers record {wrong[0]} labelled "
                                       f"{int(ids[pos[wrong[0]]])}")
        counts = np.bincount(ids, minlength=num_classes)
        sizes = set()
        for k in np.unique(np.linspace(0, len(keys) - 1, min(sample, len(keys))).astype(int)):
            _, payload = reader.read(keys[k])
            img = cv2.imdecode(np.frombuffer(payload, np.uint8), cv2.IMREAD_COLOR) if payload else None
            if img is None:
                raise ToolkitError(f"{rec}: record {keys[k]} is not a decodable image")
            sizes.add(img.shape[:2])
        if sizes != {(ph, pw)}:
            got = ", ".join(f"{w}x{h}" for h, w in sorted(sizes))
            raise ToolkitError(f"{rec}: images are {got} but {prop} says {pw}x{ph}")
        return {"num_classes": num_classes, "num_images": len(keys), "identity_records": reader.has_identity_records,
                "per_identity": (int(counts.min()), float(np.median(counts)), int(counts.max())),
                "empty_classes": int((counts == 0).sum()), "image_size": (ph, pw), "property": prop}


def bin_info(path: str, sample: int = 16) -> dict:
    """Check a verification ``.bin`` (insightface's ``(images, issame)`` pickle, read without running code) and
    return ``{num_pairs, num_same, num_images, image_sizes [(h, w)]}``; ``sample`` images are decoded for sizes."""
    from recognition.rec import safe_load_pickle

    obj = safe_load_pickle(path)
    if not isinstance(obj, (tuple, list)) or len(obj) != 2:
        raise ToolkitError(f"{path}: expected a pickle of (images, issame_list), got {type(obj).__name__}")
    bins, issame = list(obj[0]), [bool(x) for x in obj[1]]
    if len(bins) != 2 * len(issame):
        raise ToolkitError(f"{path}: {len(bins)} images but {len(issame)} pair labels (need 2 images per pair)")
    if not bins:
        raise ToolkitError(f"{path}: holds no pairs")
    sizes = set()
    for k in np.unique(np.linspace(0, len(bins) - 1, min(sample, len(bins))).astype(int)):
        raw = bytes(bins[k])
        img = cv2.imdecode(np.frombuffer(raw, np.uint8), cv2.IMREAD_COLOR) if raw else None
        if img is None:
            raise ToolkitError(f"{path}: image {k} is not a decodable image")
        sizes.add(img.shape[:2])
    return {"num_pairs": len(issame), "num_same": int(sum(issame)), "num_images": len(bins),
            "image_sizes": sorted(sizes)}


def _print_bin(path: str, info: dict) -> None:
    sizes = ", ".join(f"{w}x{h}" for h, w in info["image_sizes"])
    print(f"{os.path.basename(path)}: {info['num_pairs']} pairs ({info['num_same']} same, "
          f"{info['num_pairs'] - info['num_same']} different), {info['num_images']} images, image size {sizes}")


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m datasets.rec_info", description=__doc__.split("\n\n")[0],
                                 formatter_class=DefaultsHelpFormatter)
    ap.add_argument("rec", help="train.rec or its folder, or a verification .bin")
    ap.add_argument("--sample", type=int, default=16, help="images decoded to check their size")
    args = ap.parse_args(argv)
    if args.rec.endswith(".bin"):
        if not os.path.isfile(args.rec):
            raise ToolkitError(f"{args.rec}: verification file does not exist")
        _print_bin(args.rec, bin_info(args.rec, args.sample))
        return 0
    info = rec_info(args.rec, args.sample)
    lo, med, hi = info["per_identity"]
    print(f"classes: {info['num_classes']}")
    print(f"images: {info['num_images']}")
    print(f"identity records: {'yes' if info['identity_records'] else 'no'}")
    print(f"images per identity: min {lo} median {med:g} max {hi} (empty classes: {info['empty_classes']})")
    print(f"image size: {info['image_size'][1]}x{info['image_size'][0]}")
    print("check: rec, idx and property agree")
    folder = args.rec if os.path.isdir(args.rec) else os.path.dirname(os.path.abspath(args.rec))
    for name in sorted(f for f in os.listdir(folder) if f.endswith(".bin")):
        _print_bin(name, bin_info(os.path.join(folder, name), args.sample))
    return 0


def cli() -> None:
    sys.exit(run_cli(main))


if __name__ == "__main__":
    cli()
