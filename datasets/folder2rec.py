"""Pack face images into insightface RecordIO (train.rec, train.idx, property) with identity records.

Sources: a folder of identity sub-folders, an insightface ``.lst`` (``aligned<TAB>path<TAB>label[...]``) or an
mxnet im2rec ``.lst`` (``index<TAB>label<TAB>path``). JPEG/PNG files of the right size are stored byte for byte;
others need ``--resize`` (decoded, resized, re-encoded as JPEG).

Usage::

    python -m datasets.folder2rec --src faces/ --out data/mine
    python -m datasets.folder2rec --src train.lst --out data/mine --no-identity-records --shuffle
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import List, Optional, Sequence, Tuple

import cv2
import numpy as np

from recognition.common import DefaultsHelpFormatter, ToolkitError, atomic_write, run_cli
from recognition.rec import write_dataset

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


def image_kind(raw: bytes) -> Optional[str]:
    """'jpg' / 'png' from the file's magic bytes, else None."""
    if raw[:3] == b"\xff\xd8\xff":
        return "jpg"
    if raw[:8] == b"\x89PNG\r\n\x1a\n":
        return "png"
    return None


def image_bytes(path: str, size: Tuple[int, int] = (112, 112), resize: bool = False, quality: int = 95) -> bytes:
    """Bytes to store for the image file ``path``: the file itself when it is a JPEG/PNG of ``size`` (h, w),
    else (with ``resize``) a JPEG re-encoding at ``size``; otherwise a ToolkitError naming the file."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as exc:
        raise ToolkitError(f"{path}: cannot read image ({exc.strerror})") from None
    img = cv2.imdecode(np.frombuffer(raw, np.uint8), cv2.IMREAD_COLOR) if raw else None
    if img is None:
        raise ToolkitError(f"{path}: not a decodable image")
    kind = image_kind(raw)
    h, w = size
    if kind and img.shape[:2] == (h, w):
        return raw
    if not resize:
        what = f"{img.shape[1]}x{img.shape[0]} {kind.upper() if kind else 'non-JPEG/PNG'} image"
        raise ToolkitError(f"{path}: {what}, expected a {w}x{h} JPEG/PNG (pass --resize to re-encode)")
    if img.shape[:2] != (h, w):
        interp = cv2.INTER_AREA if img.shape[0] > h else cv2.INTER_LINEAR
        img = cv2.resize(img, (w, h), interpolation=interp)
    ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise ToolkitError(f"{path}: JPEG re-encoding failed")
    return buf.tobytes()


def _is_int(s: str) -> bool:
    try:
        int(s)
        return True
    except ValueError:
        return False


def list_folder(src: str) -> Tuple[List[Tuple[int, str]], List[str]]:
    """``([(class_id, path), ...], class_names)`` from a folder of identity sub-folders.

    Sub-folders named by integers keep that integer as class id (so rec -> folder -> rec keeps labels);
    otherwise ids follow sorted names. An identity folder without images is an error.
    """
    names = sorted(d for d in os.listdir(src) if os.path.isdir(os.path.join(src, d)) and not d.startswith("."))
    if not names:
        raise ToolkitError(f"{src}: no identity sub-folders found")
    numeric = all(n.isdigit() for n in names)
    if numeric:
        names = sorted(names, key=int)
    items = []
    for i, name in enumerate(names):
        folder = os.path.join(src, name)
        files = sorted(f for f in os.listdir(folder) if f.lower().endswith(IMAGE_EXTS) and not f.startswith("."))
        if not files:
            raise ToolkitError(f"{folder}: empty identity folder (no {'/'.join(IMAGE_EXTS)} files)")
        cid = int(name) if numeric else i
        items += [(cid, os.path.join(folder, f)) for f in files]
    return items, names


def parse_lst(path: str, root: Optional[str] = None) -> List[Tuple[int, str]]:
    """``[(class_id, image_path), ...]`` from an insightface or an im2rec ``.lst`` (format detected per line)."""
    root = root if root is not None else os.path.dirname(os.path.abspath(path))
    items = []
    with open(path) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            parts = line.rstrip("\n").split("\t")
            if len(parts) < 3:
                raise ToolkitError(f"{path}:{lineno}: expected 3+ tab-separated fields "
                                   f"('aligned path label' or 'index label path'), got {len(parts)}")
            if parts[0] in ("0", "1") and _is_int(parts[2]) and not _is_float(parts[1]):
                label, rel = int(parts[2]), parts[1]  # insightface: aligned, path, label[, bbox, landmarks]
            elif _is_float(parts[1]) and not _is_float(parts[-1]):
                label, rel = int(float(parts[1])), parts[-1]  # im2rec: index, label(s), path
            else:
                raise ToolkitError(f"{path}:{lineno}: cannot tell the .lst format of {line.strip()[:80]!r}")
            items.append((label, rel if os.path.isabs(rel) else os.path.join(root, rel)))
    if not items:
        raise ToolkitError(f"{path}: empty .lst file")
    return items


def _is_float(s: str) -> bool:
    try:
        float(s)
        return True
    except ValueError:
        return False


def folder2rec(src: str, out_dir: str, image_size: int = 112, identity_records: bool = True, shuffle: bool = False,
               resize: bool = False, seed: int = 0, root: Optional[str] = None) -> dict:
    """Pack a folder or ``.lst`` into ``out_dir/train.rec/.idx/property``. Returns ``write_dataset``'s dict."""
    if shuffle and identity_records:
        raise ToolkitError("--shuffle needs --no-identity-records (identity records need images grouped by class)")
    if os.path.isdir(src):
        items, names = list_folder(src)
    elif os.path.isfile(src):
        items, names = parse_lst(src, root), None
    else:
        raise ToolkitError(f"--src {src}: no such folder or .lst file")
    size = (image_size, image_size)
    samples = [(cid, (lambda p=p: image_bytes(p, size, resize))) for cid, p in items]
    info = write_dataset(out_dir, samples, None, size, identity_records=identity_records, shuffle=shuffle, seed=seed)
    if names is not None and not all(n.isdigit() for n in names):
        with atomic_write(os.path.join(out_dir, "classes.txt"), "w") as f:
            f.writelines(n + "\n" for n in names)
    return info


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m datasets.folder2rec", description=__doc__.split("\n\n")[0],
                                 formatter_class=DefaultsHelpFormatter)
    ap.add_argument("--src", required=True, help="folder of identity sub-folders, or a .lst file")
    ap.add_argument("--out", required=True, help="output folder")
    ap.add_argument("--root", default=None, help="folder that .lst paths are relative to (default: the .lst's)")
    ap.add_argument("--image-size", type=int, default=112)
    ap.add_argument("--resize", action="store_true", help="resize/re-encode images that are not JPEG/PNG of the size")
    ap.add_argument("--no-identity-records", action="store_true", help="im2rec-style rec: keys 0..N-1")
    ap.add_argument("--shuffle", action="store_true", help="shuffle record order (with --no-identity-records)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    info = folder2rec(args.src, args.out, args.image_size, not args.no_identity_records, args.shuffle, args.resize,
                      args.seed, args.root)
    print(f"wrote {info['num_images']} images of {info['num_classes']} classes to {info['rec']}")
    return 0


def cli() -> None:
    sys.exit(run_cli(main))


if __name__ == "__main__":
    cli()
