"""A run folder is self-contained and every numeric flag is checked before anything is written (issue 14, 4-5).

- ``--resume DIR`` writes into DIR, wherever the run was when it was saved: resuming a copy leaves the original
  byte-identical, and a tampered ``config.prefix`` cannot send the run elsewhere;
- a tampered ``state.json`` (types, ranges, files outside ``resume/``, RNG state, garbage parameters) is one line;
- ``--lr nan``, ``--wd inf``, ``--mom nan``, ``--max-steps -3``, ... are one line with nothing written.
"""
import hashlib
import json
import os
import shutil

import pytest

from recognition import train
from recognition.common import run_cli
from recognition.metrics_log import read_metrics
from recognition.resume_state import read_resume_state


def _argv(data, prefix, steps, *extra):
    return ["--network", "tiny", "--loss", "arcface", "--data-dir", os.path.dirname(data["rec"]), "--target", "",
            "--per-batch-size", "8", "--max-steps", str(steps), "--verbose", "2", "--ckpt", "2", "--prefix",
            str(prefix), "--lr", "0.05", "--seed", "7", "--num-workers", "1", *extra]


def _digest(folder):
    """``{relative path: sha256}`` of every file under ``folder``."""
    out = {}
    for root, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, folder)] = hashlib.sha256(f.read()).hexdigest()
    return out


@pytest.fixture(scope="module")
def run_a(tiny_data, tmp_path_factory):
    """A finished 2-step run (checkpoint epoch 1, resume state at step 2)."""
    root = tmp_path_factory.mktemp("runs")
    assert run_cli(train.main, _argv(tiny_data, root / "runA" / "model", 2)) == 0
    return str(root / "runA")


def _one_line_error(capsys, rc):
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.startswith("error: ") and "\n" not in err, err
    return err


def test_resuming_a_copy_writes_only_into_the_copy(run_a, tmp_path):
    before = _digest(run_a)
    run_b = str(tmp_path / "runB")
    shutil.copytree(run_a, run_b)
    assert run_cli(train.main, ["--resume", run_b, "--max-steps", "4"]) == 0
    assert _digest(run_a) == before  # the original: same files, same bytes
    state = read_resume_state(run_b)
    assert state["step"] == 4 and state["dir"] == os.path.join(run_b, "resume")
    assert os.path.isfile(os.path.join(run_b, "model-0002.params"))
    assert [r["step"] for r in read_metrics(os.path.join(run_b, "metrics.jsonl"), "train")] == [1, 2, 3, 4]
    assert state["last_ckpt"] == os.path.join(run_b, "model-0002.params")


def test_a_tampered_config_prefix_cannot_send_the_run_elsewhere(run_a, tmp_path):
    run_c, elsewhere = str(tmp_path / "runC"), tmp_path / "elsewhere"
    shutil.copytree(run_a, run_c)
    path = os.path.join(run_c, "resume", "state.json")
    doc = json.load(open(path))
    doc["config"]["prefix"] = str(elsewhere / "model")
    json.dump(doc, open(path, "w"))
    assert run_cli(train.main, ["--resume", run_c, "--max-steps", "4"]) == 0
    assert not elsewhere.exists()
    assert os.path.isfile(os.path.join(run_c, "model-0002.params"))


@pytest.mark.parametrize("change, message", [
    (dict(step="abc"), "field 'step' must be an integer >= 0, got \"abc\""),
    (dict(step=-5), "field 'step' must be an integer >= 0, got -5"),
    (dict(config=[1, 2]), "field 'config' must be an object"),
    (dict(params="../../elsewhere.params"), "field 'params' must be a file name inside the resume folder"),
    (dict(params="/tmp/x.params"), "field 'params' must be a file name inside the resume folder"),
    (dict(params="missing.params"), "params file missing.params is missing from"),
    (dict(rng={"numpy": [1, 2], "python": None}), "field 'rng' must be numpy and python RNG states"),
    (dict(iter_state={"epoch": "x"}), "field 'iter_state' must be an object with integer epoch"),
    (dict(highest=[0.5]), "field 'highest' must be a list of two numbers"),
    (dict(version=7), "state version 7 is not 1"),
])
def test_a_tampered_state_is_one_line(run_a, tmp_path, capsys, change, message):
    run_d = str(tmp_path / "runD")
    shutil.copytree(run_a, run_d)
    path = os.path.join(run_d, "resume", "state.json")
    doc = json.load(open(path))
    doc.update(change)
    json.dump(doc, open(path, "w"))
    before = _digest(run_d)
    err = _one_line_error(capsys, run_cli(train.main, ["--resume", run_d, "--max-steps", "4"]))
    assert message in err
    assert _digest(run_d) == before  # refused before anything was written


def test_garbage_resume_parameters_are_one_line(run_a, tmp_path, capsys):
    run_e = str(tmp_path / "runE")
    shutil.copytree(run_a, run_e)
    doc = json.load(open(os.path.join(run_e, "resume", "state.json")))
    with open(os.path.join(run_e, "resume", doc["params"]), "wb") as f:
        f.write(b"not an ndarray file" * 10)
    err = _one_line_error(capsys, run_cli(train.main, ["--resume", run_e, "--max-steps", "4"]))
    assert f"--resume: cannot read {os.path.join(run_e, 'resume', doc['params'])}" in err


@pytest.mark.parametrize("extra, message", [
    (["--lr", "nan"], "--lr nan: must be a finite number >= 0"),
    (["--lr", "inf"], "--lr inf: must be a finite number >= 0"),
    (["--wd", "nan"], "--wd nan: must be a finite number >= 0"),
    (["--mom", "nan"], "--mom nan: must be a finite number in [0, 1)"),
    (["--mom", "1.5"], "--mom 1.5: must be in [0, 1)"),
    (["--max-steps", "-3"], "--max-steps -3: must be >= 0"),
    (["--per-batch-size", "0"], "--per-batch-size 0: must be > 0"),
    (["--fc7-lr-mult", "-1"], "--fc7-lr-mult -1.0: must be >= 0"),
    (["--seed", "-1"], "--seed -1: must be in [0, 4294967295]"),
    (["--set", "lr=\"fast\""], "--lr 'fast': must be a finite number >= 0"),
    (["--set", "margin_s=Infinity"], "--margin-s inf: must be a finite number"),
    (["--set", "margin_m=NaN"], "--margin-m nan: must be a finite number"),
    (["--set", "center_loss_weight=NaN"], "--center-loss-weight nan: must be a finite number"),
])
def test_bad_numbers_are_one_line_and_write_nothing(tiny_data, tmp_path, capsys, extra, message):
    rc = run_cli(train.main, _argv(tiny_data, tmp_path / "run" / "model", 2, *extra))
    assert message in _one_line_error(capsys, rc)
    assert not (tmp_path / "run").exists()


def test_a_run_failing_while_it_is_built_leaves_no_folder(tiny_data, tmp_path, capsys):
    """A checkpoint whose embedding lacks a layer the network needs fails after the plan, in the Trainer: the run
    folder it had started is removed."""
    pre = tmp_path / "pre" / "model"
    assert run_cli(train.main, _argv(tiny_data, pre, 1, "--emb-size", "64")) == 0
    capsys.readouterr()
    rc = run_cli(train.main, _argv(tiny_data, tmp_path / "new" / "run" / "model", 1, "--pretrained", f"{pre},1",
                                   "--network", "r18"))
    err = capsys.readouterr().err.strip().splitlines()[-1]  # the run logs while it loads the checkpoint
    assert rc == 2 and err.startswith("error: --pretrained") and "would be re-initialised" in err
    assert not (tmp_path / "new").exists()
