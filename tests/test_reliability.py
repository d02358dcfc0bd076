"""Crash safety of training runs: SIGKILL at random moments, graceful SIGTERM/SIGINT, disk full, ``--keep``.

Every test runs the real ``recognition/train.py`` in a subprocess on tiny data (``--network tiny``) and always
kills what it started, also when an assertion fails.
"""
import os
import random
import re
import resource
import signal
import subprocess
import sys
import time

import mxnet as mx
import numpy as np
import pytest

from recognition.callbacks import load_resume_arrays, prune_checkpoints, read_resume_state
from recognition.common import remove_stale_temps
from recognition.metrics_log import read_metrics

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN = os.path.join(ROOT, "recognition", "train.py")
PARAMS_RE = re.compile(r"model-(\d{4})\.params")


def train_argv(data, run_dir, *extra, steps=100000, verbose=1, keep=3):
    return [sys.executable, TRAIN, "--network", "tiny", "--loss", "softmax", "--data-dir", os.path.dirname(data["rec"]),
            "--target", "", "--per-batch-size", "8", "--max-steps", str(steps), "--verbose", str(verbose),
            "--frequent", "1", "--ckpt", "2", "--keep", str(keep), "--prefix", os.path.join(run_dir, "model"),
            "--lr", "0.01", "--seed", "5", "--num-workers", "1", *extra]


class Proc:
    """A training subprocess with stdout+stderr in a file; ``stop()`` kills its whole session (always called)."""

    def __init__(self, argv, log_path, **kw):
        self.log_path = log_path
        self._log = open(log_path, "w")
        self.p = subprocess.Popen(argv, stdout=self._log, stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True,
                                  **kw)

    def text(self) -> str:
        with open(self.log_path) as f:
            return f.read()

    def wait_for(self, pattern: str, timeout: float = 90.0) -> None:
        """Poll the log until ``pattern`` appears; fail if the process exits first or the bound passes."""
        deadline = time.monotonic() + timeout
        while pattern not in self.text():
            if self.p.poll() is not None:
                pytest.fail(f"training exited with {self.p.returncode} before {pattern!r}:\n{self.text()[-2000:]}")
            if time.monotonic() > deadline:
                pytest.fail(f"no {pattern!r} within {timeout}s:\n{self.text()[-2000:]}")
            time.sleep(0.05)

    def wait(self, timeout: float = 120.0) -> int:
        return self.p.wait(timeout=timeout)

    def stop(self) -> None:
        if self.p.poll() is None:
            os.killpg(self.p.pid, signal.SIGKILL)
            self.p.wait(timeout=30)
        self._log.close()


def checkpoints(run_dir):
    return sorted(int(m.group(1)) for m in map(PARAMS_RE.fullmatch, os.listdir(run_dir)) if m)


def temp_files(run_dir):
    out = []
    for d in (run_dir, os.path.join(run_dir, "resume")):
        if os.path.isdir(d):
            out += [os.path.join(d, n) for n in os.listdir(d) if n.endswith(".tmp")]
    return out


def load_and_forward(prefix, epoch):
    """``mx.model.load_checkpoint`` + one forward of the embedding: the checkpoint is complete and usable."""
    sym, arg, aux = mx.model.load_checkpoint(prefix, epoch)
    if "fc1_output" not in sym.list_outputs():
        sym = sym.get_internals()["fc1_output"]
    mod = mx.mod.Module(sym, data_names=["data"], label_names=None, context=mx.cpu())
    mod.bind(data_shapes=[("data", (1, 3, 112, 112))], for_training=False)
    mod.set_params(arg, aux, allow_missing=False, allow_extra=True)
    x = np.random.RandomState(epoch).uniform(0, 255, (1, 3, 112, 112)).astype(np.float32)
    mod.forward(mx.io.DataBatch([mx.nd.array(x)]), is_train=False)
    out = mod.get_outputs()[0].asnumpy()
    assert out.shape[0] == 1 and np.all(np.isfinite(out))


def train_steps(run_dir):
    return [r["step"] for r in read_metrics(os.path.join(run_dir, "metrics.jsonl"), "train")]


@pytest.mark.slow
def test_sigkill_at_random_moments_always_leaves_a_loadable_checkpoint_and_resumable_state(tiny_data, tmp_path):
    """10 SIGKILLs at seeded random moments of a run that checkpoints every step (restarted with --resume each time):
    after each, the newest complete checkpoint loads and runs, the resume state loads, no temporary file is ever
    taken as a checkpoint, and a final --resume finishes with a gap-free step sequence and no leftovers."""
    run_dir = str(tmp_path / "run")
    rng = random.Random(20240611)
    keep, last_step, temps_seen = 3, 0, 0
    for trial in range(10):
        argv = train_argv(tiny_data, run_dir, keep=keep) if trial == 0 else [sys.executable, TRAIN, "--resume", run_dir]
        proc = Proc(argv, str(tmp_path / f"trial{trial}.log"))
        try:
            proc.wait_for("Epoch[")  # at least one step done in this process (so a resume state exists)
            time.sleep(rng.uniform(0.0, 1.2))
            assert proc.p.poll() is None, proc.text()[-2000:]
            os.killpg(proc.p.pid, signal.SIGKILL)
            proc.wait(timeout=30)
        finally:
            proc.stop()
        if trial:
            assert "resumed" in proc.text()
        temps_seen += len(temp_files(run_dir))
        epochs = checkpoints(run_dir)
        assert epochs, f"trial {trial}: no checkpoint"
        # prune runs after the newest is complete: a kill in between leaves one extra, never fewer than keep
        assert len(epochs) <= keep + 1 and epochs == list(range(epochs[0], epochs[-1] + 1))
        load_and_forward(os.path.join(run_dir, "model"), epochs[-1])
        state = read_resume_state(run_dir)
        sym, arg, aux, opt = load_resume_arrays(state)
        assert "fc7_weight" in arg and opt is not None
        assert state["step"] >= last_step and state["step"] >= 1
        last_step = state["step"]
    assert last_step > 1, "training never got going between kills"
    final = Proc([sys.executable, TRAIN, "--resume", run_dir, "--max-steps", str(last_step + 2)],
                 str(tmp_path / "final.log"))
    try:
        assert final.wait(timeout=120) == 0, final.text()[-2000:]
    finally:
        final.stop()
    assert f"resumed {os.path.join(run_dir, 'resume')} at step {last_step}" in final.text()
    assert temp_files(run_dir) == []  # leftovers of killed writes were removed at start
    assert train_steps(run_dir) == list(range(1, last_step + 3))  # no step lost or logged twice
    assert read_resume_state(run_dir)["step"] == last_step + 2
    assert len(checkpoints(run_dir)) == keep
    load_and_forward(os.path.join(run_dir, "model"), checkpoints(run_dir)[-1])
    print(f"kill trials: 10, final step {last_step + 2}, temporary files left by kills (then cleaned): {temps_seen}")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_stops_gracefully_with_resume_state_then_resume_continues(tiny_data, tmp_path, sig):
    run_dir = str(tmp_path / "run")
    proc = Proc(train_argv(tiny_data, run_dir, verbose=1000), str(tmp_path / "stop.log"))
    try:
        proc.wait_for("Epoch[")
        os.killpg(proc.p.pid, sig)
        rc = proc.wait(timeout=120)
    finally:
        proc.stop()
    log = proc.text()
    assert rc == 0, log[-2000:]
    m = re.search(rf"stopped by {sig.name} at step (\d+); resume state saved", log)
    assert m and "Traceback" not in log, log[-2000:]
    step = int(m.group(1))
    assert step >= 1 and read_resume_state(run_dir)["step"] == step
    assert read_metrics(os.path.join(run_dir, "metrics.jsonl"), "stopped")[-1]["step"] == step
    assert checkpoints(run_dir) == []  # no verification round reached: the stop writes the resume state only
    if sig != signal.SIGTERM:
        return
    # half-written files of some earlier crash must be ignored and cleaned, never loaded
    for path in (os.path.join(run_dir, ".model-0999.params.abc123.tmp"),
                 os.path.join(run_dir, "resume", ".params-00000999.params.def456.tmp")):
        with open(path, "wb") as f:
            f.write(b"garbage")
    out = subprocess.run([sys.executable, TRAIN, "--resume", run_dir, "--max-steps", str(step + 2)], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert f"at step {step}" in out.stderr and "removed 2 unfinished temporary file(s)" in out.stderr
    assert temp_files(run_dir) == [] and checkpoints(run_dir) == [1]
    assert train_steps(run_dir) == list(range(1, step + 3))


def _limit_file_size():  # runs in the child: files may not grow past 1 MiB; write() then fails with EFBIG
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))


def test_disk_full_gives_one_line_error_and_keeps_previous_checkpoint(tiny_data, tmp_path):
    run_dir = str(tmp_path / "run")
    out = subprocess.run(train_argv(tiny_data, run_dir, steps=2), cwd=ROOT, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert checkpoints(run_dir) == [1, 2]
    with open(os.path.join(run_dir, "model-0002.params"), "rb") as f:
        good = f.read()
    with open(os.path.join(run_dir, "resume", "state.json"), "rb") as f:
        state = f.read()
    # a 4 MB checkpoint cannot be written under a 1 MiB file-size limit (the small logs still can)
    out = subprocess.run([sys.executable, TRAIN, "--resume", run_dir, "--max-steps", "4"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120, preexec_fn=_limit_file_size)
    last = out.stderr.strip().splitlines()[-1]
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr[-2000:]
    target = os.path.join(run_dir, "model-0003.params")
    assert last.startswith(f"error: cannot write {target}: [Errno 27] File too large")
    assert last.endswith(f"last good checkpoint: {os.path.join(run_dir, 'model-0002.params')}")
    assert checkpoints(run_dir) == [1, 2] and temp_files(run_dir) == []
    with open(os.path.join(run_dir, "model-0002.params"), "rb") as f:
        assert f.read() == good
    with open(os.path.join(run_dir, "resume", "state.json"), "rb") as f:
        assert f.read() == state
    load_and_forward(os.path.join(run_dir, "model"), 2)


def test_prune_keeps_newest_k_and_protected(tmp_path):
    prefix = str(tmp_path / "model")
    for e in range(1, 7):
        (tmp_path / ("model-%04d.params" % e)).write_bytes(b"x")
    (tmp_path / "other-0001.params").write_bytes(b"x")
    (tmp_path / ".model-0007.params.abc.tmp").write_bytes(b"x")
    assert prune_checkpoints(prefix, 0) == []
    removed = prune_checkpoints(prefix, 2, protect=(1,))
    assert sorted(os.path.basename(p) for p in removed) == ["model-0002.params", "model-0003.params",
                                                          "model-0004.params"]
    assert checkpoints(str(tmp_path)) == [1, 5, 6] and (tmp_path / "other-0001.params").exists()
    assert remove_stale_temps(str(tmp_path)) == [".model-0007.params.abc.tmp"]
    assert remove_stale_temps(str(tmp_path / "absent")) == []


def test_negative_keep_is_refused(tiny_data, tmp_path):
    out = subprocess.run(train_argv(tiny_data, str(tmp_path / "run"), keep=-1), cwd=ROOT, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 2 and out.stderr.strip() == "error: --keep -1: must be >= 0 (0 keeps every checkpoint)"
