"""Build an insightface verification ``NAME.bin`` from a pairs list.

Accepted lines (blank lines and a leading ``10<TAB>300``-style count header are skipped):

- ``path1 path2 issame`` (``issame`` 1/0/true/false; paths relative to ``--root``, default the pairs file's folder);
- LFW ``pairs.txt`` over a folder: ``name n1 n2`` (same person) and ``name1 n1 name2 n2`` (different), images at
  ``ROOT/name/name_%04d.EXT``.

JPEG/PNG images of the right size are stored byte for byte, others need ``--resize``.

Usage::

    python -m datasets.pairs2bin --pairs pairs.txt --root lfw_aligned/ --out data/lfw.bin
"""
from __future__ import annotations

import argparse
import os
import re
import sys
from typing import List, Optional, Sequence, Tuple

from datasets.folder2rec import image_bytes
from recognition.common import DefaultsHelpFormatter, ToolkitError, run_cli
from recognition.rec import save_bin

_TRUE, _FALSE = {"1", "true", "yes", "same"}, {"0", "false", "no", "diff", "different"}


def parse_pairs(path: str, root: Optional[str] = None, ext: str = "jpg") -> List[Tuple[str, str, bool]]:
    """``[(path1, path2, issame), ...]`` from a pairs file (either format, detected per line)."""
    if not os.path.isfile(path):
        raise ToolkitError(f"--pairs {path}: file does not exist")
    root = root if root is not None else os.path.dirname(os.path.abspath(path))

    def lfw(name: str, n: str) -> str:
        return os.path.join(root, name, f"{name}_{int(n):04d}.{ext}")

    out = []
    with open(path) as f:
        for lineno, line in enumerate(f, 1):
            parts = line.split()
            if not parts:
                continue
            if lineno == 1 and all(re.fullmatch(r"\d+", p) for p in parts) and len(parts) <= 2:
                continue  # LFW header: folds, pairs per fold
            if len(parts) == 3 and re.fullmatch(r"\d+", parts[1]) and re.fullmatch(r"\d+", parts[2]):
                out.append((lfw(parts[0], parts[1]), lfw(parts[0], parts[2]), True))
            elif len(parts) == 4 and re.fullmatch(r"\d+", parts[1]) and re.fullmatch(r"\d+", parts[3]):
                out.append((lfw(parts[0], parts[1]), lfw(parts[2], parts[3]), False))
            elif len(parts) == 3 and parts[2].lower() in _TRUE | _FALSE:
                p1, p2 = (p if os.path.isabs(p) else os.path.join(root, p) for p in parts[:2])
                out.append((p1, p2, parts[2].lower() in _TRUE))
            else:
                raise ToolkitError(f"{path}:{lineno}: cannot parse {line.strip()[:80]!r}; expected "
                                   "'path1 path2 issame', 'name n1 n2' or 'name1 n1 name2 n2'")
    if not out:
        raise ToolkitError(f"{path}: no pairs found")
    return out


def pairs2bin(pairs: str, out_bin: str, root: Optional[str] = None, image_size: int = 112, resize: bool = False,
              ext: str = "jpg") -> dict:
    """Write ``out_bin``; returns ``{bin, num_pairs, num_same}``. Each distinct image file is read once."""
    items = parse_pairs(pairs, root, ext)
    cache = {}
    images, issame = [], []
    for p1, p2, same in items:
        for p in (p1, p2):
            if p not in cache:
                cache[p] = image_bytes(p, (image_size, image_size), resize)
            images.append(cache[p])
        issame.append(same)
    save_bin(out_bin, images, issame)
    return {"bin": out_bin, "num_pairs": len(issame), "num_same": int(sum(issame))}


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m datasets.pairs2bin", description=__doc__.split("\n\n")[0],
                                 formatter_class=DefaultsHelpFormatter)
    ap.add_argument("--pairs", required=True, help="pairs file ('path1 path2 issame' or LFW pairs.txt)")
    ap.add_argument("--out", required=True, help="output NAME.bin")
    ap.add_argument("--root", default=None, help="image folder (default: the pairs file's folder)")
    ap.add_argument("--ext", default="jpg", help="image extension for LFW-style lines")
    ap.add_argument("--image-size", type=int, default=112)
    ap.add_argument("--resize", action="store_true", help="resize/re-encode images not JPEG/PNG of the size")
    args = ap.parse_args(argv)
    info = pairs2bin(args.pairs, args.out, args.root, args.image_size, args.resize, args.ext)
    print(f"wrote {info['bin']}: {info['num_pairs']} pairs ({info['num_same']} same)")
    return 0


def cli() -> None:
    sys.exit(run_cli(main))


if __name__ == "__main__":
    cli()
