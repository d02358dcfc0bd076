"""insightface's IR-ResNet ("fresnet", ArcFace paper section 3.2) with the basic IR unit 'v3' and output head 'E'.

Variants (units per stage, widths): r18 [2,2,2,2], r34 [3,4,6,3], r50 [3,4,14,3], r100 [3,13,30,3], all with
widths 64/64/128/256/512; ``tiny`` is a narrow one (16/16/32/64/128, one unit per stage) for tests and CPU demos.
Input (N, 3, 112, 112) RGB 0-255; the stem keeps 112x112, four stride-2 stages bring it to 7x7.
"""
from __future__ import annotations

from typing import List, Sequence, Tuple

import mxnet as mx

from recognition.backbones.layers import act, batchnorm, conv, embedding_head, normalise_input
from recognition.common import ToolkitError

# name -> (units per stage, widths [stem, stage1..stage4], default embedding size)
SPECS = {
    "r18": ([2, 2, 2, 2], [64, 64, 128, 256, 512], 512),
    "r34": ([3, 4, 6, 3], [64, 64, 128, 256, 512], 512),
    "r50": ([3, 4, 14, 3], [64, 64, 128, 256, 512], 512),
    "r100": ([3, 13, 30, 3], [64, 64, 128, 256, 512], 512),
    "tiny": ([1, 1, 1, 1], [16, 16, 32, 64, 128], 128),
}


def ir_unit(data: mx.sym.Symbol, num_filter: int, stride: Tuple[int, int], dim_match: bool, name: str,
            prelu_mode: str, bn_mom: float, act_type: str) -> mx.sym.Symbol:
    """IR basic unit 'v3': BN-Conv3x3-BN-PReLU-Conv3x3(stride)-BN plus a shortcut (1x1 conv+BN when shapes change).

    Inputs: (N, C_in, H, W). Outputs: (N, num_filter, H/stride, W/stride).
    """
    body = batchnorm(data, name + "_bn1", bn_mom=bn_mom)
    body = conv(body, name + "_conv1", num_filter, kernel=(3, 3), pad=(1, 1))
    body = batchnorm(body, name + "_bn2", bn_mom=bn_mom)
    body = act(body, name + "_relu1", num_filter, act_type, prelu_mode)
    body = conv(body, name + "_conv2", num_filter, kernel=(3, 3), stride=stride, pad=(1, 1))
    body = batchnorm(body, name + "_bn3", bn_mom=bn_mom)
    if dim_match:
        shortcut = data
    else:
        shortcut = conv(data, name + "_conv1sc", num_filter, stride=stride)
        shortcut = batchnorm(shortcut, name + "_sc", bn_mom=bn_mom)
    return body + shortcut


def build(name: str, emb_size: int, prelu: str = "fast", units: Sequence[int] = None,
          widths: Sequence[int] = None, dropout: float = 0.4, bn_mom: float = 0.9,
          act_type: str = "prelu") -> mx.sym.Symbol:
    """Symbol from ``data`` (N, 3, 112, 112) to ``fc1_output`` (N, emb_size).

    ``units``/``widths`` override the variant's table entry (four stages; widths = stem + four stages).
    """
    spec_units, spec_widths, _ = SPECS[name]
    units = list(units or spec_units)
    widths = list(widths or spec_widths)
    if len(units) != 4 or len(widths) != 5:
        raise ToolkitError(f"network {name}: units needs 4 entries and widths 5 (got {units}, {widths})")
    data = normalise_input(mx.sym.var("data"))
    body = conv(data, "conv0", widths[0], kernel=(3, 3), pad=(1, 1))
    body = batchnorm(body, "bn0", bn_mom=bn_mom)
    body = act(body, "relu0", widths[0], act_type, prelu)
    for stage, num_units in enumerate(units, start=1):
        for unit in range(1, num_units + 1):
            first = unit == 1
            body = ir_unit(body, widths[stage], (2, 2) if first else (1, 1), not first,
                           f"stage{stage}_unit{unit}", prelu, bn_mom, act_type)
    return embedding_head(body, emb_size, "E", bn_mom=bn_mom, dropout=dropout)


def stages(name: str) -> List[Tuple[str, str]]:
    """Freezing groups from input to embedding: stem, stage1..stage4, embedding."""
    return ([("stem", r"^(conv0|bn0|relu0)_")]
            + [(f"stage{i}", rf"^stage{i}_") for i in range(1, 5)]
            + [("embedding", r"^(bn1|pre_fc1|fc1)_")])
