"""Start MXNet's parameter-server roles (scheduler, servers, workers) for multi-process / multi-machine training.

``--kvstore dist_sync`` (or ``dist_device_sync``, ``dist_async``) makes each training process a *worker* of
MXNet's parameter server (ps-lite). Besides the workers, one *scheduler* and one or more *servers* must run;
every process learns its role and where the scheduler listens from environment variables::

    DMLC_ROLE=scheduler|server|worker  DMLC_PS_ROOT_URI=<scheduler IP>  DMLC_PS_ROOT_PORT=<port>
    DMLC_NUM_SERVER=<servers>          DMLC_NUM_WORKER=<workers>        (DMLC_NODE_HOST=<this node's IP>)

A scheduler or server is just ``python -c "import mxnet"`` with that environment: importing mxnet runs the
server loop and exits when the workers finish. This launcher sets it all up and watches the processes.

One machine (e.g. several processes sharing CPU cores, or one process per GPU)::

    python -m recognition.launch --num-workers 2 --num-servers 1 -- \\
        python recognition/train.py --kvstore dist_sync --network r50 --data-dir ...

Several machines (``--hosts`` file: one IP address per line, ``#`` comments; the first host also runs the
scheduler; workers and servers are assigned round-robin)::

    python -m recognition.launch --hosts hosts.txt --num-workers 4 --num-servers 2 -- \\
        python recognition/train.py --kvstore dist_sync ...

Remote processes are started with ``ssh -o BatchMode=yes HOST 'cd <this directory> && env DMLC_...=... CMD'``
(``--ssh`` replaces ``ssh -o BatchMode=yes``; ``--dry-run`` prints every command without running it). Requirements
for real hosts: password-less ssh from this machine to each host; the same code, data paths and Python environment
at the same path on every host (a shared file system, or identical copies; activate the environment in the
command, e.g. ``bash -c '. .venv/bin/activate && python ...'``); the scheduler's port (``--port``) and ps-lite's
ports open between hosts; with several network interfaces set ``--interface eth0`` (``DMLC_INTERFACE``).

Without ssh (a cluster scheduler, ``mpirun``, Kubernetes, dmlc-submit, or by hand): start the same roles with the
same environment yourself. On the scheduler host, once: ``DMLC_ROLE=scheduler ... python -c "import mxnet"``; on
server hosts ``DMLC_ROLE=server`` and the same command; on each worker host ``DMLC_ROLE=worker python
recognition/train.py --kvstore dist_sync ...``; every process gets the same ``DMLC_PS_ROOT_URI``,
``DMLC_PS_ROOT_PORT``, ``DMLC_NUM_SERVER``, ``DMLC_NUM_WORKER`` (and its own ``DMLC_NODE_HOST``). ``--dry-run``
prints exactly these commands. Nothing then watches for failures: a failed train.py worker exits at once with a
non-zero code, and your tool must stop the other processes.

What ``train.py --kvstore dist_sync`` does as a worker (``recognition.trainer``):

- ``--kvstore`` is checked first: an unknown name, a ``dist_*`` kvstore without ``DMLC_ROLE=worker`` (not started
  by a launcher) or a launched worker with a local kvstore is a one-line error, exit code 2.
- The kvstore is created before anything else; ``kv.rank`` of ``kv.num_workers`` picks the data part: each epoch's
  seeded order is drawn for the global batch ``num_workers x per-batch-size x devices`` and worker ``r`` takes
  rows ``[r*B, (r+1)*B)`` of every global batch (disjoint parts covering the epoch; same number of steps on
  every worker, so all stop at the same step).
- The servers sum the workers' gradients; the optimizer runs in each worker with ``rescale_grad = 1 / (devices x
  workers)`` on per-device mean gradients: an update equals that of one process with the same global batch (one
  process with ``--ctx cpu:0,cpu:1`` and the same per-batch size sees the very same batches). Every worker starts
  from rank 0's parameters and applies the same update, so all hold identical weights. BatchNorm running
  statistics are not synchronised (each worker keeps those of its own part; rank 0's are saved, as in
  insightface). Dropout masks differ from a single-process run.
- Rank 0 alone verifies on ``--target``, writes checkpoints, ``resume/`` and the curves; worker ``r > 0`` logs to
  ``RUN_DIR/worker<r>/`` (``train.log``, ``metrics.jsonl``; losses there are those of its part). ``--resume RUN_DIR``
  restarts every worker from rank 0's state (also with another number of workers giving the same global batch).
- A worker that fails prints its one-line error and leaves with ``os._exit`` (a normal exit would wait forever
  in ps-lite's shutdown for the others); the launcher then stops the rest.

Failure handling: the launcher polls every process. When any of them exits with a non-zero code (or a worker
is killed), the others would block forever in the next synchronous push/pull, so the launcher stops all of them
(SIGTERM, then SIGKILL after ``--grace`` seconds), prints which process died and exits non-zero. ``--timeout``
bounds the whole run. Ctrl-C or SIGTERM to the launcher stops every process it started.
"""
from __future__ import annotations

import argparse
import contextlib
import logging
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass, field
from typing import Dict, Iterator, List, Mapping, Optional, Sequence

from recognition.common import ToolkitError, run_cli

DIST_KVSTORES = ("dist_sync", "dist_device_sync", "dist_async", "dist_device_async", "dist_sync_device")
LOCAL_KVSTORES = ("local", "device", "nccl")
KVSTORES = LOCAL_KVSTORES + DIST_KVSTORES
LOCAL_HOSTS = ("127.0.0.1", "localhost", "")
POLL_S = 0.2


@dataclass
class Proc:
    """One started role: ``role`` ('scheduler', 'server', 'worker'), its index, host and Popen handle."""

    role: str
    index: int
    host: str
    argv: List[str]
    env: Dict[str, str] = field(default_factory=dict)
    popen: Optional[subprocess.Popen] = None

    @property
    def label(self) -> str:
        return self.role if self.role == "scheduler" else f"{self.role} {self.index}"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m recognition.launch", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Everything after '--' is the worker command.")
    p.add_argument("--num-workers", "-n", type=int, default=None, help="number of workers (default: one per host)")
    p.add_argument("--num-servers", "-s", type=int, default=None, help="number of servers (default: = workers)")
    p.add_argument("--hosts", "-H", default=None, help="file with one host IP per line; default: all on 127.0.0.1")
    p.add_argument("--port", type=int, default=0, help="scheduler port (default: a free port)")
    p.add_argument("--ssh", default="ssh -o BatchMode=yes", help="command that runs a command on a remote host")
    p.add_argument("--interface", default=None, help="network interface for ps-lite (sets DMLC_INTERFACE)")
    p.add_argument("--env", action="append", default=[], metavar="KEY=VALUE", help="extra environment, repeatable")
    p.add_argument("--grace", type=float, default=5.0, help="seconds between SIGTERM and SIGKILL when stopping")
    p.add_argument("--timeout", type=float, default=0, help="stop everything after this many seconds (0: never)")
    p.add_argument("--dry-run", action="store_true", help="print the commands with their environment and exit")
    p.add_argument("command", nargs=argparse.REMAINDER, help="worker command (after '--')")
    return p


def read_hosts(path: str) -> List[str]:
    """Hosts from a file: one address per line (``host`` or ``host:port``-free), ``#`` starts a comment."""
    if not os.path.isfile(path):
        raise ToolkitError(f"--hosts: file {path} does not exist")
    with open(path) as f:
        hosts = [line.split("#", 1)[0].strip() for line in f]
    hosts = [h for h in hosts if h]
    if not hosts:
        raise ToolkitError(f"--hosts: {path} lists no host")
    for h in hosts:
        if any(c.isspace() for c in h) or ":" in h:
            raise ToolkitError(f"--hosts: {path}: bad host {h!r}; expected one address per line")
    return hosts


def check_command(command: Sequence[str]) -> List[str]:
    """Strip the leading ``--``; a ``--kvstore`` given to the workers must be a distributed kvstore."""
    command = list(command)
    if command and command[0] == "--":
        command = command[1:]
    if not command:
        raise ToolkitError("no worker command: give it after '--', e.g. -- python recognition/train.py "
                           "--kvstore dist_sync ...")
    for i, arg in enumerate(command):
        value = None
        if arg == "--kvstore" and i + 1 < len(command):
            value = command[i + 1]
        elif arg.startswith("--kvstore="):
            value = arg.split("=", 1)[1]
        if value is not None and value not in DIST_KVSTORES:
            hint = "it is not a distributed kvstore" if not value.startswith("dist") else "no such kvstore"
            raise ToolkitError(f"--kvstore {value} in the worker command: {hint}; launch.py runs parameter servers "
                               f"for {', '.join(DIST_KVSTORES)}")
    return command


def check_kvstore(name: str, env: Optional[Mapping[str, str]] = None) -> str:
    """``--kvstore`` checked before any compute; returns ``name``.

    MXNet itself turns any unknown name into a local kvstore, and a ``dist_*`` kvstore without the ``DMLC_*``
    environment waits for a scheduler that never comes: both become one-line errors here. A process the launcher
    started as a worker (``DMLC_ROLE=worker``) must use a distributed kvstore, else N copies would train alone.
    """
    env = os.environ if env is None else env
    if name not in KVSTORES:
        raise ToolkitError(f"--kvstore {name!r}: unknown kvstore; choose one of {', '.join(KVSTORES)}")
    role = env.get("DMLC_ROLE")
    if name in DIST_KVSTORES and role != "worker":
        why = "DMLC_ROLE is not set" if not role else f"DMLC_ROLE is {role!r}, not 'worker'"
        raise ToolkitError(f"--kvstore {name}: a distributed kvstore needs a scheduler and servers ({why}); start "
                           f"the workers with python -m recognition.launch --num-workers N -- python "
                           f"recognition/train.py --kvstore {name} ...")
    if role == "worker" and name not in DIST_KVSTORES:
        raise ToolkitError(f"--kvstore {name}: this process is a launched worker (DMLC_ROLE=worker) but the kvstore "
                           f"is not distributed; give --kvstore dist_sync (or {', '.join(DIST_KVSTORES[1:])})")
    if name == "nccl":
        import mxnet as mx

        if mx.context.num_gpus() == 0:
            raise ToolkitError("--kvstore nccl: needs GPUs (none visible); use device or local")
    return name


@contextlib.contextmanager
def worker_exit_on_error() -> Iterator[None]:
    """In a parameter-server worker, end the process at once on any error (after the one-line message).

    A normal exit runs ps-lite's shutdown, which waits for every other worker: a worker that failed would hang
    there forever (and the others in their next push/pull). ``os._exit`` skips it; the launcher sees the exit
    code and stops the other processes. ToolkitError -> ``error: ...`` and code 2, Ctrl-C -> 130, anything else ->
    traceback and code 1.
    """
    try:
        yield
    except BaseException as exc:  # noqa: BLE001 -- every way out must skip the blocking shutdown
        if isinstance(exc, ToolkitError):
            code, msg = 2, f"error: {exc}"
        elif isinstance(exc, KeyboardInterrupt):
            code, msg = 130, "interrupted"
        elif isinstance(exc, SystemExit):
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
            msg = "" if code == 0 or exc.code is None or isinstance(exc.code, int) else str(exc.code)
        else:
            traceback.print_exc()
            code, msg = 1, f"error: worker failed: {type(exc).__name__}: {exc}"
        if msg:
            print(msg, file=sys.stderr)
        for handler in logging.getLogger().handlers:
            with contextlib.suppress(Exception):
                handler.flush()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def worker_kvstore(name: str):
    """``mx.kv.create(name)`` in a launched worker (waits until the scheduler, servers and all workers are up).

    The servers only sum gradients; the optimizer runs in every worker (``MXNET_UPDATE_ON_KVSTORE=0``). A
    server-side optimizer is a pickled copy made once: it would never see the lr schedule (``opt.lr`` set per step)
    nor the per-parameter multipliers set after ``init_optimizer``, and its states could not be saved for
    ``--resume``. Each worker applies the same summed gradient to the same parameters, so they stay identical.
    A stage switch binds a new Module that initialises every key again; ps-lite would count a second ``init``
    (pushed by rank 0 only) as a gradient push and wait for the other workers forever: keys are initialised once.
    """
    import mxnet as mx

    os.environ["MXNET_UPDATE_ON_KVSTORE"] = "0"
    kv = mx.kv.create(name)
    seen: set = set()
    init = kv.init

    def init_once(key, value):
        keys, values = (list(key), list(value)) if isinstance(key, (list, tuple)) else ([key], [value])
        new = [(k, v) for k, v in zip(keys, values) if k not in seen]
        seen.update(k for k, _ in new)
        if new:
            init([k for k, _ in new], [v for _, v in new])

    kv.init = init_once
    logging.getLogger("recognition").info("kvstore %s: worker %d of %d", name, kv.rank, kv.num_workers)
    return kv


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def plan(command: List[str], num_workers: int, num_servers: int, hosts: List[str], port: int,
         extra_env: Dict[str, str], interface: Optional[str] = None) -> List[Proc]:
    """The processes to start: scheduler on ``hosts[0]``, servers and workers round-robin over ``hosts``."""
    root = hosts[0] if hosts[0] not in ("localhost", "") else "127.0.0.1"
    base = dict(extra_env, DMLC_PS_ROOT_URI=root, DMLC_PS_ROOT_PORT=str(port), DMLC_NUM_SERVER=str(num_servers),
                DMLC_NUM_WORKER=str(num_workers))
    if interface:
        base["DMLC_INTERFACE"] = interface
    python = command[0] if os.path.basename(command[0]).startswith("python") else sys.executable
    server_argv = [python, "-c", "import mxnet"]
    procs = [Proc("scheduler", 0, hosts[0], server_argv, dict(base, DMLC_ROLE="scheduler"))]
    for i in range(num_servers):
        procs.append(Proc("server", i, hosts[i % len(hosts)], server_argv, dict(base, DMLC_ROLE="server")))
    for i in range(num_workers):
        procs.append(Proc("worker", i, hosts[i % len(hosts)], list(command), dict(base, DMLC_ROLE="worker")))
    for p in procs:
        p.env["DMLC_NODE_HOST"] = p.host if p.host not in ("localhost", "") else "127.0.0.1"
        if p.role != "worker":  # servers only sum gradients and run the optimizer: keep them off the cores
            p.env.setdefault("OMP_NUM_THREADS", "1")
    return procs


def remote_argv(proc: Proc, ssh: str) -> List[str]:
    """``ssh HOST 'cd CWD && env K=V ... CMD'`` for a remote host; the local command otherwise."""
    if proc.host in LOCAL_HOSTS:
        return proc.argv
    env = " ".join(f"{k}={shlex.quote(v)}" for k, v in sorted(proc.env.items()))
    inner = f"cd {shlex.quote(os.getcwd())} && env {env} {shlex.join(proc.argv)}"
    return shlex.split(ssh) + [proc.host, inner]


def _stop(procs: Sequence[Proc], grace: float) -> None:
    """SIGTERM every live process group, SIGKILL what is left after ``grace`` seconds; reap them all."""
    live = [p for p in procs if p.popen is not None and p.popen.poll() is None]
    for p in live:
        _signal_group(p.popen, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and any(p.popen.poll() is None for p in live):
        time.sleep(0.05)
    for p in live:
        if p.popen.poll() is None:
            _signal_group(p.popen, signal.SIGKILL)
    for p in procs:
        if p.popen is not None:
            try:
                p.popen.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                pass


def _signal_group(popen: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(popen.pid, sig)  # each role runs in its own process group (start_new_session)
    except (ProcessLookupError, PermissionError):
        pass


def run(procs: List[Proc], ssh: str = "ssh -o BatchMode=yes", grace: float = 5.0, timeout: float = 0) -> int:
    """Start ``procs``, wait for the workers, stop everything. Returns 0; raises ToolkitError naming the process
    that failed (all others stopped first)."""
    started = time.monotonic()
    prev = signal.getsignal(signal.SIGTERM)

    def _on_term(signum, frame):
        raise KeyboardInterrupt

    try:
        signal.signal(signal.SIGTERM, _on_term)
    except ValueError:  # not the main thread: rely on the caller
        prev = None
    try:
        for p in procs:
            argv = remote_argv(p, ssh)
            env = dict(os.environ, **p.env) if p.host in LOCAL_HOSTS else None
            try:
                p.popen = subprocess.Popen(argv, env=env, start_new_session=True)
            except OSError as exc:
                raise ToolkitError(f"cannot start {p.label} ({shlex.join(argv[:3])} ...): {exc}") from None
            print(f"launch: started {p.label} on {p.host or '127.0.0.1'} pid {p.popen.pid}", file=sys.stderr,
                  flush=True)
        workers = [p for p in procs if p.role == "worker"]
        while True:
            for p in procs:
                rc = p.popen.poll()
                if rc is not None and rc != 0:
                    how = f"was killed by signal {-rc}" if rc < 0 else f"exited with code {rc}"
                    raise ToolkitError(f"{p.label} (pid {p.popen.pid}, host {p.host or '127.0.0.1'}) {how}; "
                                       f"stopped the other processes")
            if all(p.popen.poll() == 0 for p in workers):
                break
            if timeout and time.monotonic() - started > timeout:
                raise ToolkitError(f"--timeout: workers still running after {timeout:g} s; stopped all processes")
            time.sleep(POLL_S)
        # the workers finished: scheduler and servers leave on their own shortly after
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and any(p.popen.poll() is None for p in procs):
            time.sleep(0.05)
        print(f"launch: {len(workers)} worker(s) finished in {time.monotonic() - started:.1f} s", file=sys.stderr)
        return 0
    finally:
        _stop(procs, grace)
        if prev is not None:
            signal.signal(signal.SIGTERM, prev)


def _parse_env(items: Sequence[str]) -> Dict[str, str]:
    env = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ToolkitError(f"--env {item!r}: expected KEY=VALUE")
        env[key] = value
    return env


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    command = check_command(args.command)
    hosts = read_hosts(args.hosts) if args.hosts else ["127.0.0.1"]
    num_workers = args.num_workers if args.num_workers is not None else len(hosts)
    num_servers = args.num_servers if args.num_servers is not None else num_workers
    if num_workers < 1:
        raise ToolkitError(f"--num-workers: must be >= 1, got {num_workers}")
    if num_servers < 1:
        raise ToolkitError(f"--num-servers: must be >= 1, got {num_servers}")
    if not 0 <= args.port < 65536:
        raise ToolkitError(f"--port: must be in 0..65535, got {args.port}")
    port = args.port or (free_port() if hosts[0] in LOCAL_HOSTS else 9091)
    procs = plan(command, num_workers, num_servers, hosts, port, _parse_env(args.env), args.interface)
    if args.dry_run:
        for p in procs:
            env = " ".join(f"{k}={v}" for k, v in sorted(p.env.items()))
            local = p.host in LOCAL_HOSTS
            print(f"# {p.label} on {p.host}\n" + (f"env {env} {shlex.join(p.argv)}" if local
                                                   else shlex.join(remote_argv(p, args.ssh))))
        return 0
    return run(procs, ssh=args.ssh, grace=args.grace, timeout=args.timeout)


def cli() -> None:
    sys.exit(run_cli(main))


if __name__ == "__main__":
    cli()
