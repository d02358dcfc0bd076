"""Linear probe: a scikit-learn classifier on features of a FROZEN checkpoint (no backbone training).

The cheapest transfer strategy: when the new identities look like what the checkpoint was trained on and there
are few images per identity, a linear classifier on ``fc1_output`` (L2-normalised) is usually as good as
fine-tuning. For a different domain, an earlier layer (``--layer stage3_unit2_relu1_output``, globally
average-pooled) can carry more transferable features.

Commands::

    python recognition/linear_probe.py train --model ../models/model-y1-test2/model,0 --data DIR --output probe.pkl
    python recognition/linear_probe.py predict --probe probe.pkl --images a.jpg b.jpg
    python recognition/linear_probe.py predict --probe probe.pkl --data DIR     # labelled: also prints accuracy

``--data`` is a folder with ``train.rec``/``train.idx`` (or a ``.rec`` path, with ``classes.txt`` beside it for
names) or a folder of identity sub-folders.

Open set: a face of someone the probe was not trained on still gets the nearest class, with a low score. ``train``
sets ``unknown_threshold`` from its validation images: the top-1 score that ``--accept-rate`` (default 0.95) of the
correctly classified validation images reach. ``predict`` answers ``unknown`` below it (``--threshold T``
overrides, ``--threshold 0`` turns it off).
The probe file is a pickle (a pickle runs code when loaded): load only probe files you made yourself.
"""
from __future__ import annotations

import argparse
import json
import os
import pickle
import sys
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from recognition.common import (
    DefaultsHelpFormatter,
    ToolkitError,
    atomic_write,
    parse_ctx,
    parse_prefix_epoch,
    run_cli,
    setup_logging,
)
from recognition.features import FeatureExtractor, LabelledImages, extract, l2_normalize, list_images, read_image
from recognition.verification import EMBED_NODE

PROBE_FORMAT = "insightface-finetune linear probe"
PROBE_VERSION = 1
CLASSIFIERS = ("logreg", "svm")
UNKNOWN = "unknown"


def stratified_split(labels: np.ndarray, val_fraction: float, seed: int = 0) -> Tuple[np.ndarray, np.ndarray]:
    """Seeded per-class split -> ``(train_idx, val_idx)``, both sorted.

    Each class with n >= 2 images gives ``max(1, round(val_fraction * n))`` images (at most n - 1) to validation;
    a class with one image stays in training. ``val_fraction = 0`` -> no validation.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ToolkitError(f"--val-split {val_fraction}: must be in [0, 1)")
    labels = np.asarray(labels)
    rng = np.random.RandomState(seed)
    val: List[int] = []
    if val_fraction > 0:
        for c in np.unique(labels):
            idx = np.flatnonzero(labels == c)
            if len(idx) < 2:
                continue
            k = min(len(idx) - 1, max(1, int(round(val_fraction * len(idx)))))
            val += rng.permutation(idx)[:k].tolist()
    val_idx = np.array(sorted(val), dtype=np.int64)
    train_idx = np.setdiff1d(np.arange(len(labels)), val_idx)
    return train_idx, val_idx


def make_classifier(kind: str = "logreg", c: float = 1.0, seed: int = 0):
    """``StandardScaler`` + ``LogisticRegression`` (probabilities) or ``LinearSVC`` (decision scores)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from sklearn.svm import LinearSVC

    if kind == "logreg":
        clf = LogisticRegression(C=c, max_iter=2000, random_state=seed)
    elif kind == "svm":
        clf = LinearSVC(C=c, max_iter=5000, random_state=seed)
    else:
        raise ToolkitError(f"--classifier {kind!r}: expected one of {', '.join(CLASSIFIERS)}")
    return make_pipeline(StandardScaler(), clf)


def features_for(fx: FeatureExtractor, images_or_data, normalize: bool, flip: bool, indices=None,
                 batch_size: int = 64) -> np.ndarray:
    """Probe features (N, D): extractor output (flip-summed if ``flip``), L2-normalised if ``normalize``."""
    if isinstance(images_or_data, LabelledImages):
        feats = extract(fx, images_or_data, indices, batch_size, flip, progress="linear probe: embed")
    else:
        feats = fx(np.asarray(images_or_data, dtype=np.float32), flip=flip)
    return l2_normalize(feats) if normalize else feats


def unknown_threshold(scores: np.ndarray, correct: np.ndarray, accept_rate: float = 0.95) -> Optional[float]:
    """Open-set threshold from validation: the top-1 score (N,) that ``accept_rate`` of the correctly classified
    (``correct`` bool (N,)) validation images reach (their ``1 - accept_rate`` quantile, lower interpolation).
    None without a correct validation image."""
    good = np.sort(np.asarray(scores, dtype=np.float64)[np.asarray(correct, dtype=bool)])
    if not len(good):
        return None
    return float(good[int(np.floor((1.0 - accept_rate) * (len(good) - 1)))])


def train_probe(model: str, data: str, layer: Optional[str] = None, classifier: str = "logreg",
                val_split: float = 0.2, c: float = 1.0, seed: int = 0, flip: bool = False,
                normalize: Optional[bool] = None, ctx=None, batch_size: int = 64,
                accept_rate: float = 0.95) -> Dict:
    """Embed ``data`` with the frozen checkpoint ``model`` (``PREFIX,EPOCH``) and fit a classifier.

    Returns the probe dict (what :func:`save_probe` writes): ``format``, ``version``, ``model`` (absolute
    ``PREFIX,EPOCH``), ``layer``, ``normalize``, ``flip``, ``classifier``, ``class_names``, ``pipeline`` (sklearn),
    ``feature_dim``, ``train_acc``, ``val_acc`` (None without validation), ``num_train``, ``num_val``,
    ``unknown_threshold`` (see :func:`unknown_threshold`; None without validation) and ``accept_rate``.
    """
    if not 0.0 < accept_rate <= 1.0:
        raise ToolkitError(f"--accept-rate {accept_rate}: must be in (0, 1]")
    prefix, epoch = parse_prefix_epoch(model, "--model")
    images = LabelledImages(data)
    try:
        present = np.unique(images.labels)
        if len(present) < 2:
            raise ToolkitError(f"--data {data}: a classifier needs at least 2 identities, found {len(present)}")
        fx = FeatureExtractor.from_checkpoint(prefix, epoch, layer, ctx, batch_size=min(batch_size, 64))
        normalize = (fx.layer == EMBED_NODE) if normalize is None else bool(normalize)
        train_idx, val_idx = stratified_split(images.labels, val_split, seed)
        feats = features_for(fx, images, normalize, flip, batch_size=batch_size)
    finally:
        images.close()
    pipe = make_classifier(classifier, c, seed)
    pipe.fit(feats[train_idx], images.labels[train_idx])
    train_acc = float(np.mean(pipe.predict(feats[train_idx]) == images.labels[train_idx]))
    val_acc, threshold = None, None
    if len(val_idx):
        probe = {"pipeline": pipe, "class_names": list(images.class_names)}
        _, val_scores, val_pred = predict_features(probe, feats[val_idx])
        correct = val_pred == images.labels[val_idx]
        val_acc = float(np.mean(correct))
        threshold = unknown_threshold(val_scores, correct, accept_rate)
    return {"format": PROBE_FORMAT, "version": PROBE_VERSION, "model": f"{os.path.abspath(prefix)},{epoch}",
            "layer": fx.layer, "normalize": normalize, "flip": bool(flip), "classifier": classifier,
            "class_names": list(images.class_names), "pipeline": pipe, "feature_dim": int(feats.shape[1]),
            "train_acc": train_acc, "val_acc": val_acc, "num_train": int(len(train_idx)),
            "num_val": int(len(val_idx)), "data_shape": list(fx.data_shape), "unknown_threshold": threshold,
            "accept_rate": float(accept_rate)}


def save_probe(path: str, probe: Dict) -> str:
    """Pickle ``probe`` to ``path`` atomically."""
    with atomic_write(path, "wb") as f:
        pickle.dump(probe, f, protocol=pickle.HIGHEST_PROTOCOL)
    return path


def load_probe(path: str) -> Dict:
    """Read a probe file written by :func:`save_probe`. It is a pickle: only load files you made yourself."""
    if not os.path.isfile(path):
        raise ToolkitError(f"--probe {path}: file does not exist")
    try:
        with open(path, "rb") as f:
            probe = pickle.load(f)  # the user's own file (see module docstring)
    except Exception as exc:
        raise ToolkitError(f"--probe {path}: not a readable probe file ({type(exc).__name__}: {exc})") from None
    if not isinstance(probe, dict) or probe.get("format") != PROBE_FORMAT:
        raise ToolkitError(f"--probe {path}: not a linear probe file (written by linear_probe.py train)")
    if probe.get("version") != PROBE_VERSION:
        raise ToolkitError(f"--probe {path}: version {probe.get('version')} is not supported "
                           f"(this toolkit reads version {PROBE_VERSION})")
    return probe


def probe_extractor(probe: Dict, ctx=None, batch_size: int = 64) -> FeatureExtractor:
    """The frozen checkpoint + layer the probe was trained on."""
    prefix, epoch = parse_prefix_epoch(probe["model"], "probe model")
    return FeatureExtractor.from_checkpoint(prefix, epoch, probe["layer"], ctx, batch_size,
                                            tuple(probe.get("data_shape", (3, 112, 112))))


def predict_features(probe: Dict, feats: np.ndarray,
                     threshold: Optional[float] = None) -> Tuple[List[str], np.ndarray, np.ndarray]:
    """``(top-1 names, top-1 scores (N,), label ids (N,))`` for probe features (N, D).

    Score = class probability (logreg) or the SVM decision value (svm). With ``threshold``, a score below it gives
    the name ``unknown`` and the label id -1 (open set: someone the probe was not trained on).
    """
    pipe = probe["pipeline"]
    labels = pipe.predict(feats)
    if hasattr(pipe, "predict_proba"):
        scores = pipe.predict_proba(feats)
    else:
        scores = pipe.decision_function(feats)
        if scores.ndim == 1:  # binary LinearSVC: score of class 1; show the winner's margin
            scores = np.stack([-scores, scores], axis=1)
    col = np.searchsorted(pipe.classes_, labels)
    top = scores[np.arange(len(labels)), col]
    names = [probe["class_names"][int(k)] for k in labels]
    labels = labels.astype(np.int64)
    if threshold is not None:
        under = top < threshold
        names = [UNKNOWN if u else n for n, u in zip(names, under)]
        labels = np.where(under, -1, labels)
    return names, top.astype(np.float64), labels


def predict_images(probe: Dict, images: np.ndarray, ctx=None, batch_size: int = 64,
                   threshold: Optional[float] = None):
    """Predict uint8/float (N, 3, H, W) RGB images -> see :func:`predict_features`."""
    fx = probe_extractor(probe, ctx, batch_size)
    return predict_features(probe, features_for(fx, images, probe["normalize"], probe["flip"]), threshold)


def resolve_threshold(probe: Dict, flag: Optional[float]) -> Optional[float]:
    """``--threshold``: None -> the probe's own ``unknown_threshold`` (older probe files have none), 0 -> off."""
    if flag is None:
        return probe.get("unknown_threshold")
    return None if flag == 0 else float(flag)


# --------------------------------------------------------------------------------------------------------- CLI
class _HelpFormatter(DefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """``--help`` with each flag's default and the description as written."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="linear_probe.py", description=__doc__.split("\n")[0],
                                     formatter_class=_HelpFormatter,
                                     epilog="The probe file is a pickle: load only probe files you made yourself.")
    sub = parser.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="embed labelled data with a frozen checkpoint and fit a classifier",
                       formatter_class=_HelpFormatter)
    t.add_argument("--model", required=True, help="frozen checkpoint PREFIX,EPOCH")
    t.add_argument("--data", required=True, help="DIR with train.rec/train.idx, a .rec, or a folder of identity "
                                                 "sub-folders")
    t.add_argument("--layer", default=None, help=f"layer output to probe (default {EMBED_NODE}; 4-D outputs are "
                                                 "average-pooled), e.g. stage3_unit2_relu1_output")
    t.add_argument("--classifier", choices=CLASSIFIERS, default="logreg", help="logistic regression or linear SVM")
    t.add_argument("--C", dest="c", type=float, default=1.0, help="inverse regularisation strength")
    t.add_argument("--val-split", type=float, default=0.2, help="fraction of each identity held out (0: none)")
    t.add_argument("--flip", action="store_true", help="features of image + mirrored image (insightface style)")
    t.add_argument("--no-normalize", action="store_true", help="do not L2-normalise fc1 features")
    t.add_argument("--accept-rate", type=float, default=0.95,
                   help="open set: share of correctly classified validation images the 'unknown' threshold keeps")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--output", required=True, help="probe file to write (pickle)")
    p = sub.add_parser("predict", help="top-1 identity of new images", formatter_class=_HelpFormatter)
    p.add_argument("--probe", required=True, help="probe file from 'train' (a pickle: your own files only)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--images", nargs="+", help="aligned 112x112 face images")
    src.add_argument("--data", help="folder of images, or labelled data as for 'train' (then accuracy is shown)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of lines")
    p.add_argument("--threshold", type=float, default=None,
                   help="answer 'unknown' under this top-1 score (default: the probe's own, from its validation "
                        "data; 0: always name the nearest class)")
    for sp in (t, p):
        sp.add_argument("--ctx", default=None, help="device, e.g. cpu or gpu:0")
        sp.add_argument("--batch-size", type=int, default=64)
    return parser


def _cmd_train(args) -> int:
    if args.batch_size <= 0:
        raise ToolkitError(f"--batch-size {args.batch_size}: must be > 0")
    out_dir = os.path.dirname(os.path.abspath(args.output))
    if not os.path.isdir(out_dir):
        raise ToolkitError(f"--output {args.output}: folder {out_dir} does not exist")
    probe = train_probe(args.model, args.data, args.layer, args.classifier, args.val_split, args.c, args.seed,
                        args.flip, False if args.no_normalize else None, parse_ctx(args.ctx)[0], args.batch_size,
                        args.accept_rate)
    save_probe(args.output, probe)
    val = "n/a" if probe["val_acc"] is None else f"{probe['val_acc']:.4f}"
    thr = "none (no validation images)" if probe["unknown_threshold"] is None else \
        f"{probe['unknown_threshold']:.4f} (keeps {probe['accept_rate']:.0%} of correct validation answers)"
    print(f"probe: {probe['classifier']} on {probe['layer']} ({probe['feature_dim']}-d, "
          f"{len(probe['class_names'])} identities); train acc {probe['train_acc']:.4f} on {probe['num_train']} "
          f"images; val acc {val} on {probe['num_val']} images; 'unknown' under score {thr}; saved {args.output}")
    return 0


def _cmd_predict(args) -> int:
    probe = load_probe(args.probe)
    fx = probe_extractor(probe, parse_ctx(args.ctx)[0], args.batch_size)
    truth: Optional[List[str]] = None
    if args.images or (os.path.isdir(args.data) and list_images(args.data)
                       and not os.path.isfile(os.path.join(args.data, "train.rec"))):
        paths = list(args.images) if args.images else list_images(args.data)
        images = np.stack([read_image(p) for p in paths])
        feats = features_for(fx, images, probe["normalize"], probe["flip"], batch_size=args.batch_size)
    else:  # labelled data: streamed in batches, accuracy against the folder/rec labels
        data = LabelledImages(args.data)
        try:
            feats = features_for(fx, data, probe["normalize"], probe["flip"], batch_size=args.batch_size)
            paths = [str(s) for s in data.sources]
            truth = [data.class_names[int(k)] for k in data.labels]
        finally:
            data.close()
    threshold = resolve_threshold(probe, args.threshold)
    names, scores, _ = predict_features(probe, feats, threshold)
    kind = "probability" if probe["classifier"] == "logreg" else "score"
    acc = None if truth is None else float(np.mean([a == b for a, b in zip(names, truth)]))
    if args.json:
        print(json.dumps({"predictions": [{"image": p, "name": n, kind: float(s)}
                                          for p, n, s in zip(paths, names, scores)], "accuracy": acc,
                          "threshold": threshold}))
        return 0
    for p, n, s in zip(paths, names, scores):
        print(f"{p}\t{n}\t{kind}={s:.4f}")
    if acc is not None:
        unknown = sum(n == UNKNOWN for n in names)
        print(f"accuracy {acc:.4f} on {len(paths)} labelled images ({unknown} answered unknown under "
              f"{'no threshold' if threshold is None else f'{threshold:.4f}'})")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(verbose=False)
    return _cmd_train(args) if args.command == "train" else _cmd_predict(args)


def cli() -> None:
    sys.exit(run_cli(main))


if __name__ == "__main__":
    cli()
