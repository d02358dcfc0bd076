"""Triplet refinement with OFFLINE hard-negative mining per bag (FaceNet, Schroff et al. 2015, Sec. 3.2).

``--loss triplet|atriplet --mining-interval N`` (N > 0) replaces the in-graph online mining of
``recognition.losses_triplet`` with insightface's older offline scheme (``src/triplet_image_iter.py``): every N
steps a *bag* of ``--bag-identities`` identities x ``--images-per-identity`` images is embedded with the current
model (un-mirrored, no flip), and for every anchor/positive pair ``(a, p)`` of an identity one negative ``n`` is
drawn at random among those with ``d(a, n) - d(a, p) < alpha`` -- preferably semi-hard (``d(a, n) > d(a, p)``),
else hard (``d(a, n) <= d(a, p)``). Distances are squared L2 between L2-normalised embeddings (``triplet``) or
the angle (``atriplet``, alpha in radians), the same as the loss. Batches are then drawn from the mined triplets
for N steps, and the next bag is mined.

Batch layout (what :func:`offline_triplet_symbol` consumes): each device's slice of the batch holds T anchors,
then their T positives, then their T negatives (B = 3 T per device). ``softmax_label`` carries the identity ids;
the graph only uses them to ignore a triplet whose roles are inconsistent.

Usage (refine a classification checkpoint; its ``fc7`` is dropped and the load report says so)::

    python recognition/train.py --loss triplet --pretrained models/tiny-arcface-A/model,1 --data-dir DIR \\
        --mining-interval 20 --bag-identities 20 --images-per-identity 5 --per-batch-size 30 --lr 0.01
"""
from __future__ import annotations

import logging
import time
from typing import Callable, Dict, Optional, Tuple

import mxnet as mx
import numpy as np

from recognition.common import ToolkitError
from recognition.features import decode_image
from recognition.objectives.base import COS_EPS, embedding_output, head_info

logger = logging.getLogger("recognition")

# ---------------------------------------------------------------------------------------------------- mining
def pair_distances(emb: np.ndarray, kind: str = "l2") -> np.ndarray:
    """(N, N) distances between L2-normalised rows of ``emb`` (N, E): squared L2 (``l2``) or angle (``angle``)."""
    x = np.asarray(emb, np.float64)
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    gram = x @ x.T
    if kind == "angle":
        return np.arccos(np.clip(gram, -1.0 + COS_EPS, 1.0 - COS_EPS))
    if kind != "l2":
        raise ToolkitError(f"triplet mining: distance must be 'l2' or 'angle', got {kind!r}")
    return np.maximum(2.0 - 2.0 * gram, 0.0)


def mine_triplets(emb: np.ndarray, labels: np.ndarray, alpha: float, rng: np.random.Generator,
                  kind: str = "l2") -> Tuple[np.ndarray, Dict[str, int]]:
    """Offline semi-hard mining on one bag.

    Inputs: ``emb`` (N, E) embeddings (any norm), ``labels`` (N,) identity ids. Outputs: ``triplets`` int (T, 3)
    rows ``(a, p, n)`` of indices into the bag, and counts ``pairs`` (anchor/positive pairs, ``a < p``),
    ``triplets``, ``semihard``, ``hard`` (chosen among ``d_an <= d_ap`` because no semi-hard one existed).
    """
    labels = np.asarray(labels).astype(np.int64)
    dist = pair_distances(emb, kind)
    out, semi, hard, pairs = [], 0, 0, 0
    for a in range(len(labels)):
        neg = labels != labels[a]
        for p in np.flatnonzero((labels == labels[a]) & (np.arange(len(labels)) > a)):
            pairs += 1
            d_ap = dist[a, p]
            within = neg & (dist[a] - d_ap < alpha)
            cand = np.flatnonzero(within & (dist[a] > d_ap))
            if len(cand):
                semi += 1
            else:
                cand = np.flatnonzero(within)
                if not len(cand):
                    continue
                hard += 1
            out.append((a, int(p), int(cand[rng.integers(len(cand))])))
    trip = np.asarray(out, np.int64).reshape(-1, 3)
    return trip, {"pairs": pairs, "triplets": len(trip), "semihard": semi, "hard": hard}


# ---------------------------------------------------------------------------------------------------- graph
def offline_triplet_symbol(embedding, loss_cfg) -> Tuple[mx.sym.Symbol, dict]:
    """Training symbol for triplet-ordered batches.

    Inputs: ``embedding`` Symbol (B, E), B = 3 T per device laid out anchors | positives | negatives;
    ``softmax_label`` (B,) identity ids. Outputs: ``triplet_loss_output`` (1,) MakeLoss of
    ``mean(relu(d(a, p) - d(a, n) + alpha))`` over consistent triplets, and ``<emb>_emb`` BlockGrad (B, E).
    """
    label = mx.sym.Variable("softmax_label")
    nemb = mx.sym.L2Normalization(embedding, mode="instance", name="triplet_nemb")
    a, p, n = mx.sym.split(nemb, num_outputs=3, axis=0)
    la, lp, ln = mx.sym.split(mx.sym.BlockGrad(label), num_outputs=3, axis=0)
    if loss_cfg.loss == "atriplet":
        def dist(u, v):
            return mx.sym.arccos(mx.sym.clip(mx.sym.sum(u * v, axis=1), -1.0 + COS_EPS, 1.0 - COS_EPS))
    else:
        def dist(u, v):
            return mx.sym.sum(mx.sym.square(u - v), axis=1)
    valid = mx.sym.BlockGrad((la == lp) * (la != ln))
    per = mx.sym.relu(dist(a, p) - dist(a, n) + float(loss_cfg.triplet_alpha)) * valid
    loss = mx.sym.MakeLoss(mx.sym.sum(per) / mx.sym.maximum(mx.sym.sum(valid), 1.0), name="triplet_loss")
    out = mx.sym.Group([loss, embedding_output(embedding)])
    return out, head_info(out, "loss")


# ---------------------------------------------------------------------------------------------------- data
class OfflineTripletIter(mx.io.DataIter):
    """Triplet-ordered batches mined offline from bags (see the module docstring).

    Parameters: ``path_imgrec`` (``train.rec``), ``batch_size`` B (total over ``num_parts`` devices, a multiple of
    3 x ``num_parts``), ``bag_identities``, ``images_per_identity``, ``mining_interval`` (steps per bag),
    ``alpha``, ``kind`` (``l2``/``angle``), ``rand_mirror``, ``seed``. ``attach(embed_factory, metrics)`` must be
    called before ``next()``: ``embed_factory()`` returns a function (N, 3, H, W) -> (N, E) of the current model.
    An epoch is one pass over the identities in bags. Resume re-mines the interrupted bag with the restored
    model (the same bag and position, not necessarily the same triplets).
    """

    def __init__(self, path_imgrec: str, batch_size: int, num_parts: int = 1, data_shape=(3, 112, 112),
                 bag_identities: int = 20, images_per_identity: int = 5, mining_interval: int = 20,
                 alpha: float = 0.3, kind: str = "l2", rand_mirror: bool = False, seed: int = 0):
        from recognition.rec import RecordReader

        super().__init__(batch_size)
        if batch_size % (3 * num_parts):
            raise ToolkitError(f"--per-batch-size: offline triplet batches hold anchors, positives and negatives; "
                               f"{batch_size // num_parts} per device is not a multiple of 3")
        if bag_identities < 2 or images_per_identity < 2 or mining_interval < 1:
            raise ToolkitError(f"triplet mining: --bag-identities ({bag_identities}) and --images-per-identity "
                               f"({images_per_identity}) must be >= 2, --mining-interval ({mining_interval}) >= 1")
        self.path_imgrec, self.reader = path_imgrec, RecordReader(path_imgrec)
        keys = np.asarray(self.reader.image_keys, np.int64)
        ids = self.reader.labels(keys).astype(np.int64)
        self._members = [keys[ids == c] for c in np.unique(ids)]
        self._members = [m for m in self._members if len(m) >= 2]
        if len(self._members) < 2:
            raise ToolkitError(f"{path_imgrec}: triplet mining needs >= 2 identities with >= 2 images each")
        self._ident = np.asarray([int(self.reader.labels(m[:1])[0]) for m in self._members], np.int64)
        self.bag_identities = min(int(bag_identities), len(self._members))
        self.images_per_identity, self.mining_interval = int(images_per_identity), int(mining_interval)
        self.alpha, self.kind, self.rand_mirror = float(alpha), kind, bool(rand_mirror)
        self.num_parts, self.data_shape, self.seed = int(num_parts), tuple(data_shape), int(seed)
        self.bags_per_epoch = -(-len(self._members) // self.bag_identities)
        self._embed_factory: Optional[Callable] = None
        self._metrics = None
        self._epoch, self._bag, self._served, self._round_served, self._rounds = 0, 0, 0, 0, 0
        self._empty, self._resume_round = 0, 0
        self._pool: Optional[np.ndarray] = None  # (T, 3) record keys
        self._pool_labels: Optional[np.ndarray] = None

    def attach(self, embed_factory: Callable, metrics=None) -> None:
        """Give the iterator the current model (``embed_factory()`` -> embed function) and the metrics log."""
        self._embed_factory, self._metrics = embed_factory, metrics

    @property
    def provide_data(self):
        return [mx.io.DataDesc("data", (self.batch_size,) + self.data_shape, np.float32)]

    @property
    def provide_label(self):
        return [mx.io.DataDesc("softmax_label", (self.batch_size,), np.float32)]

    def _bag_members(self, epoch: int, bag: int) -> Tuple[np.ndarray, np.ndarray]:
        """Record keys and identity labels of bag ``bag`` of ``epoch`` (seeded)."""
        order = np.random.default_rng([self.seed, epoch, 11]).permutation(len(self._members))
        chosen = order[bag * self.bag_identities:(bag + 1) * self.bag_identities]
        if len(chosen) < 2:  # a last bag of one identity has no negatives: top it up from the start of the order
            chosen = np.concatenate([chosen, order[:2 - len(chosen)]])
        rng = np.random.default_rng([self.seed, epoch, bag, 12])
        keys, labels = [], []
        for c in chosen:
            m = self._members[c]
            k = min(self.images_per_identity, len(m))
            keys.append(rng.choice(m, k, replace=False))
            labels.append(np.full(k, self._ident[c]))
        return np.concatenate(keys), np.concatenate(labels)

    def _load(self, keys, mirror=None) -> np.ndarray:
        out = np.empty((len(keys),) + self.data_shape, np.float32)
        size = self.data_shape[1:]
        for i, k in enumerate(keys):
            _, raw = self.reader.read(int(k))
            img = decode_image(raw, f"{self.path_imgrec}: record {int(k)}", size)
            out[i] = img[:, :, ::-1] if mirror is not None and mirror[i] else img
        return out

    def _mine(self) -> None:
        """Mine bags from the current position until one yields triplets. After a whole epoch's worth of bags in a
        row without any (every negative already beyond the margin), fall back to random negatives."""
        if self._embed_factory is None:
            raise ToolkitError("OfflineTripletIter: attach(embed_factory) before iterating")
        embed = self._embed_factory()
        while True:
            if self._bag >= self.bags_per_epoch:
                raise StopIteration
            t0 = time.time()
            keys, labels = self._bag_members(self._epoch, self._bag)
            emb = embed(self._load(keys))
            rng = np.random.default_rng([self.seed, self._epoch, self._bag, 13])
            trip, stats = mine_triplets(emb, labels, self.alpha, rng, self.kind)
            self._rounds += 1
            logger.info("mining round %d (epoch %d bag %d, step %d): %d images of %d identities, %d anchor/positive "
                        "pairs, %d valid triplets (%d semi-hard, %d hard) in %.1fs", self._rounds, self._epoch,
                        self._bag, self._served, len(keys), len(np.unique(labels)), stats["pairs"],
                        stats["triplets"], stats["semihard"], stats["hard"], time.time() - t0)
            if self._metrics is not None:
                self._metrics.write("mining", step=self._served, round=self._rounds, epoch=self._epoch, bag=self._bag,
                                    images=int(len(keys)), seconds=round(time.time() - t0, 3), **stats)
            if len(trip):
                self._empty = 0
                break
            self._empty += 1
            if self._empty >= self.bags_per_epoch:
                logger.warning("triplet mining: no triplet within the margin alpha=%g in %d bags in a row; this bag "
                               "trains on random negatives (their loss is 0 or small)", self.alpha, self._empty)
                trip = np.asarray([(a, p, rng.choice(np.flatnonzero(labels != labels[a])))
                                   for a in range(len(labels))
                                   for p in np.flatnonzero((labels == labels[a]) & (np.arange(len(labels)) > a))],
                                  np.int64)
                break
            self._bag += 1
        order = rng.permutation(len(trip))
        self._pool, self._pool_labels = keys[trip[order]], labels[trip[order]]

    def next(self) -> mx.io.DataBatch:
        if self._pool is None or self._round_served >= self.mining_interval:
            if self._pool is not None:
                self._bag += 1
            self._round_served = 0
            self._pool = None
            self._mine()
            if self._resume_round:  # resumed mid-round: serve the rest of the re-mined bag's round
                self._round_served, self._resume_round = self._resume_round, 0
        t = self.batch_size // 3
        start = self._round_served * t
        pick = np.arange(start, start + t) % len(self._pool)
        trip_keys, trip_labels = self._pool[pick], self._pool_labels[pick]  # (T, 3)
        per = t // self.num_parts
        # each device slice: its anchors, then positives, then negatives
        keys = np.concatenate([trip_keys[d * per:(d + 1) * per].T.reshape(-1) for d in range(self.num_parts)])
        labels = np.concatenate([trip_labels[d * per:(d + 1) * per].T.reshape(-1) for d in range(self.num_parts)])
        mirror = None
        if self.rand_mirror:
            mirror = np.random.default_rng([self.seed, self._epoch, self._bag, self._round_served, 14]).random(
                len(keys)) < 0.5
        data = self._load(keys, mirror)
        self._round_served += 1
        self._served += 1
        return mx.io.DataBatch(data=[mx.nd.array(data)], label=[mx.nd.array(labels.astype(np.float32))], pad=0,
                               provide_data=self.provide_data, provide_label=self.provide_label)

    def reset(self) -> None:
        self._epoch += 1
        self._bag, self._round_served, self._pool = 0, 0, None

    def get_state(self) -> dict:
        return {"kind": "offline_triplet", "seed": self.seed, "epoch": self._epoch, "bag": self._bag,
                "round_served": self._round_served, "served": self._served, "rounds": self._rounds,
                "cursor": self._served}

    def set_state(self, state: dict) -> None:
        if state.get("kind") != "offline_triplet":
            raise ToolkitError("iterator state: saved by another iterator kind; cannot resume offline triplet mining")
        self.seed, self._epoch, self._bag = int(state["seed"]), int(state["epoch"]), int(state["bag"])
        self._served, self._rounds = int(state["served"]), int(state["rounds"])
        self._pool, self._round_served, self._resume_round = None, 0, int(state["round_served"])

    def close(self) -> None:
        self.reader.close()


__all__ = ["pair_distances", "mine_triplets", "offline_triplet_symbol", "OfflineTripletIter"]
