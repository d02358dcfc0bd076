"""insightface compatibility: every flag of its five scripts (tests/data/insightface_flags.json, read from their
argparse definitions) is accepted with insightface's meaning and default, or refused in one line; its config keys
and --set names are understood."""
import json
import logging
import os

import pytest

from recognition.common import ToolkitError
from recognition.train import build_argparser, config_from_args
from recognition.train_config import resolve_config
from recognition.train_parall import check_parallel_config, parall_config
from recognition.train_softmax import softmax_config
from recognition.verification_compat import parse_request

with open(os.path.join(os.path.dirname(__file__), "data", "insightface_flags.json")) as _f:
    FLAGS = json.load(_f)


def _train_config(argv):
    return config_from_args(build_argparser(prog="train.py").parse_args(argv))


def _parall_config(argv):
    cfg = parall_config(argv)
    check_parallel_config(cfg)
    return cfg


def _slim(argv):
    from deploy.model_slim import build_parser

    return vars(build_parser().parse_args(argv))


RESOLVE = {"train_softmax": softmax_config, "train_softmax_later": softmax_config, "train": _train_config,
           "train_parall": _parall_config, "train_parall_later": _parall_config,
           "verification": lambda a: parse_request(a), "model_slim": _slim}
BASE = {"model_slim": ["--model", "/tmp/ifr_base/model,0"]}
CASES = [(script, f) for script, entry in FLAGS["scripts"].items() for f in entry["flags"]]


@pytest.mark.parametrize("script, flag", CASES, ids=[f"{s}{f['flag']}={'/'.join(f['probe'])}" for s, f in CASES])
def test_every_insightface_flag_changes_something_or_is_refused(script, flag):
    resolve = RESOLVE[script]
    base = BASE.get(script, [])
    argv = [flag["flag"]] + flag["probe"]
    base_out = resolve(base)
    if script != "model_slim":  # model_slim's only flag is --model: the probe replaces the base value
        argv = base + argv
    if flag["status"] == "refused":
        with pytest.raises(ToolkitError) as err:
            resolve(argv)
        text = str(err.value)
        assert "\n" not in text and flag["flag"] in text
        assert any(word in text for word in ("use ", "drop", "use --", "python ")), text  # names the replacement
        return
    out = resolve(argv)
    assert out != base_out, f"{flag['flag']} {flag['probe']} was accepted and changed nothing"


def test_flag_list_covers_every_parser_flag_of_the_scripts():
    """The data list is complete for the flags our train_softmax parser adds for insightface (no flag in the
    parser's insightface groups is missing from the list)."""
    listed = {f["flag"] for e in ("train_softmax", "train_softmax_later") for f in FLAGS["scripts"][e]["flags"]}
    parser = build_argparser(legacy=True)
    groups = [g for g in parser._action_groups if "train_softmax.py flags" in (g.title or "")]
    ours = {opt for g in groups for a in g._group_actions for opt in a.option_strings}
    assert ours - listed <= {"--triplet-alpha", "--center-loss-weight", "--center-alpha", "--mining-interval",
                             "--bag-identities", "--teacher", "--distill-loss", "--distill-weight", "--teacher-cache"}


@pytest.mark.parametrize("argv", [["--per-batch", "8"], ["--loss-t", "4"], ["--version-out", "E"]])
def test_train_parsers_refuse_abbreviations(argv):
    with pytest.raises(SystemExit):
        build_argparser(legacy=True).parse_args(argv)


def test_verification_mode_is_not_read_as_model():
    with pytest.raises(SystemExit):  # insightface's --mode must never be an abbreviation of --model
        parse_request(["--mod", "1"])
    assert parse_request(["--mode", "2"]).mode == 2
    with pytest.raises(ToolkitError, match=r"^--mode 1: insightface's bad-case mosaics"):
        parse_request(["--mode", "1"])


# insightface train_softmax.py flag -> how its default reads in our resolved configuration
def _softmax_default(cfg, flag):
    from recognition.objectives import make_loss_config

    key = flag[2:].replace("-", "_")
    table = {"version_se": cfg.net_se, "version_input": cfg.net_input, "version_output": cfg.net_output,
             "version_unit": cfg.net_unit, "version_act": cfg.net_act, "image_size": ",".join(map(str, cfg.image_size)),
             "bn_mom": 0.9 if cfg.bn_mom is None else cfg.bn_mom,  # None: the builders' 0.9
             "rand_mirror": int(cfg.data_rand_mirror), "cutoff": cfg.data_cutoff, "color": cfg.data_color,
             "target": ",".join(cfg.val_targets), "loss_type": {"arcface": 4}[cfg.loss],
             "margin_m": cfg.loss_kwargs["margin_m"], "margin_s": cfg.loss_kwargs["margin_s"],
             "margin_a": cfg.loss_kwargs["margin_a"], "margin_b": cfg.loss_kwargs["margin_b"],
             "easy_margin": int(cfg.loss_kwargs.get("easy_margin", False)), "data_dir": cfg.data_dir or "",
             "pretrained": cfg.pretrained or "",
             "fc7_no_bias": make_loss_config("softmax", **{k: v for k, v in cfg.loss_kwargs.items()
                                                           if k == "fc7_no_bias"}).fc7_no_bias}
    return table[key] if key in table else cfg.get(key)


SKIP_DEFAULT = {"--prefix": "runs go to MODELS_ROOT/NETWORK-LOSS-DATASET/model (docs/COMPAT.md)",
                "--lr-steps": "derived from the batch size: test_lr_steps_follow_the_batch_size",
                "--use-deformable": "not built (0 is what runs)", "--ce-loss": "refused",
                "--margin": "refused (LSoftmax)", "--beta": "refused", "--beta-min": "refused",
                "--beta-freeze": "refused", "--gamma": "refused", "--power": "refused", "--scale": "refused"}


@pytest.mark.parametrize("flag", [f for f in FLAGS["scripts"]["train_softmax"]["flags"]
                                  if f["flag"] not in SKIP_DEFAULT], ids=lambda f: f["flag"])
def test_train_softmax_defaults_are_insightfaces(flag):
    assert _softmax_default(softmax_config([]), flag["flag"]) == flag["default"]


def test_train_defaults_are_sample_configs():
    cfg = resolve_config({})
    for key, want in FLAGS["sample_config"]["default"].items():
        assert (cfg[key] or "" if want == "" else cfg[key]) == want, key


def test_lr_steps_follow_the_batch_size(tiny_data):
    from recognition.run_plan import prepare_run

    d = os.path.dirname(tiny_data["rec"])
    for loss_type, base in (("4", (100000, 140000, 160000)), ("0", (40000, 60000, 80000))):
        cfg = softmax_config(["--network", "tiny", "--data-dir", d, "--per-batch-size", "8", "--loss-type", loss_type,
                              "--ctx", "cpu:0,cpu:1"])
        assert prepare_run(cfg).lr_steps == tuple(int(s * 512.0 / 16) for s in base)  # batch 8 x 2 devices
    cfg = softmax_config(["--network", "tiny", "--data-dir", d, "--per-batch-size", "8", "--lr-steps", "30,60"])
    assert prepare_run(cfg).lr_steps == (30, 60)


@pytest.mark.parametrize("config_of", [_train_config, softmax_config], ids=["train", "train_softmax"])
def test_default_targets_are_skipped_named_ones_must_exist(config_of, tiny_data, caplog):
    from recognition.run_plan import prepare_run

    d = os.path.dirname(tiny_data["rec"])
    base = ["--network", "tiny", "--data-dir", d, "--per-batch-size", "8"]
    with caplog.at_level(logging.WARNING, logger="recognition"):
        plan = prepare_run(config_of(base))
    assert plan.targets == ()
    skipped = [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()]
    assert [m.split()[2] for m in skipped] == ["lfw:", "cfp_fp:", "agedb_30:"]
    with pytest.raises(ToolkitError, match=r"^--target lfw: verification set .*lfw.bin does not exist$"):
        prepare_run(config_of(base + ["--target", "lfw"]))
    assert prepare_run(config_of(base + ["--target", "synth_val"])).targets == (os.path.join(d, "synth_val.bin"),)


def test_loss_type_defaults_are_train_softmaxs():
    cfg = softmax_config(["--loss-type", "2"])
    assert (cfg.loss, cfg.loss_kwargs["margin_b"], cfg.loss_kwargs["margin_m"]) == ("cosface", 0.5, 0.0)
    cfg = softmax_config(["--loss-type", "5"])
    kw = cfg.loss_kwargs
    assert (cfg.loss, kw["margin_a"], kw["margin_m"], kw["margin_b"], kw["margin_s"]) == ("combined", 1.0, 0.5, 0.0,
                                                                                          64.0)
    with pytest.raises(ToolkitError, match=r"^--loss-type 1: insightface's LSoftmax .* use train.py --loss sphereface"):
        softmax_config(["--loss-type", "1"])


def test_emb_size_is_512_unless_the_checkpoint_or_a_non_insightface_net_decides():
    assert softmax_config(["--network", "y1"]).emb_size == 512  # insightface's train_softmax: --emb-size 512
    assert softmax_config(["--network", "y1", "--pretrained", "/x/model,0"]).emb_size is None  # the checkpoint's
    assert softmax_config(["--network", "tiny"]).emb_size is None  # tiny's own width
    assert softmax_config(["--network", "y1", "--emb-size", "128"]).emb_size == 128


def test_compat_table_lists_every_flag():
    with open(os.path.join(os.path.dirname(os.path.dirname(__file__)), "docs", "COMPAT.md")) as f:
        table = f.read()
    for _, flag in CASES:
        assert f"| `{flag['flag']}` |" in table, flag["flag"]


def test_count_flops_flag_and_bare_pretrained_prefix(tiny_data, tmp_path):
    import mxnet as mx

    from recognition.backbones import get_symbol
    from recognition.common import save_checkpoint
    from recognition.run_plan import prepare_run

    assert _train_config(["--count-flops"]).count_flops is True and _train_config([]).count_flops is False
    d = os.path.dirname(tiny_data["rec"])
    prefix = str(tmp_path / "model")
    sym = get_symbol("tiny", prelu="stock")
    shapes, _, aux = sym.infer_shape(data=(1, 3, 112, 112))
    save_checkpoint(prefix, 1, sym, {n: mx.nd.zeros(s) for n, s in zip(sym.list_arguments(), shapes) if n != "data"},
                    {n: mx.nd.ones(s) for n, s in zip(sym.list_auxiliary_states(), aux)})
    plan = prepare_run(_train_config(["--data-dir", d, "--pretrained", prefix, "--per-batch-size", "8"]))
    assert plan.pretrained == f"{prefix},1"  # insightface's --pretrained-epoch default 1
    with pytest.raises(ToolkitError, match=r"model-0002.params does not exist"):
        prepare_run(_train_config(["--data-dir", d, "--pretrained", prefix, "--pretrained-epoch", "2"]))
