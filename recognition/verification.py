"""Face verification on insightface ``.bin`` pair sets (LFW, CFP-FP, AgeDB-30) with insightface's maths.

A ``.bin`` is a pickle of ``(list_of_encoded_images, issame_list)``; images ``2i`` and ``2i+1`` form pair ``i``.
Embedding of an image = L2-normalise(emb(img) + emb(horizontally flipped img)); distance = squared L2;
10 folds in order, the threshold is chosen on 9 folds from ``np.arange(0, 4, 0.01)`` and scored on the 10th.

Command::

    python -m recognition.verification --model ../models/model-y1-test2/model,0 --target lfw.bin,cfp_fp.bin
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from recognition.checkpoint_graph import EMBEDDING_NODE as EMBED_NODE  # noqa: F401  (re-exported, one definition)
from recognition.checkpoint_graph import cut_at_embedding
from recognition.common import (
    DefaultsHelpFormatter,
    ToolkitError,
    atomic_write,
    load_checkpoint,
    parse_ctx,
    parse_prefix_epoch,
    run_cli,
)
from recognition.rec import safe_load_pickle  # noqa: F401  (public here too: the one restricted .bin unpickler)
from recognition.thresholds import cosine_from_squared_l2, format_threshold, operating_points, record_thresholds

logger = logging.getLogger("recognition")

THRESHOLDS = np.arange(0, 4, 0.01)
EmbedFn = Callable[[np.ndarray], np.ndarray]


# ------------------------------------------------------------------------------------------------- reading .bin
def read_bin(path: str, image_size: Sequence[int] = (112, 112)) -> Tuple[np.ndarray, np.ndarray]:
    """Decode a ``.bin`` into ``(images uint8 (N, 3, H, W) RGB, issame bool (N/2,))`` after checking its layout."""
    import cv2

    obj = safe_load_pickle(path)
    if not isinstance(obj, (tuple, list)) or len(obj) != 2:
        raise ToolkitError(f"{path}: expected a pickle of (images, issame_list), got {type(obj).__name__}")
    bins, issame = obj
    bins, issame = list(bins), [bool(x) for x in issame]
    if len(bins) % 2:
        raise ToolkitError(f"{path}: odd number of images ({len(bins)}); pairs must be consecutive")
    if len(bins) != 2 * len(issame):
        raise ToolkitError(f"{path}: {len(bins)} images but {len(issame)} pair labels (need 2 images per pair)")
    if not issame:
        raise ToolkitError(f"{path}: holds no pairs")
    h, w = int(image_size[0]), int(image_size[1])
    out = np.empty((len(bins), 3, h, w), dtype=np.uint8)
    for i, b in enumerate(bins):
        buf = np.frombuffer(bytes(b), dtype=np.uint8) if not isinstance(b, np.ndarray) else b.astype(np.uint8)
        img = cv2.imdecode(buf, cv2.IMREAD_COLOR) if buf.size else None
        if img is None:
            raise ToolkitError(f"{path}: image {i} cannot be decoded (not a JPEG/PNG byte string)")
        if img.shape[:2] != (h, w):
            img = cv2.resize(img, (w, h), interpolation=cv2.INTER_LINEAR)
        out[i] = cv2.cvtColor(img, cv2.COLOR_BGR2RGB).transpose(2, 0, 1)
    return out, np.asarray(issame, dtype=bool)


def load_bin(path: str, image_size: Sequence[int] = (112, 112)):
    """insightface's ``load_bin``: ``([NCHW nd.array, its horizontal mirror], issame_list)``, float32 RGB 0-255."""
    import mxnet as mx

    images, issame = read_bin(path, image_size)
    data = images.astype(np.float32)
    return [mx.nd.array(data), mx.nd.array(data[:, :, :, ::-1])], list(issame.tolist())


# -------------------------------------------------------------------------------------------------- embedding
def _forward_padded(module, bound_batch: int, batch: np.ndarray, output: int = 0) -> np.ndarray:
    """Forward ``batch`` (n <= bound_batch, C, H, W) through a bound Module, padding the last partial batch."""
    import mxnet as mx

    n = batch.shape[0]
    if n < bound_batch:
        pad = np.zeros((bound_batch - n,) + batch.shape[1:], dtype=np.float32)
        batch = np.concatenate([batch, pad], axis=0)
    module.forward(mx.io.DataBatch(data=[mx.nd.array(batch)]), is_train=False)
    return module.get_outputs()[output].asnumpy()[:n].astype(np.float32, copy=False)


class Embedder:
    """Bind an embedding symbol once for inference; ``embed(x)`` returns the un-normalised ``fc1_output``.

    Inputs: ``x`` float32 (N, 3, H, W) RGB 0-255 (numpy or NDArray), any N. Outputs: float32 numpy (N, E).

    Full chunks of ``batch_size`` go through the main binding. A smaller remainder (one face at a time, the usual
    deploy call) goes through a binding of the next power of two, made on first use and sharing the main
    binding's parameters and memory: padding one face to a bound batch of 64 cost 64 forwards' time.

    ``optimize=True`` (default) binds the inference form of the graph (:class:`recognition.infer_graph.
    InferenceGraph`: BatchNorm folded, PReLU on MKLDNN operators; same embeddings to float32 rounding, y1 ~2x
    faster on CPU); ``set_params`` refolds new parameters. ``optimize=False`` binds the graph as given.
    """

    def __init__(self, symbol, arg_params: dict, aux_params: dict, ctx=None, batch_size: int = 32,
                 data_shape: Sequence[int] = (3, 112, 112), optimize: bool = True):
        self.symbol, self.arg_params, self.aux_params = symbol, arg_params, aux_params
        self.ctx = ctx if ctx is not None else parse_ctx(None)
        self.batch_size, self.data_shape = int(batch_size), tuple(int(d) for d in data_shape)
        missing = sorted(set(symbol.list_arguments()) - {"data"} - set(arg_params)) + \
            sorted(set(symbol.list_auxiliary_states()) - set(aux_params))
        if missing:
            raise ToolkitError(f"checkpoint lacks {len(missing)} parameter(s) the graph needs: "
                               f"{', '.join(missing[:8])}{' ...' if len(missing) > 8 else ''}")
        self.graph = None
        if optimize:
            from recognition.infer_graph import InferenceGraph

            self.graph = InferenceGraph(symbol, self.data_shape)
        self._bind()

    @property
    def backend(self) -> str:
        """The engine, as ``--backend`` names it: ``mxnet`` (the inference form) or ``mxnet-plain``."""
        return "mxnet" if self.graph is not None else "mxnet-plain"

    def _bound_params(self, arg_params: dict, aux_params: dict) -> Tuple[dict, dict]:
        return self.graph.params(arg_params, aux_params) if self.graph is not None else (arg_params, aux_params)

    def _bind(self) -> None:
        import mxnet as mx

        # recognition/__init__ sets MXNET_SUBGRAPH_BACKEND=NONE before mxnet loads; MXNet reads it at bind time,
        # so setting it here too covers users who imported mxnet first (see DESIGN.md, MKLDNN TBlob failure).
        os.environ.setdefault("MXNET_SUBGRAPH_BACKEND", "NONE")
        self.bound_symbol = self.graph.symbol if self.graph is not None else self.symbol
        self.module = mx.mod.Module(symbol=self.bound_symbol, data_names=["data"], label_names=None,
                                    context=self.ctx)
        self.module.bind(data_shapes=[("data", (self.batch_size,) + self.data_shape)], for_training=False)
        arg, aux = self._bound_params(self.arg_params, self.aux_params)
        self.module.set_params(arg, aux, allow_missing=False, allow_extra=True)
        self._small: Dict[int, object] = {}  # batch size -> Module sharing self.module's parameters

    def _module_for(self, n: int):
        """``(module, bound batch)`` for a chunk of ``n <= batch_size`` faces (see the class docstring)."""
        import mxnet as mx

        size = min(self.batch_size, 1 << max(n - 1, 0).bit_length())
        if size == self.batch_size:
            return self.module, size
        if size not in self._small:
            mod = mx.mod.Module(symbol=self.bound_symbol, data_names=["data"], label_names=None, context=self.ctx)
            mod.bind(data_shapes=[("data", (size,) + self.data_shape)], for_training=False,
                     shared_module=self.module)  # the same parameter arrays: set_params reaches it too
            self._small[size] = mod
        return self._small[size], size

    def set_params(self, arg_params: dict, aux_params: dict) -> None:
        """Load new parameters into the bound module (same graph): no rebind, no new executor."""
        self.arg_params, self.aux_params = arg_params, aux_params
        arg, aux = self._bound_params(arg_params, aux_params)
        self.module.set_params(arg, aux, allow_missing=False, allow_extra=True, force_init=True)

    @classmethod
    def from_checkpoint(cls, prefix: str, epoch: int, ctx=None, batch_size: int = 32,
                        data_shape: Sequence[int] = (3, 112, 112), optimize: bool = True) -> "Embedder":
        """Load ``PREFIX-symbol.json`` + ``PREFIX-%04d.params`` (full or slim) and cut the graph at ``fc1_output``."""
        symbol, arg_params, aux_params = load_checkpoint(prefix, epoch)
        return cls(cut_at_embedding(symbol, f"{prefix}-symbol.json"), arg_params, aux_params, ctx,
                   batch_size, data_shape, optimize)

    def __call__(self, x) -> np.ndarray:
        x = x.asnumpy() if hasattr(x, "asnumpy") else np.asarray(x)
        if x.ndim != 4 or tuple(x.shape[1:]) != self.data_shape:
            raise ToolkitError(f"Embedder: expected input (N, {', '.join(map(str, self.data_shape))}), "
                               f"got {tuple(x.shape)}")
        x = x.astype(np.float32, copy=False)
        outs = []
        for start in range(0, x.shape[0], self.batch_size):
            outs.append(self._forward(x[start:start + self.batch_size]))
        if not outs:
            return np.zeros((0, self.embedding_size), dtype=np.float32)
        return np.concatenate(outs, axis=0)

    embed = __call__

    def _forward(self, batch: np.ndarray) -> np.ndarray:
        try:
            return _forward_padded(*self._module_for(batch.shape[0]), batch=batch)
        except Exception as exc:
            if "TBlob for MKLDNN" not in str(exc) or os.environ.get("MXNET_SUBGRAPH_BACKEND") == "NONE":
                raise
            logger.warning("MKLDNN subgraph failed at asnumpy(); rebinding with MXNET_SUBGRAPH_BACKEND=NONE")
            os.environ["MXNET_SUBGRAPH_BACKEND"] = "NONE"
            self._bind()
            return _forward_padded(*self._module_for(batch.shape[0]), batch=batch)

    @property
    def embedding_size(self) -> int:
        return int(self.module.output_shapes[0][1][1])


BACKENDS = ("auto", "onnx", "mxnet", "mxnet-plain")
BACKEND_HELP = ("inference engine: auto (the default: onnx on CPU when onnxruntime is installed, else mxnet), onnx "
                "(onnxruntime on the checked export; fastest measured on CPU, benchmarks/bench_infer.py), mxnet (the "
                "BatchNorm-folded MXNet graph; the one for GPUs), mxnet-plain (the graph as it is)")


def onnx_available() -> bool:
    """Whether the ``onnx`` backend can be built here (``pip install -e .[onnx]``: onnx and onnxruntime)."""
    import importlib.util

    return all(importlib.util.find_spec(m) is not None for m in ("onnx", "onnxruntime"))


def resolve_backend(backend: str, ctx=None) -> str:
    """The engine ``backend`` means for ``ctx``: ``auto`` -> ``onnx`` when every context is a CPU and onnxruntime is
    installed (1.5x the MXNet inference form on y1, 1.7x on r50 at batch 32 on this class of machine), else ``mxnet``.
    An explicit ``onnx`` with a GPU context is refused (the backend runs on CPU)."""
    if backend not in BACKENDS:
        raise ToolkitError(f"--backend {backend!r}: choose one of {', '.join(BACKENDS)}")
    ctxs = ctx if isinstance(ctx, (list, tuple)) else [ctx]
    on_cpu = all(c is None or getattr(c, "device_type", "cpu") == "cpu" for c in ctxs)
    if backend == "auto":
        return "onnx" if on_cpu and onnx_available() else "mxnet"
    if backend == "onnx" and not on_cpu:
        raise ToolkitError("--backend onnx runs on CPU (onnxruntime's CPU provider); use --backend mxnet on a GPU")
    return backend


def make_embedder(symbol, arg_params: dict, aux_params: dict, ctx=None, batch_size: int = 32,
                  data_shape: Sequence[int] = (3, 112, 112), backend: str = "auto"):
    """An embedder for ``backend`` (see :data:`BACKEND_HELP` and :func:`resolve_backend`). ``auto`` falls back to
    the MXNet inference form, with a warning, when the graph cannot be exported to ONNX. All take float32
    (N, 3, H, W) RGB 0-255 and return un-normalised (N, E); the chosen engine is the result's ``backend``."""
    chosen = resolve_backend(backend, ctx)
    if chosen == "onnx":
        from deploy.onnx_embed import OnnxEmbedder

        try:
            return OnnxEmbedder(symbol, arg_params, aux_params, batch_size, data_shape)
        except ToolkitError as exc:
            if backend != "auto":
                raise
            logger.warning("--backend auto: onnx unavailable for this graph (%s); using mxnet", exc)
            chosen = "mxnet"
    return Embedder(symbol, arg_params, aux_params, ctx, batch_size, data_shape, optimize=chosen == "mxnet")


# ----------------------------------------------------------------------------------------------------- maths
def _fold_indices(n: int, nrof_folds: int) -> List[np.ndarray]:
    """Consecutive folds like ``sklearn.model_selection.KFold(shuffle=False)`` (first folds one larger)."""
    if nrof_folds < 2 or nrof_folds > n:
        raise ToolkitError(f"--nfolds {nrof_folds}: need 2 <= folds <= number of pairs ({n})")
    return np.array_split(np.arange(n), nrof_folds)


def _accuracy_grid(dist: np.ndarray, issame: np.ndarray) -> np.ndarray:
    """Accuracy of ``dist < t`` for every t in :data:`THRESHOLDS`: (T,)."""
    pred = dist[None, :] < THRESHOLDS[:, None]
    return (pred == issame[None, :]).mean(axis=1)


def kfold_accuracy(dist: np.ndarray, issame: np.ndarray, nrof_folds: int = 10) -> Tuple[np.ndarray, np.ndarray]:
    """insightface's ``calculate_roc`` accuracy: per-fold accuracy (K,) and chosen thresholds (K,)."""
    folds = _fold_indices(len(dist), nrof_folds)
    acc, thr = np.zeros(len(folds)), np.zeros(len(folds))
    for k, test_idx in enumerate(folds):
        train_mask = np.ones(len(dist), dtype=bool)
        train_mask[test_idx] = False
        best = int(np.argmax(_accuracy_grid(dist[train_mask], issame[train_mask])))  # first maximum, as insightface
        thr[k] = THRESHOLDS[best]
        acc[k] = np.mean((dist[test_idx] < thr[k]) == issame[test_idx])
    return acc, thr


def tar_at_far(dist: np.ndarray, issame: np.ndarray, far: float) -> float:
    """True-accept rate at the largest threshold whose empirical FAR (impostors with dist < t) is <= ``far``.

    No interpolation: with fewer than ``1/far`` impostor pairs the only admissible threshold accepts no impostor,
    so the figure is the TAR at zero false accepts (``evaluate`` reports the FAR resolution ``1/#impostors``).
    """
    genuine, impostor = np.sort(dist[issame]), np.sort(dist[~issame])
    if len(genuine) == 0 or len(impostor) == 0:
        return float("nan")
    k = int(np.floor(far * len(impostor)))  # false accepts allowed
    t = impostor[k] if k < len(impostor) else np.inf  # accept dist < t: exactly k impostors (ties excluded)
    return float(np.mean(genuine < t))


def evaluate(embeddings: np.ndarray, issame, nrof_folds: int = 10) -> Dict:
    """Verification figures for L2-normalised ``embeddings`` (2P, E), pairs ``(2i, 2i+1)``, ``issame`` (P,).

    Returns ``acc``/``std`` (k-fold), ``fold_acc``, ``fold_thresholds``, ``best_threshold``/``best_threshold_acc``
    (over all pairs), ``tar_at_far`` ({1e-3, 1e-4}), ``far_resolution``, ``auc``, ``eer``, ``roc`` (fpr, tpr).
    """
    from sklearn.metrics import roc_auc_score, roc_curve

    issame = np.asarray(issame, dtype=bool)
    emb = np.asarray(embeddings, dtype=np.float64)
    dist = np.sum(np.square(emb[0::2] - emb[1::2]), axis=1)
    fold_acc, fold_thr = kfold_accuracy(dist, issame, nrof_folds)
    grid = _accuracy_grid(dist, issame)
    best = int(np.argmax(grid))
    out = {"acc": float(np.mean(fold_acc)), "std": float(np.std(fold_acc)), "fold_acc": fold_acc,
           "fold_thresholds": fold_thr, "best_threshold": float(THRESHOLDS[best]),
           "best_threshold_acc": float(grid[best]), "num_pairs": int(len(dist)),
           "tar_at_far": {far: tar_at_far(dist, issame, far) for far in (1e-3, 1e-4)},
           "far_resolution": 1.0 / max(1, int((~issame).sum())),
           "auc": float("nan"), "eer": float("nan"), "roc": (np.zeros(0), np.zeros(0))}
    if issame.any() and (~issame).any():
        fpr, tpr, _ = roc_curve(issame, -dist)
        out["auc"] = float(roc_auc_score(issame, -dist))
        out["eer"] = _eer(fpr, tpr)
        out["roc"] = (fpr, tpr)
    return out


def _eer(fpr: np.ndarray, tpr: np.ndarray) -> float:
    """Equal error rate: where FAR = FRR on the ROC, linearly interpolated between the bracketing points."""
    gap = (1.0 - tpr) - fpr  # decreasing along the curve
    i = int(np.argmax(gap <= 0))
    if i == 0:
        return float(fpr[0])
    g0, g1 = gap[i - 1], gap[i]
    w = g0 / (g0 - g1) if g0 != g1 else 0.0
    return float(fpr[i - 1] + w * (fpr[i] - fpr[i - 1]))


def _l2n(x: np.ndarray) -> np.ndarray:
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norm, 1e-12)


# ------------------------------------------------------------------------------------------------ test drivers
def embed_pairs(data_set, embed_fn: EmbedFn, batch_size: int = 32, progress: bool = False,
                desc: str = "verify") -> Tuple[np.ndarray, np.ndarray, list]:
    """Embed a data set of either form; returns ``(emb (N, E), emb_flip (N, E), issame)``, both un-normalised.

    ``data_set`` is ``(data_list, issame)`` from :func:`load_bin` (``[images, mirrored]`` NDArrays) or from
    :func:`read_bin` wrapped as ``([uint8 images], issame)`` (mirrors are made per batch, saving memory).
    """
    from recognition.progress import Progress

    data_list, issame = data_set
    images = data_list[0]
    mirrored = data_list[1] if len(data_list) > 1 else None
    n = images.shape[0]
    embs: List[List[np.ndarray]] = [[], []]
    bar = Progress(n, desc, unit="img", enabled=progress)  # a bar on a terminal, timed log lines elsewhere
    for start in range(0, n, batch_size):
        batch = _as_numpy(images[start:start + batch_size])
        flip = _as_numpy(mirrored[start:start + batch_size]) if mirrored is not None else batch[:, :, :, ::-1]
        embs[0].append(np.asarray(embed_fn(np.ascontiguousarray(batch, dtype=np.float32)), dtype=np.float32))
        embs[1].append(np.asarray(embed_fn(np.ascontiguousarray(flip, dtype=np.float32)), dtype=np.float32))
        bar.update(batch.shape[0])
    bar.close()
    return np.concatenate(embs[0]), np.concatenate(embs[1]), list(issame)


def _as_numpy(x) -> np.ndarray:
    return x.asnumpy() if hasattr(x, "asnumpy") else np.asarray(x)


def test_bin(data_set, embed_fn: EmbedFn, batch_size: int = 32, nfolds: int = 10, progress: bool = False,
             desc: str = "verify") -> Dict:
    """Verification of ``embed_fn`` on a data set (see :func:`embed_pairs`), insightface maths.

    Returns :func:`evaluate`'s dict (flip-summed) plus ``acc_noflip``/``std_noflip``, ``xnorm`` (mean norm of the
    un-normalised embeddings, original and mirrored), ``embeddings`` (2P, E normalised) and ``seconds``.
    """
    t0 = time.time()
    emb, emb_flip, issame = embed_pairs(data_set, embed_fn, batch_size, progress, desc)
    res = evaluate(_l2n(emb + emb_flip), issame, nfolds)
    plain = evaluate(_l2n(emb), issame, nfolds)
    res.update(acc_noflip=plain["acc"], std_noflip=plain["std"], embeddings=_l2n(emb + emb_flip),
               xnorm=float(np.mean(np.linalg.norm(np.concatenate([emb, emb_flip]), axis=1))),
               seconds=time.time() - t0, raw=(emb, emb_flip))
    return res


def test(data_set, mx_model, batch_size: int, nfolds: int = 10, data_extra=None, label_shape=None):
    """insightface's ``test``: ``(acc1, std1, acc2, std2, xnorm, [emb, emb_flip])`` for a Module bound for inference.

    ``acc2``/``std2`` are the flip-summed figures insightface prints; ``acc1``/``std1`` are the no-flip figures
    (insightface returns 0.0 there). ``data_extra``/``label_shape`` are accepted for signature compatibility.
    """
    bound = mx_model.data_shapes[0].shape[0] if hasattr(mx_model.data_shapes[0], "shape") \
        else mx_model.data_shapes[0][1][0]

    def embed_fn(x):
        return np.concatenate([_forward_padded(mx_model, bound, x[s:s + bound]) for s in range(0, len(x), bound)])

    r = test_bin(data_set, embed_fn, batch_size, nfolds)
    return r["acc_noflip"], r["std_noflip"], r["acc"], r["std"], r["xnorm"], list(r["raw"])


def verify_targets(paths: Sequence[str], embed_fn: EmbedFn, batch_size: int = 32, nfolds: int = 10,
                   image_size: Sequence[int] = (112, 112), progress: bool = False) -> Dict[str, Dict]:
    """Run :func:`test_bin` on each ``.bin`` in ``paths``; returns ``{name: results}`` (name = file stem)."""
    for p in paths:  # fail before spending compute on the first target
        if not os.path.isfile(p):
            raise ToolkitError(f"--target: verification set {p} does not exist")
    results = {}
    for p in paths:
        name = os.path.splitext(os.path.basename(p))[0]
        images, issame = read_bin(p, image_size)
        results[name] = test_bin(([images], issame), embed_fn, batch_size, nfolds, progress, desc=name)
        results[name]["issame"] = np.asarray(issame, dtype=bool)
    return results


def format_result(name: str, r: Dict) -> str:
    """insightface-style report lines for one target."""
    tar = ", ".join(f"TAR@FAR={far:g}: {v:.5f}" for far, v in r["tar_at_far"].items())
    return (f"[{name}]XNorm: {r['xnorm']:f}\n[{name}]Accuracy: {r['acc_noflip']:.5f}+-{r['std_noflip']:.5f}\n"
            f"[{name}]Accuracy-Flip: {r['acc']:.5f}+-{r['std']:.5f}\n"
            f"[{name}]best-threshold accuracy {r['best_threshold_acc']:.5f} at "
            f"{format_threshold(cosine_from_squared_l2(r['best_threshold']))}; {tar} "
            f"(FAR resolution {r['far_resolution']:.1e}); AUC {r['auc']:.5f}; EER {r['eer']:.5f}; "
            f"{r['num_pairs']} pairs in {r['seconds']:.1f}s")


def save_roc_png(path: str, results: Dict[str, Dict]) -> None:
    """Write the ROC curves (TPR vs log FPR) of every target to a PNG, atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 4))
    for name, r in results.items():
        fpr, tpr = r["roc"]
        ax.plot(np.maximum(fpr, 1e-5), tpr, label=f"{name} (AUC {r['auc']:.4f})")
    ax.set_xscale("log")
    ax.set_xlabel("false accept rate")
    ax.set_ylabel("true accept rate")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    with atomic_write(path, "wb") as f:
        fig.savefig(f, format="png", dpi=100)
    plt.close(fig)


def main(argv: Optional[Sequence[str]] = None) -> int:
    from recognition import verification_compat  # insightface's calling convention (--data-dir + names, PREFIX,E1|E2)

    if verification_compat.is_insightface_argv(sys.argv[1:] if argv is None else argv):
        return verification_compat.main(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(prog="ifr-verify", description="Verification accuracy of a checkpoint on .bin sets",
                                allow_abbrev=False, formatter_class=DefaultsHelpFormatter)
    p.add_argument("--model", required=True, help="PREFIX,EPOCH of the checkpoint (full or slim)")
    p.add_argument("--target", required=True, help="comma-separated .bin files (lfw.bin,cfp_fp.bin,...)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--nfolds", type=int, default=10)
    p.add_argument("--image-size", default="112,112", help="H,W of the network input")
    p.add_argument("--roc-png", default="", help="write the ROC curves to this PNG")
    p.add_argument("--ctx", default="", help="cpu, gpu:0, ... (default: CUDA_VISIBLE_DEVICES or cpu)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--no-save-threshold", action="store_true",
                   help="do not record the thresholds in the model's PREFIX-meta.json (compare, search and the "
                        "server read it)")
    p.add_argument("--backend", default="auto", choices=BACKENDS, help=BACKEND_HELP)
    args = p.parse_args(argv)
    if args.batch_size < 1:
        raise ToolkitError(f"--batch-size {args.batch_size}: must be >= 1")
    try:
        size = tuple(int(v) for v in args.image_size.split(","))
        assert len(size) == 2
    except (ValueError, AssertionError):
        raise ToolkitError(f"--image-size {args.image_size!r}: expected H,W such as 112,112") from None
    prefix, epoch = parse_prefix_epoch(args.model, "--model")
    targets = [t for t in args.target.split(",") if t]
    for t in targets:
        if not os.path.isfile(t):
            raise ToolkitError(f"--target: verification set {t} does not exist")
    symbol, arg_params, aux_params = load_checkpoint(prefix, epoch)
    embedder = make_embedder(cut_at_embedding(symbol, f"{prefix}-symbol.json"), arg_params, aux_params,
                             parse_ctx(args.ctx), args.batch_size, (3,) + size, args.backend)
    results = verify_targets(targets, embedder, args.batch_size, args.nfolds, size, progress=not args.no_progress)
    for name, r in results.items():
        print(format_result(name, r))
    points = {name: operating_points(r["embeddings"], r["issame"], r["best_threshold"], r["best_threshold_acc"])
              for name, r in results.items()}
    for name, pt in points.items():
        far = ", ".join(f"FAR {k}: " + ("n/a (too few pairs)" if v is None else f"cosine {v:.3f}")
                        for k, v in pt["far"].items())
        print(f"[{name}]thresholds: best {format_threshold(pt['cosine'])}; {far}")
    if points and not args.no_save_threshold:
        try:
            path = record_thresholds(prefix, points)
            print(f"thresholds recorded in {path} (compare, search and the server use them by default)")
        except ToolkitError as exc:  # a read-only model folder: the figures above still stand
            logger.warning("thresholds not recorded: %s", exc)
    if args.roc_png:
        save_roc_png(args.roc_png, results)
        print(f"ROC curve written to {args.roc_png}")
    return 0


def cli() -> None:
    sys.exit(run_cli(main))


if __name__ == "__main__":
    cli()
