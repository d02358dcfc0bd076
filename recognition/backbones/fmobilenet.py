"""MobileNet v1 (Howard et al. 2017, arXiv:1704.04861) as insightface's ``fmobilenet`` with the GDC head (``m1``).

Widths 32..1024 (``multiplier`` 1.0), 256-d embedding. For 112x112 input the first convolution keeps stride 1
(insightface's ``net_input=1``), so the four stride-2 depthwise layers end at 7x7 for the 7x7 GDC.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import mxnet as mx

from recognition.backbones.fmobilefacenet import _Ctx, conv_unit
from recognition.backbones.layers import embedding_head, normalise_input

SPECS = {"m1": 256, "m05": 256}  # insightface config.network: m05 is m1 at multiplier 0.5

# (depthwise stride, pointwise width in units of the base width) for conv_2 .. conv_14
_LAYERS = [(1, 2), (2, 4), (1, 4), (2, 8), (1, 8), (2, 16), (1, 16), (1, 16), (1, 16), (1, 16), (1, 16),
           (2, 32), (1, 32)]


_MULTIPLIER = {"m1": 1.0, "m05": 0.5}


def build(name: str, emb_size: int, prelu: str = "fast", multiplier: Optional[float] = None, bn_mom: float = 0.9,
          act_type: str = "prelu", head: str = "GDC") -> mx.sym.Symbol:
    """Symbol from ``data`` (N, 3, 112, 112) to ``fc1_output`` (N, emb_size); ``multiplier``/``head``: insightface's
    ``net_multiplier``/``net_output`` (``m05``: multiplier 0.5)."""
    ctx = _Ctx(prelu, bn_mom, act_type)
    multiplier = _MULTIPLIER[name] if multiplier is None else float(multiplier)
    base = int(32 * multiplier)
    body = normalise_input(mx.sym.var("data"))
    body = conv_unit(body, ctx, base, "conv_1", kernel=(3, 3), pad=(1, 1))
    channels = base
    for index, (stride, width) in enumerate(_LAYERS, start=2):
        body = conv_unit(body, ctx, channels, f"conv_{index}_dw", kernel=(3, 3), stride=(stride, stride),
                         pad=(1, 1), num_group=channels)
        channels = base * width
        body = conv_unit(body, ctx, channels, f"conv_{index}")
    # insightface's GDC here is get_fc1(..., input_channel=512): 512 groups over the last layer's channels ->
    # weight (512, 2, 7, 7) at multiplier 1 (checked in compat/insightface_params.json), (512, 1, 7, 7) at 0.5
    return embedding_head(body, emb_size, head, in_channels=512, bn_mom=bn_mom, gdc_group=512,
                          act_type=act_type, prelu_mode=prelu)


def stages(name: str) -> List[Tuple[str, str]]:
    """Freezing groups from input to embedding, split at the stride-2 layers."""
    unit = r")_(conv2d|batchnorm|relu)_"
    return [
        ("stem", r"^conv_(1|2_dw|2|3_dw" + unit),
        ("stage1", r"^conv_(3|4_dw|4|5_dw" + unit),
        ("stage2", r"^conv_(5|6_dw|6|7_dw" + unit),
        ("stage3", r"^conv_(7|8_dw|8|9_dw|9|10_dw|10|11_dw|11|12_dw|12|13_dw" + unit),
        ("stage4", r"^conv_(13|14_dw|14" + unit),
        ("embedding", r"^(conv_6dw7_7|bn1|relu1|pre_fc1|fc1)_"),
    ]
