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
from typing import Dict, Iterator, List, Optional

from recognition.common import atomic_write

logger = logging.getLogger("recognition")


class Series:
    """The curves' data in bounded memory: training loss/accuracy as at most ``max_points`` bucket means (when
    full, neighbouring buckets merge and the bucket width doubles), every verification result as it is.

    The curves PNG is redrawn every verification round; drawing it from the whole ``metrics.jsonl`` made each
    round read and plot every step so far (time and transient memory growing with the run's length).
    """

    FIELDS = ("loss", "acc", "acc_nomargin")

    def __init__(self, max_points: int = 2000):
        if max_points < 2:
            raise ValueError("max_points must be >= 2")
        self.max_points, self.width = int(max_points), 1
        self.points: List[list] = []  # [last step, count, (sum, n) per field ...]
        self.verify: Dict[str, List[tuple]] = {}
        self.kept: Dict[str, float] = {}  # source target -> the pretrained model's accuracy (the level to keep)

    def add(self, rec: dict) -> None:
        """Take one metrics record (``train``, ``verify`` and ``kept`` kinds are kept, others ignored)."""
        kind = rec.get("kind")
        if kind == "verify":
            self.verify.setdefault(rec["target"], []).append((rec["step"], rec["acc"]))
            return
        if kind == "kept":
            self.kept[rec["target"]] = float(rec["before"])
            return
        if kind != "train":
            return
        if not self.points or self.points[-1][1] >= self.width:
            self.points.append([rec["step"], 0] + [0.0, 0] * len(self.FIELDS))
            if len(self.points) > self.max_points:
                self._merge()
        p = self.points[-1]
        p[0], p[1] = rec["step"], p[1] + 1
        for i, name in enumerate(self.FIELDS):
            v = rec.get(name)
            if v is not None:
                p[2 + 2 * i] += float(v)
                p[3 + 2 * i] += 1

    def _merge(self) -> None:
        """Halve the number of points: every two neighbours become one (sums add), the width doubles."""
        merged = []
        for k in range(0, len(self.points) - 1, 2):
            a, b = self.points[k], self.points[k + 1]
            merged.append([b[0]] + [x + y for x, y in zip(a[1:], b[1:])])
        if len(self.points) % 2:
            merged.append(self.points[-1])
        self.points, self.width = merged, self.width * 2

    def series(self, name: str) -> List[tuple]:
        """``[(step, mean)]`` of one training field, skipping buckets where it was never logged."""
        i = 2 + 2 * self.FIELDS.index(name)
        return [(p[0], p[i] / p[i + 1]) for p in self.points if p[i + 1]]

    @classmethod
    def from_file(cls, path: str, max_points: int = 2000) -> "Series":
        """Read ``metrics.jsonl`` once (a resumed run, or :func:`plot_curves` on a finished one)."""
        out = cls(max_points)
        for rec in iter_metrics(path):
            out.add(rec)
        return out


class MetricsLog:
    """Append-only JSON-lines file; ``truncate_after(step)`` drops records past a resume point.

    Keeps a :class:`Series` of what it wrote (and of what the file already held) for :meth:`plot`.
    """

    def __init__(self, path: str):
        self.path = path
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        self.series = Series.from_file(path)
        self._f = open(path, "a")

    def write(self, kind: str, **fields) -> None:
        rec = {"kind": kind}
        rec.update(fields)
        self._f.write(json.dumps(rec, sort_keys=True) + "\n")
        self._f.flush()
        self.series.add(rec)

    def plot(self, png_path: str) -> Optional[str]:
        """Write the curves PNG from the in-memory series (see :func:`plot_series`)."""
        return plot_series(self.series, png_path)

    def truncate_after(self, step: int) -> None:
        """Keep only records with ``step <= step`` (rewritten atomically)."""
        self._f.close()
        series = Series(self.series.max_points)
        with atomic_write(self.path, "w") as f:  # streamed: a long run's log is never held in memory
            for r in iter_metrics(self.path):
                if int(r.get("step", 0)) <= step:
                    f.write(json.dumps(r, sort_keys=True) + "\n")
                    series.add(r)
        self.series = series
        self._f = open(self.path, "a")

    def close(self) -> None:
        if not self._f.closed:
            self._f.close()


def iter_metrics(path: str, kind: Optional[str] = None) -> Iterator[dict]:
    """Records of ``path`` one at a time (optionally of one ``kind``); a torn last line is skipped."""
    if not os.path.isfile(path):
        return
    with open(path) as f:
        for line in f:
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if kind is None or rec.get("kind") == kind:
                yield rec


def read_metrics(path: str, kind: Optional[str] = None) -> List[dict]:
    """Records of ``path`` (optionally of one ``kind``) as a list; see :func:`iter_metrics`."""
    return list(iter_metrics(path, kind))


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
    """Draw a ``metrics.jsonl``'s loss, training accuracy and verification accuracy into ``png_path`` (atomic).

    Returns the path, or None when there is nothing to draw yet. A running trainer uses :meth:`MetricsLog.plot`.
    """
    return plot_series(Series.from_file(metrics_path), png_path)


def plot_series(series: Series, png_path: str) -> Optional[str]:
    """Draw ``series`` (loss, training accuracy with and without margin, verification accuracy against step)."""
    loss = series.series("loss")
    if not loss:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    verify = series.verify
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    axes[0].plot(*zip(*loss), lw=0.8)
    axes[0].set_title("training loss" + (f" (means of {series.width} steps)" if series.width > 1 else ""))
    accs = series.series("acc")
    if accs:
        axes[1].plot(*zip(*accs), lw=0.8, label="margin")
    nomargin = series.series("acc_nomargin")
    if nomargin:
        axes[1].plot(*zip(*nomargin), lw=0.8, label="no margin")
        axes[1].legend()
    axes[1].set_title("training accuracy")
    colours = {}
    for name, pts in sorted(verify.items()):
        colours[name] = axes[2].plot(*zip(*pts), marker="o", label=name)[0].get_color()
    for name, level in sorted(series.kept.items()):  # --source-targets: the accuracy the run should keep
        axes[2].axhline(level, ls="--", lw=0.9, color=colours.get(name, "grey"), label=f"{name} pretrained (kept)")
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


__all__ = ["MetricsLog", "Series", "iter_metrics", "read_metrics", "Window", "plot_curves", "plot_series"]
