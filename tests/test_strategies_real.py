"""benchmarks/strategies_real.py: each strategy's flags parse as train.py's and mean what the table says; the
summary's gains and seed means are the arithmetic of the cells; results from two runs merge."""
import importlib.util
import json
import os

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def sr():
    spec = importlib.util.spec_from_file_location("strategies_real", os.path.join(ROOT, "benchmarks",
                                                                                    "strategies_real.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


RECIPE = dict(flip=False, steps=80, per_batch_size=32, lr=0.01, wd=5e-4, head_frac=0.25, head_lr_factor=0.1,
              backbone_lr_mult=0.1, bn_mode="frozen", margin_s=64.0, margin_m=0.5, distill_weight=1.0,
              distill_loss="cosine")


def test_flags_parse_and_budgets_are_equal(sr):
    from recognition.freeze import parse_stages
    from recognition.train import build_argparser

    seen = {}
    for s in ("head", "two-stage", "full", "two-stage+distill"):
        args = build_argparser().parse_args(sr.train_flags(s, RECIPE, "m/model,0") + ["--data-dir", "d"])
        stages = parse_stages(0, args.stages)
        assert sum(st.steps for st in stages) == 80  # equal step budgets
        assert args.fc7_init == "imprint" and args.bn_mode == "frozen" and args.lr == 0.01
        seen[s] = (stages, args)
    assert [(st.name, st.steps, st.lr_mult) for st in seen["two-stage"][0]] == [("head", 20, 0.1), ("all", 60, 1.0)]
    assert [st.name for st in seen["head"][0]] == ["head"] and seen["head"][0][0].lr_mult == 0.1
    assert seen["full"][1].backbone_lr_mult == 1.0 and seen["two-stage"][1].backbone_lr_mult == 0.1
    d = seen["two-stage+distill"][1]
    assert d.teacher == "m/model,0" and d.distill_loss == "cosine" and d.distill_weight == 1.0
    assert seen["two-stage"][1].teacher is None and seen["two-stage"][1].frozen_stages is None
    # frozen-stages:K = two-stage with the first K backbone stages held (the advisor's old small & different recipe)
    args = build_argparser().parse_args(sr.train_flags("frozen-stages:4", RECIPE, "m/model,0") + ["--data-dir", "d"])
    assert args.frozen_stages == 4 and parse_stages(0, args.stages) == seen["two-stage"][0]
    assert args.backbone_lr_mult == 0.1 and args.teacher is None
    assert sr.frozen_stages_of("frozen-stages:12") == 12 and sr.frozen_stages_of("frozen-stages:") is None
    with pytest.raises(sr.ToolkitError, match=r"--strategies: unknown frozen-stages:x; choose from .* or "
                                              r"frozen-stages:K"):
        sr.main(["--strategies", "frozen-stages:x", "--report-only"])


def test_summary_is_the_cells_arithmetic(sr):
    cells = {"r|mask@0.7|none|-": dict(target_acc=0.90, target_std=0.02, source_acc=0.99, source_std=0.01),
             "r|mask@0.7|two-stage|0": dict(target_acc=0.93, target_std=0.02, source_acc=0.985, source_std=0.01),
             "r|mask@0.7|two-stage|1": dict(target_acc=0.95, target_std=0.04, source_acc=0.975, source_std=0.01)}
    rows = sr.summarise({"cells": cells}, "r", ["mask@0.7"], ["none", "two-stage"])
    two = rows[1]
    assert two["seeds"] == 2 and two["target_acc"] == pytest.approx(0.94) and two["target_std"] == pytest.approx(0.03)
    assert two["gain"] == pytest.approx(0.04) and two["kept"] == pytest.approx(-0.01)
    assert two["gain_in_stds"] == pytest.approx(2.0) and two["seed_spread"] == pytest.approx(0.02)
    assert "two-stage" in sr.format_table(rows) and sr.domain_slug("lowres@0.9+jpeg") == "lowres0.9+jpeg"


def test_paired_gain_is_judged_fold_by_fold(sr):
    """The t statistic of the per-fold gains (seed-averaged), computed here by hand."""
    base = [0.80, 0.90, 0.85, 0.95, 0.70, 0.88, 0.92, 0.81, 0.86, 0.83]
    seed0 = [b + 0.03 for b in base]
    seed1 = [b + d for b, d in zip(base, [0.01, 0.05, 0.03, 0.03, 0.01, 0.05, 0.02, 0.04, 0.03, 0.03])]
    cells = {"r|lowres|none|-": dict(target_acc=np.mean(base), target_std=np.std(base), source_acc=0.99,
                                     source_std=0.01, target_folds=base),
             "r|lowres|two-stage|0": dict(target_acc=np.mean(seed0), target_std=0.05, source_acc=0.99, source_std=0.01,
                                          target_folds=seed0),
             "r|lowres|two-stage|1": dict(target_acc=np.mean(seed1), target_std=0.05, source_acc=0.99, source_std=0.01,
                                          target_folds=seed1)}
    row = sr.summarise({"cells": cells}, "r", ["lowres"], ["none", "two-stage"])[1]
    diff = [(0.03 + d) / 2 for d in [0.01, 0.05, 0.03, 0.03, 0.01, 0.05, 0.02, 0.04, 0.03, 0.03]]
    mean, sd = sum(diff) / 10, (sum((x - sum(diff) / 10) ** 2 for x in diff) / 9) ** 0.5
    assert row["gain"] == pytest.approx(0.03) and row["fold_gain_std"] == pytest.approx(sd)
    assert row["paired_t"] == pytest.approx(mean / (sd / 10 ** 0.5))
    assert row["gain_in_stds"] < 1 < 3 < row["paired_t"]  # a gain inside either model's fold std, clear fold by fold
    assert "paired t" in sr.format_table([row]) and f"{row['paired_t']:+.1f}" in sr.format_table([row])


def test_two_runs_merge_their_cells(sr, tmp_path):
    path = str(tmp_path / "results.json")
    a = {"recipes": {"r": {}}, "cells": {"r|x|head|0": {"target_acc": 1}}, "baseline": {}}
    b = {"recipes": {"r": {}}, "cells": {"r|x|full|0": {"target_acc": 2}}, "baseline": {"v": {"acc": 3}}}
    sr._save(path, a)
    sr._save(path, b)  # b did not know a's cell: it is kept, and b now holds it too
    with open(path) as f:
        disk = json.load(f)
    assert set(disk["cells"]) == {"r|x|head|0", "r|x|full|0"} and disk["baseline"] == {"v": {"acc": 3}}
    assert set(b["cells"]) == set(disk["cells"])
