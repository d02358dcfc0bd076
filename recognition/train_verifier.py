"""Verification on ``--target`` sets during training: :class:`Verifier` holds the decoded sets and verifies an
embedding graph on each, bound once per graph."""
from __future__ import annotations

import logging
import os
from typing import Dict, Sequence

import numpy as np

from recognition.common import symbol_json

logger = logging.getLogger("recognition")


class Verifier:
    """Holds the decoded ``--target`` sets and verifies an embedding graph on each.

    ``__call__(embedding_symbol, arg, aux) -> {name: test_bin result}`` (``acc``, ``std``, ``xnorm``, ...).
    """

    def __init__(self, paths: Sequence[str], ctx, batch_size: int = 32, image_size=(112, 112), nfolds: int = 10,
                 backend: str = "auto"):
        from recognition.verification import read_bin, resolve_backend

        self.ctx, self.batch_size, self.nfolds = ctx, int(batch_size), int(nfolds)
        # a wrong choice is refused before training starts; ``backend`` is what "auto" means here, while the embedder
        # is built from the request, so that auto can still fall back to MXNet for a graph ONNX cannot take
        self.backend, self._requested = resolve_backend(backend, ctx), backend
        self.image_size = tuple(image_size)
        self._embed, self._key = None, None
        self.sets = {}
        for p in paths:
            name = os.path.splitext(os.path.basename(p))[0]
            self.sets[name] = read_bin(p, self.image_size)

    def __bool__(self) -> bool:
        return bool(self.sets)

    def __call__(self, embedding_symbol, arg_params: dict, aux_params: dict) -> Dict[str, dict]:
        from recognition.verification import make_embedder, test_bin

        if not self.sets:
            return {}
        # bind once per graph and only load new parameters each round: a new executor per round cost a bind and
        # a ~180 MB memory peak each time (benchmarks/soak.py, verification every 10 steps: max RSS 921 -> 737 MB).
        # The onnx backend re-exports the graph with the round's parameters (under a second for y1).
        key = symbol_json(embedding_symbol)
        if self._embed is None or self._key != key:
            self._embed = make_embedder(embedding_symbol, arg_params, aux_params, self.ctx, self.batch_size,
                                        (3,) + self.image_size, self._requested)
            logger.info("verification engine: %s (--verify-backend)", self._embed.backend)
            self._key = key
        else:
            self._embed.set_params(arg_params, aux_params)
        embed = self._embed
        out = {}
        for name, (images, issame) in self.sets.items():
            # progress lines (or a bar on a terminal) for a long set: a 12,000-image .bin takes a minute on a CPU
            out[name] = test_bin(([images], issame), embed, self.batch_size, self.nfolds, progress=True,
                                 desc=f"verify {name}")
            out[name]["issame"] = np.asarray(issame, dtype=bool)  # the checkpoint's thresholds need the pairs
        return out


__all__ = ["Verifier"]
