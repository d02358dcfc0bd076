"""Raw photos to aligned 112x112 faces ready for ``folder2rec``: detect (MTCNN), keep faces by a rule, align.

    python -m datasets.tools align --src photos/ --out aligned/ --detector ../models/mtcnn [--faces largest]
    python -m datasets.tools folder2rec --src aligned/ --out data/mine

``--src`` holds one sub-folder per person (``photos/<person>/<image>``); images lying directly in ``--src`` count
as one person named after that folder. Output:

- ``aligned/<person>/<image>.jpg`` (with ``--faces all``: ``<image>_<k>.jpg``, k = 0, 1, ... best score first);
- ``aligned/align_report.tsv``: one line per written face (source, output, score, box, landmarks);
- ``aligned/no_face.txt``: photos in which no face was found, ``aligned/unreadable.txt``: files that did not decode.

Every file is written atomically. Photos without a face are counted, logged and listed, never silently dropped;
when a photo holds several faces the rule's choice is logged for that photo. ``--detector`` is insightface's
``deploy/mtcnn-model`` folder (det1..det4); nothing is downloaded.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from datasets.folder2rec import IMAGE_EXTS
from deploy.detect import add_detector_options, crop_faces, detector_from_args
from recognition.common import ToolkitError, atomic_write, run_cli, setup_logging

logger = logging.getLogger("recognition")
REPORT, NO_FACE, UNREADABLE = "align_report.tsv", "no_face.txt", "unreadable.txt"


def list_photos(src: str) -> List[Tuple[str, str]]:
    """``[(person, path), ...]`` of ``src/<person>/<image>`` plus loose ``src/<image>`` (person = src's name)."""
    if not os.path.isdir(src):
        raise ToolkitError(f"--src {src}: no such folder")

    def images(folder: str) -> List[str]:
        return sorted(f for f in os.listdir(folder) if f.lower().endswith(IMAGE_EXTS) and not f.startswith(".")
                      and os.path.isfile(os.path.join(folder, f)))

    loose_person = os.path.basename(os.path.normpath(os.path.abspath(src)))
    photos = [(loose_person, os.path.join(src, f)) for f in images(src)]
    for person in sorted(d for d in os.listdir(src) if os.path.isdir(os.path.join(src, d)) and not d.startswith(".")):
        photos += [(person, os.path.join(src, person, f)) for f in images(os.path.join(src, person))]
    if not photos:
        raise ToolkitError(f"--src {src}: no images ({', '.join(IMAGE_EXTS)}) in it or in its person sub-folders")
    return photos


def _out_names(photos: Sequence[Tuple[str, str]]) -> Dict[str, str]:
    """Output stem per photo path: the file's stem, or its full name where two files of a person share a stem."""
    stems: Dict[Tuple[str, str], int] = {}
    for person, path in photos:
        key = (person, os.path.splitext(os.path.basename(path))[0])
        stems[key] = stems.get(key, 0) + 1
    out = {}
    for person, path in photos:
        stem = os.path.splitext(os.path.basename(path))[0]
        out[path] = stem if stems[(person, stem)] == 1 else os.path.basename(path)
    return out


def _write_jpeg(path: str, rgb: np.ndarray, quality: int) -> None:
    import cv2

    ok, buf = cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise ToolkitError(f"{path}: JPEG encoding failed")
    with atomic_write(path, "wb") as f:
        f.write(buf.tobytes())


def align_folder(src: str, out: str, detector, rule: str = "largest", image_size: int = 112, quality: int = 95,
                 progress_every: Optional[int] = None) -> Dict:
    """Align every photo of ``src`` into ``out`` (see the module doc).

    Returns ``{num_photos, num_faces, no_face (list of paths), unreadable (list), multi_face (count), report}``.
    """
    from tqdm import tqdm

    from deploy.face_model import read_image

    photos = list_photos(src)
    names = _out_names(photos)
    os.makedirs(out, exist_ok=True)
    tty = sys.stderr.isatty()
    every = progress_every or max(1, len(photos) // 20)
    rows, no_face, unreadable, multi = [], [], [], 0
    start = time.time()
    bar = tqdm(total=len(photos), unit="photo", disable=not tty)
    for n, (person, path) in enumerate(photos, 1):
        try:
            img = read_image(path)
        except ToolkitError as exc:
            logger.warning("unreadable, skipped: %s", exc)
            unreadable.append(path)
            img = None
        if img is not None:
            faces = detector.detect(img)
            kept = crop_faces(img, faces, rule, image_size)
            if not faces:
                logger.warning("%s: no face found", path)
                no_face.append(path)
            elif len(faces) > 1:
                multi += 1
                logger.info("%s: %d faces, kept %s", path, len(faces), _describe(rule, kept))
            os.makedirs(os.path.join(out, person), exist_ok=True)
            for k, (crop, face) in enumerate(kept):
                stem = names[path] + (f"_{k}" if rule == "all" else "")
                dst = os.path.join(out, person, stem + ".jpg")
                _write_jpeg(dst, crop, quality)
                rows.append((path, os.path.relpath(dst, out), face))
        bar.update(1)
        if not tty and (n % every == 0 or n == len(photos)):
            logger.info("align: %d/%d photos, %d faces written, %d without a face, %d unreadable (%.1f photos/s)",
                        n, len(photos), len(rows), len(no_face), len(unreadable), n / max(time.time() - start, 1e-9))
    bar.close()
    report = os.path.join(out, REPORT)
    with atomic_write(report, "w") as f:
        f.write("source\toutput\tscore\tbox_x1,y1,x2,y2\tlandmarks_x1,y1,...,x5,y5\n")
        for path, rel, face in rows:
            f.write(f"{path}\t{rel}\t{face.score:.4f}\t{','.join('%.1f' % v for v in face.box)}\t"
                    f"{','.join('%.1f' % v for v in face.landmarks.ravel())}\n")
    for name, paths in ((NO_FACE, no_face), (UNREADABLE, unreadable)):
        with atomic_write(os.path.join(out, name), "w") as f:
            f.writelines(p + "\n" for p in paths)
    return {"num_photos": len(photos), "num_faces": len(rows), "no_face": no_face, "unreadable": unreadable,
            "multi_face": multi, "report": report}


def _describe(rule: str, kept) -> str:
    if rule == "all":
        return f"all {len(kept)}"
    face = kept[0][1]
    return f"the {rule} (score {face.score:.3f}, box {','.join('%.0f' % v for v in face.box)})"


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m datasets.tools align", description=__doc__.split("\n\n")[0])
    ap.add_argument("--src", required=True, help="folder of person sub-folders of raw photos")
    ap.add_argument("--out", required=True, help="output folder: <person>/<image>.jpg, ready for folder2rec")
    ap.add_argument("--detector", required=True, metavar="DIR",
                    help="MTCNN folder (insightface's deploy/mtcnn-model: det1..det4 -symbol.json, -0001.params)")
    ap.add_argument("--image-size", type=int, default=112, help="aligned crop side (default 112)")
    ap.add_argument("--quality", type=int, default=95, help="JPEG quality of the crops (default 95)")
    add_detector_options(ap)
    args = ap.parse_args(argv)
    if args.image_size < 16:
        raise ToolkitError(f"--image-size {args.image_size}: too small for a face crop")
    if not 1 <= args.quality <= 100:
        raise ToolkitError(f"--quality {args.quality}: must lie in 1..100")
    setup_logging()
    list_photos(args.src)  # a bad --src fails before the detector loads
    detector = detector_from_args(args, "detector")
    r = align_folder(args.src, args.out, detector, args.faces, args.image_size, args.quality)
    print(f"{r['num_photos']} photos: {r['num_faces']} faces written to {args.out} (rule {args.faces}; "
          f"{r['multi_face']} photos with several faces); {len(r['no_face'])} without a face "
          f"(listed in {os.path.join(args.out, NO_FACE)}); {len(r['unreadable'])} unreadable")
    if not r["num_faces"]:
        raise ToolkitError(f"no face found in any of the {r['num_photos']} photos of {args.src}")
    return 0


def cli() -> None:
    sys.exit(run_cli(main))


if __name__ == "__main__":
    cli()
