"""The ``--ckpt`` policy and model checkpoints: :class:`CheckpointPolicy` (insightface's rule for when to save),
:func:`save_model` (atomic ``PREFIX-%04d.params`` + symbol + meta), :func:`prune_checkpoints` (``--keep``) and
:func:`synced_params`."""
from __future__ import annotations

import os
import re
from typing import List, Optional, Sequence

from recognition.common import ToolkitError, save_checkpoint


class CheckpointPolicy:
    """insightface's ``--ckpt``: 0 never, 1 when verification improves, 2 every round, 3 improving into epoch 1.

    "Improves" is insightface's rule: the last target's accuracy rises, or stays equal while the sum over all
    targets does not fall. Without targets nothing improves (0, 1 and 3 then save only the final model).
    The final model is always saved (``final_epoch``).
    """

    def __init__(self, ckpt: int, highest=(0.0, 0.0)):
        if ckpt not in (0, 1, 2, 3):
            raise ToolkitError(f"--ckpt {ckpt}: choose 0, 1, 2 or 3")
        self.ckpt = ckpt
        self.highest = [float(highest[0]), float(highest[1])]  # [best sum, best last-target accuracy]
        self.saved_best = False

    def is_highest(self, accs: List[float]) -> bool:
        if not accs:
            return False
        score, last = float(sum(accs)), float(accs[-1])
        best = False
        if last >= self.highest[1]:
            if last > self.highest[1]:
                best = True
            elif score >= self.highest[0]:
                best = True
                self.highest[0] = score
            self.highest[1] = last
        if best:
            self.highest[0] = max(self.highest[0], score)
        return best

    def decide(self, accs: List[float], msave: int) -> Optional[int]:
        """Checkpoint epoch number to save after verification round ``msave`` (1-based), or None."""
        best = self.is_highest(accs)
        if self.ckpt == 2 or (self.ckpt == 1 and best):
            return msave
        if self.ckpt == 3 and best:
            self.saved_best = True
            return 1
        return None

    def final_epoch(self, msave: int) -> int:
        """Epoch for the end-of-training checkpoint when the last round did not save: ``msave``; with ``--ckpt 3``
        epoch 1 when no best was saved yet, else 2 (epoch 1 keeps the best)."""
        if self.ckpt == 3:
            return 2 if self.saved_best else 1
        return msave


def synced_params(module):
    """``module.get_params()`` after every pending operation finished.

    MXNet 1.9.1's MKLDNN BatchNorm writes its moving statistics during the backward pass without the engine
    tracking that write, so a plain ``get_params()`` right after ``update()`` can copy last step's statistics
    (seen as a run-to-run difference in verification XNorm with identical losses). ``waitall`` closes the gap.
    """
    import mxnet as mx

    mx.nd.waitall()
    return module.get_params()


def save_model(prefix: str, epoch: int, module, train_symbol, embedding_symbol, slim: bool,
               meta: Optional[dict] = None) -> str:
    """Save ``module``'s parameters as ``PREFIX-%04d.params`` + symbol (atomic). Returns the params path.

    ``slim``: the embedding graph and only its parameters (selected by the graph's own argument names, never by
    a name pattern); else the full training graph with the classifier. ``meta`` goes to ``PREFIX-meta.json``.
    """
    arg, aux = synced_params(module)
    if slim:
        keep_arg, keep_aux = set(embedding_symbol.list_arguments()), set(embedding_symbol.list_auxiliary_states())
        arg = {k: v for k, v in arg.items() if k in keep_arg}
        aux = {k: v for k, v in aux.items() if k in keep_aux}
        sym = embedding_symbol
    else:
        sym = train_symbol
    from recognition.backbones import checkpoint_form

    sym, arg, aux = checkpoint_form(sym, arg, aux)  # prelu='bn': stock graph, no constant unit states
    paths = save_checkpoint(prefix, epoch, sym, arg, aux)
    if meta is not None:
        from recognition.pretrained import write_meta

        write_meta(prefix, **dict(meta, slim=bool(slim)))
    return paths[0]


def prune_checkpoints(prefix: str, keep: int, protect: Sequence[int] = ()) -> List[str]:
    """``--keep K``: delete ``PREFIX-%04d.params`` beyond the K highest epochs (never those in ``protect``).

    Called after the newest checkpoint is complete (renamed into place), so a crash never leaves fewer than K.
    Returns the deleted paths.
    """
    if keep <= 0:
        return []
    folder, base = os.path.split(os.path.abspath(prefix))
    epochs = sorted((int(m.group(1)) for m in (re.fullmatch(re.escape(base) + r"-(\d{4})\.params", n)
                                                for n in os.listdir(folder)) if m), reverse=True)
    removed = []
    for epoch in epochs[keep:]:
        if epoch not in protect:
            path = "%s-%04d.params" % (prefix, epoch)
            os.unlink(path)
            removed.append(path)
    return removed


__all__ = ["CheckpointPolicy", "synced_params", "save_model", "prune_checkpoints"]
