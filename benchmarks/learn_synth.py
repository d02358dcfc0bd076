"""Does training learn? Train ``tiny`` from scratch on built-in synthetic faces (CPU, a few minutes) and print
held-out verification accuracy before (random init, ~50%) and after, for softmax, ArcFace, and insightface's
two-run recipe (softmax, then ArcFace from its checkpoint).

    python benchmarks/learn_synth.py --steps 150 --out /tmp/learn_synth

Figures depend on the machine's load (the speed column especially); the held-out pairs come from identities
never seen in training.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import List, Optional, Sequence

from recognition.common import run_cli


def _train(argv: List[str]) -> dict:
    from recognition.train import build_argparser, config_from_args
    from recognition.trainer import run_training

    return run_training(config_from_args(build_argparser().parse_args(argv)))


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--out", default="/tmp/learn_synth", help="work folder (data and runs)")
    ap.add_argument("--steps", type=int, default=150, help="batches per run (the two-run recipe splits them)")
    ap.add_argument("--per-batch-size", type=int, default=32)
    ap.add_argument("--num-classes", type=int, default=60)
    ap.add_argument("--images-per-class", type=int, default=16)
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--lr2", type=float, default=None, help="lr of the ArcFace run of the recipe (default lr/5)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--margin-s", type=float, default=32.0,
                    help="ArcFace scale of the ArcFace runs (insightface's 64 barely moves tiny in a short run)")
    ap.add_argument("--margin-m", type=float, default=0.3, help="ArcFace margin of the ArcFace runs")
    args = ap.parse_args(argv)
    from datasets.synth import generate_dataset

    data = os.path.join(args.out, "data")
    if not os.path.isfile(os.path.join(data, "train.rec")):
        generate_dataset(data, num_classes=args.num_classes, images_per_class=args.images_per_class,
                         num_holdout=40, holdout_images=4, num_pairs=400, seed=args.seed)
    common = ["--network", "tiny", "--data-dir", data, "--target", "synth_val", "--per-batch-size",
              str(args.per_batch_size), "--verbose", str(10 ** 6), "--frequent", "25", "--ckpt", "0",
              "--lr", str(args.lr), "--seed", str(args.seed), "--eval-pretrained"]
    half = max(1, args.steps // 2)
    rows = []
    arc = ["--set", f"margin_s={args.margin_s}", "--set", f"margin_m={args.margin_m}"]
    for name, loss, steps, extra in (("softmax", "softmax", args.steps, []),
                                     ("arcface", "arcface", args.steps, arc),
                                     ("softmax->arcface (1/2)", "softmax", half, [])):
        t0 = time.time()
        if steps == half:  # the two-run recipe: save the full training graph, so run 2 keeps the classifier
            extra = extra + ["--ckpt-embedding", "0"]
        s = _train(common + ["--loss", loss, "--max-steps", str(steps), "--models-root",
                             os.path.join(args.out, "runs", name.split(" ")[0].replace(">", ""))] + extra)
        rows.append((name, s["before"]["synth_val"], s["final"]["synth_val"], steps, time.time() - t0))
        if loss == "softmax" and steps == half:
            ck = s["checkpoint"][: -len("-0000.params")] + "," + str(int(s["checkpoint"][-11:-7]))
            t0 = time.time()
            # same classes: --pretrained keeps run 1's fc7 (insightface's recipe); a lower lr with warm-up, since
            # the margin makes the loss jump and a full lr would undo run 1 in the first updates
            s2 = _train(common + arc + ["--loss", "arcface", "--max-steps", str(args.steps - half),
                                        "--pretrained", ck, "--network", "tiny",
                                        "--lr", str(args.lr2 if args.lr2 else args.lr / 5),
                                        "--warmup-steps", str(max(1, (args.steps - half) // 10)),
                                        "--models-root", os.path.join(args.out, "runs", "two_run")])
            with open(os.path.join(s2["run_dir"], "load_report.json")) as f:
                kept = any(item["name"] == "fc7_weight" for item in json.load(f)["loaded"])
            print(f"two-run recipe: run 2 {'kept' if kept else 'did NOT keep'} run 1's fc7_weight")
            rows.append(("softmax->arcface (2/2)", s2["before"]["synth_val"], s2["final"]["synth_val"],
                         args.steps - half, time.time() - t0))
    print(f"\nheld-out verification (synth_val, 400 pairs of unseen identities), tiny, batch {args.per_batch_size}, "
          f"ArcFace s={args.margin_s:g} m={args.margin_m:g}")
    print(f"{'run':<24}{'steps':>6}{'before':>9}{'after':>9}{'seconds':>9}")
    for name, b, a, steps, sec in rows:
        print(f"{name:<24}{steps:>6}{b:>9.4f}{a:>9.4f}{sec:>9.0f}")
    return 0


def cli() -> None:
    sys.exit(run_cli(main))


if __name__ == "__main__":
    cli()
