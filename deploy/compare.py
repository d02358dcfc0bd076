"""Compare two aligned face images: cosine similarity, squared L2 distance, same or different person.

    python deploy/compare.py --model ../models/model-y1-test2/model,0 a.jpg b.jpg --threshold 1.36
    python deploy/compare.py --model ../models/model-y1-test2/model,0 --detect ../models/mtcnn raw1.jpg raw2.jpg

The threshold is on the squared L2 distance of normalised embeddings (what verification reports as
"best-threshold ... at T"); ``cosine = 1 - dist / 2``.
"""
from __future__ import annotations

import argparse
import sys
from typing import Dict, Optional, Sequence

import numpy as np

from deploy.detect import FaceDetectingModel, add_detect_args, detector_from_args
from deploy.face_model import FaceModel, ImageLike, add_model_args, model_from_args
from recognition.common import ToolkitError, run_cli

# model-y1-test2's best threshold over LFW fold 1 (ifr-verify); take your model's from its verification report.
DEFAULT_THRESHOLD = 1.36


def compare_faces(model: FaceModel, img1: ImageLike, img2: ImageLike,
                  threshold: float = DEFAULT_THRESHOLD) -> Dict[str, float]:
    """Embed two faces in one batch; returns ``{cosine, dist, same, threshold}`` (``same`` = dist < threshold)."""
    f = model.get_features([img1, img2])
    cosine = float(np.dot(f[0], f[1]))
    dist = float(np.sum(np.square(f[0] - f[1])))
    return {"cosine": cosine, "dist": dist, "same": bool(dist < threshold), "threshold": float(threshold)}


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description="Cosine similarity / squared L2 of two aligned faces (raw photos with "
                                            "--detect)")
    p.add_argument("image1")
    p.add_argument("image2")
    p.add_argument("--threshold", type=float, default=DEFAULT_THRESHOLD,
                   help="squared L2 distance below which the faces are the same person (default %(default)s)")
    add_model_args(p)
    add_detect_args(p)
    args = p.parse_args(argv)
    if not 0.0 <= args.threshold <= 4.0:
        raise ToolkitError(f"--threshold {args.threshold}: squared L2 of unit vectors lies in [0, 4]")
    detector = detector_from_args(args)
    model = model_from_args(args)
    if detector is not None:
        model = FaceDetectingModel(model, detector, args.faces)
    r = compare_faces(model, args.image1, args.image2, args.threshold)
    verdict = "same person" if r["same"] else "different people"
    print(f"cosine {r['cosine']:.5f}  squared-L2 {r['dist']:.5f}  threshold {r['threshold']:.3f}  -> {verdict}")
    return 0


def cli() -> None:
    sys.exit(run_cli(main))


if __name__ == "__main__":
    cli()
