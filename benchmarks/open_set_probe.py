"""Open-set answers of the linear probe on real faces: known people kept, unknown people answered "unknown".

    python benchmarks/open_set_probe.py            # ../shared/real/lfw_dev + the real y1 checkpoint, ~3 min on 2 cores

Trains a probe (``recognition/linear_probe.py``, logistic regression on L2-normalised ``fc1_output``) on
``lfw_dev/train.rec`` (471 people), whose ``unknown_threshold`` comes from its own validation split, then predicts
the 2,400 images of ``lfw_dev/val.bin`` (LFW folds 4-5: none of them is one of the 471). Prints, for the probe's
threshold and for no threshold: the share of validation images (known people) answered with the right name, with
a wrong name, and "unknown"; and the share of the unknown people answered "unknown".
"""
from __future__ import annotations

import argparse
import os
import time

import numpy as np

from recognition.common import setup_logging
from recognition.features import FeatureExtractor
from recognition.linear_probe import UNKNOWN, features_for, predict_features, stratified_split, train_probe
from recognition.verification import read_bin

HERE = os.path.dirname(os.path.abspath(__file__))
SHARED = os.path.normpath(os.path.join(HERE, "..", "..", "shared"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=os.path.join(SHARED, "fixtures", "model-y1-test2", "model") + ",0")
    ap.add_argument("--data", default=os.path.join(SHARED, "real", "lfw_dev"))
    ap.add_argument("--accept-rate", type=float, default=0.95)
    ap.add_argument("--val-split", type=float, default=0.3)
    ap.add_argument("--max-unknown", type=int, default=2400, help="images of val.bin to predict")
    args = ap.parse_args()
    setup_logging()
    t0 = time.time()
    probe = train_probe(args.model, args.data, val_split=args.val_split, accept_rate=args.accept_rate)
    print(f"probe: {len(probe['class_names'])} people, {probe['num_train']} train / {probe['num_val']} val images, "
          f"val acc {probe['val_acc']:.4f}, unknown_threshold {probe['unknown_threshold']:.4f} "
          f"({time.time() - t0:.0f} s)")
    # the validation split again (same seed, same split): known people
    from recognition.features import LabelledImages

    data = LabelledImages(args.data)
    prefix, _, epoch = probe["model"].rpartition(",")
    fx = FeatureExtractor.from_checkpoint(prefix, int(epoch), probe["layer"], batch_size=64)
    _, val_idx = stratified_split(data.labels, args.val_split, 0)
    known = features_for(fx, data, probe["normalize"], probe["flip"], indices=val_idx)
    truth = [data.class_names[int(k)] for k in data.labels[val_idx]]
    data.close()
    images, _ = read_bin(os.path.join(args.data, "val.bin"))
    unknown = features_for(fx, images[:args.max_unknown], probe["normalize"], probe["flip"])
    print(f"{'threshold':<22}{'known: right':>14}{'wrong':>8}{'unknown':>9}{'| strangers: unknown':>22}")
    for label, thr in (("none", None), (f"probe's {probe['unknown_threshold']:.4f}", probe["unknown_threshold"])):
        names, _, _ = predict_features(probe, known, thr)
        right = np.mean([n == t for n, t in zip(names, truth)])
        unk = np.mean([n == UNKNOWN for n in names])
        snames, _, _ = predict_features(probe, unknown, thr)
        print(f"{label:<22}{right:>14.4f}{1 - right - unk:>8.4f}{unk:>9.4f}"
              f"{np.mean([n == UNKNOWN for n in snames]):>22.4f}")


if __name__ == "__main__":
    main()
