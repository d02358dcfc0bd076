"""True resume: a run stopped at step k and resumed to N logs the same per-step losses as an uninterrupted run."""
import os

import numpy as np
import pytest

from recognition import train
from recognition.callbacks import read_resume_state
from recognition.common import run_cli
from recognition.metrics_log import read_metrics


def _argv(data, root, steps, *extra):
    return ["--network", "tiny", "--loss", "arcface", "--data-dir", os.path.dirname(data["rec"]), "--target", "",
            "--per-batch-size", "8", "--max-steps", str(steps), "--verbose", "2", "--frequent", "1", "--ckpt", "2",
            "--models-root", str(root), "--lr", "0.05", "--mom", "0.9", "--seed", "7", "--stages", "head:3,all",
            *extra]


def _losses(run_dir):
    return [(r["step"], r["stage"], r["loss"]) for r in read_metrics(os.path.join(run_dir, "metrics.jsonl"), "train")]


@pytest.mark.slow
def test_resume_continues_the_loss_sequence_exactly(tiny_data, tmp_path):
    """Stop at step 2 (inside the head stage, momentum state built), resume to 6 across the head->all switch."""
    name = f"tiny-arcface-{os.path.basename(os.path.dirname(tiny_data['rec']))}"
    assert run_cli(train.main, _argv(tiny_data, tmp_path / "full", 6)) == 0
    full = _losses(os.path.join(tmp_path, "full", name))
    assert len(full) == 6

    part_dir = os.path.join(tmp_path, "part", name)
    assert run_cli(train.main, _argv(tiny_data, tmp_path / "part", 2)) == 0
    state = read_resume_state(part_dir)
    assert state["step"] == 2 and state["iter_state"]["cursor"] == 2
    assert run_cli(train.main, ["--resume", part_dir, "--max-steps", "6"]) == 0
    resumed = _losses(part_dir)
    assert [s for s, _, _ in resumed] == [1, 2, 3, 4, 5, 6]
    assert [st for _, st, _ in resumed] == [st for _, st, _ in full] == ["head"] * 3 + ["all"] * 3
    np.testing.assert_allclose([v for *_, v in resumed], [v for *_, v in full], rtol=1e-5, atol=1e-5)
    assert read_resume_state(part_dir)["step"] == 6


def test_resume_state_roundtrip_of_optimizer_states(tiny_data, tmp_path):
    """Momentum saved by name comes back bit-identical (what makes the continuation exact)."""
    from recognition.callbacks import get_optimizer_states, load_resume_arrays, set_optimizer_states
    from recognition.trainer import Trainer, prepare_run

    args = train.build_argparser().parse_args(_argv(tiny_data, tmp_path, 2, "--stages", "all"))
    cfg = train.config_from_args(args)
    summary = Trainer(cfg, prepare_run(cfg)).fit()
    doc = read_resume_state(summary["run_dir"])
    _, arg, aux, states = load_resume_arrays(doc)
    assert "fc7_weight" in arg and states
    cfg2 = train.config_from_args(train.build_argparser().parse_args(["--resume", summary["run_dir"]]))
    t = Trainer(cfg2, prepare_run(cfg2))
    t.module, t.opt = t._make_module(0, t.arg_params, t.aux_params)
    assert set_optimizer_states(t.module, states) == len(states)
    # states are keyed by parameter name, so they survive a change of Module (stage switch, device count)
    back = get_optimizer_states(t.module)
    for name, st in states.items():
        assert np.array_equal(back[name].asnumpy(), st.asnumpy()), name
    live_arg, _ = t.module.get_params()
    for name in arg:
        assert np.array_equal(live_arg[name].asnumpy(), arg[name].asnumpy()), name
    t.data.close()


@pytest.mark.slow
def test_stage_lr_factor_scales_the_schedule_and_survives_resume(tiny_data, tmp_path):
    """``head:2@0``: lr 0 x schedule in the head stage (head parameters unchanged; @1 changes them), the schedule
    after; a run resumed inside the head stage logs the same lr and loss sequence."""
    from recognition.trainer import Trainer, lr_at, prepare_run

    name = f"tiny-arcface-{os.path.basename(os.path.dirname(tiny_data['rec']))}"
    extra = ("--stages", "head:2@0,all", "--warmup-steps", "3")
    cfg = train.config_from_args(train.build_argparser().parse_args(_argv(tiny_data, tmp_path / "full", 4, *extra)))
    trainer = Trainer(cfg, prepare_run(cfg))
    summary = trainer.fit()
    recs = read_metrics(os.path.join(summary["run_dir"], "metrics.jsonl"), "train")
    assert [r["lr"] for r in recs] == [0.0, 0.0] + [lr_at(s, 0.05, [], 3) for s in (2, 3)]
    assert recs[-1]["lr"] > 0

    # 2 steps at factor 0: fc7 and the embedding layer stay bit-identical; at factor 1 they move
    cfg0 = train.config_from_args(train.build_argparser().parse_args(_argv(tiny_data, tmp_path / "zero", 2, *extra)))
    t0 = Trainer(cfg0, prepare_run(cfg0))
    init_fc7, start = t0._init_fc7, {}

    def record_start():  # the parameters the first update starts from
        init_fc7()
        start.update({k: v.asnumpy() for k, v in t0.module.get_params()[0].items()})

    t0._init_fc7 = record_start
    t0.fit()
    arg0, _ = t0.module.get_params()
    cfg1 = train.config_from_args(train.build_argparser().parse_args(
        _argv(tiny_data, tmp_path / "one", 2, "--stages", "head:2@1,all", "--warmup-steps", "3")))
    t1 = Trainer(cfg1, prepare_run(cfg1))
    t1.fit()
    arg1, _ = t1.module.get_params()
    trained = [n for n in t0.trained if n in arg0]
    assert "fc7_weight" in trained and any(n.startswith(("pre_fc1", "fc1")) for n in trained)
    assert all(np.array_equal(arg0[n].asnumpy(), start[n]) for n in trained)
    assert any(not np.array_equal(arg0[n].asnumpy(), arg1[n].asnumpy()) for n in trained)

    _check_stop_and_resume(tiny_data, tmp_path / "part", name, 1, recs, extra)


def _check_stop_and_resume(data, root, name, stop, full, extra):
    """Train to ``stop``, resume to ``len(full)`` steps: the same lr and losses as the uninterrupted ``full``."""
    part_dir = os.path.join(root, name)
    assert run_cli(train.main, _argv(data, root, stop, *extra)) == 0
    assert run_cli(train.main, ["--resume", part_dir, "--max-steps", str(len(full))]) == 0
    resumed = read_metrics(os.path.join(part_dir, "metrics.jsonl"), "train")
    assert [r["lr"] for r in resumed] == [r["lr"] for r in full]
    np.testing.assert_allclose([r["loss"] for r in resumed], [r["loss"] for r in full], rtol=1e-5, atol=1e-5)


def test_scheduled_lr_ramps_each_later_stage():
    """--stage-warmup N: (k+1)/N over the first N updates of every stage after the first, on top of the stage
    factor, the global warm-up and the lr steps (reference values written out by hand)."""
    from easydict import EasyDict as edict

    from recognition.freeze import parse_stages
    from recognition.run_plan import scheduled_lr

    plan = edict(stages=parse_stages(stages="head:2@0.5,stage3+:3,all"), lr_steps=[6])
    cfg = edict(lr=0.1, warmup_steps=1, stage_warmup=2)
    want = [0.05, 0.05,             # head at 0.5x, no ramp in the first stage
            0.05, 0.1, 0.1,         # stage3+: 1/2, 2/2, then full
            0.05, 0.01, 0.01]       # all: ramp 1/2 of 0.1, then x0.1 from step 6 on
    np.testing.assert_allclose([scheduled_lr(s, cfg, plan) for s in range(8)], want, rtol=1e-12)
    cfg.stage_warmup = 0
    np.testing.assert_allclose([scheduled_lr(s, cfg, plan) for s in range(8)],
                               [0.05, 0.05, 0.1, 0.1, 0.1, 0.1, 0.01, 0.01], rtol=1e-12)


@pytest.mark.slow
def test_stage_warmup_is_logged_and_survives_resume(tiny_data, tmp_path):
    """A run resumed inside the ramp logs the same lr and losses as an uninterrupted one."""
    name = f"tiny-arcface-{os.path.basename(os.path.dirname(tiny_data['rec']))}"
    extra = ("--stage-warmup", "3")
    assert run_cli(train.main, _argv(tiny_data, tmp_path / "full", 6, *extra)) == 0
    full = read_metrics(os.path.join(tmp_path, "full", name, "metrics.jsonl"), "train")
    assert [r["lr"] for r in full] == pytest.approx([0.05] * 3 + [0.05 / 3, 0.1 / 3, 0.05])
    _check_stop_and_resume(tiny_data, tmp_path / "part", name, 4, full, extra)


def test_negative_stage_warmup_is_one_line(tiny_data, tmp_path, capsys):
    assert run_cli(train.main, _argv(tiny_data, tmp_path / "bad", 1, "--stage-warmup", "-1")) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == "error: --stage-warmup -1: must be >= 0"
    assert not (tmp_path / "bad").exists()  # refused before anything was written
