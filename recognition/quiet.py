"""Quiet by default: MXNet's C++ INFO chatter and its deprecation warnings are filtered; ``-v`` shows them.

MXNet 1.9.1 writes, straight to file descriptor 2 (no Python logging to configure):

- ``MXNET_SUBGRAPH_BACKEND=NONE is detected, subgraph backend is not in use`` at every executor it builds (the
  toolkit sets that value on purpose, see ``recognition/__init__``; 1-7 times per command);
- ``Loading symbol saved by previous version v1.0.0. Attempting to upgrade...`` and ``Symbol successfully
  upgraded!`` at every load of an older checkpoint's ``-symbol.json`` (every insightface model-zoo model);

and its Python modules raise ``DeprecationWarning`` on import and inside ``mx.nd.array``/``mx.recordio.pack``
(``distutils`` versions, ``scipy.sparse.csr``, ``ndarray.tostring``), about 5,000 times in the test run.

:func:`install` (called by ``recognition/__init__`` unless verbose) adds warning filters for those third-party
modules only, and wraps the MXNet entry points that write the chatter (``Symbol.bind``, ``Symbol.simple_bind``,
``mx.sym.load``, ``mx.sym.load_json``) in :func:`filtered_stderr`: descriptor 2 goes to a temporary file for the
call and every line that is not one of the known messages is written back. Nothing else is hidden: errors come
back as exceptions, and any other line MXNet writes is passed through. ``IFR_VERBOSE=1`` (what ``-v`` of every
command sets, see :func:`recognition.common.run_cli`) turns all of it off.
"""
from __future__ import annotations

import contextlib
import functools
import importlib.abc
import importlib.util
import os
import re
import sys
import tempfile
import threading
import warnings
from typing import Iterator

VERBOSE_ENV = "IFR_VERBOSE"

# the exact INFO lines MXNet 1.9.1 prints (src/executor/graph_executor.cc, src/nnvm/legacy_json_util.cc)
CHATTER = re.compile(r"MXNET_SUBGRAPH_BACKEND=NONE is detected, subgraph backend is not in use"
                     r"|Loading symbol saved by previous version v[\d.]+\. Attempting to upgrade\.\.\."
                     r"|Symbol successfully upgraded!")

# DeprecationWarnings raised inside these third-party packages (their code, not ours) are not shown
THIRD_PARTY = r"(mxnet|gluoncv)(\..*)?$"

_lock = threading.RLock()
_depth = 0
_patched = False


def is_verbose() -> bool:
    """True when ``IFR_VERBOSE`` is set to something other than '' or '0' (``-v``)."""
    return os.environ.get(VERBOSE_ENV, "") not in ("", "0")


def set_verbose(on: bool) -> None:
    """``-v``: show MXNet's messages and third-party warnings from now on (also in child processes)."""
    if on:
        os.environ[VERBOSE_ENV] = "1"
        warnings.filterwarnings("default", category=DeprecationWarning, module=THIRD_PARTY)
    else:
        os.environ.pop(VERBOSE_ENV, None)


@contextlib.contextmanager
def filtered_stderr() -> Iterator[None]:
    """Send descriptor 2 to a temporary file for the block, then write back every line that is not :data:`CHATTER`.

    Re-entrant; one block at a time across threads (a lock), as descriptor 2 is shared by the whole process.
    """
    global _depth
    if is_verbose():
        yield
        return
    with _lock:
        if _depth:  # nested: the outer block filters
            _depth += 1
            try:
                yield
            finally:
                _depth -= 1
            return
        try:
            sys.stderr.flush()
            saved = os.dup(2)
        except (OSError, ValueError, AttributeError):  # no usable descriptor 2: nothing to filter
            yield
            return
        _depth = 1
        with tempfile.TemporaryFile() as tmp:
            os.dup2(tmp.fileno(), 2)
            try:
                yield
            finally:
                with contextlib.suppress(OSError, ValueError):
                    sys.stderr.flush()
                os.dup2(saved, 2)
                os.close(saved)
                _depth = 0
                tmp.seek(0)
                text = tmp.read().decode("utf-8", errors="replace")
                kept = "".join(line for line in text.splitlines(True) if not CHATTER.search(line))
                if kept:
                    with contextlib.suppress(OSError, ValueError):
                        sys.stderr.write(kept)
                        sys.stderr.flush()


def _quiet(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with filtered_stderr():
            return fn(*args, **kwargs)

    wrapper._ifr_quiet = True  # type: ignore[attr-defined]
    return wrapper


def patch_mxnet(mx) -> None:
    """Wrap ``Symbol.bind``, ``Symbol.simple_bind``, ``mx.sym.load`` and ``mx.sym.load_json`` of the imported
    module ``mx`` (once)."""
    global _patched
    if _patched:
        return
    sym_mod = mx.symbol.symbol
    for name in ("bind", "simple_bind"):
        fn = getattr(sym_mod.Symbol, name)
        if not getattr(fn, "_ifr_quiet", False):
            setattr(sym_mod.Symbol, name, _quiet(fn))
    for name in ("load", "load_json"):
        fn = getattr(sym_mod, name)
        if not getattr(fn, "_ifr_quiet", False):
            quiet_fn = _quiet(fn)
            setattr(sym_mod, name, quiet_fn)
            setattr(mx.symbol, name, quiet_fn)
    _patched = True


class _PatchOnImport(importlib.abc.MetaPathFinder):
    """Patches ``mxnet`` right after it is imported (importing ``recognition`` must not import MXNet itself)."""

    def find_spec(self, name, path, target=None):
        if name != "mxnet":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec("mxnet")
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        run = spec.loader.exec_module

        def exec_module(module):
            run(module)
            patch_mxnet(module)

        spec.loader.exec_module = exec_module  # type: ignore[method-assign]
        return spec


def install() -> None:
    """Filter third-party deprecation warnings and MXNet's chatter (now, or when MXNet is imported), unless
    verbose."""
    if is_verbose():
        return
    warnings.filterwarnings("ignore", category=DeprecationWarning, module=THIRD_PARTY)
    if "mxnet" in sys.modules and hasattr(sys.modules["mxnet"], "symbol"):
        patch_mxnet(sys.modules["mxnet"])
    elif not any(isinstance(f, _PatchOnImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _PatchOnImport())


__all__ = ["CHATTER", "VERBOSE_ENV", "filtered_stderr", "install", "is_verbose", "patch_mxnet", "set_verbose"]
