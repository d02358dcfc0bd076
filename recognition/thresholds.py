"""One threshold convention for users: the cosine similarity of L2-normalised (flip-summed) embeddings.

insightface's verification maths works in squared L2 distance ``d2`` between unit vectors (thresholds 0:4:0.01,
"same" when ``d2 < t``). For unit vectors ``d2 = 2 - 2 cos``, so the same decision in cosine is ``cos > 1 - t/2``:
a verification best threshold of 1.20 (squared L2) is a cosine of 0.40. Everything a user sets or reads
(``compare``, ``search``, the server, the probe's report) is a cosine; the squared-L2 value may be shown beside it.

Verification writes what it measured into the model's ``PREFIX-meta.json`` (:func:`record_thresholds`)::

    "thresholds": {"lfw": {"cosine": 0.40, "squared_l2": 1.20, "accuracy": 0.9883, "num_pairs": 600,
                           "far": {"0.001": 0.52, "0.0001": null}}},
    "threshold": {"cosine": 0.40, "from": "lfw"}

(``far``: the cosine that keeps the false-accept rate at or under that value on those pairs; null where the set
has fewer than 1/FAR different-person pairs.) The deploy tools take ``threshold.cosine`` by default
(:func:`default_threshold`).
"""
from __future__ import annotations

from typing import Dict, Optional, Sequence, Tuple

import numpy as np

from recognition.common import ToolkitError
from recognition.load_report import read_meta, write_meta

FARS = (1e-3, 1e-4)


def cosine_from_squared_l2(d2: float) -> float:
    """Squared L2 between unit vectors -> cosine: ``1 - d2 / 2`` (1.20 -> 0.40)."""
    return 1.0 - float(d2) / 2.0


def squared_l2_from_cosine(cos: float) -> float:
    """Cosine -> squared L2 between unit vectors: ``2 - 2 cos`` (0.40 -> 1.20)."""
    return 2.0 - 2.0 * float(cos)


def format_threshold(cos: float) -> str:
    """``'cosine 0.400 (squared L2 1.200)'``."""
    return f"cosine {cos:.3f} (squared L2 {squared_l2_from_cosine(cos):.3f})"


def far_threshold(cosines: np.ndarray, issame: np.ndarray, far: float) -> Optional[float]:
    """The cosine threshold ``t`` ("same" when ``cos > t``) that accepts at most ``floor(far x impostors)``
    different-person pairs: the (k+1)-th highest impostor cosine. None with fewer than ``1/far`` impostor pairs
    (the figure would be a guess). ``cosines`` (P,) pair similarities, ``issame`` (P,) bool."""
    impostor = np.sort(np.asarray(cosines, dtype=np.float64)[~np.asarray(issame, dtype=bool)])[::-1]
    if len(impostor) * far < 1.0:
        return None
    k = int(np.floor(far * len(impostor)))  # false accepts allowed: the k highest impostors
    return float(impostor[k])


def operating_points(embeddings: np.ndarray, issame: Sequence[bool], best_squared_l2: float,
                     best_accuracy: float) -> Dict:
    """Thresholds of one verification set: the best-accuracy threshold (insightface's, from the squared-L2 grid)
    as a cosine, and the cosines at FAR 1e-3/1e-4 where the pairs allow.

    ``embeddings`` (2P, E) L2-normalised, pairs ``(2i, 2i+1)``; ``issame`` (P,).
    """
    emb = np.asarray(embeddings, dtype=np.float64)
    issame = np.asarray(issame, dtype=bool)
    cos = np.sum(emb[0::2] * emb[1::2], axis=1)
    return {"cosine": round(cosine_from_squared_l2(best_squared_l2), 6), "squared_l2": float(best_squared_l2),
            "accuracy": float(best_accuracy), "num_pairs": int(len(issame)),
            "far": {f"{far:g}": far_threshold(cos, issame, far) for far in FARS}}


def record_thresholds(prefix: str, points: Dict[str, Dict]) -> str:
    """Merge ``{target: operating_points(...)}`` into ``PREFIX-meta.json`` (atomic) and set the model's default
    ``threshold`` from the set with the most pairs (the most reliable estimate). Returns the sidecar's path."""
    if not points:
        raise ToolkitError("no verification results to record")
    meta = read_meta(prefix)
    recorded = dict(meta.get("thresholds") or {})
    recorded.update(points)
    source = max(recorded, key=lambda name: (recorded[name].get("num_pairs", 0), name in points))
    meta["thresholds"] = recorded
    meta["threshold"] = {"cosine": recorded[source]["cosine"], "from": source}
    return write_meta(prefix, **meta)


def default_threshold(prefix: Optional[str], given: Optional[float], fallback: float) -> Tuple[float, str]:
    """The cosine threshold a deploy tool uses and where it came from: ``given`` (the flag), else the model's
    verified ``threshold`` in ``PREFIX-meta.json``, else ``fallback``. Returns ``(cosine, source text)``."""
    if given is not None:
        if not -1.0 <= float(given) <= 1.0:
            raise ToolkitError(f"--threshold {given}: a cosine similarity is between -1 and 1 (squared L2 "
                               f"{given} would be cosine {cosine_from_squared_l2(given):.3f})")
        return float(given), "--threshold"
    meta = read_meta(prefix) if prefix else {}
    chosen = meta.get("threshold") or {}
    if isinstance(chosen.get("cosine"), (int, float)):
        return float(chosen["cosine"]), f"verified on {chosen.get('from', '?')} ({prefix}-meta.json)"
    return float(fallback), "default (no verified threshold in the model's meta.json)"


def threshold_for_model(model: str, given: Optional[float], fallback: float) -> Tuple[float, str]:
    """:func:`default_threshold` for a ``--model PREFIX,EPOCH`` flag (the sidecar is ``PREFIX-meta.json``)."""
    from recognition.common import parse_prefix_epoch

    prefix = parse_prefix_epoch(model, "--model", check_files=False)[0] if model else None
    return default_threshold(prefix, given, fallback)


__all__ = ["FARS", "cosine_from_squared_l2", "default_threshold", "far_threshold", "format_threshold",
           "operating_points", "record_thresholds", "squared_l2_from_cosine", "threshold_for_model"]
