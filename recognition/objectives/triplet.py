"""Triplet objectives: ``triplet`` (squared L2 between normalised embeddings) and ``atriplet`` (angle), with
online mining inside the batch (:mod:`recognition.losses_triplet`) or, with ``--mining-interval N > 0``, offline
semi-hard mining per bag of identities (:mod:`recognition.triplet_mining`). Neither trains a classifier: a
checkpoint's fc7 is dropped (and the load report says so).
"""
from __future__ import annotations

import argparse
from typing import Any, Callable, Dict, Mapping, Optional

import mxnet as mx

from recognition.common import ToolkitError
from recognition.objectives.base import (
    AddOn,
    DataSpec,
    LossConfig,
    Objective,
    ObjectiveFlags,
    embedding_output,
    head_info,
)


class TripletObjective(Objective):
    """``triplet``/``atriplet``: metric 'loss'; batches of identities x ``images_per_identity`` images (online)
    or triplet-ordered batches mined offline (``options['mining_interval'] > 0``)."""

    family = "triplet"
    needs_classifier = False

    def __init__(self, name: str, loss_type: int, alpha: float, legacy_margin_m: str = "margin_m"):
        self.name, self.loss_type, self.legacy_margin_m = name, loss_type, legacy_margin_m
        self.defaults = dict(margin_m=0.0, margin_a=1.0, margin_b=0.0, triplet_alpha=alpha, images_per_identity=5)
        self.train_defaults = dict(per_batch_size=60, lr=0.05)

    @property
    def distance(self) -> str:
        """What the loss and the miner measure: ``l2`` (squared, normalised) or ``angle`` (radians)."""
        return "angle" if self.name == "atriplet" else "l2"

    def check(self, cfg: LossConfig) -> None:
        if not cfg.triplet_alpha > 0:
            raise ToolkitError(f"--triplet-alpha: must be > 0, got {cfg.triplet_alpha}")
        if cfg.images_per_identity < 2:
            raise ToolkitError(f"--images-per-identity: triplet losses need >= 2, got {cfg.images_per_identity}")
        if cfg.triplet_mining not in ("semihard", "hard"):
            raise ToolkitError(f"--triplet-mining: choose 'semihard' or 'hard', got {cfg.triplet_mining!r}")

    def run_options(self, flags: ObjectiveFlags, loss_cfg: LossConfig, kvstore: str) -> Dict[str, Any]:
        from recognition.launch import DIST_KVSTORES

        n = MINING.interval(flags, self)
        if n and kvstore in DIST_KVSTORES:
            raise ToolkitError(f"--mining-interval: offline triplet mining runs on one machine; --kvstore {kvstore} "
                               "is not supported with it")
        return dict(mining_interval=n, bag_identities=flags.bag_identities)

    def check_batch(self, per_batch_size: int, loss_cfg: LossConfig, options: Mapping[str, Any]) -> None:
        if not options.get("mining_interval") and per_batch_size % loss_cfg.images_per_identity:
            raise ToolkitError(f"--per-batch-size {per_batch_size}: must be a multiple of images_per_identity "
                               f"{loss_cfg.images_per_identity} for {loss_cfg.loss}")

    def build_symbol(self, embedding, num_classes: int, loss_cfg: LossConfig, fc7_name: str = "fc7",
                     emb_size: Optional[int] = None, options: Optional[Mapping[str, Any]] = None):
        """Outputs: ``triplet_loss_output`` (1,) MakeLoss of the mean loss; ``<emb>_emb`` (B, E)."""
        if (options or {}).get("mining_interval"):
            from recognition.triplet_mining import offline_triplet_symbol

            return offline_triplet_symbol(embedding, loss_cfg)
        from recognition.losses_triplet import triplet_loss_symbol

        loss = triplet_loss_symbol(embedding, mx.sym.Variable("softmax_label"), loss_cfg)
        out = mx.sym.Group([loss, embedding_output(embedding)])
        return out, head_info(out, "loss")

    def images_per_identity(self, loss_cfg: LossConfig) -> int:
        return int(loss_cfg.images_per_identity)

    def make_data(self, spec: DataSpec, loss_cfg: LossConfig, options: Mapping[str, Any]):
        if not options.get("mining_interval"):
            return super().make_data(spec, loss_cfg, options)
        from recognition.triplet_mining import OfflineTripletIter

        return OfflineTripletIter(spec.rec, spec.batch_size, num_parts=spec.num_devices, data_shape=spec.data_shape,
                                  bag_identities=int(options["bag_identities"]),
                                  images_per_identity=int(loss_cfg.images_per_identity),
                                  mining_interval=int(options["mining_interval"]),
                                  alpha=float(loss_cfg.triplet_alpha), kind=self.distance,
                                  rand_mirror=spec.rand_mirror, seed=spec.seed)

    def start(self, data, embedder: Callable, metrics, options: Mapping[str, Any]) -> None:
        if options.get("mining_interval"):  # the miner embeds each bag with the model as it is then
            data.attach(embedder, metrics)


TRIPLET = TripletObjective("triplet", 12, alpha=0.3)
# insightface's config.py: loss.atriplet triplet_alpha 0.35 (radians); its --margin-m sets it (loss type 13)
ATRIPLET = TripletObjective("atriplet", 13, alpha=0.35, legacy_margin_m="triplet_alpha")

OBJECTIVES = (TRIPLET, ATRIPLET)


class OfflineMining(AddOn):
    """``--mining-interval --bag-identities --images-per-identity`` (and ``--triplet-alpha``)."""

    name = "mining"

    def add_args(self, parser: argparse.ArgumentParser, group, legacy: bool) -> None:
        if legacy:
            group.add_argument("--triplet-alpha", type=float, default=None, help="triplet margin (type 12)")
        g = parser.add_argument_group("triplet refinement (offline mining)")
        g.add_argument("--mining-interval", type=int, default=None,
                       help="triplet losses: re-mine a bag every N steps (0: online mining inside the batch)")
        g.add_argument("--bag-identities", type=int, default=None, help="identities per mining bag")
        g.add_argument("--images-per-identity", type=int, default=None,
                       help="images per identity (mining bag, or online-mining batch groups)")
        if not legacy:
            g.add_argument("--triplet-alpha", type=float, default=None, help="triplet margin alpha")

    @staticmethod
    def interval(flags: ObjectiveFlags, objective: Objective) -> int:
        """``--mining-interval`` (0: online); raises for a negative value, a non-triplet loss or ``--teacher``."""
        n = flags.mining_interval
        if n < 0:
            raise ToolkitError(f"--mining-interval: must be >= 0, got {n}")
        if n and not isinstance(objective, TripletObjective):
            raise ToolkitError(f"--mining-interval {n}: offline mining needs --loss triplet or atriplet, "
                               f"got {objective.name}")
        if n and flags.teacher:
            raise ToolkitError(f"--mining-interval {n} with --teacher: offline triplet batches carry no teacher "
                               "embeddings; distil first, then refine with triplets (or use --mining-interval 0)")
        return n


MINING = OfflineMining()


__all__ = ["TripletObjective", "TRIPLET", "ATRIPLET", "OBJECTIVES", "OfflineMining", "MINING"]
