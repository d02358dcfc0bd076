"""insightface compatibility, continued: --version-*/net_* variants against facts read from insightface's builders
(tests/data/insightface_variants.json), an insightface sample_config.py through --config, --set with insightface's
key names, the FLOPs counter against a hand count, and the verification calling convention."""
import json
import logging
import os
import pickle
import re

import mxnet as mx
import numpy as np
import pytest

from recognition.backbones import get_symbol, network_options
from recognition.common import ToolkitError
from recognition.train_config import resolve_config

DATA = os.path.join(os.path.dirname(__file__), "data")
with open(os.path.join(DATA, "insightface_variants.json")) as _f:
    VARIANTS = json.load(_f)["variants"]
with open(os.path.join(DATA, "insightface_flags.json")) as _f:
    SAMPLE = json.load(_f)["sample_config"]


def _shapes(sym):
    args, _, aux = sym.infer_shape(data=(1, 3, 112, 112))
    return dict(zip(sym.list_arguments(), map(list, args))), dict(zip(sym.list_auxiliary_states(), map(list, aux)))


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_variant_names_and_shapes_match_insightfaces_builders(name, params_contract):
    v = VARIANTS[name]
    args, _ = _shapes(get_symbol(v["network"], emb_size=v["emb_size"], prelu="stock", **v["options"]))
    for pname, shape in v["arguments"].items():
        assert args.get(pname) == shape, pname
    for pname in v.get("absent", []) + v["removed"]:
        assert pname not in args, pname
    patterns = [re.compile(p) for p in v.get("removed_patterns", [])]
    assert not [n for n in args if any(p.search(n) for p in patterns)]
    if name == "m05":
        return  # another width everywhere: only the listed facts apply
    # everything else is the base network's, name for name and shape for shape
    base = {n: s for n, s in params_contract[v["base"]]["arguments"]}
    changed = set(v["arguments"]) | set(v["removed"]) | {n for n in args if "_se_" in n}
    same = {n: s for n, s in args.items() if n not in changed and n in base}
    assert same == {n: base[n] for n in same}
    if v["base"] != v["network"]:
        return  # another depth: the base has units this one lacks (listed as absent)
    head = {"bn1_", "pre_fc1_", "fc1_", "relu1_", "conv_6dw7_7_", "conv0_"}
    gone = set(base) - set(args) - set(v["removed"]) - {n for n in base if any(p.search(n) for p in patterns)}
    assert gone <= {n for n in base if any(n.startswith(h) for h in head)}


def test_version_flags_reach_the_graph(tiny_data, tmp_path):
    from recognition.run_plan import prepare_run
    from recognition.train_softmax import softmax_config

    d = os.path.dirname(tiny_data["rec"])
    plan = prepare_run(softmax_config(["--network", "y1", "--data-dir", d, "--per-batch-size", "8"]))
    args, _ = _shapes(get_symbol(plan.network, emb_size=plan.emb_size, **plan.network_options))
    assert args["pre_fc1_weight"] == [512, 512 * 7 * 7] and "conv_6dw7_7_conv2d_weight" not in args  # insightface E
    plan = prepare_run(softmax_config(["--network", "y1", "--data-dir", d, "--per-batch-size", "8",
                                       "--version-output", "GDC", "--emb-size", "128"]))
    args, _ = _shapes(get_symbol(plan.network, emb_size=plan.emb_size, **plan.network_options))
    assert args["conv_6dw7_7_conv2d_weight"] == [512, 1, 7, 7] and args["pre_fc1_weight"] == [128, 512]
    with pytest.raises(ToolkitError, match=r"net_unit=4 is not built here; supported: 1, 2, 3$"):
        prepare_run(softmax_config(["--network", "r18", "--data-dir", d, "--version-unit", "4"]))
    with pytest.raises(ToolkitError, match=r"the graph comes from the checkpoint"):
        prepare_run(softmax_config(["--network", "tiny", "--data-dir", d, "--version-output", "E",
                                    "--pretrained", _tiny_checkpoints(str(tmp_path), (0,)) + ",0"]))


@pytest.mark.parametrize("keys, message", [
    ({"net_output": "Z"}, r"'Z': not built here; supported: E, GDC, F, G, H, I, J, GAP$"),
    ({"net_se": 1}, r"net_se=1 has no meaning for fmobilefacenet networks; it takes bn_mom, net_act"),
    ({"net_act": "swish"}, r"net_act='swish' is not built here; supported: prelu, relu"),
])
def test_network_options_refuse_in_one_line(keys, message):
    with pytest.raises(ToolkitError, match=message):
        network_options("y1", keys)
    assert network_options("r50", {"net_blocks": [1, 4, 6, 2]}) == {}  # insightface's fresnet ignores net_blocks


def test_bn_mom_reaches_every_batchnorm():
    from recognition.common import symbol_graph

    sym = get_symbol("tiny", prelu="stock", **network_options("tiny", {"bn_mom": 0.8}))
    moms = {float(n["attrs"]["momentum"]) for n in symbol_graph(sym)["nodes"] if n["op"] == "BatchNorm"}
    assert moms == {0.8}


def _write_sample_config(path):
    """insightface's sample_config.py layout (module-level easydicts), with its keys and values."""
    lines = ["from easydict import EasyDict as edict", ""]
    for section in ("config", "network", "dataset", "loss", "default"):
        lines.append(f"{section} = edict()")
        for key, value in SAMPLE[section].items():
            if section in ("config", "default"):
                lines.append(f"{section}.{key} = {value!r}")
            else:
                lines.append(f"{section}.{key} = edict()")
                for sub, sub_value in value.items():
                    lines.append(f"{section}.{key}.{sub} = {sub_value!r}")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def test_sample_config_py_is_read_unchanged(tmp_path, caplog, tiny_data):
    path = str(tmp_path / "sample_config.py")
    _write_sample_config(path)
    with caplog.at_level(logging.WARNING, logger="recognition"):
        cfg = resolve_config({"network": "y1", "loss": "cosface"}, path)
    skipped = sorted(r.getMessage().split("key ")[1].split(" ")[0] for r in caplog.records)
    assert skipped == ["'ce_loss'", "'densenet_dropout'", "'densenet_dropout'", "'triplet_bag_size'",
                       "'triplet_bag_size'", "'triplet_max_ap'", "'triplet_max_ap'", "'workspace'"]
    assert (cfg.emb_size, cfg.net_output, cfg.bn_mom, cfg.image_size) == (128, "GDC", 0.9, (112, 112))
    kw = cfg.loss_kwargs
    assert (kw["margin_s"], kw["margin_a"], kw["margin_m"], kw["margin_b"]) == (64.0, 1.0, 0.0, 0.35)
    assert network_options("y1", {k: cfg[k] for k in ("net_output", "net_blocks", "net_act", "bn_mom")}) == \
        {"head": "GDC", "blocks": [1, 4, 6, 2], "act_type": "prelu", "bn_mom": 0.9}
    r100 = resolve_config({"network": "r100"}, path)
    assert (r100.net_output, r100.emb_size, r100.loss_kwargs["margin_m"]) == ("E", 512, 0.5)
    from recognition.run_plan import prepare_run

    plan = prepare_run(resolve_config({"network": "r18", "data_dir": os.path.dirname(tiny_data["rec"]),
                                       "per_batch_size": 8}, path))  # the whole file passes the run plan's checks
    assert dict(plan.network_options) == {"head": "E", "se": 0, "input": 1, "unit": 3, "act_type": "prelu",
                                         "bn_mom": 0.9}


def test_set_takes_insightface_key_names():
    cfg = resolve_config({}, sets=["loss.arcface.loss_m2=0.45", "config.bn_mom=0.8", "loss_s=32"])
    assert (cfg.loss_kwargs["margin_m"], cfg.bn_mom, cfg.loss_kwargs["margin_s"]) == (0.45, 0.8, 32)
    with pytest.raises(ToolkitError, match=r"^--set: key 'workspace' has no effect here"):
        resolve_config({}, sets=["config.workspace=128"])
    with pytest.raises(ToolkitError, match=r"network.r50.num_layers=34 contradicts the name r50"):
        resolve_config({}, sets=["network.r50.num_layers=34"])


def test_flops_match_a_hand_count():
    data = mx.sym.var("data")
    x = mx.sym.Convolution(data, num_filter=4, kernel=(3, 3), pad=(1, 1), no_bias=True, name="c1")
    x = mx.sym.Convolution(x, num_filter=4, kernel=(3, 3), pad=(1, 1), num_group=4, name="c2")
    x = mx.sym.FullyConnected(x, num_hidden=10, no_bias=True, name="fc1")
    from recognition.flops import count_flops, count_params, flops_str

    # c1: (2*3*3*3 - 1) per output x 8*8*4 outputs = 53 * 256; c2 (depthwise, bias): 2*4*3*3 * 8*8*4 / 4 = 72 * 64;
    # fc1 (no bias): 2 * 256 * 10 - 10
    assert count_flops(x, (1, 3, 8, 8)) == 53 * 256 + 72 * 64 + 2 * 256 * 10 - 10
    assert count_params(x, (1, 3, 8, 8)) == 4 * 3 * 9 + (4 * 9 + 4) + 10 * 256
    assert (flops_str(439821056), flops_str(24169929728), flops_str(950)) == ("439.8M", "24.2G", "950.0")


def test_flops_cli_on_the_registry(capsys):
    from recognition.common import run_cli
    from recognition.flops import main

    assert run_cli(main, ["--network", "y1"]) == 0
    out = capsys.readouterr().out  # insightface's MobileFaceNet: about 440 MFLOPs, 1.0M parameters
    assert "FLOPs 439.8M" in out and "parameters 1003264" in out
    assert run_cli(main, ["--network", "y1", "--version-output", "Q"]) == 2


def _tiny_checkpoints(folder, epochs):
    from recognition.common import save_checkpoint

    sym = get_symbol("tiny", prelu="stock")
    args, aux = _shapes(sym)
    rng = np.random.default_rng(0)
    prefix = os.path.join(folder, "model")
    for e in epochs:
        arg = {n: mx.nd.array(rng.normal(0, 0.1, s)) for n, s in args.items() if n != "data"}
        aux_p = {n: mx.nd.array(np.ones(s) if n.endswith("var") else np.zeros(s)) for n, s in aux.items()}
        save_checkpoint(prefix, e, sym, arg, aux_p)
    return prefix


def test_model_epochs_follow_insightfaces_listing(tmp_path):
    from recognition.verification_compat import model_epochs

    for e in (1, 2, 3, 10):
        (tmp_path / f"model-{e:04d}.params").write_bytes(b"")
    (tmp_path / "other-0005.params").write_bytes(b"")
    prefix = str(tmp_path / "model")
    assert model_epochs(prefix) == (prefix, [10, 3, 2, 1])
    assert model_epochs(prefix, (1, 3)) == (prefix, [3, 2])
    assert model_epochs(prefix, (0, 9)) == (prefix, [10, 3, 2, 1])  # not more than B: all
    assert model_epochs(prefix + ",1|3") == (prefix, [1, 3])


def test_insightface_verification_call_prints_its_lines(tiny_data, tmp_path, capsys, monkeypatch):
    from recognition.verification import Embedder, read_bin, test_bin
    from recognition.verification_compat import is_insightface_argv, main

    d = os.path.dirname(tiny_data["rec"])
    prefix = _tiny_checkpoints(str(tmp_path), (1, 2))
    argv = ["--data-dir", d, "--model", prefix, "--target", "synth_val", "--batch-size", "16"]
    assert is_insightface_argv(argv) and not is_insightface_argv(["--model", prefix + ",1", "--target", "a.bin"])
    assert main(argv) == 0
    lines = capsys.readouterr().out.splitlines()
    flip = [ln for ln in lines if ln.startswith("[synth_val]Accuracy-Flip: ")]
    assert len(flip) == 2 and lines[-1].startswith("Max of [synth_val] is ")
    images, issame = read_bin(os.path.join(d, "synth_val.bin"))
    accs = [test_bin(([images], issame), Embedder.from_checkpoint(prefix, e, batch_size=16), 16)["acc"] for e in (2, 1)]
    assert [float(ln.split()[1].split("+-")[0]) for ln in flip] == [round(a, 5) for a in accs]  # newest first
    assert lines[-1] == f"Max of [synth_val] is {max(accs):1.5f}"
    monkeypatch.chdir(tmp_path)
    assert main(["--data-dir", d, "--model", prefix + ",1", "--target", "synth_val", "--mode", "2"]) == 0
    with open(tmp_path / "temp.bin", "rb") as f:
        emb, same = pickle.load(f)
    want = test_bin(([images], issame), Embedder.from_checkpoint(prefix, 1, batch_size=32), 32)["embeddings"]
    assert np.allclose(emb, want, atol=1e-5) and list(same) == list(issame)


def test_gpu_flag_names_itself_when_no_gpu_is_visible(tiny_data, tmp_path):
    from recognition.verification_compat import main

    if mx.context.num_gpus() > 0:
        pytest.skip("a GPU is visible")
    prefix = _tiny_checkpoints(str(tmp_path), (1,))
    d = os.path.dirname(tiny_data["rec"])
    with pytest.raises(ToolkitError, match=r"^--gpu 3: .*omit --gpu to use CUDA_VISIBLE_DEVICES or the CPU$"):
        main(["--data-dir", d, "--model", prefix + ",1", "--target", "synth_val", "--gpu", "3"])


def test_image_size_the_network_cannot_take_is_one_line(tiny_data):
    from recognition.run_plan import prepare_run
    from recognition.train_softmax import softmax_config

    base = ["--data-dir", os.path.dirname(tiny_data["rec"]), "--per-batch-size", "8"]
    with pytest.raises(ToolkitError, match=r"^--image-size 96,96: network y1 cannot take this input \(.*use 112,112$"):
        prepare_run(softmax_config(base + ["--network", "y1", "--version-output", "GDC", "--image-size", "96,96"]))
    with pytest.raises(ToolkitError, match=r"^--image-size 96,112: must be square"):
        prepare_run(softmax_config(base + ["--network", "tiny", "--image-size", "96,112"]))
    assert prepare_run(softmax_config(base + ["--network", "tiny", "--image-size", "96,96"])).image_size == (96, 96)


def test_python_m_recognition_verification_takes_insightfaces_call(tiny_data, tmp_path, capsys):
    from recognition import verification
    from recognition.common import run_cli

    d = os.path.dirname(tiny_data["rec"])
    prefix = _tiny_checkpoints(str(tmp_path), (1,))
    assert run_cli(verification.main, ["--data-dir", d, "--model", prefix, "--target", "synth_val"]) == 0
    out = capsys.readouterr().out
    assert "[synth_val]Accuracy-Flip: " in out and "Max of [synth_val] is " in out
    assert run_cli(verification.main, ["--model", prefix + ",1", "--target", os.path.join(d, "synth_val.bin")]) == 0
    assert "Max of" not in capsys.readouterr().out  # this toolkit's own call keeps its own report
    with pytest.raises(SystemExit):
        verification.main(["--mod", prefix + ",1", "--target", "x.bin"])  # no abbreviations


def test_stages_in_passes_count_the_images_the_iterator_keeps(tmp_path, monkeypatch, tiny_data):
    """``--stages head:Xep`` -> batches from the rec's image count: kept by --images-filter, over the global batch
    (x DMLC_NUM_WORKER under a dist kvstore); the plan carries plain step counts."""
    import cv2

    from recognition.freeze import Stage
    from recognition.rec import write_dataset
    from recognition.run_plan import epoch_steps, prepare_run

    jpg = cv2.imencode(".jpg", np.full((112, 112, 3), 128, np.uint8))[1].tobytes()
    sizes = [5, 3, 10]  # 18 images; identities with >= 5 images keep 15
    d = str(tmp_path / "uneven")
    write_dataset(d, [(c, jpg) for c, n in enumerate(sizes) for _ in range(n)])
    assert epoch_steps(resolve_config({}), d, 4) == 18 // 4
    assert epoch_steps(resolve_config({"data_images_filter": 5}), d, 4) == 15 // 4
    assert epoch_steps(resolve_config({}), d, 64) == 1  # fewer images than a batch: still one step
    monkeypatch.setenv("DMLC_NUM_WORKER", "2")
    assert epoch_steps(resolve_config({}), d, 4, "dist_sync") == 18 // 8
    assert epoch_steps(resolve_config({}), d, 4, "device") == 18 // 4  # a local kvstore has one worker
    monkeypatch.delenv("DMLC_NUM_WORKER")
    # end to end through the run plan: tiny_data holds 12 x 8 = 96 images, batch 8 -> 12 steps a pass
    plan = prepare_run(resolve_config({"network": "y1", "data_dir": os.path.dirname(tiny_data["rec"]),
                                       "per_batch_size": 8, "stages": "head:0.5ep@0.1,all:2ep"}))
    assert list(plan.stages) == [Stage("head", 6, 0.1), Stage("all", 24)]
    assert plan.max_total == 30 and plan.verbose == 2000 and plan.pass_steps == 12  # verbose: the default
    # --verbose in passes too (a verification round per pass); a plain number still works, as text or int
    base = {"network": "y1", "data_dir": os.path.dirname(tiny_data["rec"]), "per_batch_size": 8}
    assert prepare_run(resolve_config({**base, "verbose": "0.5ep"})).verbose == 6
    assert prepare_run(resolve_config({**base, "verbose": "25"})).verbose == 25
    assert prepare_run(resolve_config(base)).pass_steps is None  # nothing in passes: the data is not counted
    assert prepare_run(resolve_config({**base, "verbose": 7})).verbose == 7
    with pytest.raises(ToolkitError, match=r"^--verbose 'often': is not an integer step count \(or Xep"):
        prepare_run(resolve_config({**base, "verbose": "often"}))
    with pytest.raises(ToolkitError, match=r"^--verbose '-1ep': passes over the data must be a number > 0"):
        prepare_run(resolve_config({**base, "verbose": "-1ep"}))
    with pytest.raises(ToolkitError, match=r"^--verbose 0: must be > 0"):
        prepare_run(resolve_config({**base, "verbose": "0"}))
