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
        self.reason = ""  # a stop the run asks for itself (request), e.g. --stop-on-source-drop
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

    def request(self, reason: str) -> None:
        """Stop after this step for ``reason`` (the same graceful path as a signal)."""
        self.reason = self.reason or reason

    def __bool__(self) -> bool:
        return self.signum is not None or bool(self.reason)

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum is not None else self.reason

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


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _plain_name(v) -> bool:
    """A file name inside the resume folder: no folder part, not hidden/relative."""
    return isinstance(v, str) and v == os.path.basename(v) and v not in ("", ".", "..") and not v.startswith(".")


def _rng_ok(rng) -> bool:
    try:
        kind, keys, pos, has_gauss, cached = rng["numpy"]
        version, internal, gauss = rng["python"]
    except (TypeError, KeyError, ValueError):
        return False
    return (kind == "MT19937" and isinstance(keys, list) and len(keys) == 624
            and all(_is_int(k) and 0 <= k < 2 ** 32 for k in keys) and _is_int(pos) and 0 <= pos <= 624
            and _is_int(has_gauss) and _is_num(cached) and _is_int(version) and isinstance(internal, list)
            and len(internal) == 625 and all(_is_int(k) and 0 <= k < 2 ** 32 for k in internal[:624])
            and _is_int(internal[624]) and (gauss is None or _is_num(gauss)))


def validate_resume_state(doc, where: str) -> None:
    """One-line :class:`ToolkitError` naming the first field of a ``state.json`` with a wrong type or range, or a
    data file outside (or missing from) the resume folder."""
    if not isinstance(doc, dict):
        raise ToolkitError(f"{where}: expected a JSON object, got {type(doc).__name__}")
    if doc.get("version") != RESUME_VERSION:
        raise ToolkitError(f"{where}: state version {doc.get('version')} is not {RESUME_VERSION}")
    checks = [
        ("step", lambda v: _is_int(v) and v >= 0, "an integer >= 0"),
        ("msave", lambda v: _is_int(v) and v >= 0, "an integer >= 0"),
        ("stage_index", lambda v: _is_int(v) and v >= 0, "an integer >= 0"),
        ("highest", lambda v: isinstance(v, list) and len(v) == 2 and all(_is_num(x) for x in v),
         "a list of two numbers"),
        ("saved_best", lambda v: isinstance(v, bool), "true or false"),
        ("iter_state", lambda v: isinstance(v, dict) and all(_is_int(v.get(k)) and v[k] >= 0
                                                             for k in ("epoch", "cursor", "seed")),
         "an object with integer epoch, cursor and seed >= 0"),
        ("config", lambda v: isinstance(v, dict), "an object (the run's configuration)"),
        ("before", lambda v: isinstance(v, dict) and all(_is_num(x) for x in v.values()),
         "an object of accuracies"),
        ("last_ckpt", lambda v: v is None or isinstance(v, str), "a path or null"),
        ("params", _plain_name, "a file name inside the resume folder"),
        ("optimizer", _plain_name, "a file name inside the resume folder"),
        ("optimizer_none", lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v),
         "a list of names"),
        ("optimizer_saved", lambda v: isinstance(v, bool), "true or false"),
        ("rng", _rng_ok, "numpy and python RNG states"),
    ]
    for key, ok, what in checks:
        if key not in doc:
            raise ToolkitError(f"{where}: field {key!r} is missing")
        if not ok(doc[key]):
            shown = json.dumps(doc[key], default=str)
            shown = shown if len(shown) <= 40 else shown[:37] + "..."
            raise ToolkitError(f"{where}: field {key!r} must be {what}, got {shown}")
    prefix = doc["config"].get("prefix")
    if prefix is not None and not isinstance(prefix, str):
        raise ToolkitError(f"{where}: config.prefix must be a path or null")


def read_resume_state(path: str) -> dict:
    """Parse and validate ``state.json`` of ``--resume DIR``; the dict gains ``dir`` (the resume folder) and
    ``run_dir`` (the folder holding it: where the resumed run writes, whatever path it had when saved)."""
    rdir = resume_dir(path)
    where = f"--resume {path}: {os.path.join(rdir, 'state.json')}"
    try:
        with open(os.path.join(rdir, "state.json")) as f:
            doc = json.load(f)
    except ValueError as exc:
        raise ToolkitError(f"--resume {path}: state.json is not valid JSON ({exc})") from None
    validate_resume_state(doc, where)
    for key in ("params", "optimizer"):
        if not os.path.isfile(os.path.join(rdir, doc[key])):
            raise ToolkitError(f"{where}: {key} file {doc[key]} is missing from {rdir}")
    doc["dir"] = rdir
    doc["run_dir"] = os.path.dirname(os.path.abspath(rdir))
    return doc


def load_resume_arrays(doc: dict):
    """``(embedding_symbol, arg_params, aux_params, optimizer_states or None)`` of a resume state; an unreadable
    file is one :class:`ToolkitError` line naming it."""
    rdir = doc["dir"]
    path = os.path.join(rdir, "embedding-symbol.json")
    try:
        sym = mx.sym.load(path)
        path = os.path.join(rdir, doc["params"])
        blob = mx.nd.load(path)
        states = None
        if doc.get("optimizer_saved"):
            path = os.path.join(rdir, doc["optimizer"])
            flat = mx.nd.load(path)
            flat.pop("__empty__", None)
            states = _unflatten(flat, doc.get("optimizer_none", []))
    except (mx.base.MXNetError, OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ToolkitError(f"--resume: cannot read {path} ({first[:160]})") from None
    if not isinstance(blob, dict) or not all(k.startswith(("arg:", "aux:")) for k in blob):
        raise ToolkitError(f"--resume: {os.path.join(rdir, doc['params'])} is not a resume parameter file")
    arg = {k[4:]: v for k, v in blob.items() if k.startswith("arg:")}
    aux = {k[4:]: v for k, v in blob.items() if k.startswith("aux:")}
    return sym, arg, aux, states


__all__ = ["RESUME_VERSION", "StopFlag", "get_optimizer_states", "set_optimizer_states", "rng_state",
           "set_rng_state", "save_resume", "resume_dir", "validate_resume_state", "read_resume_state",
           "load_resume_arrays"]
