"""Extract embeddings of many aligned faces: a folder of identity sub-folders, a list file, or a RecordIO set.

    python deploy/extract.py --model ../models/model-y1-test2/model,0 --input faces/ --output feats/

Writes ``OUTPUT/embeddings.npy`` (float32 (N, E), L2-normalised, flip-summed) and ``OUTPUT/index.tsv``
(``name<TAB>label<TAB>path`` per row of the array). Work is saved in chunks (``OUTPUT/chunks/``, each written
atomically), so an interrupted run restarted with the same arguments skips what is done. Unreadable images are
skipped, counted and listed in ``OUTPUT/skipped.txt``. Raw photos: ``--detect DIR`` (MTCNN, ``deploy/detect.py``)
finds, aligns and embeds the face ``--faces largest|central`` keeps; photos without a face are skipped and listed.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import sys
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from deploy.detect import add_detect_args, detector_from_args
from deploy.face_model import FaceModel, add_model_args, decode_image, model_from_args, prepare_face, read_image
from recognition.common import ToolkitError, atomic_write, run_cli

logger = logging.getLogger("recognition")
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
Item = Tuple[str, int, str]  # (identity name, label, path or "rec:KEY")


def list_identity_folder(folder: str) -> List[Item]:
    """``folder/<identity>/<image>`` -> items sorted by identity then file name; label = identity index."""
    if not os.path.isdir(folder):
        raise ToolkitError(f"{folder}: not a folder of identity sub-folders")
    names = sorted(d for d in os.listdir(folder) if os.path.isdir(os.path.join(folder, d)))
    items = [(name, label, os.path.join(folder, name, f)) for label, name in enumerate(names)
             for f in sorted(os.listdir(os.path.join(folder, name))) if f.lower().endswith(IMAGE_EXTS)]
    if not items:
        raise ToolkitError(f"{folder}: no images found in identity sub-folders ({', '.join(IMAGE_EXTS)})")
    return items


def read_list_file(path: str) -> List[Item]:
    """insightface ``aligned<TAB>path<TAB>label``, mxnet im2rec ``index<TAB>label<TAB>path`` or ``path label`` lines.

    Relative paths are taken from the list file's folder; the identity name is the image's parent folder.
    """
    base = os.path.dirname(os.path.abspath(path))
    items = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            cols = line.rstrip("\n").split("\t") if "\t" in line else line.split()
            if not cols or not cols[0].strip():
                continue
            if len(cols) >= 3 and _is_int(cols[-1]) and not _is_number(cols[1]):
                img, label = cols[1], cols[-1]  # insightface: aligned, path, label
            elif len(cols) >= 3 and _is_number(cols[1]):
                img, label = cols[-1], cols[1]  # im2rec: index, label(s), path
            elif len(cols) == 2 and _is_int(cols[1]):
                img, label = cols[0], cols[1]
            else:
                raise ToolkitError(f"{path}:{n}: cannot parse {line.strip()!r}; expected 'aligned<TAB>path<TAB>label'"
                                   " or 'index<TAB>label<TAB>path'")
            img = img if os.path.isabs(img) else os.path.join(base, img)
            items.append((os.path.basename(os.path.dirname(img)) or str(int(float(label))), int(float(label)), img))
    if not items:
        raise ToolkitError(f"{path}: list file holds no images")
    return items


def _is_number(s: str) -> bool:
    try:
        float(s)
        return True
    except ValueError:
        return False


def _is_int(s: str) -> bool:
    return _is_number(s) and float(s) == int(float(s))


def collect_items(source: str) -> Tuple[List[Item], Callable[[str], np.ndarray]]:
    """Items of a folder / list file / rec (``train.rec`` or its folder) and a loader ``path -> RGB uint8``."""
    rec = source if source.endswith(".rec") else os.path.join(source, "train.rec")
    if os.path.isfile(rec):
        from recognition.rec import RecordReader

        reader = RecordReader(rec)
        labels = reader.labels()
        items = [(str(int(lab)), int(lab), f"rec:{k}") for k, lab in zip(reader.image_keys, labels)]

        def load(ref: str) -> np.ndarray:
            return decode_image(reader.read(int(ref[4:]))[1], f"{rec} record {ref[4:]}")
        return items, load
    if os.path.isdir(source):
        return list_identity_folder(source), read_image
    if os.path.isfile(source):
        return read_list_file(source), read_image
    raise ToolkitError(f"--input {source}: no such folder, list file or .rec")


def _digest(items: Sequence[Item], extra: str) -> str:
    h = hashlib.sha1(extra.encode())
    for it in items:
        h.update(f"{it[0]}\t{it[1]}\t{it[2]}\n".encode())
    return h.hexdigest()


def extract(model: FaceModel, source: str, output: str, chunk_size: int = 1024, progress: bool = False,
            model_id: str = "", detector=None, rule: str = "largest") -> Dict:
    """Embed every image of ``source`` into ``output`` (see module doc), resuming from finished chunks.

    With a ``detector`` (``deploy.detect.MtcnnDetector``) the images are raw photos: the face ``rule`` keeps is
    aligned and embedded; photos without a face are skipped and listed like unreadable ones.
    Returns ``{num_images, num_skipped, chunks_done, chunks_reused, embeddings, index}``.
    """
    from tqdm import tqdm

    if chunk_size < 1:
        raise ToolkitError(f"--chunk-size {chunk_size}: must be >= 1")
    items, load = collect_items(source)
    if detector is not None:
        load = _detecting_loader(load, detector, rule, model.image_size[0])
        model_id += f"|detect:{detector.min_face_size:g},{detector.thresholds},{rule},{detector.lnet is not None}"
    chunk_dir = os.path.join(output, "chunks")
    os.makedirs(chunk_dir, exist_ok=True)
    manifest = {"digest": _digest(items, f"{model_id}|{model.flip}|{model.image_size}"), "num_items": len(items),
                "chunk_size": chunk_size}
    mpath = os.path.join(chunk_dir, "manifest.json")
    if os.path.isfile(mpath):
        with open(mpath) as f:
            old = json.load(f)
        if old != manifest:
            raise ToolkitError(f"{output}: holds chunks of a different input, model or --chunk-size; "
                               "use a new --output folder or delete its chunks/")
    else:
        with atomic_write(mpath, "w") as f:
            json.dump(manifest, f)
    bar = tqdm(total=len(items), unit="img", disable=not progress or not sys.stderr.isatty())
    embs, oks, done, reused = [], [], 0, 0
    for c, start in enumerate(range(0, len(items), chunk_size)):
        cpath = os.path.join(chunk_dir, "chunk_%06d.npz" % c)
        part = items[start:start + chunk_size]
        if os.path.isfile(cpath):
            with np.load(cpath) as z:
                emb, ok = z["emb"], z["ok"]
            reused += 1
        else:
            emb, ok = _embed_chunk(model, part, load)
            with atomic_write(cpath, "wb") as f:
                np.savez(f, emb=emb, ok=ok)
            done += 1
        embs.append(emb)
        oks.append(ok)
        bar.update(len(part))
    bar.close()
    ok = np.concatenate(oks)
    emb = np.concatenate(embs) if embs else np.zeros((0, model.embedding_size), np.float32)
    emb_path, index_path = os.path.join(output, "embeddings.npy"), os.path.join(output, "index.tsv")
    with atomic_write(emb_path, "wb") as f:
        np.save(f, emb.astype(np.float32))
    with atomic_write(index_path, "w") as f:
        f.writelines(f"{n}\t{lab}\t{p}\n" for (n, lab, p), good in zip(items, ok) if good)
    with atomic_write(os.path.join(output, "skipped.txt"), "w") as f:
        f.writelines(f"{p}\n" for (_, _, p), good in zip(items, ok) if not good)
    skipped = int((~ok).sum())
    if skipped:
        logger.warning("skipped %d unreadable (or, with --detect, faceless) image(s); listed in %s", skipped,
                       os.path.join(output, "skipped.txt"))
    return {"num_images": int(ok.sum()), "num_skipped": skipped, "chunks_done": done, "chunks_reused": reused,
            "embeddings": emb_path, "index": index_path}


def _detecting_loader(load: Callable[[str], np.ndarray], detector, rule: str, size: int) -> Callable[[str], np.ndarray]:
    """Wrap an image loader: raw photo -> the aligned crop of its face (no face -> ToolkitError: skipped, listed)."""
    from deploy.detect import aligned_face

    def load_face(ref: str) -> np.ndarray:
        return aligned_face(load(ref), detector, rule, size, ref)
    return load_face


def _embed_chunk(model: FaceModel, part: Sequence[Item], load) -> Tuple[np.ndarray, np.ndarray]:
    """Read (skipping unreadable files) and embed one chunk: ``(emb (n_ok, E), ok (n,) bool)``."""
    faces, ok = [], np.zeros(len(part), dtype=bool)
    for i, (_, _, path) in enumerate(part):
        try:
            img = load(path)
        except ToolkitError as exc:
            logger.warning("skipping %s", exc)
            continue
        faces.append(prepare_face(img, model.image_size, model.resize))  # wrong size is a setup error: raise
        ok[i] = True
    emb = [model.embed_arrays(np.stack(faces[s:s + model.batch_size])) for s in range(0, len(faces), model.batch_size)]
    return (np.concatenate(emb) if emb else np.zeros((0, model.embedding_size), np.float32)), ok


def load_index(path: str) -> List[Item]:
    """Read ``index.tsv`` back: ``[(name, label, path), ...]``."""
    with open(path) as f:
        return [(n, int(lab), p) for n, lab, p in (line.rstrip("\n").split("\t") for line in f if line.strip())]


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description="Embeddings of aligned faces (folder / list file / rec) to .npy + index; "
                                            "raw photos with --detect")
    p.add_argument("--input", required=True, help="folder of identity sub-folders, list file, or train.rec (folder)")
    p.add_argument("--output", required=True, help="output folder (embeddings.npy, index.tsv, chunks/)")
    p.add_argument("--chunk-size", type=int, default=1024, help="images per resumable chunk")
    p.add_argument("--no-progress", action="store_true")
    add_model_args(p)
    add_detect_args(p)
    args = p.parse_args(argv)
    if args.detect and args.faces == "all":
        raise ToolkitError("--faces all: extract embeds one face per photo; use --faces largest or central")
    detector = detector_from_args(args)
    model = model_from_args(args)
    r = extract(model, args.input, args.output, args.chunk_size, progress=not args.no_progress, model_id=args.model,
                detector=detector, rule=args.faces)
    print(f"{r['num_images']} embeddings -> {r['embeddings']} (index {r['index']}); {r['num_skipped']} skipped; "
          f"{r['chunks_done']} chunk(s) computed, {r['chunks_reused']} reused")
    return 0


def cli() -> None:
    sys.exit(run_cli(main))


if __name__ == "__main__":
    cli()
