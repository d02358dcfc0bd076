"""Transfer-strategy advisor: measure new data against a pretrained checkpoint and print the command to run.

    python recognition/advise.py --pretrained ../models/model-y1-test2/model,0 --data data/mine [--json]

What it measures (seeded, on at most ``--max-identities`` x ``--per-identity`` images of the data):

- size: identities, images, images per identity (min / median / max);
- distance from what the checkpoint knows: 10-fold verification accuracy of the UNTOUCHED model on
  same/different-identity pairs drawn from the data (flip-summed embeddings, insightface maths via
  ``verification.evaluate``), the embedding norm (mean/std, insightface's XNorm) and the spread: mean cosine
  between images of one identity vs images of different identities.

The classic transfer-learning grid (Yosinski et al. 2014, "How transferable are features in deep neural
networks?"; the CS231n transfer-learning notes) then picks one of four scenarios:

1. small & similar   -> linear probe on ``fc1_output`` (fine-tuning would overfit; the features already work);
2. large & similar   -> fine-tune everything briefly at a low learning rate, imprinted fc7 first;
3. small & different -> the grid says: freeze the early stages, train the last stage + embedding. Measured on real
   faces (21-pixel LFW faces, ``benchmarks/strategies_real.py --strategies frozen-stages:4,two-stage --steps
   320``, two seeds) that gained +0.5 point (0.8842 -> 0.8896, within fold noise) and cost the unshifted pairs 0.6,
   while two-stage over the whole backbone at 0.1x gained +4.4: the advice here is two-stage (or a probe of an
   earlier layer);
4. large & different -> two-stage: head only, then unfreeze everything at a higher learning rate (or retrain).

Thresholds (:class:`Thresholds`, all overridable):

- "small": median images per identity < 20 OR total images < 5,000. Margin losses shape each class centre from
  that class's own images; insightface's fine-tuning sets (CASIA-WebFace ~47 per identity, MS1M ~80) sit well above
  20, and below ~5,000 images a pass over the data is < 100 batches of 64, too few steps to move a backbone of
  1-65 M parameters without memorising the set.
- "similar": verification accuracy on the new pairs >= 0.90. A checkpoint on its own domain scores 0.97-0.995
  (the y1 fixture: 0.988 on an LFW fold); an unrelated/random embedding scores 0.5-0.7. 0.90 means the embedding
  already separates most identities of the new data, so its last layer is worth keeping as it is.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import shlex
import sys
from dataclasses import asdict, dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from recognition.common import (
    DefaultsHelpFormatter,
    ToolkitError,
    load_checkpoint,
    parse_ctx,
    parse_prefix_epoch,
    run_cli,
    setup_logging,
)
from recognition.features import FeatureExtractor, LabelledImages, l2_normalize
from recognition.verification import EMBED_NODE, evaluate

SCENARIOS = {1: "small & similar", 2: "large & similar", 3: "small & different", 4: "large & different"}
# Settings measured on real faces (benchmarks/strategies_real.py: model-y1-test2 adapted to LFW identities at low
# resolution; see the README's strategies section):
# - the imprinted head trains at 0.1x the lr (``head:N@0.1``): it already fits, a full-lr head pulls it away;
# - the backbone at 0.1x after the head stage: at 1x (lr 0.01) the loss rose after unfreezing and unshifted
#   verification fell (issue 13: 0.990 -> 0.980);
# - ``--bn-mode frozen`` when the checkpoint's knowledge is to be kept: with batch statistics the 'all' stage starts
#   on other features (loss 11 -> 23 at the switch on 21-pixel faces, before any update) and the moving statistics
#   drift to the new domain, which cost the unshifted pairs 2.2 points; frozen statistics need the slow backbone
#   (at 1x they diverged: loss 0 -> 20 in 15 steps).
HEAD_LR_FACTOR = 0.1
BACKBONE_LR_MULT = 0.1


@dataclass(frozen=True)
class Thresholds:
    """Decision thresholds (see the module docstring for why these values)."""

    min_images_per_identity: float = 20.0  # median below this -> small
    min_total_images: int = 5000  # total below this -> small
    similar_accuracy: float = 0.90  # verification accuracy at or above this -> similar


def decide_scenario(num_images: int, median_per_identity: float, verification_acc: float,
                    thresholds: Thresholds = Thresholds()) -> Dict:
    """Pure decision: ``{scenario (1-4), name, small, similar, reasons [str]}`` from the three measurements."""
    t = thresholds
    few_per_id = median_per_identity < t.min_images_per_identity
    few_total = num_images < t.min_total_images
    small = few_per_id or few_total
    similar = verification_acc >= t.similar_accuracy
    reasons = [
        f"median {median_per_identity:g} images per identity {'<' if few_per_id else '>='} "
        f"{t.min_images_per_identity:g}; {num_images} images {'<' if few_total else '>='} {t.min_total_images} "
        f"-> {'small' if small else 'large'}",
        f"verification accuracy of the untouched model on the new pairs {verification_acc:.4f} "
        f"{'>=' if similar else '<'} {t.similar_accuracy:g} -> {'similar' if similar else 'different'}",
    ]
    scenario = {(True, True): 1, (False, True): 2, (True, False): 3, (False, False): 4}[(small, similar)]
    return {"scenario": scenario, "name": SCENARIOS[scenario], "small": small, "similar": similar,
            "reasons": reasons}


# -------------------------------------------------------------------------------------------------- measuring
def sample_subset(labels: np.ndarray, per_identity: int, max_identities: int, seed: int = 0) -> np.ndarray:
    """Seeded subset of image indices: up to ``max_identities`` identities x ``per_identity`` images, sorted."""
    rng = np.random.RandomState(seed)
    classes = np.unique(labels)
    if len(classes) > max_identities:
        classes = np.sort(rng.choice(classes, max_identities, replace=False))
    keep = []
    for c in classes:
        idx = np.flatnonzero(labels == c)
        keep += (rng.choice(idx, per_identity, replace=False) if len(idx) > per_identity else idx).tolist()
    return np.array(sorted(keep), dtype=np.int64)


def sample_pairs(labels: np.ndarray, num_pairs: int, seed: int = 0) -> Tuple[np.ndarray, np.ndarray]:
    """Seeded balanced pairs over positions of ``labels`` -> ``(pairs (P, 2) int, issame (P,) bool)``.

    Half same-identity pairs (distinct images), half different-identity pairs, no pair twice, shuffled.
    """
    rng = np.random.RandomState(seed)
    by_class = {c: np.flatnonzero(labels == c) for c in np.unique(labels)}
    multi = [c for c, idx in by_class.items() if len(idx) >= 2]
    if not multi:
        raise ToolkitError("--data: no identity has 2 images; same-identity pairs cannot be formed")
    if len(by_class) < 2:
        raise ToolkitError("--data: only one identity; different-identity pairs cannot be formed")
    possible_same = sum(len(by_class[c]) * (len(by_class[c]) - 1) // 2 for c in multi)
    half = min(num_pairs // 2, possible_same)
    same, diff = set(), set()
    classes = np.array(sorted(by_class))
    for _ in range(50 * half + 100):
        if len(same) >= half:
            break
        a, b = rng.choice(by_class[multi[rng.randint(len(multi))]], 2, replace=False)
        same.add((min(a, b), max(a, b)))
    for _ in range(50 * half + 100):
        if len(diff) >= len(same):
            break
        ca, cb = rng.choice(classes, 2, replace=False)
        a, b = rng.choice(by_class[ca]), rng.choice(by_class[cb])
        diff.add((min(a, b), max(a, b)))
    pairs = [(a, b, True) for a, b in sorted(same)] + [(a, b, False) for a, b in sorted(diff)]
    order = rng.permutation(len(pairs))
    arr = np.array([pairs[i][:2] for i in order], dtype=np.int64).reshape(-1, 2)
    return arr, np.array([pairs[i][2] for i in order], dtype=bool)


def spread(emb: np.ndarray, labels: np.ndarray) -> Tuple[float, float]:
    """``(mean intra-class cosine, mean inter-class cosine)`` of L2-normalised ``emb`` (N, E); self-pairs excluded."""
    gram = emb @ emb.T
    same = labels[:, None] == labels[None, :]
    np.fill_diagonal(same, False)
    diff = labels[:, None] != labels[None, :]
    intra = float(gram[same].mean()) if same.any() else float("nan")
    inter = float(gram[diff].mean()) if diff.any() else float("nan")
    return intra, inter


def measure(fx: FeatureExtractor, data: LabelledImages, num_pairs: int = 600, per_identity: int = 10,
            max_identities: int = 300, seed: int = 0, batch_size: int = 64) -> Dict:
    """Size statistics of ``data`` and how the frozen embedding ``fx`` (fc1) sees it (see module docstring)."""
    counts = np.bincount(data.labels)
    counts = counts[counts > 0]
    stats = {"num_identities": int(len(counts)), "num_images": int(len(data)),
             "images_per_identity": {"min": int(counts.min()), "median": float(np.median(counts)),
                                     "max": int(counts.max())}}
    subset = sample_subset(data.labels, per_identity, max_identities, seed)
    labels = data.labels[subset]
    pairs, issame = sample_pairs(labels, num_pairs, seed)
    raw, raw_flip = [], []
    for batch in data.batches(subset, batch_size, progress="advise: embed"):  # one decode per image + mirror
        raw.append(fx(batch))
        raw_flip.append(fx(np.ascontiguousarray(batch[:, :, :, ::-1])))
    raw, raw_flip = np.concatenate(raw), np.concatenate(raw_flip)
    emb = l2_normalize(raw + raw_flip)
    res = evaluate(emb[pairs.reshape(-1)], issame, nrof_folds=min(10, len(issame)))
    norms = np.linalg.norm(np.concatenate([raw, raw_flip]), axis=1)
    intra, inter = spread(emb, labels)
    stats.update(verification_acc=res["acc"], verification_std=res["std"], num_pairs=int(len(issame)),
                 num_same_pairs=int(issame.sum()), embedding_norm_mean=float(norms.mean()),
                 embedding_norm_std=float(norms.std()), intra_cosine=intra, inter_cosine=inter,
                 sampled_images=int(len(subset)))
    return stats


# ----------------------------------------------------------------------------------------------- suggestions
def _stage_table(symbol, network: Optional[str]) -> List[Tuple[str, str]]:
    from recognition.freeze import stage_table_for

    return stage_table_for(network, symbol.list_arguments() + symbol.list_auxiliary_states())


def earlier_layer(symbol, table: Sequence[Tuple[str, str]]) -> Optional[str]:
    """Last activation output of the second-to-last backbone stage (a probe layer for a different domain)."""
    names = [s for s, _ in table]
    emb_idx = names.index("embedding") if "embedding" in names else len(names) - 1
    if emb_idx < 2:
        return None
    rx = re.compile(table[emb_idx - 2][1])
    outs = [o for o in symbol.get_internals().list_outputs() if o.endswith("_output") and rx.search(o[:-7] + "_")]
    acts = [o for o in outs if re.search(r"relu|prelu|act", o)]
    return (acts or outs or [None])[-1]


def per_batch_size(num_images: int, requested: int = 64, num_devices: int = 1) -> int:
    """``requested``, or the largest power of two giving >= 4 batches per epoch on small data (at least 2)."""
    fit = 2 ** int(math.floor(math.log2(max(2, num_images // (4 * num_devices)))))
    return max(2, min(int(requested), fit))


def suggest(decision: Dict, stats: Dict, pretrained: str, data: str, network: Optional[str] = None,
            layer: Optional[str] = None, targets: Sequence[str] = (),
            batch: int = 64, num_devices: int = 1, loss: str = "arcface", emb_size: Optional[int] = None) -> Dict:
    """``{command: argv list, alternative: argv list or None}`` for the decided scenario.

    Step counts are in batches: one epoch = images / (per-batch-size x devices). 2 and 3: head 1 epoch + all 3
    at lr 0.01 with the backbone at 0.1x and frozen BatchNorm statistics (the real-faces winner: its gain grew up
    to ~4 passes; holding the early stages, the classic advice for 3, gained nothing there); 4: head 1 epoch + all
    20 epochs at lr 0.1 (batch statistics: a different domain with enough data needs its own; not measurable on
    the real sets here, which are small). Heads start imprinted (class-mean embeddings) and train at 0.1x the lr,
    so 'head' is short.
    ``emb_size`` (the checkpoint's) is passed as ``--emb-size``: without it train.py would use its configured
    width and re-create the pretrained embedding layer when they differ.
    """
    scenario = decision["scenario"]
    probe = ["python", "recognition/linear_probe.py", "train", "--model", pretrained, "--data", data]
    if scenario == 1:
        return {"command": probe + ["--output", "probe.pkl"], "alternative": None}
    b = per_batch_size(stats["num_images"], batch, num_devices)
    epoch = max(1, stats["num_images"] // (b * num_devices))
    head, rest, lr = {2: (1, 3, 0.01), 3: (1, 3, 0.01), 4: (1, 20, 0.1)}[scenario]
    head, rest = max(20, head * epoch), max(100, rest * epoch)
    cmd = ["python", "recognition/train.py"] + (["--network", network] if network else []) + (
        ["--emb-size", str(emb_size)] if emb_size else []) + [
        "--loss", loss, "--data-dir", data, "--pretrained", pretrained, "--fc7-init", "imprint",
        "--stages", f"head:{head}@{HEAD_LR_FACTOR:g},all:{rest}", "--max-steps", str(head + rest), "--lr", f"{lr:g}",
        "--per-batch-size", str(b), "--ckpt-embedding", "1"]
    if scenario in (2, 3):  # keep what the checkpoint knows: slow backbone, its own BatchNorm statistics
        cmd += ["--backbone-lr-mult", f"{BACKBONE_LR_MULT:g}", "--bn-mode", "frozen"]
    if targets:
        cmd += ["--target", ",".join(targets)]
    alt = probe + ["--layer", layer, "--output", "probe.pkl"] if scenario == 3 and layer else None
    return {"command": cmd, "alternative": alt}


def advise(pretrained: str, data: str, ctx=None, network: Optional[str] = None, num_pairs: int = 600,
           per_identity: int = 10, max_identities: int = 300, seed: int = 0,
           thresholds: Thresholds = Thresholds(), batch_size: int = 64, per_device_batch: int = 64,
           num_devices: int = 1) -> Dict:
    """Measure ``data`` with the checkpoint ``pretrained`` (``PREFIX,EPOCH``) and decide the scenario.

    Returns ``{pretrained, data, stats, thresholds, decision, command, alternative, command_str, alternative_str}``
    (commands as argv lists and as shell strings).
    """
    prefix, epoch = parse_prefix_epoch(pretrained, "--pretrained")
    symbol, arg_params, aux_params = load_checkpoint(prefix, epoch)
    if network is None:  # a toolkit-trained checkpoint names its network in PREFIX-meta.json
        from recognition.pretrained import read_meta

        network = read_meta(prefix).get("network") or None
        if network and network.startswith("checkpoint graph of "):  # not a registry name: stages from the graph
            network = None
    fx = FeatureExtractor(symbol, arg_params, aux_params, EMBED_NODE, ctx, batch_size)
    images = LabelledImages(data)
    try:
        stats = measure(fx, images, num_pairs, per_identity, max_identities, seed, batch_size)
    finally:
        images.close()
    decision = decide_scenario(stats["num_images"], stats["images_per_identity"]["median"],
                               stats["verification_acc"], thresholds)
    table = _stage_table(symbol, network)
    folder = data if os.path.isdir(data) else os.path.dirname(data)
    targets = sorted(os.path.splitext(f)[0] for f in os.listdir(folder) if f.endswith(".bin")) \
        if os.path.isdir(folder) and images.kind == "rec" else []
    cmds = suggest(decision, stats, pretrained, data, network, earlier_layer(symbol, table),
                   targets, per_device_batch, num_devices, emb_size=fx.dim)
    out = {"pretrained": pretrained, "data": data, "stats": stats, "thresholds": asdict(thresholds),
           "decision": decision, **cmds}
    out["command_str"] = shlex.join(cmds["command"])
    out["alternative_str"] = shlex.join(cmds["alternative"]) if cmds["alternative"] else None
    return out


def format_report(r: Dict) -> str:
    """Human-readable report of :func:`advise`'s result."""
    s, d = r["stats"], r["decision"]
    ipi = s["images_per_identity"]
    lines = [
        f"data {r['data']}: {s['num_identities']} identities, {s['num_images']} images, images per identity "
        f"min {ipi['min']} / median {ipi['median']:g} / max {ipi['max']}",
        f"untouched {r['pretrained']} on {s['num_pairs']} pairs ({s['num_same_pairs']} same) from "
        f"{s['sampled_images']} images: verification accuracy {s['verification_acc']:.4f} +- "
        f"{s['verification_std']:.4f}",
        f"embedding norm {s['embedding_norm_mean']:.3f} +- {s['embedding_norm_std']:.3f}; cosine within identity "
        f"{s['intra_cosine']:.3f} vs between identities {s['inter_cosine']:.3f}",
        f"scenario {d['scenario']} ({d['name']}):",
    ] + [f"  - {reason}" for reason in d["reasons"]] + [f"run:\n  {r['command_str']}"]
    if r["alternative_str"]:
        lines.append(f"or (probe an earlier layer):\n  {r['alternative_str']}")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    t = Thresholds()
    p = argparse.ArgumentParser(prog="advise.py", description=__doc__.split("\n")[0],
                                formatter_class=DefaultsHelpFormatter)
    p.add_argument("--pretrained", required=True, help="checkpoint PREFIX,EPOCH")
    p.add_argument("--data", required=True, help="DIR with train.rec/train.idx (or a folder of identity folders)")
    p.add_argument("--network", default=None, help="network name to put in the suggested train.py command")
    p.add_argument("--ctx", default=None, help="device for measuring, e.g. cpu or gpu:0")
    p.add_argument("--num-pairs", type=int, default=600, help="verification pairs drawn from the data")
    p.add_argument("--per-identity", type=int, default=10, help="images sampled per identity")
    p.add_argument("--max-identities", type=int, default=300, help="identities sampled")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=64, help="inference batch")
    p.add_argument("--per-batch-size", type=int, default=64, help="training batch per device to suggest")
    p.add_argument("--min-images-per-identity", type=float, default=t.min_images_per_identity)
    p.add_argument("--min-total-images", type=int, default=t.min_total_images)
    p.add_argument("--similar-accuracy", type=float, default=t.similar_accuracy)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(verbose=False)
    for flag in ("num_pairs", "per_identity", "max_identities", "batch_size", "per_batch_size"):
        if getattr(args, flag) <= 0:
            raise ToolkitError(f"--{flag.replace('_', '-')} {getattr(args, flag)}: must be > 0")
    thresholds = Thresholds(args.min_images_per_identity, args.min_total_images, args.similar_accuracy)
    r = advise(args.pretrained, args.data, parse_ctx(args.ctx)[0], args.network, args.num_pairs,
               args.per_identity, args.max_identities, args.seed, thresholds, args.batch_size, args.per_batch_size)
    print(json.dumps(r, indent=1) if args.json else format_report(r))
    return 0


def cli() -> None:
    sys.exit(run_cli(main))


if __name__ == "__main__":
    cli()
