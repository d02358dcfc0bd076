"""Open-set answers of the linear probe on real faces: known people kept, unknown people answered "unknown".

    python benchmarks/open_set_probe.py     # ../shared/real/lfw_dev + the real y1 checkpoint: 3,151 images to embed

Trains a probe (``recognition/linear_probe.py``, logistic regression on L2-normalised ``fc1_output``) on
``lfw_dev/train.rec`` (471 people), whose ``unknown_threshold`` comes from its own validation split, then predicts
the first ``--max-unknown`` images of ``lfw_dev/val.bin`` (LFW folds 4-5: none of them is one of the 471). Prints,
for the probe's threshold and for no threshold: the share of validation images (known people) answered with the
right name, with a wrong name, and "unknown" (the threshold is set on every other validation image, these figures
come from the other half); and the share of the strangers answered "unknown".
"""
from __future__ import annotations

import argparse
import os
import time

import numpy as np

from recognition.common import setup_logging
from recognition.features import FeatureExtractor, LabelledImages
from recognition.linear_probe import (
    UNKNOWN,
    features_for,
    make_classifier,
    predict_features,
    stratified_split,
    unknown_threshold,
)
from recognition.verification import read_bin

HERE = os.path.dirname(os.path.abspath(__file__))
SHARED = os.path.normpath(os.path.join(HERE, "..", "..", "shared"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=os.path.join(SHARED, "fixtures", "model-y1-test2", "model") + ",0")
    ap.add_argument("--data", default=os.path.join(SHARED, "real", "lfw_dev"))
    ap.add_argument("--accept-rate", type=float, default=0.95)
    ap.add_argument("--val-split", type=float, default=0.3)
    ap.add_argument("--max-unknown", type=int, default=600, help="images of val.bin (strangers) to predict")
    args = ap.parse_args()
    setup_logging()
    t0 = time.time()
    # what train_probe does, with the features kept: each image is embedded once
    prefix, _, epoch = args.model.rpartition(",")
    fx = FeatureExtractor.from_checkpoint(prefix, int(epoch), None, batch_size=64)
    data = LabelledImages(args.data)
    feats = features_for(fx, data, True, False)
    labels, names = data.labels, list(data.class_names)
    data.close()
    tr, va = stratified_split(labels, args.val_split, 0)
    pipe = make_classifier("logreg", 1.0, 0).fit(feats[tr], labels[tr])
    probe = {"pipeline": pipe, "class_names": names}
    _, val_scores, val_pred = predict_features(probe, feats[va])
    correct = val_pred == labels[va]
    # the threshold from every other validation image, the known-people figures on the rest (held out from both)
    pick, held = np.arange(len(va)) % 2 == 0, np.arange(len(va)) % 2 == 1
    thr = unknown_threshold(val_scores[pick], correct[pick], args.accept_rate)
    print(f"probe: {len(names)} people, {len(tr)} train / {len(va)} val images, val acc {np.mean(correct):.4f}, "
          f"unknown_threshold {thr:.4f} from {int(pick.sum())} of them ({time.time() - t0:.0f} s)")
    va = va[held]
    images, _ = read_bin(os.path.join(args.data, "val.bin"))
    strangers = features_for(fx, images[:args.max_unknown], True, False)
    truth = [names[int(k)] for k in labels[va]]
    print(f"{'threshold':<18}{'known: right':>14}{'wrong':>8}{'unknown':>9}   strangers answered unknown")
    for label, t in (("none", None), (f"probe's {thr:.4f}", thr)):
        got, _, _ = predict_features(probe, feats[va], t)
        right = np.mean([n == k for n, k in zip(got, truth)])
        unk = np.mean([n == UNKNOWN for n in got])
        sgot, _, _ = predict_features(probe, strangers, t)
        print(f"{label:<18}{right:>14.4f}{1 - right - unk:>8.4f}{unk:>9.4f}   "
              f"{np.mean([n == UNKNOWN for n in sgot]):.4f} of {len(strangers)}")


if __name__ == "__main__":
    main()
