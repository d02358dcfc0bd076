"""Five-point face alignment to the standard 112x112 ArcFace crop (similarity transform, as insightface aligns).

    python deploy/align.py --image photo.jpg --landmarks 120,140,180,138,150,175,128,210,175,208 --output face.jpg
    python deploy/align.py --list landmarks.txt --output-dir aligned/    # lines: path x1 y1 ... x5 y5
    python deploy/align.py --detect ../models/mtcnn --image photo.jpg --output face.jpg  # landmarks from MTCNN

Landmarks are (x, y) pixels in order: left eye, right eye, nose tip, left mouth corner, right mouth corner
(as seen in the image). With ``--detect DIR`` (insightface's MTCNN, see ``deploy/detect.py``) they come from the
detector: ``--list`` lines may then hold just a path, and ``--faces all`` writes ``NAME_<k>.EXT`` per face.
For a whole folder of people use ``python -m datasets.tools align``.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import List, Optional, Sequence

import numpy as np

from deploy.detect import add_detect_args, detector_from_args, select_faces
from recognition.common import ToolkitError, atomic_write, run_cli

# The ArcFace 5-point reference positions in a 112x112 crop (insightface's alignment template).
ARCFACE_REFERENCE = np.array([[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366],
                              [41.5493, 92.3655], [70.7299, 92.2041]], dtype=np.float64)


def umeyama_similarity(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Least-squares similarity transform (rotation, uniform scale, translation) mapping ``src`` onto ``dst``.

    Umeyama, "Least-squares estimation of transformation parameters between two point patterns", PAMI 1991.
    Inputs: ``(K, 2)`` point sets, K >= 2. Output: ``(2, 3)`` affine matrix for ``cv2.warpAffine``.
    """
    src, dst = np.asarray(src, np.float64), np.asarray(dst, np.float64)
    mu_s, mu_d = src.mean(0), dst.mean(0)
    s0, d0 = src - mu_s, dst - mu_d
    cov = d0.T @ s0 / len(src)
    u, sig, vt = np.linalg.svd(cov)
    fix = np.eye(2)
    if np.linalg.det(u) * np.linalg.det(vt) < 0:  # a reflection is not a similarity: flip the weakest axis
        fix[1, 1] = -1
    rot = u @ fix @ vt
    var_s = (s0 ** 2).sum() / len(src)
    if var_s <= 0:
        raise ToolkitError("landmarks: all points coincide; cannot estimate an alignment")
    scale = float(np.trace(np.diag(sig) @ fix) / var_s)
    m = np.zeros((2, 3))
    m[:, :2] = scale * rot
    m[:, 2] = mu_d - scale * rot @ mu_s
    return m


def reference_landmarks(image_size: int = 112) -> np.ndarray:
    """The ArcFace template scaled to an ``image_size`` square crop: ``(5, 2)``."""
    return ARCFACE_REFERENCE * (float(image_size) / 112.0)


def norm_crop(image: np.ndarray, landmarks, image_size: int = 112) -> np.ndarray:
    """Warp ``image (H, W, 3)`` so that its 5 landmarks ``(5, 2)`` land on the template: ``(S, S, 3)``."""
    import cv2

    lm = np.asarray(landmarks, dtype=np.float64).reshape(-1, 2)
    if lm.shape != (5, 2):
        raise ToolkitError(f"landmarks: expected 5 (x, y) points, got {lm.size} numbers")
    m = umeyama_similarity(lm, reference_landmarks(image_size))
    return cv2.warpAffine(image, m, (image_size, image_size), flags=cv2.INTER_LINEAR, borderValue=0.0)


def _parse_landmarks(text: str, where: str) -> np.ndarray:
    try:
        vals = [float(v) for v in text.replace(",", " ").split()]
    except ValueError:
        raise ToolkitError(f"{where}: landmarks must be 10 numbers x1 y1 ... x5 y5") from None
    if len(vals) != 10:
        raise ToolkitError(f"{where}: expected 10 landmark numbers (5 points), got {len(vals)}")
    return np.array(vals).reshape(5, 2)


def _read(path: str) -> np.ndarray:
    import cv2

    img = cv2.imread(path, cv2.IMREAD_COLOR)
    if img is None:
        raise ToolkitError(f"{path}: cannot read image")
    return img


def _write(path: str, img: np.ndarray) -> None:
    import cv2

    ext = os.path.splitext(path)[1] or ".jpg"
    ok, buf = cv2.imencode(ext, img)
    if not ok:
        raise ToolkitError(f"{path}: cannot encode an image with extension {ext}")
    with atomic_write(path, "wb") as f:
        f.write(buf.tobytes())


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description="Align faces to the 112x112 ArcFace crop from 5 landmarks")
    p.add_argument("--image", help="one image to align (with --landmarks and --output)")
    p.add_argument("--landmarks", help="x1,y1,...,x5,y5: eyes, nose, mouth corners")
    p.add_argument("--output", help="aligned image path")
    p.add_argument("--list", help="text file: one 'path x1 y1 ... x5 y5' per line")
    p.add_argument("--output-dir", help="where --list crops go (same file names)")
    p.add_argument("--image-size", type=int, default=112)
    add_detect_args(p)
    args = p.parse_args(argv)
    if bool(args.image) == bool(args.list):
        raise ToolkitError("give either --image (with --landmarks, --output) or --list (with --output-dir)")
    if args.image:
        if args.landmarks and args.detect:
            raise ToolkitError("give --landmarks or --detect, not both")
        if not (args.landmarks or args.detect) or not args.output:
            raise ToolkitError("--image needs --output and either --landmarks or --detect")
        jobs = [(args.image, _parse_landmarks(args.landmarks, "--landmarks") if args.landmarks else None, args.output)]
    else:
        if not args.output_dir:
            raise ToolkitError("--list needs --output-dir")
        if not os.path.isfile(args.list):
            raise ToolkitError(f"--list {args.list} does not exist")
        jobs = []
        with open(args.list) as f:
            for n, line in enumerate(f, 1):
                if line.strip():
                    path, _, rest = line.strip().partition(" ")
                    lm = None if (args.detect and not rest.strip()) else _parse_landmarks(rest, f"{args.list}:{n}")
                    jobs.append((path, lm, os.path.join(args.output_dir, os.path.basename(path))))
    detector = detector_from_args(args)
    written, no_face = 0, []
    for src, lm, dst in jobs:
        img = _read(src)
        if lm is not None:
            _write(dst, norm_crop(img, lm, args.image_size))
            written += 1
            continue
        crops = _detected_crops(img, detector, args.faces, args.image_size)
        if not crops:
            no_face.append(src)
        for k, crop in enumerate(crops):
            stem, ext = os.path.splitext(dst)
            _write(f"{stem}_{k}{ext}" if args.faces == "all" else dst, crop)
            written += 1
    if no_face:
        if args.image:
            raise ToolkitError(f"{args.image}: no face found (MTCNN, --min-face-size {args.min_face_size:g})")
        print(f"no face found in {len(no_face)} image(s): {', '.join(no_face)}", file=sys.stderr)
    print(f"aligned {written} face(s) from {len(jobs)} image(s)" + (f"; {len(no_face)} without a face" if no_face
                                                                     else ""))
    return 0


def _detected_crops(img_bgr: np.ndarray, detector, rule: str, image_size: int) -> List[np.ndarray]:
    """BGR photo -> aligned BGR crops of the faces ``rule`` keeps (the detector takes RGB)."""
    faces = select_faces(detector.detect(img_bgr[:, :, ::-1]), rule, img_bgr.shape)
    return [norm_crop(img_bgr, f.landmarks, image_size) for f in faces]


def cli() -> None:
    sys.exit(run_cli(main))


if __name__ == "__main__":
    cli()
