"""Training records: a JSON-lines metrics log, a rolling speed/loss window, and a PNG of the curves.

``metrics.jsonl`` holds one object per line::

    {"kind": "train", "step": 12, "epoch": 0, "stage": "head", "lr": 0.1, "loss": 2.31, "acc": 0.25,
     "acc_nomargin": 0.4, "time": ...}
    {"kind": "verify", "step": 100, "target": "lfw", "acc": 0.991, "std": 0.004, "xnorm": 21.3}
    {"kind": "checkpoint", "step": 100, "epoch": 1, "path": "models/.../model-0001.params"}

``step`` is the global batch count after the update (1-based). ``acc`` is insightface's training accuracy (argmax
of the margin logits); ``acc_nomargin`` the argmax of the plain cosine logits (equal to ``acc`` for softmax).
"""
from __future__ import annotations

import json
import logging
import os
import time
from typing import Dict, List, Optional

from recognition.common import atomic_write

logger = logging.getLogger("recognition")


class MetricsLog:
    """Append-only JSON-lines file; ``truncate_after(step)`` drops records past a resume point."""

    def __init__(self, path: str):
        self.path = path
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        self._f = open(path, "a")

    def write(self, kind: str, **fields) -> None:
        rec = {"kind": kind}
        rec.update(fields)
        self._f.write(json.dumps(rec, sort_keys=True) + "\n")
        self._f.flush()

    def truncate_after(self, step: int) -> None:
        """Keep only records with ``step <= step`` (rewritten atomically)."""
        self._f.close()
        kept = [r for r in read_metrics(self.path) if int(r.get("step", 0)) <= step]
        with atomic_write(self.path, "w") as f:
            for r in kept:
                f.write(json.dumps(r, sort_keys=True) + "\n")
        self._f = open(self.path, "a")

    def close(self) -> None:
        if not self._f.closed:
            self._f.close()


def read_metrics(path: str, kind: Optional[str] = None) -> List[dict]:
    """Records of ``path`` (optionally of one ``kind``); a torn last line is ignored."""
    out = []
    if not os.path.isfile(path):
        return out
    with open(path) as f:
        for line in f:
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if kind is None or rec.get("kind") == kind:
                out.append(rec)
    return out


class Window:
    """Means of loss/accuracy and samples/s over the batches since the last ``report()`` (insightface's
    Speedometer line)."""

    def __init__(self, batch_size: int):
        self.batch_size = batch_size
        self.reset()

    def reset(self) -> None:
        self.t0, self.n, self.loss, self.acc = time.time(), 0, 0.0, 0.0
        self.n_nm, self.acc_nm = 0, 0.0

    def add(self, loss: float, acc: Optional[float], acc_nomargin: Optional[float] = None) -> None:
        self.n += 1
        self.loss += loss
        self.acc += acc if acc is not None else 0.0
        if acc_nomargin is not None:
            self.n_nm += 1
            self.acc_nm += acc_nomargin

    def report(self, epoch: int, nbatch: int, lr: float, stage: str, has_acc: bool) -> str:
        dt = max(time.time() - self.t0, 1e-9)
        speed = self.n * self.batch_size / dt
        acc = f"\tacc={self.acc / max(self.n, 1):.6f}" if has_acc else ""
        if has_acc and self.n_nm:  # argmax of the cosine logits, no margin (the margin acc under-reads)
            acc += f"\tacc_nomargin={self.acc_nm / self.n_nm:.6f}"
        loss = self.loss / max(self.n, 1)
        line = (f"Epoch[{epoch}] Batch [{nbatch}]\tSpeed: {speed:.2f} samples/sec\tloss={loss:.6f}"
                f"{acc}\tlr={lr:.6g}\tstage={stage}")
        self.reset()
        return line


def plot_curves(metrics_path: str, png_path: str) -> Optional[str]:
    """Draw loss, training accuracy and verification accuracy against step into ``png_path`` (atomic).

    Returns the path, or None when there is nothing to draw yet.
    """
    train = read_metrics(metrics_path, "train")
    if not train:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    verify: Dict[str, List[tuple]] = {}
    for r in read_metrics(metrics_path, "verify"):
        verify.setdefault(r["target"], []).append((r["step"], r["acc"]))
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    steps = [r["step"] for r in train]
    axes[0].plot(steps, [r["loss"] for r in train], lw=0.8)
    axes[0].set_title("training loss")
    accs = [(r["step"], r["acc"]) for r in train if r.get("acc") is not None]
    if accs:
        axes[1].plot(*zip(*accs), lw=0.8, label="margin")
    nomargin = [(r["step"], r["acc_nomargin"]) for r in train if r.get("acc_nomargin") is not None]
    if nomargin:
        axes[1].plot(*zip(*nomargin), lw=0.8, label="no margin")
        axes[1].legend()
    axes[1].set_title("training accuracy")
    for name, pts in sorted(verify.items()):
        axes[2].plot(*zip(*pts), marker="o", label=name)
    if verify:
        axes[2].legend()
    axes[2].set_title("verification accuracy")
    for ax in axes:
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_write(png_path, "wb") as f:
        fig.savefig(f, format="png", dpi=80)
    plt.close(fig)
    return png_path


__all__ = ["MetricsLog", "read_metrics", "Window", "plot_curves"]
