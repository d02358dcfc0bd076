"""train.py under recognition.launch (dist_sync): data parts, same result as one process, failures, bad kvstore."""
import glob
import os
import re
import subprocess
import sys

import mxnet as mx
import numpy as np
import pytest
from test_dist import _children_gone, _launch  # noqa: E402 (tests/ is on sys.path under pytest)

from recognition import train
from recognition.common import ToolkitError, load_checkpoint, run_cli
from recognition.image_iter import FaceImageIter
from recognition.launch import check_kvstore
from recognition.metrics_log import read_metrics

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NO_DMLC = {k: v for k, v in os.environ.items() if not k.startswith("DMLC_")}


def common_args(data, *extra):
    """Tiny run: 3 steps across a stage switch (head -> all), per-device batch 4, mirror on (sliced per part)."""
    return ["--loss", "softmax", "--data-dir", os.path.dirname(data["rec"]), "--target", "",
            "--per-batch-size", "4", "--stages", "head:1,all:2", "--verbose", "100", "--frequent", "1",
            "--lr", "0.1", "--seed", "3", "--ckpt-embedding", "0", "--num-workers", "1", *extra]


def test_parts_are_disjoint_slices_of_the_global_batch(tiny_data):
    full = FaceImageIter(tiny_data["rec"], 8, seed=5, num_workers=0)
    parts = [FaceImageIter(tiny_data["rec"], 4, seed=5, num_workers=1, num_parts=2, part_index=r) for r in range(2)]
    assert full.num_batches == parts[0].num_batches == parts[1].num_batches == 12
    for _ in range(2):  # two epochs: a new shuffle, still the same global batches
        seen = [[], []]
        for x, y in _batches(full):
            got = [p.next_numpy() for p in parts]
            np.testing.assert_array_equal(np.concatenate([got[0][0], got[1][0]]), x)  # mirror included
            np.testing.assert_array_equal(np.concatenate([got[0][1], got[1][1]]), y)
            for r, p in enumerate(parts):
                lo = (p.get_state()["cursor"] - 1) * 8 + 4 * r
                seen[r].extend(p._order[lo:lo + 4].tolist())
        for p in parts:
            with pytest.raises(StopIteration):
                p.next_numpy()
        assert not set(seen[0]) & set(seen[1]) and sorted(seen[0] + seen[1]) == list(range(96))
        for it in [full] + parts:
            it.reset()
    state = parts[1].get_state()  # cursors count global batches: any part's state resumes the others
    assert state["num_parts"] == 2 and state["part_index"] == 1
    parts[0].set_state(state)
    assert parts[0].part_index == 0
    one = FaceImageIter(tiny_data["rec"], 8, seed=0, num_workers=0)
    one.set_state(state)  # same global batch on one process: exact too
    with pytest.raises(ToolkitError, match=r"batch_size was 4 x 2 parts, now 4;"):
        FaceImageIter(tiny_data["rec"], 4, num_workers=0).set_state(state)
    with pytest.raises(ToolkitError, match=r"num_parts 2, part_index 2"):
        FaceImageIter(tiny_data["rec"], 4, num_workers=0, num_parts=2, part_index=2)
    for it in [full, one] + parts:
        it.close()


def _batches(it):
    while True:
        try:
            yield it.next_numpy()
        except StopIteration:
            return


def test_kvstore_checked_before_any_compute(tiny_data, tmp_path, capsys):
    with pytest.raises(ToolkitError, match=r"--kvstore 'dist_foo': unknown kvstore; choose one of local, device, "
                                           r"nccl, dist_sync, dist_device_sync, dist_async"):
        check_kvstore("dist_foo", {})
    with pytest.raises(ToolkitError, match=r"--kvstore dist_sync: a distributed kvstore needs a scheduler and servers "
                                           r"\(DMLC_ROLE is not set\); start the workers with python -m "
                                           r"recognition.launch"):
        check_kvstore("dist_sync", {})
    with pytest.raises(ToolkitError, match=r"--kvstore device: this process is a launched worker"):
        check_kvstore("device", {"DMLC_ROLE": "worker"})
    assert check_kvstore("dist_async", {"DMLC_ROLE": "worker"}) == "dist_async"
    assert check_kvstore("local", {}) == "local"
    root = tmp_path / "runs"
    for kv, want in (("foo", "error: --kvstore 'foo': unknown kvstore; choose one of local, device"),
                     ("dist_sync", "error: --kvstore dist_sync: a distributed kvstore needs a scheduler")):
        argv = common_args(tiny_data, "--network", "tiny", "--kvstore", kv, "--max-steps", "1", "--models-root",
                           str(root))
        assert run_cli(train.main, argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1].startswith(want), err
    assert not root.exists()  # nothing was created: the check came first


def no_dropout_tiny(prefix):
    """A 'tiny' checkpoint without the Dropout of its embedding head: dropout masks come from one CPU random
    stream per process, so 2 workers and 2 devices of one process cannot draw the same masks."""
    from recognition.backbones import get_symbol
    from recognition.common import save_checkpoint

    sym = get_symbol("tiny", dropout=0)
    mx.random.seed(0)
    mod = mx.mod.Module(sym, data_names=["data"], label_names=None, context=mx.cpu())
    mod.bind([("data", (1, 3, 112, 112))], for_training=False)
    mod.init_params(mx.init.Xavier(rnd_type="gaussian", factor_type="out", magnitude=2))
    save_checkpoint(prefix, 0, sym, *mod.get_params())
    return f"{prefix},0"


@pytest.mark.slow
def test_train_py_two_workers_equal_one_process(tiny_data, tmp_path):
    """2 workers x batch 4 (dist_sync) == 1 process x 2 devices x batch 4: the same global batches, the same BN
    batches (one per device/worker), the same summed gradient; the workers end with identical parameters."""
    dist, dump, single = tmp_path / "dist", tmp_path / "dump", tmp_path / "single"
    pre = no_dropout_tiny(str(tmp_path / "pre" / "model"))
    rc, out, _ = _launch(["--num-workers", "2", "--num-servers", "1", "--timeout", "120", "--grace", "3", "--",
                          sys.executable, "recognition/train.py", "--kvstore", "dist_sync",
                          "--prefix", str(dist / "model"), *common_args(tiny_data, "--pretrained", pre)],
                         timeout=150, env={"IFR_DIST_DUMP": str(dump), "OMP_NUM_THREADS": "1"})
    assert rc == 0, out
    _children_gone(out)
    proc = subprocess.run([sys.executable, "recognition/train.py", "--ctx", "cpu:0,cpu:1", "--prefix",
                           str(single / "model"), *common_args(tiny_data, "--pretrained", pre)], cwd=ROOT,
                          capture_output=True, text=True, timeout=150, env=dict(NO_DMLC, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stderr[-3000:]

    # only rank 0 wrote checkpoints; rank 1 logged to its own folder
    assert [os.path.basename(p) for p in glob.glob(str(dist / "*.params"))] == ["model-0001.params"], out
    assert not glob.glob(str(dist / "worker1" / "*.params")) and not (dist / "worker1" / "resume").exists()
    assert (dist / "resume").is_dir()
    assert [r["step"] for r in read_metrics(str(dist / "metrics.jsonl"), "train")] == [1, 2, 3]
    assert [r["step"] for r in read_metrics(str(dist / "worker1" / "metrics.jsonl"), "train")] == [1, 2, 3]

    ranks = [mx.nd.load(str(dump / f"rank{r}.params")) for r in range(2)]
    _, ckpt, _ = load_checkpoint(str(dist / "model"), 1)
    _, ref, _ = load_checkpoint(str(single / "model"), 1)
    args = sorted(k[4:] for k in ranks[0] if k.startswith("arg:"))
    assert "fc7_weight" in args and sorted(ckpt) == sorted(ref) == args
    for name in args:
        w0, w1 = ranks[0]["arg:" + name].asnumpy(), ranks[1]["arg:" + name].asnumpy()
        np.testing.assert_array_equal(w0, w1, err_msg=name)  # the workers agree exactly
        np.testing.assert_array_equal(ckpt[name].asnumpy(), w0, err_msg=name)
        np.testing.assert_allclose(w0, ref[name].asnumpy(), rtol=1e-5, atol=1e-6, err_msg=name)
    _, start, _ = load_checkpoint(str(tmp_path / "pre" / "model"), 0)
    assert not np.allclose(ckpt["conv0_weight"].asnumpy(), start["conv0_weight"].asnumpy())  # stage 'all' ran

    # --resume under the launcher: stop both workers after 2 of the 3 steps, resume them (every worker reads rank 0's
    # state), and they must end where the uninterrupted workers ended
    part, dump2 = tmp_path / "part", tmp_path / "dump2"
    for extra in (["--prefix", str(part / "model"), *common_args(tiny_data, "--pretrained", pre), "--max-steps", "2"],
                  ["--resume", str(part), "--max-steps", "3"]):
        rc, out, _ = _launch(["--num-workers", "2", "--num-servers", "1", "--timeout", "120", "--grace", "3", "--",
                              sys.executable, "recognition/train.py", "--kvstore", "dist_sync", *extra],
                             timeout=150, env={"IFR_DIST_DUMP": str(dump2), "OMP_NUM_THREADS": "1"})
        assert rc == 0, out
        _children_gone(out)
    assert [r["step"] for r in read_metrics(str(part / "metrics.jsonl"), "train")] == [1, 2, 3]
    resumed = [mx.nd.load(str(dump2 / f"rank{r}.params")) for r in range(2)]
    for name in args:
        w = resumed[0]["arg:" + name].asnumpy()
        np.testing.assert_array_equal(resumed[1]["arg:" + name].asnumpy(), w, err_msg=name)
        np.testing.assert_array_equal(w, ranks[0]["arg:" + name].asnumpy(), err_msg=name)  # exact continuation


@pytest.mark.slow
def test_failing_worker_exits_and_the_launcher_stops_the_rest(tiny_data, tmp_path):
    """A worker that fails after the kvstore exists (its log folder is taken by a file) must exit at once:
    without os._exit it would wait in ps-lite's shutdown, the other worker in its first push, until --timeout."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "worker1").write_text("not a folder")
    rc, out, _ = _launch(["--num-workers", "2", "--num-servers", "1", "--timeout", "90", "--grace", "2", "--",
                          sys.executable, "recognition/train.py", "--kvstore", "dist_sync", "--max-steps", "2",
                          "--prefix", str(run / "model"), *common_args(tiny_data, "--network", "tiny")],
                         timeout=120, env={"OMP_NUM_THREADS": "1"})
    assert rc == 2, out
    assert re.search(r"^error: worker failed: FileExistsError: .*worker1", out, re.M), out
    assert re.search(r"^error: worker \d \(pid \d+, host 127\.0\.0\.1\) exited with code 1; stopped the other "
                     r"processes$", out, re.M), out
    assert "--timeout" not in out
    _children_gone(out)
    assert not glob.glob(str(run / "*.params"))
