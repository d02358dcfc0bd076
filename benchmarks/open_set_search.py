"""1:N search in the open set on real faces: the verified cosine threshold against people who are not in the gallery.

    python benchmarks/open_set_search.py      # ../shared/real/lfw_dev + the real y1 checkpoint (~5,000 images)

1. Verification of ``model-y1-test2`` on the first half of ``lfw_dev/val.bin``'s pairs (LFW folds 4-5, people
   not in ``train.rec``) gives the best-accuracy threshold as a cosine (``recognition/thresholds.py``), as
   ``python -m recognition.verification`` records it in ``PREFIX-meta.json``.
2. Gallery: ``lfw_dev/train.rec``'s 471 people (``deploy/search.py``'s mean mode), each person with 3 or more images
   minus one held-out image, which is a query of a known person.
3. Strangers: the images of the second half of ``val.bin``'s pairs (not in the gallery).

Prints, with no threshold (the nearest person, what ``search.py`` did before), with the verified one and a few
stricter cosines: known queries answered with the right name / a wrong name / unknown, and strangers answered
unknown. (A 1:1 threshold is lenient for 1:N: a stranger is compared with every gallery person and the best of
471 scores is higher than one impostor score.)
"""
from __future__ import annotations

import argparse
import os
import time

import numpy as np

from deploy.face_model import FaceModel
from deploy.search import UNKNOWN, Gallery, answer
from recognition.features import LabelledImages
from recognition.thresholds import format_threshold, operating_points
from recognition.verification import evaluate, read_bin

HERE = os.path.dirname(os.path.abspath(__file__))
SHARED = os.path.normpath(os.path.join(HERE, "..", "..", "shared"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=os.path.join(SHARED, "fixtures", "model-y1-test2", "model") + ",0")
    ap.add_argument("--data", default=os.path.join(SHARED, "real", "lfw_dev"))
    args = ap.parse_args()
    t0 = time.time()
    model = FaceModel(args.model, batch_size=64)
    images, issame = read_bin(os.path.join(args.data, "val.bin"))
    half = len(issame) // 2
    pair_emb = model.get_features(list(images[:2 * half].transpose(0, 2, 3, 1)))
    r = evaluate(pair_emb, issame[:half], 10)
    pt = operating_points(pair_emb, issame[:half], r["best_threshold"], r["best_threshold_acc"])
    thr = pt["cosine"]
    print(f"verified on {half} pairs of val.bin: acc {r['acc']:.4f}, best {format_threshold(thr)}")
    strangers = model.get_features(list(images[2 * half:].transpose(0, 2, 3, 1)))
    data = LabelledImages(args.data)
    labels = data.labels
    emb = np.concatenate([model.get_features(list(data.load(idx).transpose(0, 2, 3, 1)))
                          for idx in np.array_split(np.arange(len(labels)), max(1, len(labels) // 256))])
    names = np.asarray(data.class_names)[labels]
    data.close()
    held = np.zeros(len(labels), dtype=bool)
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        if len(idx) >= 3:
            held[idx[0]] = True
    gallery = Gallery.from_embeddings(names[~held], emb[~held], "mean")
    known_rows = gallery.search(emb[held], top_k=1)
    stranger_rows = gallery.search(strangers, top_k=1)
    print(f"gallery {gallery.num_identities} people; {int(held.sum())} known queries, {len(strangers)} strangers "
          f"({time.time() - t0:.0f} s)")
    print(f"{'threshold':<34}{'known: right':>13}{'wrong':>8}{'unknown':>9}   strangers answered unknown")
    sweep = [(f"cosine {t:.2f}", t) for t in (0.35, 0.40, 0.45, 0.50)]
    for label, t in [("none (nearest person)", -1.0), (f"verified, cosine {thr:.3f}", thr)] + sweep:
        got = [answer(row, t) for row in known_rows]
        right = np.mean([g == n for g, n in zip(got, names[held])])
        unk = np.mean([g == UNKNOWN for g in got])
        wrong = np.mean([g not in (n, UNKNOWN) for g, n in zip(got, names[held])])
        s_unk = np.mean([answer(row, t) == UNKNOWN for row in stranger_rows])
        print(f"{label:<34}{right:>13.4f}{wrong:>8.4f}{unk:>9.4f}   {s_unk:.4f} of {len(strangers)}")


if __name__ == "__main__":
    main()
