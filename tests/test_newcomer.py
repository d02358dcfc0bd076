"""Issue 15 (a newcomer's first hour): progress lines without a terminal, quiet MXNet, run metadata that says what
was built, --help defaults, curves with stage marks and lr, datasets info on a .bin, model_slim on a slim model."""
import json
import os
import pickle
import subprocess
import sys

import numpy as np

from recognition.common import run_cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _env(**extra):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("IFR_VERBOSE", None)
    env.update(extra)
    return env


# ------------------------------------------------------------------------------------------------ progress
class FakeClock:
    def __init__(self):
        self.t = 100.0

    def __call__(self):
        return self.t


def test_progress_lines_count_rate_eta_without_a_terminal():
    from recognition.progress import Progress, format_seconds

    clock, lines = FakeClock(), []
    bar = Progress(100, "verify lfw", unit="img", every=10, bar=False, emit=lines.append, clock=clock)
    clock.t += 5
    bar.update(20)  # 5 s: under `every`, no line yet
    assert lines == []
    clock.t += 5
    bar.update(10)  # 30 img in 10 s: 3.0 img/s, 70 left -> 23.3 s
    assert lines == ["verify lfw: 30/100 img (30%), 3.0 img/s, ETA 23s"]
    clock.t += 25
    bar.update(70)
    bar.close()
    assert lines[-1] == "verify lfw: 100 img in 35s (2.9 img/s)"  # 100 / 35 = 2.857
    assert len(lines) == 3  # the update at 35 s logged 100/100, then the closing line
    assert [format_seconds(s) for s in (4.26, 75.2, 3725)] == ["4.3s", "1m15s", "1h02m"]


def test_progress_short_job_says_nothing_and_unknown_total_has_no_eta():
    from recognition.progress import Progress

    clock, lines = FakeClock(), []
    with Progress(10, "quick", bar=False, emit=lines.append, clock=clock, every=10) as bar:
        bar.update(10)
    assert lines == []  # under `every` seconds: silent, no closing line either
    bar = Progress(None, "imprint fc7", bar=False, emit=lines.append, clock=clock, every=1)
    clock.t += 2
    bar.update(8)
    assert lines == ["imprint fc7: 8 img, 4.0 img/s"]


def test_progress_draws_a_bar_on_a_terminal(monkeypatch, capsys):
    from recognition import progress

    lines = []
    monkeypatch.setattr(progress, "stdout_is_tty", lambda: True)
    with progress.Progress(5, "bar job", emit=lines.append, every=0) as bar:
        bar.update(5)
    assert lines == [] and bar._bar is not None  # tqdm drew it (on stderr), no log lines
    monkeypatch.setattr(progress, "stdout_is_tty", lambda: False)
    with progress.Progress(5, "log job", emit=lines.append, every=0) as bar:
        bar.update(5)
    assert bar._bar is None and lines[0].startswith("log job: 5/5 img (100%)")


def test_imprint_and_verification_log_progress(monkeypatch, caplog):
    """The slow steps use the helper: imprinting (count with the image total) and verification (per target)."""
    import logging

    from recognition import progress
    from recognition.pretrained import imprint_fc7
    from recognition.verification import test_bin

    monkeypatch.setattr(progress, "EVERY_SECONDS", 0.0)
    monkeypatch.setattr(progress, "stdout_is_tty", lambda: False)
    rng = np.random.RandomState(0)

    class Batch:
        def __init__(self, x, y):
            self.data, self.label, self.pad = [x], [y], 0

    batches = [Batch(rng.rand(4, 3, 8, 8).astype(np.float32), np.arange(4) % 2) for _ in range(3)]
    with caplog.at_level(logging.INFO, logger="recognition.progress"):
        imprint_fc7(lambda x: x.reshape(len(x), -1)[:, :5], batches, 2, total=12)
        images = rng.randint(0, 255, size=(8, 3, 8, 8)).astype(np.uint8)
        test_bin(([images], [True, False, True, False]), lambda x: x.reshape(len(x), -1)[:, :6], batch_size=4,
                 nfolds=2, progress=True, desc="verify tiny")
    msgs = [r.getMessage() for r in caplog.records if r.name == "recognition.progress"]
    assert any(m.startswith("imprint fc7: 12/12 img (100%)") for m in msgs), msgs
    assert any(m.startswith("verify tiny: 8/8 img (100%)") for m in msgs), msgs


# --------------------------------------------------------------------------------------------------- quiet
def _old_version_checkpoint(tmp_path):
    """A ``tiny`` checkpoint whose symbol file claims MXNet v1.0.0 (as every model-zoo model): loading it makes
    MXNet print its 'previous version' lines."""
    import mxnet as mx

    from recognition.backbones import get_symbol
    from recognition.common import save_checkpoint, symbol_graph

    sym = get_symbol("tiny")
    mod = mx.mod.Module(sym, label_names=None)
    mod.bind([("data", (1, 3, 112, 112))], for_training=False)
    mod.init_params()
    arg, aux = mod.get_params()
    prefix = str(tmp_path / "old")
    save_checkpoint(prefix, 0, sym, arg, aux)
    graph = symbol_graph(sym)
    graph["attrs"]["mxnet_version"] = ["int", 10000]
    with open(prefix + "-symbol.json", "w") as f:
        json.dump(graph, f)
    return prefix


SCRIPT = """
import sys
import recognition
import mxnet as mx
from recognition.common import load_checkpoint
sym, arg, aux = load_checkpoint(sys.argv[1], 0)
mod = mx.mod.Module(sym, label_names=None)
mod.bind([("data", (1, 3, 112, 112))], for_training=False)
import os
os.write(2, b"a line of our own\\n")
print("ok")
"""


def test_mxnet_chatter_filtered_unless_verbose(tmp_path):
    prefix = _old_version_checkpoint(tmp_path)
    quiet = subprocess.run([sys.executable, "-c", SCRIPT, prefix], capture_output=True, text=True, env=_env(),
                           timeout=300)
    assert quiet.returncode == 0 and quiet.stdout.strip() == "ok", quiet.stderr
    assert quiet.stderr == "a line of our own\n"
    loud = subprocess.run([sys.executable, "-c", SCRIPT, prefix], capture_output=True, text=True,
                          env=_env(IFR_VERBOSE="1"), timeout=300)
    assert "Loading symbol saved by previous version v1.0.0" in loud.stderr
    assert "MXNET_SUBGRAPH_BACKEND=NONE is detected" in loud.stderr
    assert "DeprecationWarning" in loud.stderr or "a line of our own" in loud.stderr


def test_filtered_stderr_keeps_other_lines(capfd):
    from recognition.quiet import filtered_stderr

    with filtered_stderr():
        os.write(2, b"[10:00:00] x.cc:60: MXNET_SUBGRAPH_BACKEND=NONE is detected, subgraph backend is not in use\n"
                    b"real problem\n")
        with filtered_stderr():  # nested: the outer block filters
            os.write(2, b"[10:00:00] y.cc:216: Symbol successfully upgraded!\n")
    assert capfd.readouterr().err == "real problem\n"


def test_dash_v_on_a_command_shows_mxnet_lines(tmp_path):
    prefix = _old_version_checkpoint(tmp_path)
    args = [sys.executable, "-m", "deploy.model_slim", "--model", prefix + ",0"]
    quiet = subprocess.run(args, capture_output=True, text=True, env=_env(), cwd=ROOT, timeout=300)
    assert quiet.returncode == 0 and quiet.stderr == "", quiet.stderr
    loud = subprocess.run(args[:3] + ["-v"] + args[3:], capture_output=True, text=True, env=_env(), cwd=ROOT,
                          timeout=300)
    assert loud.returncode == 0 and "Loading symbol saved by previous version" in loud.stderr


def test_importing_the_toolkit_filters_mxnet_deprecation_warnings():
    """``-W error::DeprecationWarning``: importing mxnet alone fails on its own warnings; after ``recognition`` it
    does not (the filter is scoped to mxnet's modules: a warning raised here still raises)."""
    code = ("import recognition, warnings, mxnet\n"
            "try:\n    warnings.warn('ours', DeprecationWarning)\nexcept DeprecationWarning:\n    print('raised')\n")
    out = subprocess.run([sys.executable, "-W", "error::DeprecationWarning", "-c", code], capture_output=True,
                         text=True, env=_env(), timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "raised", out.stderr
    bare = subprocess.run([sys.executable, "-W", "error::DeprecationWarning", "-c", "import mxnet"],
                          capture_output=True, text=True, env=_env(), timeout=300)
    assert bare.returncode != 0 and "DeprecationWarning" in bare.stderr


# ------------------------------------------------------------------------------------- run metadata, help
def _stock_prelu_count(symbol_file):
    with open(symbol_file) as f:
        nodes = json.load(f)["nodes"]
    return sum(n["op"] == "LeakyReLU" and n.get("attrs", {}).get("act_type") == "prelu" for n in nodes)


def test_run_metadata_says_what_was_built(tiny_data, tmp_path):
    from recognition import train
    from recognition.common import load_checkpoint
    from recognition.load_report import read_meta

    d = os.path.dirname(tiny_data["rec"])
    base = ["--data-dir", d, "--target", "", "--per-batch-size", "8", "--lr", "0.05", "--seed", "1", "--ckpt", "0"]
    assert run_cli(train.main, base + ["--network", "tiny", "--loss", "softmax", "--max-steps", "1",
                                       "--prefix", str(tmp_path / "pre" / "model")]) == 0
    pre = str(tmp_path / "pre" / "model")
    with open(tmp_path / "pre" / "config.json") as f:
        assert json.load(f)["network"] == "tiny"
    sym, _, _ = load_checkpoint(pre, 1)
    width = sym.infer_shape(data=(1, 3, 112, 112))[1][0][1]
    for extra, network in (([], f"checkpoint graph of {pre},1"), (["--network", "tiny"], "tiny")):
        prefix = str(tmp_path / f"ft{len(extra)}" / "model")
        assert run_cli(train.main, base + ["--loss", "arcface", "--pretrained", pre + ",1", "--stages",
                                           "head:1@0.1,all:1", "--prefix", prefix] + extra) == 0
        with open(os.path.join(os.path.dirname(prefix), "config.json")) as f:
            config = json.load(f)
        built = config["built"]
        assert config["network"] == network == built["network"]  # not the configuration's default "r100"
        assert built["loss"] == "arcface" and built["emb_size"] == width
        assert built["stages"] == [{"name": "head", "steps": 1, "lr_mult": 0.1},
                                   {"name": "all", "steps": 1, "lr_mult": 1.0}]
        assert built["prelu"]["formulation"] == "bn"
        assert built["prelu"]["bn_layers"] + built["prelu"]["stock_layers"] == \
            _stock_prelu_count(pre + "-symbol.json")  # the checkpoint stores every PReLU as a stock node
        meta = read_meta(prefix)
        assert meta == dict(built, slim=True)


def test_train_help_shows_configuration_defaults():
    from recognition.train_config import resolve_config

    out = subprocess.run([sys.executable, os.path.join(ROOT, "recognition", "train.py"), "--help"],
                         capture_output=True, text=True, env=_env(), timeout=300)
    text = " ".join(out.stdout.split())
    cfg = resolve_config({})
    assert f"momentum (default: {cfg.mom})" in text and f"weight decay (default: {cfg.wd})" in text
    assert "start learning rate (default 0.1 with --network r100 --loss arcface --dataset emore; it depends" in text
    assert "(default: r100)" in text  # --network itself


# ------------------------------------------------------------------------------------------------ curves
def test_curves_series_records_stages_and_lr(tmp_path):
    from recognition.metrics_log import MetricsLog

    log = MetricsLog(str(tmp_path / "metrics.jsonl"))
    for step in range(1, 7):
        stage, lr = ("head", 0.01) if step <= 2 else ("all", 0.1)
        log.write("train", step=step, epoch=0, stage=stage, lr=lr, loss=1.0 / step, acc=0.1 * step)
    log.write("verify", step=6, target="v", acc=0.8, std=0.01, xnorm=1.0)
    assert log.series.stages == [(1, "head"), (3, "all")]
    assert log.series.series("lr") == [(s, 0.01 if s <= 2 else 0.1) for s in range(1, 7)]
    png = log.plot(str(tmp_path / "curves.png"))
    log.close()
    with open(png, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


# ------------------------------------------------------------------------------- datasets info, model_slim
def test_datasets_info_on_a_bin(tiny_data, tmp_path, capsys):
    from datasets.tools import main

    path = tiny_data["bins"][0]
    with open(path, "rb") as f:
        images, issame = pickle.load(f)
    assert run_cli(main, ["info", path]) == 0
    out = capsys.readouterr().out
    same = int(sum(issame))
    assert out.strip() == (f"{os.path.basename(path)}: {len(issame)} pairs ({same} same, {len(issame) - same} "
                           f"different), {len(images)} images, image size 112x112")
    assert run_cli(main, ["info", os.path.dirname(path)]) == 0  # a folder lists its .bin sets after the rec
    assert f"{os.path.basename(path)}: {len(issame)} pairs" in capsys.readouterr().out
    bad = tmp_path / "bad.bin"
    with open(bad, "wb") as f:
        pickle.dump(([b"x"] * 3, [True]), f)
    assert run_cli(main, ["info", str(bad)]) == 2
    assert capsys.readouterr().err.strip() == f"error: {bad}: 3 images but 1 pair labels (need 2 images per pair)"
    assert run_cli(main, ["info", str(tmp_path / "none.bin")]) == 2
    assert "verification file does not exist" in capsys.readouterr().err


def test_model_slim_on_a_slim_model_says_so_and_meta_follows(tmp_path, capsys):
    from deploy.model_slim import main
    from recognition.load_report import read_meta, write_meta

    prefix = _old_version_checkpoint(tmp_path)  # a tiny embedding-only graph: already slim
    assert run_cli(main, ["--model", prefix + ",0"]) == 0
    out = capsys.readouterr().out
    assert "is already slim" in out and "nothing written" in out
    assert not os.path.exists(prefix + "s-0000.params")
    # a full checkpoint: the slim copy carries the sidecar, marked slim
    import mxnet as mx

    from recognition.common import load_checkpoint, save_checkpoint

    sym, arg, aux = load_checkpoint(prefix, 0)
    fc7 = mx.sym.FullyConnected(sym, num_hidden=3, name="fc7")
    arg["fc7_weight"], arg["fc7_bias"] = mx.nd.ones((3, 128)), mx.nd.zeros((3,))
    save_checkpoint(str(tmp_path / "full"), 0, mx.sym.SoftmaxOutput(fc7, name="softmax"), arg, aux)
    write_meta(str(tmp_path / "full"), network="tiny", emb_size=128)
    assert run_cli(main, ["--model", str(tmp_path / "full") + ",0"]) == 0
    assert "removed 2 array(s)" in capsys.readouterr().out
    assert read_meta(str(tmp_path / "fulls")) == {"network": "tiny", "emb_size": 128, "slim": True}


def test_extract_index_has_a_header_and_reads_back(tmp_path):
    import cv2

    from deploy import extract
    from deploy.face_model import FaceModel

    prefix = _old_version_checkpoint(tmp_path)
    rng = np.random.RandomState(0)
    for name in ("ann", "bob"):
        os.makedirs(tmp_path / "faces" / name)
        cv2.imwrite(str(tmp_path / "faces" / name / "0.png"), rng.randint(0, 255, (112, 112, 3)).astype(np.uint8))
    r = extract.extract(FaceModel(prefix + ",0"), str(tmp_path / "faces"), str(tmp_path / "feats"))
    with open(r["index"]) as f:
        lines = f.read().splitlines()
    assert lines[0] == "name\tlabel\tpath" and len(lines) == 1 + len(np.load(r["embeddings"]))
    assert extract.load_index(r["index"]) == [("ann", 0, str(tmp_path / "faces" / "ann" / "0.png")),
                                              ("bob", 1, str(tmp_path / "faces" / "bob" / "0.png"))]
    with open(tmp_path / "old.tsv", "w") as f:  # an index written before the header: still read
        f.write("ann\t0\ta.png\n")
    assert extract.load_index(str(tmp_path / "old.tsv")) == [("ann", 0, "a.png")]
