"""train_softmax.py: insightface's --loss-type flag set mapped onto the shared trainer."""
import os

import numpy as np
import pytest

from recognition import train_softmax
from recognition.args import LOSS_TYPES, legacy_loss_values
from recognition.common import ToolkitError, load_checkpoint, run_cli
from recognition.heads import LOSS_TYPE_NAMES
from recognition.metrics_log import read_metrics
from recognition.train import build_argparser


def _legacy(*argv):
    return legacy_loss_values(build_argparser(legacy=True).parse_args(list(argv)))


def test_loss_type_table_agrees_with_heads():
    assert LOSS_TYPES == LOSS_TYPE_NAMES


@pytest.mark.parametrize("argv, want", [
    (["--loss-type", "4", "--margin-s", "32", "--margin-m", "0.4"], dict(loss="arcface", margin_s=32.0, margin_m=0.4)),
    (["--loss-type", "2", "--margin-m", "0.35"], dict(loss="cosface", margin_b=0.35)),
    (["--loss-type", "5", "--margin-a", "1.0", "--margin-m", "0.3", "--margin-b", "0.2"],
     dict(loss="combined", margin_a=1.0, margin_m=0.3, margin_b=0.2)),
    (["--loss-type", "13", "--margin-m", "0.3"], dict(loss="atriplet", triplet_alpha=0.3)),
    (["--loss-type", "4", "--easy-margin", "1"], dict(loss="arcface", easy_margin=True)),
])
def test_legacy_flags_map_to_loss_config(argv, want):
    assert _legacy(*argv) == want


@pytest.mark.parametrize("argv, flag", [(["--loss-type", "0", "--easy-margin", "1"], "--easy-margin"),
                                        (["--loss-type", "4", "--margin-a", "1.2"], "--margin-a"),
                                        (["--loss-type", "2", "--margin-b", "0.2"], "--margin-b")])
def test_margins_the_loss_type_does_not_read_are_refused(argv, flag):
    with pytest.raises(ToolkitError, match=f"^{flag}: --loss-type .* does not use it .*use --loss-type 5"):
        _legacy(*argv)


def test_softmax_run_writes_checkpoint_with_fc7_bias(tiny_data, tmp_path):
    d = os.path.dirname(tiny_data["rec"])
    prefix = os.path.join(tmp_path, "m", "model")
    argv = ["--network", "tiny", "--loss-type", "0", "--data-dir", d, "--target", "synth_val", "--prefix", prefix,
            "--per-batch-size", "8", "--max-steps", "2", "--verbose", "100", "--ckpt", "1", "--ckpt-embedding", "0",
            "--fc7-wd-mult", "10", "--lr", "0.05", "--version-act", "prelu", "--set", "count_flops=true"]
    assert run_cli(train_softmax.main, argv) == 0
    sym, arg, _ = load_checkpoint(prefix, 1)
    assert arg["fc7_weight"].shape[0] == 12
    assert "fc7_bias" in arg  # plain softmax keeps insightface's fc7 bias
    assert "softmax_output" in sym.list_outputs()
    recs = read_metrics(os.path.join(tmp_path, "m", "metrics.jsonl"), "train")
    assert len(recs) == 2 and np.isfinite([r["loss"] for r in recs]).all()
    from recognition.backbones import get_symbol
    from recognition.flops import count_flops, flops_str

    with open(os.path.join(tmp_path, "m", "train.log")) as f:  # insightface's count_flops line at train start
        assert f"Network FLOPs: {flops_str(count_flops(get_symbol('tiny', prelu='stock')))}" in f.read()


def test_unknown_loss_type_is_one_line(tiny_data, tmp_path, capsys):
    rc = run_cli(train_softmax.main, ["--loss-type", "3", "--data-dir", os.path.dirname(tiny_data["rec"])])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.startswith("error: --loss-type 3: unknown; choose one of 0 (softmax)")
