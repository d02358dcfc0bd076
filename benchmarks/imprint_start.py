"""Does ``--fc7-init imprint`` give fine-tuning a head start? Same pretrained checkpoint, same new data, same seed:
fine-tune with a random classifier and with an imprinted one (rows = normalised class means of the loaded
backbone) and print the first logged training accuracies next to chance (1 / classes).

    python benchmarks/imprint_start.py                                        # makes its own data and checkpoint
    python benchmarks/imprint_start.py --pretrained /tmp/ifr_demo/models/pre/model,1 --data-dir /tmp/ifr_demo/B

The accuracy is the trainer's (insightface's): argmax of the softmax over the *margin* logits, so with a margin it
reads far lower than the cosine classifier really is (ArcFace m=0.3 asks cos(theta_y + 0.3) to beat every other
class); ``nomargin`` columns are the trainer's ``acc_nomargin`` (argmax of the plain cosine logits) of the same
batches. Both margins are run (``--margins``).
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import List, Optional, Sequence

import numpy as np

from recognition.common import run_cli


def _train(argv: List[str]) -> dict:
    from recognition.train import build_argparser, config_from_args
    from recognition.trainer import run_training

    return run_training(config_from_args(build_argparser().parse_args(argv)))


def _pretrain(out: str, steps: int, seed: int) -> tuple:
    """Small domain A / domain B data and a ``tiny`` checkpoint trained on A: ``(PREFIX,EPOCH, B folder)``."""
    from datasets.synth import generate_dataset

    a, b = os.path.join(out, "A"), os.path.join(out, "B")
    if not os.path.isfile(os.path.join(a, "train.rec")):
        generate_dataset(a, num_classes=80, images_per_class=12, num_holdout=2, holdout_images=2, num_pairs=0,
                         domain="A", seed=seed, bin_names=(), workers=2)
    if not os.path.isfile(os.path.join(b, "train.rec")):
        generate_dataset(b, num_classes=40, images_per_class=10, num_holdout=2, holdout_images=2, num_pairs=0,
                         domain="B", seed=seed + 1, bin_names=(), workers=2)
    prefix = os.path.join(out, "pre", "model")
    if not os.path.isfile(prefix + "-0001.params"):
        _train(["--network", "tiny", "--loss", "arcface", "--set", "margin_s=32", "--set", "margin_m=0.3",
                "--data-dir", a, "--target", "", "--per-batch-size", "32", "--lr", "0.1", "--warmup-steps", "20",
                "--max-steps", str(steps), "--verbose", str(10 ** 6), "--frequent", "50", "--ckpt", "0",
                "--seed", str(seed), "--prefix", prefix])
    return prefix + ",1", b


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--out", default="/tmp/imprint_start", help="work folder")
    ap.add_argument("--pretrained", default=None, help="PREFIX,EPOCH (default: pre-train tiny on generated A)")
    ap.add_argument("--data-dir", default=None, help="new data (default: generated domain B)")
    ap.add_argument("--pretrain-steps", type=int, default=200)
    ap.add_argument("--steps", type=int, default=10, help="head-stage batches per run")
    ap.add_argument("--loss", default="arcface", help="arcface or cosface (the demo's: arcface s=32 m=0.3)")
    ap.add_argument("--margin-s", type=float, default=32.0)
    ap.add_argument("--margins", default="0,0.3", help="comma-separated margins m to run")
    ap.add_argument("--lr", type=float, default=0.01)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    from recognition.metrics_log import read_metrics
    from recognition.rec import read_property

    pretrained, data = args.pretrained, args.data_dir
    if not pretrained or not data:
        made_pre, made_data = _pretrain(args.out, args.pretrain_steps, args.seed)
        pretrained, data = pretrained or made_pre, data or made_data
    classes = read_property(data)[0]
    rows = []
    for m in (float(t) for t in args.margins.split(",")):
        margin = ["--set", f"margin_s={args.margin_s}", "--set", ("margin_b" if args.loss == "cosface" else "margin_m")
                  + f"={m}"]
        for init in ("random", "imprint"):
            s = _train(["--network", "tiny", "--loss", args.loss, *margin, "--pretrained", pretrained, "--data-dir",
                        data, "--target", "", "--fc7-init", init, "--stages", f"head:{args.steps}", "--max-steps",
                        str(args.steps), "--per-batch-size", "32", "--lr", str(args.lr), "--frequent", "5",
                        "--verbose", str(10 ** 6), "--ckpt", "0", "--seed", str(args.seed),
                        "--prefix", os.path.join(args.out, f"ft_{init}_m{m:g}", "model")])
            recs = read_metrics(os.path.join(s["run_dir"], "metrics.jsonl"), "train")
            accs = np.array([r["acc"] for r in recs])
            nm = np.array([r.get("acc_nomargin", np.nan) for r in recs])
            rows.append((m, init, accs[0], accs[: min(5, len(accs))].mean(), accs[-1], nm[0], nm[-1],
                         recs[0]["loss"], recs[-1]["loss"]))
    print(f"\n{args.loss} s={args.margin_s:g}, {classes} classes (chance {1.0 / classes:.4f}), "
          f"pretrained {pretrained}, data {data}, head stage lr {args.lr:g}")
    last = args.steps
    print(f"{'margin':>7}  {'fc7 init':<9}{'acc step 1':>11}{'acc 1-5':>9}{f'acc {last}':>9}{'nomargin 1':>11}"
          f"{f'nomargin {last}':>12}{'loss 1':>8}{f'loss {last}':>9}")
    for m, init, a1, a5, alast, n1, nlast, l1, llast in rows:
        print(f"{m:>7g}  {init:<9}{a1:>11.4f}{a5:>9.4f}{alast:>9.4f}{n1:>11.4f}{nlast:>12.4f}{l1:>8.3f}{llast:>9.3f}")
    return 0


def cli() -> None:
    sys.exit(run_cli(main))


if __name__ == "__main__":
    cli()
