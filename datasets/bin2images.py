"""Unpack an insightface verification ``NAME.bin`` into images plus a ``pairs.txt`` (``path1 path2 issame``).

The ``.bin`` is read with a restricted unpickler (no code runs). Images are written byte for byte as
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
from recognition.common import atomic_write, run_cli
from recognition.rec import safe_load_bin_pickle


def bin2images(path: str, out_dir: str) -> dict:
    """Write images and ``pairs.txt``; returns ``{num_images, num_pairs, pairs}``."""
    images, issame = safe_load_bin_pickle(path)
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
    ap = argparse.ArgumentParser(prog="python -m datasets.bin2images", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--bin", required=True, help="verification NAME.bin")
    ap.add_argument("--out", required=True, help="output folder")
    args = ap.parse_args(argv)
    info = bin2images(args.bin, args.out)
    print(f"wrote {info['num_images']} images and {info['pairs']} ({info['num_pairs']} pairs)")
    return 0


def cli() -> None:
    sys.exit(run_cli(main))


if __name__ == "__main__":
    cli()
