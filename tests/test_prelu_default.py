"""prelu='bn' is the default training graph: checkpoints stay insightface's graph, resume and fine-tuning keep bn."""
import glob
import os

import mxnet as mx
import numpy as np

from recognition import train
from recognition.backbones.fast_prelu import count_prelu
from recognition.common import run_cli


def _argv(data, root, steps):
    return ["--network", "y1", "--loss", "arcface", "--data-dir", os.path.dirname(data["rec"]), "--target", "",
            "--per-batch-size", "4", "--max-steps", str(steps), "--verbose", "2", "--frequent", "1", "--ckpt", "2",
            "--models-root", str(root), "--lr", "0.01", "--seed", "3"]


def test_default_y1_saves_stock_graph_and_resumes_as_bn(tiny_data, tmp_path, params_contract):
    assert run_cli(train.main, _argv(tiny_data, tmp_path, 2)) == 0
    run_dir = glob.glob(os.path.join(str(tmp_path), "y1-arcface-*"))[0]
    prefix = os.path.join(run_dir, "model")
    sym, arg, aux = mx.model.load_checkpoint(prefix, 1)
    want = params_contract["y1"]
    assert {k: v.shape for k, v in arg.items()} == {k: tuple(v) for k, v in want["arguments"] if k != "data"}
    assert {k: v.shape for k, v in aux.items()} == {k: tuple(v) for k, v in want["auxiliary_states"]}
    layers = count_prelu(sym)
    assert layers["bn"] == 0 and layers["stock"] > 0
    with open(os.path.join(run_dir, "train.log")) as f:
        first = f.read()
    assert f"PReLU layers: {layers['stock']} bn, 0 stock (prelu=bn)" in first

    # the resume state holds the bn graph; the resumed run trains it (not the slow stock graph)
    resume_sym = mx.sym.load(os.path.join(run_dir, "resume", "embedding-symbol.json"))
    assert count_prelu(resume_sym) == {"bn": layers["stock"], "stock": 0}
    assert run_cli(train.main, ["--resume", run_dir, "--max-steps", "3"]) == 0
    with open(os.path.join(run_dir, "train.log")) as f:
        log = f.read()[len(first):]
    assert "resumed" in log and f"PReLU layers: {layers['stock']} bn, 0 stock" in log


def test_checkpoint_graph_converted_to_bn_gives_same_embedding(fixture_model):
    from recognition.pretrained import load_pretrained
    from recognition.verification import Embedder

    stock = load_pretrained(fixture_model + ",0")
    bn = load_pretrained(fixture_model + ",0", prelu="bn")
    assert count_prelu(stock.embedding_symbol)["bn"] == 0
    assert count_prelu(bn.embedding_symbol) == {"bn": count_prelu(stock.embedding_symbol)["stock"], "stock": 0}
    assert not bn.report.reinitialised and set(bn.arg_params) == set(stock.arg_params)
    x = np.random.RandomState(0).uniform(0, 255, (2, 3, 112, 112)).astype(np.float32)
    emb = [Embedder(p.embedding_symbol, p.arg_params, p.aux_params, mx.cpu(), 2, (3, 112, 112))(x)
           for p in (stock, bn)]
    np.testing.assert_allclose(emb[1], emb[0], rtol=1e-4, atol=1e-5)
