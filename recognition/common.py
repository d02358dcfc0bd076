"""Small helpers every script shares: user-facing errors, contexts, atomic files, checkpoint names."""
from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
import tempfile
from typing import Callable, Iterator, List, Optional, Sequence, Tuple

logger = logging.getLogger("recognition")


class ToolkitError(Exception):
    """A problem the user can fix (bad flag, missing file, wrong shape). Printed as one line, exit code 2."""


def run_cli(main: Callable[[Optional[Sequence[str]]], Optional[int]], argv: Optional[Sequence[str]] = None) -> int:
    """Run ``main(argv)``; turn a :class:`ToolkitError` into one ``error: ...`` line on stderr and exit code 2."""
    try:
        rc = main(argv)
    except ToolkitError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return int(rc or 0)


class _StderrHandler(logging.StreamHandler):
    """A StreamHandler on whatever ``sys.stderr`` is now (not the one at creation, which a test harness may have
    closed since: "--- Logging error ---" tracebacks)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):
        pass


def setup_logging(verbose: bool = True, log_file: Optional[str] = None) -> None:
    """Log to stderr (and to ``log_file``) with a timestamp, once per process."""
    root = logging.getLogger()
    if not any(getattr(h, "_ifr", False) for h in root.handlers):
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        handler._ifr = True  # type: ignore[attr-defined]
        root.addHandler(handler)
    if log_file:
        # one run log per process: a second Trainer in the same process (tests, notebooks, the demo's runs) moves
        # the file handler to its own run instead of writing every later run into every earlier log
        path = os.path.abspath(log_file)
        for h in [h for h in root.handlers if getattr(h, "_ifr_file", None)]:
            if h._ifr_file == path:  # type: ignore[attr-defined]
                break
            root.removeHandler(h)
            h.close()
        else:
            fh = logging.FileHandler(path)
            fh.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
            fh._ifr = True  # type: ignore[attr-defined]
            fh._ifr_file = path  # type: ignore[attr-defined]
            root.addHandler(fh)
    root.setLevel(logging.INFO if verbose else logging.WARNING)


def parse_ctx(spec: Optional[str] = None) -> list:
    """Devices from ``--ctx`` (``cpu``, ``cpu:0,cpu:1``, ``gpu:0,gpu:1``) or, when empty, ``CUDA_VISIBLE_DEVICES``.

    Without either, one CPU context. Several CPU contexts act as separate devices (data/model parallel tests).
    """
    import mxnet as mx

    if not spec:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES", "").strip()
        if visible and mx.context.num_gpus() > 0:
            return [mx.gpu(i) for i in range(len(visible.split(",")))]
        return [mx.cpu()]
    ctxs = []
    for part in spec.split(","):
        m = re.fullmatch(r"\s*(cpu|gpu)(?::(\d+))?\s*", part)
        if not m:
            raise ToolkitError(f"--ctx: cannot parse {part!r}; expected e.g. 'cpu', 'cpu:0,cpu:1' or 'gpu:0,gpu:1'")
        kind, idx = m.group(1), int(m.group(2) or 0)
        if kind == "gpu" and idx >= mx.context.num_gpus():
            raise ToolkitError(f"--ctx: {part.strip()} requested but {mx.context.num_gpus()} GPU(s) are visible")
        ctxs.append(mx.Context(kind, idx))
    return ctxs


def parse_prefix_epoch(spec: str, flag: str = "--pretrained", check_files: bool = True) -> Tuple[str, int]:
    """Split ``PREFIX,EPOCH`` (or a ``PREFIX-0000.params`` path) into ``(prefix, epoch)`` and check the files exist."""
    if not spec:
        raise ToolkitError(f"{flag}: empty; expected PREFIX,EPOCH (e.g. ../models/model-r100-ii/model,0)")
    m = re.fullmatch(r"(.+)-(\d{4})\.params", spec)
    if m:
        prefix, epoch = m.group(1), int(m.group(2))
    else:
        if "," not in spec:
            raise ToolkitError(f"{flag} {spec!r}: missing ',EPOCH'; expected PREFIX,EPOCH (e.g. {spec},0)")
        prefix, _, ep = spec.rpartition(",")
        try:
            epoch = int(ep)
        except ValueError:
            raise ToolkitError(f"{flag} {spec!r}: epoch {ep!r} is not an integer") from None
    if check_files:
        params = "%s-%04d.params" % (prefix, epoch)
        if not os.path.isfile(params):
            found = sorted(f for f in os.listdir(os.path.dirname(prefix) or ".")
                           if f.startswith(os.path.basename(prefix)) and f.endswith(".params")) \
                if os.path.isdir(os.path.dirname(prefix) or ".") else []
            hint = f" (found: {', '.join(found)})" if found else ""
            raise ToolkitError(f"{flag}: checkpoint file {params} does not exist{hint}")
    return prefix, epoch


@contextlib.contextmanager
def atomic_write(path: str, mode: str = "wb") -> Iterator:
    """Write ``path`` through a temporary file in the same folder, fsync it, then rename it into place.

    A reader never sees a half-written file: either the old content or the new one. On an exception the
    temporary file is removed and ``path`` is untouched.
    """
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = _mkstemp_like_open(path, folder)
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(exc, OSError):  # disk full, file too large, read-only: one line naming the file
            raise write_error(path, exc) from None
        raise
    _fsync_dir(folder)


def write_error(path: str, exc: BaseException) -> ToolkitError:
    """One-line :class:`ToolkitError` for a failed write of ``path``: the errno text when there is one."""
    reason = f"[Errno {exc.errno}] {exc.strerror}" if isinstance(exc, OSError) and exc.errno else \
        (str(exc).strip().splitlines() or [type(exc).__name__])[-1]
    return ToolkitError(f"cannot write {path}: {reason}; the file was left as it was (no partial file)")


def _probe_write(tmp: str) -> Optional[OSError]:
    """After MXNet's writer failed on ``tmp`` (its error has no errno), append a little to learn the real reason
    (ENOSPC, EFBIG past RLIMIT_FSIZE, EROFS, ...) from the kernel."""
    try:
        with open(tmp, "ab") as f:
            f.write(b"\0" * 65536)
            f.flush()
            os.fsync(f.fileno())
    except OSError as exc:
        return exc
    return None


def remove_stale_temps(folder: str) -> List[str]:
    """Delete the ``.NAME.XXXX.tmp`` files that :func:`atomic_write`/:func:`save_params_atomic` leave when a process
    is killed mid-write (never taken for checkpoints: real names are only ever made by rename). Returns them."""
    removed = []
    if not os.path.isdir(folder):
        return removed
    for name in sorted(os.listdir(folder)):
        if name.startswith(".") and name.endswith(".tmp") and os.path.isfile(os.path.join(folder, name)):
            with contextlib.suppress(OSError):
                os.unlink(os.path.join(folder, name))
                removed.append(name)
    return removed


def atomic_replace(tmp_path: str, path: str) -> None:
    """fsync ``tmp_path`` and rename it onto ``path`` (for writers that need a real file name while writing)."""
    with open(tmp_path, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp_path, path)
    _fsync_dir(os.path.dirname(os.path.abspath(path)))


def _mkstemp_like_open(path: str, folder: str) -> Tuple[int, str]:
    """A hidden temporary file next to ``path`` with the permissions ``open()`` would give (mkstemp makes 0600)."""
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=folder)
    umask = os.umask(0)
    os.umask(umask)
    os.fchmod(fd, 0o666 & ~umask)
    return fd, tmp


def _fsync_dir(folder: str) -> None:
    with contextlib.suppress(OSError):
        dfd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)


def save_params_atomic(path: str, params: dict) -> None:
    """``mx.nd.save`` to ``path`` atomically (keys as given, e.g. ``arg:conv0_weight``)."""
    import mxnet as mx

    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = _mkstemp_like_open(path, folder)
    os.close(fd)
    try:
        mx.nd.save(tmp, params)
        atomic_replace(tmp, path)
    except BaseException as exc:
        probe = _probe_write(tmp) if isinstance(exc, mx.base.MXNetError) else None
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(exc, (OSError, mx.base.MXNetError)):
            raise write_error(path, probe or exc) from None
        raise


def save_checkpoint(prefix: str, epoch: int, symbol, arg_params: dict, aux_params: dict) -> List[str]:
    """Atomic ``mx.model.save_checkpoint``: same files and keys, never half-written. Returns the two paths.

    The params file is written first, then the symbol: a symbol file only exists next to complete params.
    """
    params_path = "%s-%04d.params" % (prefix, epoch)
    sym_path = "%s-symbol.json" % prefix
    blob = {"arg:" + k: v.as_in_context(_cpu()) for k, v in arg_params.items()}
    blob.update({"aux:" + k: v.as_in_context(_cpu()) for k, v in aux_params.items()})
    save_params_atomic(params_path, blob)
    if symbol is not None:
        with atomic_write(sym_path, "w") as f:
            f.write(symbol_json(symbol))
    return [params_path, sym_path]


def load_checkpoint(prefix: str, epoch: int, need_symbol: bool = True):
    """``mx.model.load_checkpoint`` with one-line errors. Returns ``(symbol or None, arg_params, aux_params)``."""
    import mxnet as mx

    params_path = "%s-%04d.params" % (prefix, epoch)
    sym_path = "%s-symbol.json" % prefix
    if not os.path.isfile(params_path):
        raise ToolkitError(f"checkpoint file {params_path} does not exist")
    symbol = None
    if need_symbol:
        if not os.path.isfile(sym_path):
            raise ToolkitError(f"checkpoint symbol {sym_path} does not exist (params found at {params_path})")
        symbol = load_symbol(sym_path)
    try:
        saved = mx.nd.load(params_path)
    except Exception as exc:  # MXNet says "Invalid NDArray file format" (first line "Traceback ..."): find the cause
        from recognition.params_format import params_problem

        cause = params_problem(params_path) or mxnet_error_line(exc)
        raise ToolkitError(f"{params_path}: not a readable MXNet params file ({cause})") from None
    if not isinstance(saved, dict):
        raise ToolkitError(f"{params_path}: holds an unnamed array list, not a checkpoint")
    arg_params, aux_params = {}, {}
    for key, value in saved.items():
        kind, _, name = key.partition(":")
        if kind == "arg":
            arg_params[name] = value
        elif kind == "aux":
            aux_params[name] = value
        else:  # Gluon save_parameters format: no arg:/aux: prefixes
            (aux_params if name.endswith(("moving_mean", "moving_var", "running_mean", "running_var"))
             else arg_params)[key] = value
    return symbol, arg_params, aux_params


def mxnet_error_line(exc: BaseException) -> str:
    """The informative line of an MXNet error (its text starts with "Traceback ..." and C++ file lines)."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    for ln in reversed(lines):
        if not ln.startswith(("Traceback", "File ", "[bt]", "Stack trace")):
            return ln.replace("MXNetError: ", "")
    return type(exc).__name__


def load_symbol(sym_path: str):
    """``mx.sym.load`` with the cause of a failure kept: not UTF-8 (byte N), not JSON (line, column), not a graph."""
    import json

    import mxnet as mx

    with open(sym_path, "rb") as f:
        raw = f.read()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ToolkitError(f"{sym_path}: not a readable MXNet symbol (not UTF-8 text: byte {exc.start} is "
                           f"0x{raw[exc.start]:02x})") from None
    try:
        graph = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ToolkitError(f"{sym_path}: not a readable MXNet symbol (not JSON at line {exc.lineno} column "
                           f"{exc.colno}: {exc.msg})") from None
    if not isinstance(graph, dict) or not isinstance(graph.get("nodes"), list) or "heads" not in graph:
        raise ToolkitError(f"{sym_path}: not a readable MXNet symbol (JSON, but no 'nodes' list and 'heads')")
    try:
        return mx.sym.load_json(text)
    except Exception as exc:
        raise ToolkitError(f"{sym_path}: not a readable MXNet symbol ({mxnet_error_line(exc)})") from None


def symbol_json(symbol) -> str:
    """``symbol.tojson()`` without MXNet 1.9.1's leak: use this for every symbol-to-JSON in the toolkit.

    MXNet's ``Symbol.tojson()`` and ``Symbol.save()`` first copy the graph without AMP casts
    (``MXSymbolRemoveAmpCast``) and never free that copy: every call leaks a whole graph (~100 KB for ``tiny``,
    ~230 KB for MobileFaceNet; ``benchmarks/soak.py`` showed it as ~1 MB of RSS per verification round, from
    the checkpoint, resume-state and verifier calls). Here the copy is owned by a ``Symbol`` and freed with it;
    the JSON is the same.
    """
    import ctypes

    import mxnet as mx
    from mxnet.base import _LIB, SymbolHandle, check_call

    handle = SymbolHandle()
    check_call(_LIB.MXSymbolRemoveAmpCast(symbol.handle, ctypes.byref(handle)))
    return mx.sym.Symbol(handle).tojson(remove_amp_cast=False)


def symbol_graph(symbol) -> dict:
    """The symbol's JSON graph as a dict (``nodes``, ``heads``, ``arg_nodes``, ...); see :func:`symbol_json`."""
    import json

    return json.loads(symbol_json(symbol))


def _cpu():
    import mxnet as mx

    return mx.cpu()
