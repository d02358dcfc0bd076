"""train.py: few-step runs on tiny generated data, checkpoints, multipliers, two-stage fine-tuning, bad inputs."""
import json
import os
import subprocess
import sys

import mxnet as mx
import numpy as np
import pytest

from recognition import train
from recognition.common import load_checkpoint, run_cli
from recognition.metrics_log import read_metrics
from recognition.trainer import Trainer, format_table, lr_at, prepare_run

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def base_args(data, root, *extra, loss="softmax", steps=2):
    d = os.path.dirname(data["rec"])
    return ["--network", "tiny", "--loss", loss, "--data-dir", d, "--target", "synth_val", "--per-batch-size", "8",
            "--max-steps", str(steps), "--verbose", "100", "--frequent", "1", "--models-root", str(root),
            "--lr", "0.05", "--seed", "3", *extra]


def run_dir_of(data, root, loss="softmax"):
    return os.path.join(str(root), f"tiny-{loss}-{os.path.basename(os.path.dirname(data['rec']))}")


def make_trainer(argv):
    args = train.build_argparser().parse_args(argv)
    cfg = train.config_from_args(args)
    return Trainer(cfg, prepare_run(cfg))


def probe_images(n=4, seed=0):
    return np.random.RandomState(seed).uniform(0, 255, size=(n, 3, 112, 112)).astype(np.float32)


def embed(symbol, arg, aux, x):
    from recognition.verification import Embedder

    return Embedder(symbol, arg, aux, ctx=mx.cpu(), batch_size=len(x))(x)


def test_lr_schedule_matches_insightface_steps_and_warmup():
    steps = [3, 5]
    got = [lr_at(s, 0.1, steps) for s in range(7)]
    want = [0.1, 0.1, 0.1, 0.01, 0.01, 0.001, 0.001]
    assert np.allclose(got, want)
    assert np.allclose([lr_at(s, 0.1, [], warmup_steps=4) for s in range(5)], [0.025, 0.05, 0.075, 0.1, 0.1])


def test_help_of_each_script_and_run_from_recognition_folder(capsys):
    for mod in (train, __import__("recognition.train_softmax", fromlist=["main"])):
        with pytest.raises(SystemExit) as exc:
            mod.main(["--help"])
        assert exc.value.code == 0
        assert "--per-batch-size" in capsys.readouterr().out
    out = subprocess.run([sys.executable, "train.py", "--help"], cwd=os.path.join(ROOT, "recognition"),
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "--pretrained" in out.stdout
    out = subprocess.run([sys.executable, "recognition/train_softmax.py", "--help"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "--loss-type" in out.stdout


@pytest.mark.parametrize("slim", [1, 0])
def test_checkpoint_embeddings_equal_in_memory_model(tiny_data, tmp_path, slim):
    t = make_trainer(base_args(tiny_data, tmp_path, "--ckpt-embedding", str(slim), "--ckpt", "0"))
    summary = t.fit()
    prefix, epoch = summary["prefix"], 1
    assert summary["checkpoint"] == "%s-%04d.params" % (prefix, epoch)  # --ckpt 0 still saves the final model
    sym, arg, aux = load_checkpoint(prefix, epoch)
    assert ("fc7_weight" in arg) == (not slim)
    if not slim:
        sym = sym.get_internals()["fc1_output"]
    else:
        assert sym.list_outputs() == ["fc1_output"]
    live_arg, live_aux = t.module.get_params()
    x = probe_images()
    # the checkpoint holds the stock PReLU graph, the live module the bn one: a few ulp apart
    np.testing.assert_allclose(embed(sym, arg, aux, x), embed(t.embedding_symbol, live_arg, live_aux, x),
                               rtol=1e-5, atol=3e-4)
    recs = read_metrics(os.path.join(summary["run_dir"], "metrics.jsonl"), "train")
    assert [r["step"] for r in recs] == [1, 2] and all(np.isfinite(r["loss"]) for r in recs)
    assert os.path.isfile(os.path.join(summary["run_dir"], "curves.png"))
    assert os.path.isfile(os.path.join(summary["run_dir"], "resume", "state.json"))
    assert "synth_val" in summary["final"]


@pytest.mark.slow
def test_fc7_multipliers_zero_keep_fc7_bit_identical_on_two_devices(tiny_data, tmp_path):
    """fc7 lr_mult = wd_mult = 0 must freeze fc7 exactly while the backbone moves (kvstore path, 2 devices)."""
    assert run_cli(train.main, base_args(tiny_data, tmp_path / "a", "--ckpt-embedding", "0", "--ckpt", "0",
                                         steps=1)) == 0
    first = os.path.join(run_dir_of(tiny_data, tmp_path / "a"), "model")
    _, arg0, _ = load_checkpoint(first, 1)
    argv = base_args(tiny_data, tmp_path / "b", "--ckpt-embedding", "0", "--ckpt", "0", "--pretrained",
                     first + ",1", "--fc7-lr-mult", "0", "--fc7-wd-mult", "0", "--ctx", "cpu:0,cpu:1", "--network",
                     "tiny", steps=2)
    assert run_cli(train.main, argv) == 0
    _, arg1, _ = load_checkpoint(os.path.join(run_dir_of(tiny_data, tmp_path / "b"), "model"), 1)
    for name in ("fc7_weight", "fc7_bias"):
        assert np.array_equal(arg1[name].asnumpy(), arg0[name].asnumpy()), name
    moved = [k for k in arg0 if not k.startswith("fc7") and not np.array_equal(arg0[k].asnumpy(), arg1[k].asnumpy())]
    assert len(moved) > len(arg0) // 2


@pytest.mark.slow
def test_two_stage_finetune_from_pretrained(tiny_data, tmp_path):
    """head stage keeps the backbone stem bit-identical, the all stage moves it; imprint + before/after table."""
    assert run_cli(train.main, base_args(tiny_data, tmp_path / "pre", "--ckpt", "0", steps=1)) == 0
    pre = os.path.join(run_dir_of(tiny_data, tmp_path / "pre"), "model")
    _, arg0, aux0 = load_checkpoint(pre, 1)
    argv = base_args(tiny_data, tmp_path / "ft", "--pretrained", pre + ",1", "--network", "tiny", "--loss", "arcface",
                     "--stages", "head:2,all:2", "--fc7-init", "imprint", "--eval-pretrained", "--ckpt", "2",
                     "--verbose", "2", loss="arcface", steps=0)
    t = make_trainer(argv)
    summary = t.fit()
    prefix = summary["prefix"]
    _, arg_head, _ = load_checkpoint(prefix, 1)   # after the head stage (step 2)
    _, arg_all, _ = load_checkpoint(prefix, 2)    # after the all stage (step 4)
    stem = [k for k in arg0 if k.startswith("conv0") or k.startswith("bn0")]
    assert stem
    for k in stem:
        assert np.array_equal(arg_head[k].asnumpy(), arg0[k].asnumpy()), k
    assert any(not np.array_equal(arg_all[k].asnumpy(), arg0[k].asnumpy()) for k in stem)
    recs = read_metrics(os.path.join(summary["run_dir"], "metrics.jsonl"), "train")
    assert [r["stage"] for r in recs] == ["head", "head", "all", "all"]
    assert set(summary["before"]) == {"synth_val"} and set(summary["final"]) == {"synth_val"}
    assert os.listdir(summary["run_dir"])  # load report saved next to the run
    assert any(f.startswith("load_report") or "report" in f for f in os.listdir(summary["run_dir"]))
    table = format_table(summary["before"], summary["final"])
    assert "synth_val" in table and f"{summary['before']['synth_val']:.5f}" in table


def test_divergence_stops_with_message_and_keeps_last_checkpoint(tiny_data, tmp_path, monkeypatch, capsys):
    real = Trainer._batch_metrics

    def nan_at_step_2(self, batch):
        loss, acc, extra = real(self, batch)
        return (float("nan") if self.step == 2 else loss), acc, extra

    monkeypatch.setattr(Trainer, "_batch_metrics", nan_at_step_2)
    rc = run_cli(train.main, base_args(tiny_data, tmp_path, "--ckpt", "2", "--verbose", "1", "--target", "",
                                       steps=4))
    err = capsys.readouterr().err
    assert rc == 2
    assert "training diverged: loss is nan at step 3" in err and "model-0002.params" in err
    run_dir = run_dir_of(tiny_data, tmp_path)
    assert os.path.isfile(os.path.join(run_dir, "model-0002.params"))
    assert not os.path.exists(os.path.join(run_dir, "model-0003.params"))
    assert read_metrics(os.path.join(run_dir, "metrics.jsonl"), "diverged")[0]["step"] == 3


@pytest.mark.parametrize("extra, message", [
    (["--network", "nosuchnet"], "'nosuchnet': unknown network; valid names:"),
    (["--loss", "nosuchloss"], "--loss: unknown loss 'nosuchloss'; choose one of"),
    (["--pretrained", "/nonexistent/model"], "/nonexistent/model-0001.params does not exist"),  # insightface: epoch 1
    (["--pretrained", "/nonexistent/model,0"], "/nonexistent/model-0000.params does not exist"),
    (["--set", "num_classes=99"], "num_classes=99 but"),
    (["--target", "nosuchset"], "--target nosuchset: verification set"),
    (["--ctx", "tpu:0"], "--ctx: cannot parse"),
    (["--data-dir", "/nonexistent"], "/nonexistent/train.rec does not exist"),
    (["--set", "nosuchkey=1"], "--set 'nosuchkey=1': unknown key 'nosuchkey'"),
    (["--resume", "/nonexistent"], "no resume state"),
    (["--stages", "head:x"], "is not an integer"),
])
def test_bad_inputs_fail_fast_with_one_line(tiny_data, tmp_path, capsys, extra, message):
    rc = run_cli(train.main, base_args(tiny_data, tmp_path) + extra)
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert err.startswith("error: ") and message in err and "\n" not in err
    assert not os.path.exists(run_dir_of(tiny_data, tmp_path))  # failed before creating the run


def test_config_file_and_set_override_defaults(tmp_path):
    from recognition.train_config import resolve_config

    path = tmp_path / "c.json"
    path.write_text(json.dumps({"lr": 0.01, "loss": {"arcface": {"margin_m": 0.45}}}))
    cfg = resolve_config({"loss": "arcface", "wd": 0.001}, str(path), ["mom=0.5"])
    assert (cfg.lr, cfg.wd, cfg.mom, cfg.loss_kwargs["margin_m"]) == (0.01, 0.001, 0.5, 0.45)
    cfg = resolve_config({"loss": "triplet"}, None, ["loss.triplet.triplet_alpha=0.2"])
    assert cfg.per_batch_size == 60 and cfg.loss_kwargs["triplet_alpha"] == 0.2


def _emb_width(trainer):
    return trainer.embedding_symbol.infer_shape(data=(1, 3, 112, 112))[1][0][1]


def test_pretrained_without_emb_size_keeps_the_checkpoint_width(tiny_data, tmp_path):
    """No --emb-size: a 64-d checkpoint stays 64-d (not r100's section default 512, nor tiny's 128)."""
    assert run_cli(train.main, base_args(tiny_data, tmp_path / "pre", "--emb-size", "64", "--ckpt", "0",
                                         "--target", "", steps=1)) == 0
    pre = os.path.join(run_dir_of(tiny_data, tmp_path / "pre"), "model") + ",1"
    d = os.path.dirname(tiny_data["rec"])
    common = ["--data-dir", d, "--target", "", "--per-batch-size", "8", "--loss", "arcface", "--pretrained", pre]
    for extra in ([], ["--network", "tiny"]):
        t = make_trainer(common + extra + ["--prefix", str(tmp_path / ("ft%d" % len(extra)) / "model")])
        assert t.cfg.emb_size is None and _emb_width(t) == 64
        with open(os.path.join(t.plan.run_dir, "load_report.json")) as f:
            report = json.load(f)
        assert report["counts"]["reinitialised"] == 0 and report["counts"]["dropped"] == 0
        _, arg0, _ = load_checkpoint(pre.split(",")[0], 1)
        emb_w = [k for k in arg0 if arg0[k].ndim == 2 and arg0[k].shape[0] == 64]
        assert emb_w and all(np.array_equal(t.arg_params[k].asnumpy(), arg0[k].asnumpy()) for k in emb_w)
    t = make_trainer(common + ["--emb-size", "32", "--prefix", str(tmp_path / "ft32" / "model")])
    assert _emb_width(t) == 32  # an explicit --emb-size still re-creates the embedding layer


def test_acc_nomargin_is_the_cosine_argmax_of_the_batch(tiny_data, tmp_path, monkeypatch):
    """metrics.jsonl's acc_nomargin = numpy argmax of cos(embedding output, fc7 rows as in that forward) vs label;
    the margin accuracy ``acc`` stays insightface's (softmax over the margin logits)."""
    seen = []
    real = Trainer._acc_nomargin

    def spy(self, batch, acc):
        outs = self.module.get_outputs(merge_multi_context=True)
        w = self.module.get_params()[0]["fc7_weight"].asnumpy()
        value = real(self, batch, acc)
        seen.append((outs[1].asnumpy(), w, batch.label[0].asnumpy().astype(int), outs[0].asnumpy(), acc, value))
        return value

    monkeypatch.setattr(Trainer, "_acc_nomargin", spy)
    t = make_trainer(base_args(tiny_data, tmp_path, "--set", "margin_s=32", "--set", "margin_m=0.5",
                               loss="arcface", steps=3))
    summary = t.fit()
    recs = read_metrics(os.path.join(summary["run_dir"], "metrics.jsonl"), "train")
    assert len(seen) == len(recs) == 3
    for (emb, w, label, prob, acc, value), rec in zip(seen, recs):
        cos = (emb / np.linalg.norm(emb, axis=1, keepdims=True)) @ (w / np.linalg.norm(w, axis=1, keepdims=True)).T
        assert value == rec["acc_nomargin"] == float(np.mean(cos.argmax(axis=1) == label))
        assert rec["acc"] == acc == float(np.mean(prob.argmax(axis=1) == label))
        assert rec["acc_nomargin"] >= rec["acc"]  # right with the margin -> right without it
