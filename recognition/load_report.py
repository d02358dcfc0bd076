"""The record of a pretrained load (:class:`LoadReport`) and the ``PREFIX-meta.json`` sidecar beside checkpoints."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import List, Tuple

from recognition.common import ToolkitError, atomic_write


def fmt_shape(shape) -> str:
    """``(128, 512)`` -> ``(128,512)``: compact shapes for one-line messages."""
    return "(" + ",".join(str(int(d)) for d in shape) + ")"


@dataclass
class LoadReport:
    """What happened to every array of a pretrained checkpoint.

    ``loaded``: (name, shape, checkpoint name); ``reinitialised``: (name, shape, reason); ``dropped``:
    (checkpoint name, reason); ``unused``: (checkpoint name, shape) -- in the checkpoint, needed by nothing.
    """

    spec: str = ""
    network: str = ""
    loaded: List[Tuple[str, tuple, str]] = field(default_factory=list)
    reinitialised: List[Tuple[str, tuple, str]] = field(default_factory=list)
    dropped: List[Tuple[str, str]] = field(default_factory=list)
    unused: List[Tuple[str, tuple]] = field(default_factory=list)
    notes: List[str] = field(default_factory=list)

    @property
    def renamed(self) -> List[Tuple[str, tuple, str]]:
        return [item for item in self.loaded if item[0] != item[2]]

    def to_dict(self) -> dict:
        return {
            "spec": self.spec, "network": self.network,
            "counts": {"loaded": len(self.loaded), "renamed": len(self.renamed),
                       "reinitialised": len(self.reinitialised), "dropped": len(self.dropped),
                       "unused": len(self.unused)},
            "loaded": [{"name": n, "shape": list(s), "source": src} for n, s, src in self.loaded],
            "reinitialised": [{"name": n, "shape": list(s), "reason": r} for n, s, r in self.reinitialised],
            "dropped": [{"name": n, "reason": r} for n, r in self.dropped],
            "unused": [{"name": n, "shape": list(s)} for n, s in self.unused],
            "notes": list(self.notes),
        }

    def format(self) -> str:
        """Readable multi-line summary: counts, then every rename, re-initialisation, drop and unused array."""
        lines = [f"pretrained {self.spec} (network: {self.network})",
                 f"  loaded {len(self.loaded)} arrays ({len(self.renamed)} renamed), re-initialised "
                 f"{len(self.reinitialised)}, dropped {len(self.dropped)}, unused {len(self.unused)}"]
        lines += [f"  renamed: {n} {fmt_shape(s)} <- {src}" for n, s, src in self.renamed]
        lines += [f"  re-initialised: {n} {fmt_shape(s)}: {r}" for n, s, r in self.reinitialised]
        lines += [f"  dropped: {n}: {r}" for n, r in self.dropped]
        lines += [f"  unused: {n} {fmt_shape(s)}" for n, s in self.unused]
        lines += [f"  note: {note}" for note in self.notes]
        return "\n".join(lines)

    def save(self, folder: str) -> Tuple[str, str]:
        """Write ``load_report.json`` and ``load_report.txt`` into ``folder`` atomically; returns both paths."""
        json_path = os.path.join(folder, "load_report.json")
        txt_path = os.path.join(folder, "load_report.txt")
        with atomic_write(json_path, "w") as f:
            json.dump(self.to_dict(), f, indent=1)
        with atomic_write(txt_path, "w") as f:
            f.write(self.format() + "\n")
        return json_path, txt_path


def meta_path(prefix: str) -> str:
    """``PREFIX-meta.json``: the sidecar next to ``PREFIX-symbol.json``."""
    return prefix + "-meta.json"


def write_meta(prefix: str, **meta) -> str:
    """Write ``PREFIX-meta.json`` atomically (e.g. ``fc7_name``, ``num_classes``, ``emb_size``, ``network``)."""
    path = meta_path(prefix)
    with atomic_write(path, "w") as f:
        json.dump(meta, f, indent=1, sort_keys=True)
    return path


def read_meta(prefix: str) -> dict:
    """The sidecar written by :func:`write_meta`, or ``{}`` when there is none."""
    path = meta_path(prefix)
    if not os.path.isfile(path):
        return {}
    try:
        with open(path) as f:
            meta = json.load(f)
    except (OSError, ValueError) as exc:
        raise ToolkitError(f"{path}: not readable JSON ({exc})") from None
    if not isinstance(meta, dict):
        raise ToolkitError(f"{path}: expected a JSON object, found {type(meta).__name__}")
    return meta
