"""An onnxruntime inference backend built in memory from a checkpoint graph (the same export as ``export_onnx``).

    emb = OnnxEmbedder(symbol, arg_params, aux_params, batch_size=32, data_shape=(3, 112, 112))
    feats = emb(x)      # x float32 (N, 3, H, W) RGB 0-255 -> un-normalised fc1_output (N, E), like Embedder

The graph is exported with a dynamic batch, repaired (:mod:`deploy.onnx_fix`) and, unless ``check=False``,
compared once with MXNet's embeddings of the same random faces (cosine > 0.99999, as ``export_onnx`` requires).
Intra-op threads default to the CPUs this process may use. ``set_params`` re-exports (a training run's new
weights). Needs ``onnx<1.16`` and ``onnxruntime`` (``pip install -e .[onnx]``).
"""
from __future__ import annotations

import os
from typing import Optional, Sequence

import numpy as np

from recognition.common import ToolkitError


def default_threads() -> int:
    """CPUs this process may run on (``sched_getaffinity``), else ``os.cpu_count()``."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


class OnnxEmbedder:
    """``Embedder``'s interface (``__call__``/``embed``, ``embedding_size``, ``set_params``) on onnxruntime.

    Inputs: float32 (N, C, H, W) RGB 0-255, any N (run ``batch_size`` at a time). Outputs: float32 (N, E).
    """

    backend = "onnx"

    def __init__(self, symbol, arg_params: dict, aux_params: dict, batch_size: int = 32,
                 data_shape: Sequence[int] = (3, 112, 112), threads: Optional[int] = None, check: bool = True,
                 opset: int = 13):
        self.symbol, self.batch_size = symbol, int(batch_size)
        self.data_shape = tuple(int(d) for d in data_shape)
        self.threads = int(threads) if threads else default_threads()
        self.opset, self.check = opset, check
        self.set_params(arg_params, aux_params)

    def set_params(self, arg_params: dict, aux_params: dict) -> None:
        """Export the graph with these parameters and open a new onnxruntime session on it."""
        from deploy.export_onnx import MIN_COSINE, _import_onnx, build_onnx, compare_embeddings

        _, ort = _import_onnx()
        blob, self.fixes = build_onnx(self.symbol, arg_params, aux_params, (1,) + self.data_shape, self.opset,
                                      dynamic_batch=True)
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        opts.intra_op_num_threads = self.threads
        opts.inter_op_num_threads = 1
        try:
            self.session = ort.InferenceSession(blob, sess_options=opts, providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph types
            raise ToolkitError(f"onnxruntime rejects the exported graph: {str(exc).splitlines()[0]}") from None
        self._in = self.session.get_inputs()[0].name
        self.embedding_size = int(self._run(np.zeros((1,) + self.data_shape, np.float32)).shape[1])
        if self.check:
            from recognition.verification import Embedder

            x = np.random.RandomState(0).uniform(0, 255, (2,) + self.data_shape).astype(np.float32)
            ref = Embedder(self.symbol, arg_params, aux_params, batch_size=2, data_shape=self.data_shape,
                           optimize=False)(x)
            stats = compare_embeddings(ref, self._run(x))
            if not stats["min_cosine"] > MIN_COSINE:
                raise ToolkitError(f"--backend onnx: onnxruntime embeddings differ from MXNet's (min cosine "
                                   f"{stats['min_cosine']:.6f}, need > {MIN_COSINE}); use --backend mxnet")

    def _run(self, x: np.ndarray) -> np.ndarray:
        return self.session.run(None, {self._in: x})[0]

    def __call__(self, x) -> np.ndarray:
        x = x.asnumpy() if hasattr(x, "asnumpy") else np.asarray(x)
        if x.ndim != 4 or tuple(x.shape[1:]) != self.data_shape:
            raise ToolkitError(f"OnnxEmbedder: expected input (N, {', '.join(map(str, self.data_shape))}), "
                               f"got {tuple(x.shape)}")
        x = np.ascontiguousarray(x, dtype=np.float32)
        outs = [self._run(x[s:s + self.batch_size]) for s in range(0, x.shape[0], self.batch_size)]
        return np.concatenate(outs).astype(np.float32, copy=False) if outs else \
            np.zeros((0, self.embedding_size), np.float32)

    embed = __call__


__all__ = ["OnnxEmbedder", "default_threads"]
