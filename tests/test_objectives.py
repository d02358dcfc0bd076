"""The objectives registry: every table of losses is generated from it, and every registered loss trains."""
import mxnet as mx
import numpy as np
import pytest

from recognition import args, heads, objectives, train_config
from recognition.common import ToolkitError
from recognition.objectives import REGISTRY

NAMES = sorted(REGISTRY)


@pytest.mark.parametrize("name", NAMES)
def test_config_section_and_make_loss_config_agree(name):
    """The Python API and train.py's configuration read the same defaults (atriplet's alpha once differed)."""
    obj = REGISTRY[name]
    section = train_config.base_tree().loss[name]
    flat = train_config.resolve_config({"loss": name, "data_dir": "x"})
    for key, value in obj.defaults.items():
        assert section[key] == value and flat.loss_kwargs[key] == value
    if not obj.needs_teacher:
        cfg = objectives.make_loss_config(name, **flat.loss_kwargs)
        assert all(getattr(cfg, k) == v for k, v in obj.defaults.items())


def test_atriplet_alpha_is_one_value_everywhere():
    assert heads.make_loss_config("atriplet").triplet_alpha == 0.35
    assert train_config.resolve_config({"loss": "atriplet"}).loss_kwargs["triplet_alpha"] == 0.35


def test_loss_type_tables_come_from_the_registry():
    want = {o.loss_type: n for n, o in REGISTRY.items() if o.loss_type is not None}
    assert args.LOSS_TYPES == heads.LOSS_TYPE_NAMES == want
    assert want == {0: "softmax", 2: "cosface", 4: "arcface", 5: "combined", 12: "triplet",
                    13: "atriplet"}  # insightface src/train_softmax.py; 1 (LSoftmax) is refused, not mapped
    assert 1 in args.REFUSED_LOSS_TYPES
    assert heads.LOSSES == tuple(n for n in REGISTRY if n != "none")


@pytest.mark.parametrize("name", [n for n in NAMES if not REGISTRY[n].needs_teacher])
def test_every_objective_builds_and_steps(name):
    """Each registered loss: a symbol with the documented outputs, one forward/backward with finite values."""
    obj = REGISTRY[name]
    cfg = objectives.make_loss_config(name, images_per_identity=2, **({} if name == "softmax" else {"margin_s": 8.0}))
    emb = mx.sym.FullyConnected(mx.sym.Variable("data"), num_hidden=6, name="fc1")
    sym, info = heads.build_train_symbol(emb, 3, cfg)
    assert info["metric"] == ("acc" if obj.needs_classifier else "loss")
    assert info["outputs"][1] == "fc1_emb_output"
    assert bool(info["fc7_params"]) == obj.needs_classifier
    ex = sym.simple_bind(mx.cpu(), data=(6, 5), softmax_label=(6,))
    rng = np.random.default_rng(0)
    for n, arr in ex.arg_dict.items():
        arr[:] = np.array([0, 0, 1, 1, 2, 2]) if n == "softmax_label" else rng.normal(0, 0.5, arr.shape)
    ex.forward(is_train=True)
    ex.backward()
    assert np.isfinite(ex.outputs[0].asnumpy()).all()
    assert np.isfinite(ex.grad_dict["fc1_weight"].asnumpy()).all()
    assert np.abs(ex.grad_dict["fc1_weight"].asnumpy()).sum() > 0


def test_unknown_loss_lists_the_registry():
    with pytest.raises(ToolkitError, match="unknown loss 'nope'; choose one of softmax, nsoftmax, arcface"):
        objectives.get_objective("nope")


def test_legacy_margin_m_follows_the_objective():
    parser = args.build_parser("t", legacy=True)
    for name, obj in REGISTRY.items():
        if obj.loss_type is None or obj.loss_type == 0:  # softmax reads no margin (refused: test_train_softmax)
            continue
        out = args.legacy_loss_values(parser.parse_args(["--loss-type", str(obj.loss_type), "--margin-m", "0.25"]))
        assert out == {"loss": name, obj.legacy_margin_m: 0.25}
