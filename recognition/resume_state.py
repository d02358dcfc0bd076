"""The resume state (``RUN_DIR/resume/``), optimizer-state I/O, RNG states and the graceful stop.

Resume state, written atomically (data files first under step-stamped names, then ``state.json`` naming them;
a reader only follows a complete ``state.json``):

- ``params-STEP.params``: every argument (including the classifier under its own name) and auxiliary state;
- ``optimizer-STEP.params``: optimizer states keyed by parameter name (momentum), so they survive a stage change
  and a change in the number of devices;
- ``embedding-symbol.json``: the backbone graph cut at ``fc1_output`` (the run no longer needs ``--pretrained``);
- ``state.json``: global step, save counter, best accuracies, stage index, iterator position, numpy/python RNG
  states, the resolved configuration.

MXNet 1.9.1's Module has no public per-parameter optimizer-state API (only a pickled blob keyed by index), so
:func:`get_optimizer_states`/:func:`set_optimizer_states` read its updater here, in one place; other modules (a
model-parallel module) provide ``{param_name: state}`` through the trainer's ``optimizer_states`` hooks.
"""
from __future__ import annotations

import glob
import json
import logging
import os
import random
import signal
import threading
from typing import Dict, List, Optional, Sequence

import mxnet as mx
import numpy as np

from recognition.checkpoints import synced_params
from recognition.common import ToolkitError, atomic_write, save_params_atomic, symbol_json

logger = logging.getLogger("recognition")

RESUME_VERSION = 1


class StopFlag:
    """Graceful stop: SIGINT/SIGTERM set a flag that the loop checks after each step (the step in flight, and a
    save in flight, finish; the loop then writes the resume state and returns). A second signal aborts at once
    (KeyboardInterrupt, exit code 130). Installs handlers only in the main thread; ``restore()`` puts back the
    previous ones."""

    def __init__(self, signals: Sequence[int] = (signal.SIGINT, signal.SIGTERM)):
        self.signum: Optional[int] = None
        self._old = {}
        if threading.current_thread() is threading.main_thread():
            for sig in signals:
                self._old[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        if self.signum is not None:
            raise KeyboardInterrupt(f"second {signal.Signals(signum).name}")
        self.signum = signum
        logger.warning("%s received: stopping after this step (send again to abort at once)",
                       signal.Signals(signum).name)

    def __bool__(self) -> bool:
        return self.signum is not None

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum is not None else ""

    def restore(self) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old = {}


# ---------------------------------------------------------------------------------------------- optimizer state
def _updater(module):
    """The Python ``Updater`` holding the optimizer states (local or on a local kvstore), or None (dist)."""
    if getattr(module, "_update_on_kvstore", False):
        return getattr(module._kvstore, "_updater", None)
    return getattr(module, "_updater", None)


def _flatten_state(name: str, state, out: dict, none: list) -> None:
    if state is None:
        none.append(name)
    elif isinstance(state, mx.nd.NDArray):
        out[name] = state.copyto(mx.cpu())
    elif isinstance(state, (tuple, list)):
        for i, s in enumerate(state):
            _flatten_state(f"{name}#{i}", s, out, none)
    else:
        raise ToolkitError(f"resume: optimizer state of {name} has unsupported type {type(state).__name__}")


def get_optimizer_states(module) -> Optional[Dict[str, object]]:
    """``{param_name: state}`` from the module's updater (one copy per name), or None when states live on a
    parameter server."""
    upd = _updater(module)
    if upd is None:
        return None
    idx2name = module._optimizer.idx2name
    out: Dict[str, object] = {}
    for key, state in upd.states.items():
        name = key if isinstance(key, str) else idx2name.get(key)
        if name is not None and name not in out:
            out[name] = state
    return out


def set_optimizer_states(module, states: Dict[str, object], names: Optional[set] = None) -> int:
    """Install ``{param_name: state}`` into ``module``'s updater (for every device copy). ``names``: only these.
    Returns how many parameters got a state."""
    upd = _updater(module)
    if upd is None:
        logger.warning("optimizer states live on the parameter server; they start fresh")
        return 0
    if module._update_on_kvstore:
        keys = {n: [n] for n in module._exec_group.param_names}
    else:
        keys = {}
        for idx, n in module._optimizer.idx2name.items():
            keys.setdefault(n, []).append(idx)
    count = 0
    for name, state in states.items():
        if name not in keys or (names is not None and name not in names):
            continue
        for key in keys[name]:
            upd.states[key] = _copy_state(state)
            upd.states_synced[key] = False
        count += 1
    return count


def _copy_state(state):
    if state is None:
        return None
    if isinstance(state, (tuple, list)):
        return type(state)(_copy_state(s) for s in state)
    return state.copy()


def _unflatten(blob: dict, none: List[str]) -> Dict[str, object]:
    grouped: Dict[str, dict] = {}
    for key, arr in blob.items():
        name, _, idx = key.partition("#")
        grouped.setdefault(name, {})[int(idx) if idx else None] = arr
    for key in none:
        name, _, idx = key.partition("#")
        grouped.setdefault(name, {})[int(idx) if idx else None] = None
    out = {}
    for name, parts in grouped.items():
        out[name] = parts[None] if None in parts else tuple(parts[i] for i in sorted(parts))
    return out


# ---------------------------------------------------------------------------------------------- resume state
def rng_state() -> dict:
    """numpy and python RNG states as JSON-able lists."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    py = random.getstate()
    return {"numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)],
            "python": [py[0], list(py[1]), py[2]]}


def set_rng_state(state: dict) -> None:
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    v, internal, gauss = state["python"]
    random.setstate((v, tuple(internal), gauss))


_FROM_MODULE = object()


def save_resume(run_dir: str, step: int, module, embedding_symbol, state: dict,
                optimizer_states=_FROM_MODULE) -> str:
    """Write ``RUN_DIR/resume/`` for global step ``step``; ``state`` holds the loop's counters. Returns the dir.

    ``module``: anything with ``get_params()``; ``optimizer_states``: ``{param_name: state}`` (None: they live on a
    parameter server and are not saved); by default read from ``module`` (an ``mx.mod.Module``)."""
    rdir = os.path.join(run_dir, "resume")
    os.makedirs(rdir, exist_ok=True)
    arg, aux = synced_params(module)
    params_name, optim_name = "params-%08d.params" % step, "optimizer-%08d.params" % step
    blob = {"arg:" + k: v for k, v in arg.items()}
    blob.update({"aux:" + k: v for k, v in aux.items()})
    save_params_atomic(os.path.join(rdir, params_name), blob)
    states = get_optimizer_states(module) if optimizer_states is _FROM_MODULE else optimizer_states
    flat, none = {}, []
    for name, st in (states or {}).items():
        _flatten_state(name, st, flat, none)
    save_params_atomic(os.path.join(rdir, optim_name), flat or {"__empty__": mx.nd.zeros((1,))})
    with atomic_write(os.path.join(rdir, "embedding-symbol.json"), "w") as f:
        f.write(symbol_json(embedding_symbol))
    doc = dict(state, version=RESUME_VERSION, step=int(step), params=params_name, optimizer=optim_name,
               optimizer_none=none, optimizer_saved=states is not None, rng=rng_state())
    with atomic_write(os.path.join(rdir, "state.json"), "w") as f:
        json.dump(doc, f, indent=1, default=_json_default)
    for old in glob.glob(os.path.join(rdir, "*-*.params")):  # older stamped files, now unreferenced
        if os.path.basename(old) not in (params_name, optim_name):
            os.unlink(old)
    return rdir


def _json_default(obj):
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating,)):
        return float(obj)
    if isinstance(obj, (np.ndarray, tuple, set)):
        return list(obj.tolist() if isinstance(obj, np.ndarray) else obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def resume_dir(path: str) -> str:
    """``DIR`` or ``DIR/resume`` -> the folder holding ``state.json`` (ToolkitError when there is none)."""
    for cand in (os.path.join(path, "resume"), path):
        if os.path.isfile(os.path.join(cand, "state.json")):
            return cand
    raise ToolkitError(f"--resume {path}: no resume state (expected {os.path.join(path, 'resume', 'state.json')})")


def read_resume_state(path: str) -> dict:
    """Parse ``state.json`` of ``--resume DIR``; the dict gains ``dir``."""
    rdir = resume_dir(path)
    try:
        with open(os.path.join(rdir, "state.json")) as f:
            doc = json.load(f)
    except ValueError as exc:
        raise ToolkitError(f"--resume {path}: state.json is not valid JSON ({exc})") from None
    if doc.get("version") != RESUME_VERSION:
        raise ToolkitError(f"--resume {path}: state version {doc.get('version')} is not {RESUME_VERSION}")
    doc["dir"] = rdir
    return doc


def load_resume_arrays(doc: dict):
    """``(embedding_symbol, arg_params, aux_params, optimizer_states or None)`` of a resume state."""
    rdir = doc["dir"]
    sym = mx.sym.load(os.path.join(rdir, "embedding-symbol.json"))
    blob = mx.nd.load(os.path.join(rdir, doc["params"]))
    arg = {k[4:]: v for k, v in blob.items() if k.startswith("arg:")}
    aux = {k[4:]: v for k, v in blob.items() if k.startswith("aux:")}
    states = None
    if doc.get("optimizer_saved"):
        flat = mx.nd.load(os.path.join(rdir, doc["optimizer"]))
        flat.pop("__empty__", None)
        states = _unflatten(flat, doc.get("optimizer_none", []))
    return sym, arg, aux, states


__all__ = ["RESUME_VERSION", "StopFlag", "get_optimizer_states", "set_optimizer_states", "rng_state",
           "set_rng_state", "save_resume", "resume_dir", "read_resume_state", "load_resume_arrays"]
