"""recognition.launch: two dist_sync workers on 127.0.0.1 against one process, failures, cleanup."""
import os
import re
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from recognition.common import ToolkitError
from recognition.launch import check_command, main, plan, read_hosts, remote_argv

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A self-contained worker: tiny MLP, Module + kvstore, each worker takes its rank's slice of every global batch.
WORKER = textwrap.dedent("""
    import os, sys
    import numpy as np
    import mxnet as mx

    out, kvname, steps, gbatch = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    kv = mx.kv.create(kvname)
    rank, nw = kv.rank, kv.num_workers
    if os.environ.get("DIE_RANK") == str(rank):
        os._exit(3)  # a crash: sys.exit would block in ps-lite finalize, waiting for the others
    rng = np.random.RandomState(0)
    x = rng.uniform(-1, 1, (steps * gbatch, 10)).astype(np.float32)
    y = rng.randint(0, 4, steps * gbatch).astype(np.float32)
    arg = {"fc1_weight": rng.normal(0, 0.3, (8, 10)), "fc1_bias": np.zeros(8),
           "fc2_weight": rng.normal(0, 0.3, (4, 8)), "fc2_bias": np.zeros(4)}
    arg = {k: mx.nd.array(v.astype(np.float32)) for k, v in arg.items()}
    net = mx.sym.Activation(mx.sym.FullyConnected(mx.sym.Variable("data"), num_hidden=8, name="fc1"), act_type="tanh")
    net = mx.sym.SoftmaxOutput(mx.sym.FullyConnected(net, num_hidden=4, name="fc2"), name="softmax",
                               normalization="null")
    per = gbatch // nw
    mod = mx.mod.Module(net, context=mx.cpu())
    mod.bind(data_shapes=[("data", (per, 10))], label_shapes=[("softmax_label", (per,))])
    mod.init_params(arg_params=arg)
    mod.init_optimizer(kvstore=kv, optimizer="sgd",
                       optimizer_params=dict(learning_rate=0.2, momentum=0.9, rescale_grad=1.0 / gbatch))
    for step in range(steps):
        lo = step * gbatch + rank * per
        mod.forward_backward(mx.io.DataBatch([mx.nd.array(x[lo:lo + per])], [mx.nd.array(y[lo:lo + per])]))
        mod.update()
    params, _ = mod.get_params()
    np.savez(out % rank, **{k: v.asnumpy() for k, v in params.items()})
    print("worker", rank, "of", nw, "done", flush=True)
""")


@pytest.fixture()
def worker_script(tmp_path):
    path = tmp_path / "worker.py"
    path.write_text(WORKER)
    return str(path)


def _launch(args, timeout, env=None):
    """Run the launcher in its own process group; always kill it and every pid it reported."""
    proc = subprocess.Popen([sys.executable, "-m", "recognition.launch"] + args, cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True,
                            env=dict(os.environ, **(env or {})))
    out = ""
    started = time.monotonic()
    try:
        out, _ = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            out += proc.communicate()[0] or ""
        for pid in _started_pids(out):  # never 0: killpg(0) would hit this test's own group
            try:
                os.killpg(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
    return proc.returncode, out, time.monotonic() - started


def _started_pids(out):
    return [int(p) for p in re.findall(r"^launch: started \w+(?: \d+)? on \S+ pid (\d+)$", out, re.M) if int(p) > 1]


def _children_gone(out):
    pids = _started_pids(out)
    assert pids, out
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


@pytest.mark.slow
def test_two_workers_match_single_process(worker_script, tmp_path):
    steps, gbatch = 4, 8
    out_tpl = str(tmp_path / "dist_%d.npz")
    rc, out, _ = _launch(["--num-workers", "2", "--num-servers", "1", "--timeout", "80", "--",
                          sys.executable, worker_script, out_tpl, "dist_sync", str(steps), str(gbatch)], timeout=100)
    assert rc == 0, out
    _children_gone(out)
    single = str(tmp_path / "single_%d.npz")
    subprocess.run([sys.executable, worker_script, single, "local", str(steps), str(gbatch)], check=True,
                   timeout=60, env={k: v for k, v in os.environ.items() if not k.startswith("DMLC_")})
    w0, w1, ref = np.load(out_tpl % 0), np.load(out_tpl % 1), np.load(single % 0)
    assert sorted(w0.files) == sorted(ref.files) == ["fc1_bias", "fc1_weight", "fc2_bias", "fc2_weight"]
    for name in ref.files:
        np.testing.assert_array_equal(w0[name], w1[name])  # workers hold identical parameters
        np.testing.assert_allclose(w0[name], ref[name], rtol=1e-5, atol=1e-6)
    init = np.random.RandomState(0)  # and training moved them
    assert np.abs(ref["fc2_bias"]).max() > 1e-3, init


@pytest.mark.slow
def test_dead_worker_stops_the_others(worker_script, tmp_path):
    rc, out, took = _launch(["--num-workers", "2", "--num-servers", "1", "--grace", "2", "--",
                             sys.executable, worker_script, str(tmp_path / "w_%d.npz"), "dist_sync", "3", "4"],
                            timeout=90, env={"DIE_RANK": "1"})
    assert rc == 2, out
    assert re.search(r"error: worker \d \(pid \d+, host 127\.0\.0\.1\) exited with code 3; stopped the other "
                     r"processes", out), out
    _children_gone(out)
    assert not os.path.exists(tmp_path / "w_0.npz")  # the surviving worker was stopped, not finished
    assert took < 80


def test_timeout_stops_everything(tmp_path):
    rc, out, took = _launch(["--num-workers", "1", "--num-servers", "1", "--timeout", "1", "--grace", "1", "--",
                             sys.executable, "-c", "import time; time.sleep(60)"], timeout=40)
    assert rc == 2 and "error: --timeout: workers still running after 1 s; stopped all processes" in out, out
    _children_gone(out)
    assert took < 30


def test_bad_kvstore_and_arguments(tmp_path, capsys):
    with pytest.raises(ToolkitError, match=r"--kvstore local in the worker command: it is not a distributed kvstore"):
        check_command(["--", "python", "train.py", "--kvstore", "local"])
    with pytest.raises(ToolkitError, match=r"--kvstore dist_foo in the worker command: no such kvstore"):
        check_command(["python", "train.py", "--kvstore=dist_foo"])
    with pytest.raises(ToolkitError, match="no worker command"):
        main(["--num-workers", "2"])
    with pytest.raises(ToolkitError, match=r"--num-workers: must be >= 1, got 0"):
        main(["--num-workers", "0", "--", "python", "x.py"])
    with pytest.raises(ToolkitError, match=r"--hosts: file .*nope.txt does not exist"):
        main(["--hosts", str(tmp_path / "nope.txt"), "--", "python", "x.py"])
    rc = subprocess.run([sys.executable, "-m", "recognition.launch", "--", "python", "t.py", "--kvstore", "dist_x"],
                        cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert rc.returncode == 2 and rc.stderr.strip().startswith("error: --kvstore dist_x"), rc.stderr


def test_hosts_plan_and_ssh_commands(tmp_path, capsys):
    hosts = tmp_path / "hosts.txt"
    hosts.write_text("# cluster\n10.0.0.1\n10.0.0.2  # second\n\n")
    assert read_hosts(str(hosts)) == ["10.0.0.1", "10.0.0.2"]
    procs = plan(["python", "train.py", "--kvstore", "dist_sync"], 4, 2, ["10.0.0.1", "10.0.0.2"], 9000, {})
    roles = [(p.label, p.host) for p in procs]
    assert roles == [("scheduler", "10.0.0.1"), ("server 0", "10.0.0.1"), ("server 1", "10.0.0.2"),
                     ("worker 0", "10.0.0.1"), ("worker 1", "10.0.0.2"), ("worker 2", "10.0.0.1"),
                     ("worker 3", "10.0.0.2")]
    for p in procs:
        assert p.env["DMLC_PS_ROOT_URI"] == "10.0.0.1" and p.env["DMLC_PS_ROOT_PORT"] == "9000"
        assert p.env["DMLC_NUM_SERVER"] == "2" and p.env["DMLC_NUM_WORKER"] == "4"
        assert p.env["DMLC_ROLE"] == p.role and p.env["DMLC_NODE_HOST"] == p.host
    argv = remote_argv(procs[4], "ssh -o BatchMode=yes")
    assert argv[:4] == ["ssh", "-o", "BatchMode=yes", "10.0.0.2"]
    assert "DMLC_ROLE=worker" in argv[4] and argv[4].endswith("python train.py --kvstore dist_sync")
    assert main(["--hosts", str(hosts), "-n", "2", "--dry-run", "--", "python", "train.py"]) == 0
    printed = capsys.readouterr().out
    assert printed.count("ssh -o BatchMode=yes 10.0.0.") == 5 and "# scheduler on 10.0.0.1" in printed
