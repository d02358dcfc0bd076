"""deploy/model_slim.py: fc7 and loss removed, same embeddings, never overwrites, one-line errors."""
import os
import subprocess
import sys

import mxnet as mx
import numpy as np
import pytest

from deploy.model_slim import main, slim_checkpoint
from recognition.common import run_cli, save_checkpoint


def _full_checkpoint(tmp_path, num_classes=7):
    """Tiny backbone (conv/BN/PReLU -> pre_fc1 -> fc1) + fc7 (with bias) + SoftmaxOutput, seeded random params."""
    x = (mx.sym.Variable("data") - 127.5) * 0.0078125
    x = mx.sym.Convolution(x, num_filter=4, kernel=(3, 3), stride=(2, 2), pad=(1, 1), no_bias=True, name="conv0")
    x = mx.sym.BatchNorm(x, fix_gamma=False, name="bn0")
    x = mx.sym.LeakyReLU(x, act_type="prelu", name="relu0")
    x = mx.sym.FullyConnected(x, num_hidden=6, name="pre_fc1")
    emb = mx.sym.BatchNorm(x, fix_gamma=True, name="fc1")
    fc7 = mx.sym.FullyConnected(emb, num_hidden=num_classes, name="fc7")
    sym = mx.sym.Group([mx.sym.SoftmaxOutput(fc7, name="softmax"), mx.sym.BlockGrad(emb, name="fc1_emb")])
    rng = np.random.RandomState(0)
    arg_shapes, _, aux_shapes = sym.infer_shape(data=(1, 3, 16, 16))
    arg = {n: mx.nd.array(rng.randn(*s)) for n, s in zip(sym.list_arguments(), arg_shapes)
           if n not in ("data", "softmax_label")}
    aux = {n: mx.nd.array(rng.uniform(0.5, 1.5, s)) for n, s in zip(sym.list_auxiliary_states(), aux_shapes)}
    prefix = str(tmp_path / "model")
    save_checkpoint(prefix, 3, sym, arg, aux)
    return prefix


def _embed(prefix, epoch, x, cut):
    sym, arg, aux = mx.model.load_checkpoint(prefix, epoch)
    if cut:
        sym = sym.get_internals()["fc1_output"]
    mod = mx.mod.Module(sym, label_names=None, context=mx.cpu())
    mod.bind([("data", x.shape)], for_training=False)
    mod.set_params(arg, aux, allow_extra=cut)  # the slim model must bind without any extra array
    mod.forward(mx.io.DataBatch([mx.nd.array(x)]), is_train=False)
    return mod.get_outputs()[0].asnumpy()


def test_slim_removes_head_and_keeps_embeddings(tmp_path, capsys):
    prefix = _full_checkpoint(tmp_path)
    assert main(["--model", prefix + ",3"]) == 0
    out = capsys.readouterr().out
    assert "removed 2 array(s) (49 values)" in out and "fc7_weight (7, 6)" in out and "fc7_bias (7,)" in out
    assert "-> " + prefix + "s-0000.params" in out
    assert os.path.isfile(prefix + "s-symbol.json") and os.path.isfile(prefix + "s-0000.params")
    sym, arg, _ = mx.model.load_checkpoint(prefix + "s", 0)
    assert sym.list_outputs() == ["fc1_output"] and "fc7_weight" not in arg and "softmax_label" not in \
        sym.list_arguments()
    x = np.random.RandomState(1).uniform(0, 255, (3, 3, 16, 16)).astype(np.float32)
    np.testing.assert_array_equal(_embed(prefix + "s", 0, x, cut=False), _embed(prefix, 3, x, cut=True))
    assert os.path.getsize(prefix + "s-0000.params") < os.path.getsize(prefix + "-0003.params")


def test_output_flag_and_refusal_to_overwrite(tmp_path, capsys):
    prefix = _full_checkpoint(tmp_path)
    info = slim_checkpoint(prefix, 3, str(tmp_path / "out" / "emb"), 5)
    assert info["files"] == [str(tmp_path / "out" / "emb-0005.params"), str(tmp_path / "out" / "emb-symbol.json")]
    assert run_cli(main, ["--model", prefix + ",3", "--output", str(tmp_path / "out" / "emb") + ",5"]) == 2
    assert "already exist(s); choose another --output" in capsys.readouterr().err
    assert run_cli(main, ["--model", prefix + ",3", "--output", str(tmp_path / "o2") + ",x"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --output") and "epoch 'x' is not an integer" in err


@pytest.mark.parametrize("spec, message", [
    ("{p}", "error: --model '{p}': missing ',EPOCH'"),
    ("{p},9", "error: --model: checkpoint file {p}-0009.params does not exist"),
])
def test_bad_model_flag(tmp_path, capsys, spec, message):
    prefix = _full_checkpoint(tmp_path)
    assert run_cli(main, ["--model", spec.format(p=prefix)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(message.format(p=prefix)) and err.count("\n") == 1


def test_graph_without_fc1_output(tmp_path, capsys):
    sym = mx.sym.FullyConnected(mx.sym.Variable("data"), num_hidden=3, name="emb")
    prefix = str(tmp_path / "odd")
    save_checkpoint(prefix, 0, sym, {"emb_weight": mx.nd.zeros((3, 4)), "emb_bias": mx.nd.zeros(3)}, {})
    assert run_cli(main, ["--model", prefix + ",0"]) == 2
    assert "graph has no 'fc1_output' node (outputs: emb_output)" in capsys.readouterr().err


def test_help_and_module_entry():
    proc = subprocess.run([sys.executable, "-m", "deploy.model_slim", "--help"], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0 and "--output" in proc.stdout
