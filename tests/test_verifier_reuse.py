"""Training-time verification binds once and reloads parameters: results equal a fresh bind with the same params."""
import mxnet as mx
import numpy as np

from recognition.backbones import get_symbol
from recognition.callbacks import Verifier


def _params(sym, seed):
    arg_shapes, _, aux_shapes = sym.infer_shape(data=(1, 3, 112, 112))
    rng = np.random.RandomState(seed)
    arg = {n: mx.nd.array(rng.normal(0, 0.1, s)) for n, s in zip(sym.list_arguments(), arg_shapes) if n != "data"}
    aux = {n: mx.nd.array(rng.uniform(0.5, 1.5, s) if n.endswith("var") else rng.normal(0, 0.1, s))
           for n, s in zip(sym.list_auxiliary_states(), aux_shapes)}
    return arg, aux


def test_verifier_reuses_its_module_and_matches_a_fresh_bind(tiny_data):
    sym = get_symbol("tiny", prelu="stock")
    first, second = _params(sym, 0), _params(sym, 1)
    reused = Verifier(tiny_data["bins"], ctx=mx.cpu(), batch_size=16)
    reused(sym, *first)
    module = reused._embed.module
    got = reused(sym, *second)
    assert reused._embed.module is module  # no new executor for the second round
    want = Verifier(tiny_data["bins"], ctx=mx.cpu(), batch_size=16)(sym, *second)
    for name in want:
        assert got[name]["acc"] == want[name]["acc"] and got[name]["xnorm"] == want[name]["xnorm"]
        np.testing.assert_array_equal(got[name]["embeddings"], want[name]["embeddings"])
    other = Verifier(tiny_data["bins"], ctx=mx.cpu(), batch_size=16)(sym, *first)
    assert any(other[n]["xnorm"] != got[n]["xnorm"] for n in got)  # the params really changed the result
