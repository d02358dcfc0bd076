"""The inference form of an embedding graph: BatchNorm folded into its layer, PReLU written with MKLDNN operators.

Why (issue 17): on the real ``model-y1-test2`` at batch 32 the checkpoint's own graph embedded about half as fast
as its ONNX export in onnxruntime. Most of the gap was not convolution: MXNet's ``LeakyReLU(act_type='prelu')``
forward runs a generic broadcast kernel (replacing it by ReLU, for timing only, made y1 ~3x faster). The
same PReLU written as ``x + (1 - gamma) * relu(-x)`` with BatchNorms on unit statistics
(:func:`recognition.backbones.fast_prelu.bn_prelu`, what training already uses) runs on MKLDNN kernels, and
folding each Convolution/FullyConnected + BatchNorm pair into one layer (:mod:`recognition.bn_fold`) removes
~50 passes over the activations. Together: y1 ~2.3x the plain graph, above onnxruntime
(``benchmarks/bench_infer.py``). Embeddings equal the plain graph's to float32 rounding (cosine > 1 - 1e-6).

    g = InferenceGraph(symbol, data_shape=(3, 112, 112))
    arg2, aux2 = g.params(arg_params, aux_params)   # any parameters of ``symbol``; repeatable (no graph work)
    # bind g.symbol with arg2/aux2

MXNet's MKLDNN subgraph fusion (``MXNET_SUBGRAPH_BACKEND=MKLDNN``) was measured too: it fails on insightface
graphs only because its FullyConnected cannot take a 4-D MKLDNN input on the second forward ("We can't generate
TBlob for MKLDNN data"); an explicit ``Flatten`` before the FC avoids that, but it gave no speed on top of this
form (y1 batch 32: within noise), so the toolkit keeps the subgraph backend off.
"""
from __future__ import annotations

from typing import Sequence, Tuple

from recognition.bn_fold import FoldPlan


class InferenceGraph:
    """Graph and parameter transform of an inference-only embedding graph (see the module docstring).

    ``symbol``: any embedding graph (stock or ``bn`` PReLU, cut anywhere); input ``data`` (N, C, H, W).
    Attributes: ``symbol`` (the inference form), ``folded`` (BatchNorm names folded), ``prelu`` (count converted).
    """

    def __init__(self, symbol, data_shape: Sequence[int] = (3, 112, 112)):
        from recognition.backbones.fast_prelu import convert_prelu, count_prelu

        stock = convert_prelu(symbol, "stock")  # a training graph's bn PReLU back to LeakyReLU: one input form
        self._plan = FoldPlan(stock)
        self.folded = self._plan.folded
        self.symbol = convert_prelu(self._plan.symbol, "bn", (1,) + tuple(int(d) for d in data_shape))
        self.prelu = int(count_prelu(self.symbol)["bn"])

    def params(self, arg_params: dict, aux_params: dict) -> Tuple[dict, dict]:
        """``(arg, aux)`` for :attr:`symbol` from the original graph's parameters (unit PReLU states added)."""
        from recognition.backbones.fast_prelu import drop_unit_aux, fill_unit_aux

        arg, aux = self._plan.params(arg_params, drop_unit_aux(aux_params))
        return arg, fill_unit_aux(self.symbol, aux)

    def describe(self) -> str:
        return f"{len(self.folded)} BatchNorm(s) folded, {self.prelu} PReLU(s) as MKLDNN operators"


__all__ = ["InferenceGraph"]
