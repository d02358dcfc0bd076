"""Unpack an insightface verification ``NAME.bin`` into images plus a ``pairs.txt`` (``path1 path2 issame``).

The ``.bin`` is read with a restricted, bounded unpickler (no code runs, no allocation beyond what the file holds) and
an image over ``--max-image-bytes`` (16 MiB) or declaring more than ``--max-image-pixels`` (4096x4096) in its header is
refused with one line before anything is written. Images are written byte for byte as
``OUT/images/%06d.jpg`` (``.png`` for PNG); ``pairs2bin --pairs OUT/pairs.txt`` gives back the same ``.bin`` content.

Usage::

    python -m datasets.bin2images --bin data/lfw.bin --out lfw_unpacked/
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Optional, Sequence

from datasets.folder2rec import image_kind
from recognition.common import ToolkitError, atomic_write, run_cli
from recognition.image_header import MAX_IMAGE_BYTES, MAX_IMAGE_PIXELS
from recognition.rec import safe_load_bin_pickle


def bin2images(path: str, out_dir: str, max_image_bytes: int = MAX_IMAGE_BYTES,
               max_image_pixels: int = MAX_IMAGE_PIXELS) -> dict:
    """Write images and ``pairs.txt``; returns ``{num_images, num_pairs, pairs}``. Every image is checked against
    the limits before the first file is written."""
    images, issame = safe_load_bin_pickle(path, max_image_bytes, max_image_pixels)
    names = []
    for i, raw in enumerate(images):
        name = os.path.join("images", f"{i:06d}.{image_kind(raw) or 'jpg'}")
        with atomic_write(os.path.join(out_dir, name), "wb") as f:
            f.write(raw)
        names.append(name)
    pairs_path = os.path.join(out_dir, "pairs.txt")
    with atomic_write(pairs_path, "w") as f:
        for k, same in enumerate(issame):
            f.write(f"{names[2 * k]} {names[2 * k + 1]} {int(same)}\n")
    return {"num_images": len(images), "num_pairs": len(issame), "pairs": pairs_path}


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m datasets.bin2images", description=__doc__.split("\n\n")[0])
    ap.add_argument("--bin", required=True, help="verification NAME.bin")
    ap.add_argument("--out", required=True, help="output folder")
    ap.add_argument("--max-image-bytes", type=int, default=MAX_IMAGE_BYTES, help="largest encoded image accepted")
    ap.add_argument("--max-image-pixels", type=int, default=MAX_IMAGE_PIXELS,
                    help="largest width x height an image header may declare")
    args = ap.parse_args(argv)
    if args.max_image_bytes < 1 or args.max_image_pixels < 1:
        raise ToolkitError("--max-image-bytes and --max-image-pixels must be >= 1")
    info = bin2images(args.bin, args.out, args.max_image_bytes, args.max_image_pixels)
    print(f"wrote {info['num_images']} images and {info['pairs']} ({info['num_pairs']} pairs)")
    return 0


def cli() -> None:
    sys.exit(run_cli(main))


if __name__ == "__main__":
    cli()
