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
