"""Raw photos through the toolkit's MTCNN: faces found, time per photo, and how close the alignment comes to a
reference aligner, measured by the real y1 embedding.

    python benchmarks/raw_photos.py                      # ../shared/raw, ../shared/models/mtcnn, model-y1-test2
    python benchmarks/raw_photos.py --input-order bgr,rgb --refine 0,1 --repeats 3

For every photo in ``--raw``: the number of faces, their scores, the first call's time (binds each input shape)
and the median of ``--repeats`` later calls. For every photo with a crop of the same name in
``--raw/aligned_reference``: the cosine between the embedding of the toolkit's crop and of the reference crop, and
how far (in 112x112 crop pixels) the reference crop's alignment lies from the toolkit's at the five template
points (an affine ECC registration of one crop onto the other, OpenCV). Then the cosines the toolkit's crops give
between two photos of one person and between different people, for scale. ``--input-order`` and ``--refine`` rerun
everything with the other channel order and with det4 landmark refinement (how the defaults were chosen).
"""
from __future__ import annotations

import argparse
import itertools
import os
import time
from typing import Optional, Sequence

import numpy as np

from recognition.common import ToolkitError, run_cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join(os.path.dirname(ROOT), "shared")


def run(raw: str, detector_dir: str, model_spec: str, order: str, refine: bool, repeats: int) -> None:
    from deploy.detect import MtcnnDetector, alignment_offsets, crop_faces
    from deploy.face_model import FaceModel, read_image

    det = MtcnnDetector(detector_dir, refine_landmarks=refine)
    det.input_order = order
    model = FaceModel(model_spec)
    print(f"\n== input order {order}, det4 refinement {'on' if refine else 'off'} ==")
    print(f"{'photo':26s} {'size':>9s} {'faces':>5s} {'first ms':>8s} {'warm ms':>8s}  scores")
    crops = {}
    for name in sorted(f for f in os.listdir(raw) if f.lower().endswith((".jpg", ".jpeg", ".png"))):
        img = read_image(os.path.join(raw, name))
        t0 = time.perf_counter()
        faces = det.detect(img)
        first = time.perf_counter() - t0
        warm = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            det.detect(img)
            warm.append(time.perf_counter() - t0)
        print(f"{name:26s} {img.shape[1]:4d}x{img.shape[0]:<4d} {len(faces):5d} {first * 1e3:8.0f} "
              f"{np.median(warm) * 1e3 if warm else float('nan'):8.0f}  {' '.join('%.4f' % f.score for f in faces)}")
        if faces:
            crops[os.path.splitext(name)[0]] = crop_faces(img, faces, "largest")[0][0]
    ref_dir = os.path.join(raw, "aligned_reference")
    refs = {os.path.splitext(f)[0]: read_image(os.path.join(ref_dir, f)) for f in sorted(os.listdir(ref_dir))} \
        if os.path.isdir(ref_dir) else {}
    both = sorted(set(refs) & set(crops))
    if not both:
        return
    emb = dict(zip(both, model.get_features([crops[n] for n in both])))
    emb_ref = dict(zip(both, model.get_features([refs[n] for n in both])))
    print(f"\n{'photo':26s} {'cos(toolkit, reference crop)':>28s}  placement vs reference (px at eyes, nose, mouth)")
    for n in both:
        dev = alignment_offsets(crops[n], refs[n])
        print(f"{n:26s} {float(emb[n] @ emb_ref[n]):28.4f}  {' '.join('%.2f' % d for d in dev)}")
    print("\ncosine between toolkit crops of different photos:")
    for a, b in itertools.combinations(both, 2):
        same = a.rsplit("_", 1)[0] == b.rsplit("_", 1)[0]
        print(f"  {a} vs {b} ({'same person' if same else 'different people'}): {float(emb[a] @ emb[b]):.4f} "
              f"(reference crops {float(emb_ref[a] @ emb_ref[b]):.4f})")


def nearest_in_dataset(raw: str, detector_dir: str, model_spec: str, data_dir: str, top: int = 3) -> None:
    """For each raw photo with a reference crop: the ``top`` nearest images of a rec + .bin dataset (cosine of
    embeddings without the flip) to the toolkit's crop, e.g. the same LFW photo aligned by the dataset's pipeline.
    About 5,000 images take several minutes on 2 CPU cores."""
    from deploy.detect import MtcnnDetector, align_faces
    from deploy.face_model import FaceModel, decode_image, read_image
    from recognition.rec import RecordReader
    from recognition.verification import read_bin

    model, det = FaceModel(model_spec, batch_size=64, flip=False), MtcnnDetector(detector_dir)  # no flip: half time
    names, faces = [], []
    rec = os.path.join(data_dir, "train.rec")
    if os.path.isfile(rec):
        reader = RecordReader(rec)
        for k, lab in zip(reader.image_keys, reader.labels()):
            names.append(f"train.rec record {k} (class {int(lab)})")
            faces.append(decode_image(reader.read(k)[1]))
    for b in sorted(f for f in os.listdir(data_dir) if f.endswith(".bin")):
        images, _ = read_bin(os.path.join(data_dir, b))
        names += [f"{b} image {i}" for i in range(len(images))]
        faces += [np.ascontiguousarray(im.transpose(1, 2, 0)) for im in images]
    if not faces:
        raise ToolkitError(f"--search {data_dir}: no train.rec or .bin inside")
    t0 = time.perf_counter()
    gallery = model.get_features(faces)
    print(f"\nnearest of {len(faces)} images in {data_dir} (embedded in {time.perf_counter() - t0:.0f} s):")
    ref_dir = os.path.join(raw, "aligned_reference")
    for f in sorted(os.listdir(ref_dir)):
        found = align_faces(read_image(os.path.join(raw, f)), det)
        if not found:
            continue
        sims = gallery @ model.get_feature(found[0][0])
        best = np.argsort(-sims)[:top]
        print(f"  {os.path.splitext(f)[0]:22s} " + "; ".join(f"{sims[i]:.4f} {names[i]}" for i in best))


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--raw", default=os.path.join(SHARED, "raw"), help="folder of raw photos (+ aligned_reference/)")
    p.add_argument("--detector", default=os.path.join(SHARED, "models", "mtcnn"), help="MTCNN folder")
    p.add_argument("--model", default=os.path.join(SHARED, "fixtures", "model-y1-test2", "model") + ",0")
    p.add_argument("--input-order", default="bgr", help="comma list of bgr, rgb")
    p.add_argument("--refine", default="0", help="comma list of 0, 1 (det4 landmark refinement)")
    p.add_argument("--repeats", type=int, default=3, help="timed calls per photo after the first")
    p.add_argument("--search", metavar="DATA_DIR", help="also list the nearest images of this rec/.bin folder "
                   "(e.g. ../shared/real/lfw_dev) to each toolkit crop")
    args = p.parse_args(argv)
    if not os.path.isdir(args.raw):
        raise ToolkitError(f"--raw {args.raw}: no such folder")
    if args.search:
        nearest_in_dataset(args.raw, args.detector, args.model, args.search)
        return 0
    for order, refine in itertools.product(args.input_order.split(","), args.refine.split(",")):
        if order not in ("bgr", "rgb") or refine not in ("0", "1"):
            raise ToolkitError(f"--input-order {order!r} / --refine {refine!r}: expected bgr|rgb and 0|1")
        run(args.raw, args.detector, args.model, order, refine == "1", args.repeats)
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
