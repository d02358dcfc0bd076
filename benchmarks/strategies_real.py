"""Which fine-tuning strategy on real faces? Start from the real MobileFaceNet (``model-y1-test2``), adapt it to real
LFW identities (``lfw_dev/train.rec``: 471 people) unshifted and under domain shifts (``datasets.shift``: low
resolution, face mask), and measure each strategy on held-out people (``lfw_dev/val.bin``: 1,200 pairs of people
not in ``train.rec``): the target domain (``val.bin`` shifted like the training data) and source retention (the
unshifted ``val.bin``).

    python benchmarks/strategies_real.py --out /tmp/ifr_strategies_real        # or: bash run.sh strategies-real

Strategies (every trained one gets the same step budget, an imprinted fc7, ArcFace, the same batch and lr):

- ``none``: the pretrained network as is. ``probe``: a linear probe on its frozen embedding; its verification is
  ``none``'s by construction, its own figure the probe's accuracy on held-out images of the training identities.
- ``head``: embedding layer + fc7 only, the whole budget at ``lr x --head-lr-factor``.
- ``two-stage``: ``head`` for ``--head-frac`` of the budget, then everything (backbone at ``--backbone-lr-mult``).
- ``full``: everything from the first step (backbone at lr x 1).
- ``two-stage+distill``: ``two-stage`` plus a cosine distillation of the embedding towards the starting checkpoint
  itself (``--teacher`` = the pretrained model, ``--distill-weight``), so that the source domain is kept.
- ``frozen-stages:K``: ``two-stage`` with the first K backbone stages held (``--frozen-stages K``): the last
  stage(s) + embedding adapt, what ``recognition/advise.py`` proposed for small & different data.

Every figure is insightface's 10-fold verification (flip-summed) with its fold std. Each finished cell is written to
``OUT/results.json`` at once; a rerun with the same settings skips finished cells (partial results survive). The
table is printed and ``OUT/strategies_real.png`` plots gain on the target domain against source retention.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import subprocess
import sys
import time
from typing import Dict, List, Optional, Sequence

import numpy as np

from recognition.common import ToolkitError, atomic_write, run_cli

STRATEGIES = ("none", "probe", "head", "two-stage", "full", "two-stage+distill")
RECIPE_KEYS = ("flip", "steps", "per_batch_size", "lr", "head_frac", "head_lr_factor", "backbone_lr_mult", "bn_mode",
               "margin_s", "margin_m", "distill_weight", "distill_loss", "wd")


def domain_slug(spec: str) -> str:
    """A file-name form of the whole spec, severities included: ``"lowres@0.9+jpeg"`` -> ``"lowres0.9+jpeg"``."""
    return spec.replace("@", "")


def prepare_domain(data: str, spec: str, out: str, seed: int) -> Dict[str, str]:
    """The training folder and target ``.bin`` of one domain: the source itself for ``none``, else a shifted copy
    (made once) in ``OUT/data/NAME`` with its pairs as ``NAME_val.bin`` (a distinct name for the trainer)."""
    from datasets.shift import parse_spec, shift_bin, shift_rec

    src_bin = os.path.join(data, "val.bin")
    if spec == "none":
        return {"train": data, "target": src_bin}
    name = domain_slug(spec)  # the severity is part of the name: another severity is another folder
    folder = os.path.join(out, "data", name)
    target = os.path.join(folder, f"{name}_val.bin")
    parsed = parse_spec(spec)
    if not os.path.isfile(os.path.join(folder, "property")):
        shift_rec(data, folder, parsed, seed)
    if not os.path.isfile(target):
        shift_bin(src_bin, target, parsed, seed + 1)
    return {"train": folder, "target": target}


def frozen_stages_of(strategy: str) -> Optional[int]:
    """K of ``frozen-stages:K``, else None."""
    m = re.fullmatch(r"frozen-stages:(\d+)", strategy)
    return int(m.group(1)) if m else None


def train_flags(strategy: str, r: dict, pretrained: str) -> List[str]:
    """``recognition/train.py`` flags of one strategy under recipe ``r`` (besides data, targets, seed, prefix)."""
    steps = int(r["steps"])
    head = max(1, int(round(steps * r["head_frac"])))
    f = r["head_lr_factor"]
    frozen = frozen_stages_of(strategy)
    two_stage = f"head:{head}@{f:g},all:{steps - head}"
    stages = two_stage if frozen is not None else {
        "head": f"head:{steps}@{f:g}", "two-stage": two_stage, "full": f"all:{steps}",
        "two-stage+distill": two_stage}[strategy]
    flags = ["--pretrained", pretrained, "--loss", "arcface", "--set", f"margin_s={r['margin_s']:g}",
             "--set", f"margin_m={r['margin_m']:g}", "--fc7-init", "imprint", "--stages", stages,
             "--per-batch-size", str(r["per_batch_size"]), "--lr", f"{r['lr']:g}", "--wd", f"{r['wd']:g}",
             "--backbone-lr-mult", f"{1.0 if strategy == 'full' else r['backbone_lr_mult']:g}",
             "--bn-mode", r["bn_mode"]]
    if frozen is not None:
        flags += ["--frozen-stages", str(frozen)]
    if strategy == "two-stage+distill":
        flags += ["--teacher", pretrained, "--distill-loss", r["distill_loss"],
                  "--distill-weight", f"{r['distill_weight']:g}"]
    return flags


def verify(model: str, bins: Sequence[str], flip: bool, cache: Optional[dict] = None) -> Dict[str, dict]:
    """``{bin path: {acc, std}}`` of checkpoint ``model`` (``PREFIX,EPOCH``): insightface's 10 folds, on
    flip-summed embeddings when ``flip`` (its maths), else on the images alone (half the forward passes)."""
    from recognition.common import parse_prefix_epoch
    from recognition.verification import Embedder, _l2n, evaluate, read_bin, test_bin

    cache = {} if cache is None else cache
    prefix, epoch = parse_prefix_epoch(model, "--model")
    embed = Embedder.from_checkpoint(prefix, epoch, batch_size=32)
    out = {}
    for b in bins:
        if b not in cache:
            cache[b] = read_bin(b, (112, 112))
        images, issame = cache[b]
        t0 = time.time()
        if flip:
            res = test_bin(([images], issame), embed, batch_size=32)
        else:
            emb = np.concatenate([embed(np.ascontiguousarray(images[i:i + 32], np.float32))
                                  for i in range(0, len(images), 32)])
            res = evaluate(_l2n(emb), issame)
        out[b] = {"acc": float(res["acc"]), "std": float(res["std"]), "seconds": round(time.time() - t0, 1),
                  "folds": [round(float(a), 6) for a in res["fold_acc"]]}
    return out


def _loss_summary(run_dir: str) -> dict:
    """Mean training loss over the first and last 10% of steps and at the stage switch (the divergence check)."""
    from recognition.metrics_log import read_metrics

    recs = read_metrics(os.path.join(run_dir, "metrics.jsonl"), "train")
    if not recs:
        return {}
    n = max(1, len(recs) // 10)
    mean = lambda rs: round(sum(r["loss"] for r in rs) / len(rs), 3)  # noqa: E731
    out = {"loss_first": mean(recs[:n]), "loss_last": mean(recs[-n:]),
           "loss_max": round(max(r["loss"] for r in recs), 3)}
    head = [r for r in recs if r.get("stage") == "head"]
    if head and len(head) < len(recs):
        out["loss_end_of_head"] = mean(head[-n:])
    return out


def run_cell(strategy: str, dom: Dict[str, str], src_bin: str, r: dict, pretrained: str, seed: int,
             run_dir: str, flip: bool, bins: dict) -> dict:
    """Train one strategy in a subprocess (its output in ``run_dir/stdout.log``), then verify its checkpoint."""
    cmd = [sys.executable, "-m", "recognition.train", "--data-dir", dom["train"], "--target", "",
           "--seed", str(seed), "--verbose", str(10 ** 7), "--frequent", "10", "--ckpt", "0", "--ckpt-embedding", "1",
           "--prefix", os.path.join(run_dir, "model")] + train_flags(strategy, r, pretrained)
    os.makedirs(run_dir, exist_ok=True)
    with open(os.path.join(run_dir, "cmd.txt"), "w") as f:
        f.write(" ".join(cmd) + "\n")
    with open(os.path.join(run_dir, "stdout.log"), "w") as log:
        rc = subprocess.call(cmd, stdout=log, stderr=subprocess.STDOUT)
    if rc != 0:
        raise ToolkitError(f"{strategy} (seed {seed}) failed with exit {rc}; see {run_dir}/stdout.log")
    v = verify(_final_checkpoint(run_dir, f"{strategy} (seed {seed})"), sorted({dom["target"], src_bin}), flip, bins)
    tgt, src = v[dom["target"]], v[src_bin]
    return dict(target_acc=tgt["acc"], target_std=tgt["std"], source_acc=src["acc"], source_std=src["std"],
                target_folds=tgt["folds"], source_folds=src["folds"], **_loss_summary(run_dir))


def _final_checkpoint(run_dir: str, what: str) -> str:
    epochs = sorted(int(f[len("model-"):-len(".params")]) for f in os.listdir(run_dir)
                    if f.startswith("model-") and f.endswith(".params")) if os.path.isdir(run_dir) else []
    if not epochs:
        raise ToolkitError(f"{what}: no checkpoint in {run_dir}")
    return f"{os.path.join(run_dir, 'model')},{epochs[-1]}"


def refold(run_dir: str, dom: Dict[str, str], src_bin: str, flip: bool, bins: dict) -> dict:
    """Per-fold accuracies of a cell finished by an older version (``--add-folds``): its checkpoint verified again."""
    v = verify(_final_checkpoint(run_dir, run_dir), sorted({dom["target"], src_bin}), flip, bins)
    return {"target_folds": v[dom["target"]]["folds"], "source_folds": v[src_bin]["folds"]}


def baseline(pretrained: str, bins: Sequence[str], flip: bool, cache: dict, images: dict) -> Dict[str, dict]:
    """Verification of the untouched checkpoint on ``bins`` (cached in ``cache`` by path and flip)."""
    todo = [b for b in bins if "folds" not in cache.get(f"{b}|flip={flip}", {})]  # entries of older versions: redo
    if todo:
        for b, res in verify(pretrained, todo, flip, images).items():
            cache[f"{b}|flip={flip}"] = res
    return {b: cache[f"{b}|flip={flip}"] for b in bins}


def recipe_id(recipe: dict, pretrained: str, data: str) -> str:
    text = json.dumps({"recipe": recipe, "pretrained": os.path.abspath(pretrained.split(",")[0]),
                       "data": os.path.abspath(data)}, sort_keys=True)
    return hashlib.sha1(text.encode()).hexdigest()[:10]


def _save(path: str, results: dict) -> None:
    """Merge ``results`` into the file under a lock (two runs may share one ``--out``), then write it atomically;
    ``results`` gets what the other run added."""
    import fcntl

    with open(path + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if os.path.isfile(path):
            with open(path) as f:
                disk = json.load(f)
            for k in ("recipes", "cells", "baseline"):
                results[k] = {**disk.get(k, {}), **results[k]}
        with atomic_write(path, "w") as f:
            json.dump(results, f, indent=1, sort_keys=True)


def summarise(results: dict, rid: str, domains: Sequence[str], strategies: Sequence[str]) -> List[dict]:
    """One row per (domain, strategy): seed means of accuracy and fold std, the seed spread, gain over ``none``."""
    rows = []
    for spec in domains:
        base = results["cells"].get(f"{rid}|{spec}|none|-")
        for s in strategies:
            cells = [c for k, c in results["cells"].items() if k.startswith(f"{rid}|{spec}|{s}|")]
            if not cells:
                continue
            row = {"domain": spec, "strategy": s, "seeds": len(cells)}
            for k in ("target_acc", "target_std", "source_acc", "source_std", "probe_acc", "seconds"):
                vals = [c[k] for c in cells if c.get(k) is not None]
                row[k] = float(np.mean(vals)) if vals else None
            accs = [c["target_acc"] for c in cells]
            row["seed_spread"] = float(max(accs) - min(accs))
            if base:
                row["gain"] = row["target_acc"] - base["target_acc"]
                row["kept"] = row["source_acc"] - base["source_acc"]
                row["gain_in_stds"] = row["gain"] / max(1e-9, base["target_std"])
                row.update(paired_gain(base, cells))
            for k in ("loss_first", "loss_end_of_head", "loss_last", "loss_max"):
                vals = [c[k] for c in cells if c.get(k) is not None]
                if vals:
                    row[k] = float(np.mean(vals))
            rows.append(row)
    return rows


def paired_gain(base: dict, cells: List[dict]) -> dict:
    """The gain judged fold by fold: the adapted and the untouched model are scored on the same 10 folds, so the
    per-fold gains (averaged over seeds) have a spread of their own, usually far below either model's fold std.
    ``paired_t`` = mean gain / standard error of the per-fold gains (> 3: a gain well clear of fold noise)."""
    folds = [c["target_folds"] for c in cells if c.get("target_folds")]
    if not folds or not base.get("target_folds"):
        return {}
    diff = np.mean(np.asarray(folds, float), axis=0) - np.asarray(base["target_folds"], float)
    sd = float(np.std(diff, ddof=1)) if len(diff) > 1 else 0.0
    return {"fold_gain_std": sd, "paired_t": float(np.mean(diff) / max(1e-9, sd / np.sqrt(len(diff))))}


def format_table(rows: List[dict]) -> str:
    w = max([12] + [len(domain_slug(r["domain"])) + 2 for r in rows])  # a chained shift names a longer domain
    head = (f"{'domain':<{w}}{'strategy':<19}{'seeds':>5}{'target':>8}{'+-std':>7}{'gain':>8}{'(stds)':>7}"
            f"{'paired t':>9}{'source':>8}{'+-std':>7}{'kept':>8}{'probe':>7}{'loss 1st/end':>14}{'sec':>6}")
    out = [head]
    for r in rows:
        g = f"{r['gain']:+.4f}" if "gain" in r else "-"
        gs = f"{r['gain_in_stds']:+.1f}" if "gain_in_stds" in r else "-"
        pt = f"{r['paired_t']:+.1f}" if "paired_t" in r else "-"
        kept = f"{r['kept']:+.4f}" if "kept" in r else "-"
        probe = f"{r['probe_acc']:.3f}" if r.get("probe_acc") is not None else "-"
        loss = f"{r['loss_first']:.2f}/{r['loss_last']:.2f}" if "loss_first" in r else "-"
        sec = f"{r['seconds']:.0f}" if r.get("seconds") is not None else "-"
        out.append(f"{domain_slug(r['domain']):<{w}}{r['strategy']:<19}{r['seeds']:>5}{r['target_acc']:>8.4f}"
                   f"{r['target_std']:>7.4f}{g:>8}{gs:>7}{pt:>9}{r['source_acc']:>8.4f}{r['source_std']:>7.4f}{kept:>8}"
                   f"{probe:>7}{loss:>14}{sec:>6}")
    return "\n".join(out)


def plot(rows: List[dict], path: str) -> None:
    """Gain on the target domain (y) against source retention (x), one marker per strategy, a colour per domain."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    markers = dict(zip(STRATEGIES, "o^svDP"))
    doms = sorted({r["domain"] for r in rows})
    colours = dict(zip(doms, plt.rcParams["axes.prop_cycle"].by_key()["color"]))
    fig, ax = plt.subplots(figsize=(7, 5))
    for r in rows:
        if "gain" not in r:
            continue
        ax.errorbar(100 * r["kept"], 100 * r["gain"], yerr=100 * r["target_std"], xerr=100 * r["source_std"],
                    fmt=markers.get(r["strategy"], "o"), color=colours[r["domain"]], alpha=0.8, capsize=2)
    for d in doms:
        ax.plot([], [], "s", color=colours[d], label=f"domain {domain_slug(d)}")
    for s, m in markers.items():
        ax.plot([], [], m, color="grey", label=s)
    ax.axhline(0, color="k", lw=0.5)
    ax.axvline(0, color="k", lw=0.5)
    ax.axvline(-0.5, color="r", lw=0.5, ls="--")
    ax.set_xlabel("source retention: unshifted val.bin accuracy change (points)")
    ax.set_ylabel("target gain: shifted val.bin accuracy change (points)")
    ax.set_title("model-y1-test2 adapted to lfw_dev (bars: fold std)")
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--out", default="/tmp/ifr_strategies_real", help="work folder (shifted data, runs, results)")
    ap.add_argument("--pretrained", default="../shared/fixtures/model-y1-test2/model,0")
    ap.add_argument("--data", default="../shared/real/lfw_dev", help="folder with train.rec, property, val.bin")
    ap.add_argument("--domains", default="lowres@0.8,mask@0.7,none",
                    help="comma-separated shift specs (datasets.shift; 'none' = unshifted)")
    ap.add_argument("--strategies", default="two-stage,head,full,two-stage+distill,probe",
                    help="run in this order (each over every seed and domain); 'none' is always measured; "
                         "frozen-stages:K is two-stage with the first K backbone stages held")
    ap.add_argument("--seeds", default="0,1", help="training seeds (the shifted data use --data-seed)")
    ap.add_argument("--data-seed", type=int, default=0, help="seed of the shifted copies")
    ap.add_argument("--steps", type=int, default=120, help="batches per trained strategy (equal budgets)")
    ap.add_argument("--per-batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=0.01)
    ap.add_argument("--wd", type=float, default=5e-4)
    ap.add_argument("--head-frac", type=float, default=0.25, help="share of the budget in the head stage")
    ap.add_argument("--head-lr-factor", type=float, default=0.1, help="lr factor of the head stage")
    ap.add_argument("--backbone-lr-mult", type=float, default=0.1, help="backbone lr multiplier after the head stage")
    ap.add_argument("--bn-mode", default="train", choices=("train", "frozen"))
    ap.add_argument("--margin-s", type=float, default=64.0)
    ap.add_argument("--margin-m", type=float, default=0.5)
    ap.add_argument("--distill-weight", type=float, default=1.0)
    ap.add_argument("--distill-loss", default="cosine", choices=("mse", "cosine", "both"))
    ap.add_argument("--no-flip", dest="flip", action="store_false",
                    help="verify on the images alone, not flip-summed (half the forward passes; a busy CPU)")
    ap.add_argument("--add-folds", action="store_true",
                    help="verify again the checkpoints of finished cells that lack per-fold accuracies (older "
                         "versions), for the paired t column")
    ap.add_argument("--report-only", action="store_true", help="print the table of finished cells; train nothing")
    args = ap.parse_args(argv)
    from recognition.common import setup_logging

    setup_logging()
    strategies = [s.strip() for s in args.strategies.split(",") if s.strip()]
    bad = [s for s in strategies if s not in STRATEGIES and frozen_stages_of(s) is None]
    if bad:
        raise ToolkitError(f"--strategies: unknown {', '.join(bad)}; choose from {', '.join(STRATEGIES)} or "
                           "frozen-stages:K")
    domains = [d.strip() for d in args.domains.split(",") if d.strip()]
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    src_bin = os.path.join(args.data, "val.bin")
    for p in (os.path.join(args.data, "train.rec"), src_bin, args.pretrained.split(",")[0] + "-symbol.json"):
        if not os.path.isfile(p):
            raise ToolkitError(f"{p}: not found (see --data / --pretrained)")
    recipe = {k: getattr(args, k) for k in RECIPE_KEYS}
    rid = recipe_id(recipe, args.pretrained, args.data)
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "results.json")
    results = json.load(open(path)) if os.path.isfile(path) else {"recipes": {}, "cells": {}, "baseline": {}}
    results["recipes"][rid] = recipe
    t_all, bin_images = time.time(), {}
    doms = {spec: prepare_domain(args.data, spec, args.out, args.data_seed) for spec in domains}
    for spec, dom in ([] if args.report_only else doms.items()):  # the untouched model first: every gain needs it
        key0 = f"{rid}|{spec}|none|-"
        if "target_folds" not in results["cells"].get(key0, {}):
            base = baseline(args.pretrained, sorted({dom["target"], src_bin}), args.flip, results["baseline"],
                            bin_images)
            tb, sb = base[dom["target"]], base[src_bin]
            results["cells"][key0] = dict(target_acc=tb["acc"], target_std=tb["std"], source_acc=sb["acc"],
                                          source_std=sb["std"], target_folds=tb["folds"], source_folds=sb["folds"])
            _save(path, results)
    # strategy-major order: the first strategy's cells over every seed and domain finish first (a partial run
    # already answers "does this recipe work everywhere"), the comparisons follow
    for s in ([] if args.report_only else strategies):
        for seed in seeds:
            for spec, dom in doms.items():
                key = f"{rid}|{spec}|{s}|{seed}"
                if s == "none":
                    continue
                if key in results["cells"]:
                    if args.add_folds and s != "probe" and "target_folds" not in results["cells"][key]:
                        run_dir = os.path.join(args.out, "runs", rid, domain_slug(spec), f"{s}-seed{seed}")
                        results["cells"][key].update(refold(run_dir, dom, src_bin, args.flip, bin_images))
                        _save(path, results)
                    continue
                t0 = time.time()
                if s == "probe":
                    from recognition.linear_probe import train_probe

                    probe = train_probe(args.pretrained, dom["train"], val_split=0.25, seed=seed)
                    cell = dict(results["cells"][f"{rid}|{spec}|none|-"], probe_acc=float(probe["val_acc"]))
                else:
                    run_dir = os.path.join(args.out, "runs", rid, domain_slug(spec), f"{s}-seed{seed}")
                    cell = run_cell(s, dom, src_bin, recipe, args.pretrained, seed, run_dir, args.flip, bin_images)
                cell["seconds"] = round(time.time() - t0, 1)
                results["cells"][key] = cell
                _save(path, results)
                print(f"[{time.strftime('%H:%M:%S')}] {spec} {s} seed {seed}: target {cell['target_acc']:.4f} "
                      f"source {cell['source_acc']:.4f} ({cell['seconds']:.0f} s)", flush=True)
    rows = summarise(results, rid, domains, ["none"] + [s for s in strategies if s != "none"])
    summary = {"recipe_id": rid, "recipe": recipe, "rows": rows, "baseline": results["baseline"],
               "seconds": round(time.time() - t_all, 1)}
    with atomic_write(os.path.join(args.out, f"table-{rid}.json"), "w") as f:
        json.dump(summary, f, indent=1)
    print(f"\nmodel-y1-test2 -> lfw_dev ({args.steps} steps of {args.per_batch_size}, lr {args.lr:g}, head "
          f"{args.head_frac:g} of the budget at x{args.head_lr_factor:g}, backbone x{args.backbone_lr_mult:g}, bn "
          f"{args.bn_mode}, arcface s={args.margin_s:g} m={args.margin_m:g}, distill {args.distill_loss} "
          f"w={args.distill_weight:g}; recipe {rid})")
    print("target = shifted val.bin (1,200 pairs, people not trained on); source = unshifted val.bin; accuracies are"
          " seed means, +-std the mean 10-fold std; gain/kept vs 'none'")
    print(format_table(rows))
    if rows:
        plot(rows, os.path.join(args.out, f"strategies_real-{rid}.png"))
    print(f"results: {path}; table: {args.out}/table-{rid}.json; plot: {args.out}/strategies_real-{rid}.png")
    return 0


def cli() -> None:
    sys.exit(run_cli(main))


if __name__ == "__main__":
    cli()
