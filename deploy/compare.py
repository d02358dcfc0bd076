"""Compare two aligned face images: cosine similarity, squared L2 distance, same or different person.

    python deploy/compare.py --model ../models/model-y1-test2/model,0 a.jpg b.jpg --threshold 0.32
    python deploy/compare.py --model ../models/model-y1-test2/model,0 --detect ../models/mtcnn raw1.jpg raw2.jpg

The threshold is a cosine similarity ("same person" when the cosine reaches it), as everywhere in the toolkit
(``recognition/thresholds.py``); the squared L2 distance is shown beside it (``dist = 2 - 2 cosine``). By default
it is the model's verified threshold (``PREFIX-meta.json``, written by ``python -m recognition.verification``),
else 0.32 (model-y1-test2's best on LFW fold 1: squared L2 1.36).
"""
from __future__ import annotations

import argparse
import sys
from typing import Dict, Optional, Sequence

import numpy as np

from deploy.detect import FaceDetectingModel, add_detect_args, detector_from_args
from deploy.face_model import FaceModel, ImageLike, add_model_args, model_from_args
from recognition.common import DefaultsHelpFormatter, run_cli
from recognition.thresholds import format_threshold, threshold_for_model

# model-y1-test2's best threshold over LFW fold 1 (ifr-verify: squared L2 1.36) as a cosine; used when the model's
# PREFIX-meta.json holds no verified threshold
DEFAULT_THRESHOLD = 0.32


def compare_faces(model: FaceModel, img1: ImageLike, img2: ImageLike,
                  threshold: float = DEFAULT_THRESHOLD) -> Dict[str, float]:
    """Embed two faces in one batch; returns ``{cosine, dist, same, threshold}`` (``same`` = cosine >= threshold,
    a cosine threshold; ``dist`` the squared L2 of the normalised embeddings)."""
    f = model.get_features([img1, img2])
    cosine = float(np.dot(f[0], f[1]))
    dist = float(np.sum(np.square(f[0] - f[1])))
    return {"cosine": cosine, "dist": dist, "same": bool(cosine >= threshold), "threshold": float(threshold)}


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(formatter_class=DefaultsHelpFormatter,
                                description="Cosine similarity / squared L2 of two aligned faces (raw photos with "
                                            "--detect)")
    p.add_argument("image1")
    p.add_argument("image2")
    p.add_argument("--threshold", type=float, default=None,
                   help="cosine similarity from which the faces are the same person (default: the model's verified "
                        f"threshold in PREFIX-meta.json, else {DEFAULT_THRESHOLD})")
    add_model_args(p)
    add_detect_args(p)
    args = p.parse_args(argv)
    threshold, source = threshold_for_model(args.model, args.threshold, DEFAULT_THRESHOLD)
    detector = detector_from_args(args)
    model = model_from_args(args)
    if detector is not None:
        model = FaceDetectingModel(model, detector, args.faces)
    r = compare_faces(model, args.image1, args.image2, threshold)
    verdict = "same person" if r["same"] else "different people"
    print(f"cosine {r['cosine']:.5f} (squared L2 {r['dist']:.5f})  threshold {format_threshold(threshold)}, "
          f"{source}  -> {verdict}")
    return 0


def cli() -> None:
    sys.exit(run_cli(main))


if __name__ == "__main__":
    cli()
