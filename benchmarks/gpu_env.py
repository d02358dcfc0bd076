"""Environment half of ``benchmarks/gpu_check.sh``: the GPU, a Python for MXNet 1.9.1, the install, the CUDA libraries.

Standard library only: it runs under whatever ``python3`` the machine has, before the virtual environment exists.
Each sub-command prints its answer on stdout (a path, or JSON) and, when it cannot go on, one line starting with
``GPU CHECK:`` naming the problem on stderr with exit status 3.

    python benchmarks/gpu_env.py gpu-info                       # nvidia-smi facts as JSON
    python benchmarks/gpu_env.py find-python [--python PY]      # a Python 3.8-3.11 with venv + ensurepip
    python benchmarks/gpu_env.py install --venv V --package mxnet-cu117 [--wheels DIR] [--offline] --root R
    python benchmarks/gpu_env.py archs PATH/libmxnet.so          # SASS/PTX architectures in a CUDA library
    python benchmarks/gpu_env.py verdict --cc 9.0 --archs 50,60,70,80,86 [--ptx ...]
    python benchmarks/gpu_env.py download --dest DIR --python-version 3.11   # stage wheels for an offline machine

MXNet 1.9.1's CUDA wheels link the CUDA 11 libraries dynamically (``libcudart.so.11.0``, ``libcublas.so.11``,
``libcudnn.so.8``, ``libnccl.so.2``, ...) and ship none of them; where the system has no CUDA 11 toolkit they come
from NVIDIA's ``nvidia-*-cu11`` wheels (:data:`CUDA_LIBS`), whose ``lib`` folders go on ``LD_LIBRARY_PATH``.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import re
import shutil
import struct
import subprocess
import sys
from typing import Dict, List, Optional, Sequence, Tuple

MXNET_VERSION = "1.9.1"
PYTHON_RANGE = ((3, 8), (3, 11))  # numpy<1.24 (needed by mxnet 1.9.1) has no wheels for 3.12+
# soname that libmxnet.so (mxnet-cu112/cu117 1.9.1) needs -> the pip package that provides it
CUDA_LIBS: Dict[str, str] = {
    "libcudart.so.11.0": "nvidia-cuda-runtime-cu11==11.8.89",
    "libcublas.so.11": "nvidia-cublas-cu11==11.11.3.6",
    "libcublasLt.so.11": "nvidia-cublas-cu11==11.11.3.6",
    "libcudnn.so.8": "nvidia-cudnn-cu11==8.9.6.50",
    "libnccl.so.2": "nvidia-nccl-cu11==2.21.5",
    "libcufft.so.10": "nvidia-cufft-cu11==10.9.0.58",
    "libcusolver.so.11": "nvidia-cusolver-cu11==11.4.1.48",
    "libcusparse.so.11": "nvidia-cusparse-cu11==11.7.5.86",
    "libcurand.so.10": "nvidia-curand-cu11==10.3.0.86",
    "libnvrtc.so.11.2": "nvidia-cuda-nvrtc-cu11==11.8.89",
    "libnvToolsExt.so.1": "nvidia-nvtx-cu11==11.8.86",
}
DRIVER_LIB = "libcuda.so.1"  # comes with the NVIDIA driver, never from pip
# Measured with cuobjdump 13.5 --list-elf/--list-ptx on the PyPI wheels (2026-12-03): machine code for these
# architectures, no PTX, so nothing the driver could JIT for a newer GPU.
KNOWN_ARCHS: Dict[str, Dict[str, List[int]]] = {
    "mxnet-cu112": {"sass": [50, 60, 70, 80, 86], "ptx": []},
    "mxnet-cu117": {"sass": [50, 60, 70, 80, 86], "ptx": []},
}
PREFIX = "GPU CHECK:"


class EnvError(Exception):
    """A condition that stops the GPU check; the message is the one line printed."""


# ------------------------------------------------------------------------------------------------------ the GPU
def gpu_info(smi: str = "nvidia-smi") -> dict:
    """``{'gpus': [{'name', 'compute_cap', 'driver', 'memory_mib'}], 'cuda_driver': '13.0', 'summary'}`` from
    nvidia-smi (``summary``: one line for people).

    Raises :class:`EnvError` when nvidia-smi is missing or fails (no driver, no GPU visible).
    """
    if shutil.which(smi) is None:
        raise EnvError("no NVIDIA driver: nvidia-smi is not on PATH")
    fields = "name,compute_cap,driver_version,memory.total"
    proc = subprocess.run([smi, f"--query-gpu={fields}", "--format=csv,noheader,nounits"], capture_output=True,
                          text=True, timeout=60)
    if proc.returncode != 0:
        raise EnvError(f"nvidia-smi failed: {_last_line(proc.stderr or proc.stdout)}")
    gpus = []
    for line in proc.stdout.strip().splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) == 4:
            gpus.append({"name": parts[0], "compute_cap": parts[1], "driver": parts[2],
                         "memory_mib": int(float(parts[3])) if parts[3].replace(".", "").isdigit() else None})
    if not gpus:
        raise EnvError("nvidia-smi lists no GPU")
    head = subprocess.run([smi], capture_output=True, text=True, timeout=60).stdout
    m = re.search(r"CUDA Version:\s*([\d.]+)", head)
    g = gpus[0]
    summary = (f"{g['name']}, compute capability {g['compute_cap']}, driver {g['driver']} "
               f"(CUDA {m.group(1) if m else '?'}), {len(gpus)} GPU(s)")
    return {"gpus": gpus, "cuda_driver": m.group(1) if m else None, "summary": summary}


# ----------------------------------------------------------------------------------------------------- Python
def python_version(exe: str) -> Optional[Tuple[int, int, int]]:
    """``(major, minor, micro)`` of ``exe`` if it runs and has ``venv`` + ``ensurepip``, else ``None``."""
    code = "import sys, venv, ensurepip; print('%d %d %d' % sys.version_info[:3])"
    try:
        proc = subprocess.run([exe, "-c", code], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if proc.returncode != 0:
        return None
    major, minor, micro = (int(v) for v in proc.stdout.split())
    return major, minor, micro


def python_candidates(env: Optional[Dict[str, str]] = None) -> List[str]:
    """Interpreters to try, newest first: ``python3.11 .. python3.8`` on PATH, then pyenv, uv, conda installs."""
    env = os.environ if env is None else env
    path = env.get("PATH", "")
    out: List[str] = []
    for minor in range(PYTHON_RANGE[1][1], PYTHON_RANGE[0][1] - 1, -1):
        found = shutil.which(f"python3.{minor}", path=path)
        if found:
            out.append(found)
    home = env.get("HOME", os.path.expanduser("~"))
    patterns = [os.path.join(home, ".pyenv/versions/3.*/bin/python3"),
                os.path.join(home, ".local/share/uv/python/cpython-3.*/bin/python3"),
                "/opt/conda/bin/python3", "/opt/python/3.*/bin/python3", "/usr/local/bin/python3.*",
                "/usr/bin/python3.*"]
    for pattern in patterns:
        out.extend(sorted(p for p in glob.glob(pattern) if re.search(r"python3(\.\d+)?$", p)))
    for name in ("python3", "python"):
        found = shutil.which(name, path=path)
        if found:
            out.append(found)
    seen, unique = set(), []
    for p in out:
        real = os.path.realpath(p)
        if real not in seen:
            seen.add(real)
            unique.append(p)
    return unique


def find_python(explicit: Optional[str] = None, candidates: Optional[Sequence[str]] = None) -> Tuple[str, str]:
    """``(path, 'X.Y.Z')`` of the first Python in 3.8-3.11 with venv; :class:`EnvError` naming what was found."""
    tried = [explicit] if explicit else list(candidates if candidates is not None else python_candidates())
    seen = []
    for exe in tried:
        ver = python_version(exe)
        if ver is None:
            seen.append(f"{exe} (no venv/ensurepip or does not run)")
            continue
        if PYTHON_RANGE[0] <= ver[:2] <= PYTHON_RANGE[1]:
            return exe, "%d.%d.%d" % ver
        seen.append(f"{exe} ({'%d.%d.%d' % ver})")
    lo, hi = ("%d.%d" % v for v in PYTHON_RANGE)
    raise EnvError(f"no Python {lo}-{hi} found (mxnet {MXNET_VERSION} needs numpy<1.24, which has no wheels for "
                   f"3.12+); found: {', '.join(seen) or 'none'}; pass --python PATH")


# ---------------------------------------------------------------------------------------------- CUDA libraries
def missing_sonames(ldd_output: str) -> List[str]:
    """Sonames that ``ldd`` reports as ``not found`` (in order, no duplicates)."""
    out: List[str] = []
    for line in ldd_output.splitlines():
        m = re.match(r"\s*(\S+)\s*=>\s*not found", line)
        if m and m.group(1) not in out:
            out.append(m.group(1))
    return out


def packages_for(sonames: Sequence[str]) -> Tuple[List[str], List[str]]:
    """``(pip requirements that provide them, sonames no pip package provides)``."""
    reqs: List[str] = []
    unknown: List[str] = []
    for so in sonames:
        req = CUDA_LIBS.get(so)
        if req is None:
            unknown.append(so)
        elif req not in reqs:
            reqs.append(req)
    return reqs, unknown


def nvidia_lib_dirs(site_packages: str) -> List[str]:
    """The ``nvidia/*/lib`` folders of the ``nvidia-*-cu11`` wheels installed in ``site_packages``."""
    return sorted(d for d in glob.glob(os.path.join(site_packages, "nvidia", "*", "lib")) if os.path.isdir(d))


def ld_path_with(dirs: Sequence[str], current: Optional[str]) -> str:
    """``LD_LIBRARY_PATH`` with ``dirs`` first and the existing entries after (no duplicates)."""
    parts: List[str] = []
    for d in list(dirs) + (current or "").split(":"):
        if d and d not in parts:
            parts.append(d)
    return ":".join(parts)


# -------------------------------------------------------------------------------------------- fatbin contents
FATBIN_MAGIC = 0xBA55ED50
KIND_PTX, KIND_ELF = 1, 2


def fatbin_archs(blob: bytes) -> Dict[str, List[int]]:
    """``{'sass': [...], 'ptx': [...]}``: architectures (e.g. 86 for sm_86) of every entry of the CUDA fat binaries
    found in ``blob`` (the ``.nv_fatbin`` section of a library, or any bytes holding fat binaries).

    Layout (as cuobjdump lists it): a 16-byte header ``<I magic, H version, H header_size, Q size>`` followed by
    ``size`` bytes of entries; each entry starts ``<H kind, H _, I header_size, Q payload_size>`` and holds its
    architecture as a u32 at byte 28; the next entry follows after ``header_size + payload_size`` bytes.
    """
    sass, ptx = set(), set()
    magic = struct.pack("<I", FATBIN_MAGIC)
    pos = blob.find(magic)
    while pos >= 0:
        if pos + 16 > len(blob):
            break
        _, _, hsize, size = struct.unpack_from("<IHHQ", blob, pos)
        start, end = pos + hsize, min(pos + hsize + size, len(blob))
        entry = start
        while hsize >= 16 and entry + 32 <= end:
            kind, _, ehsize, payload = struct.unpack_from("<HHIQ", blob, entry)
            if ehsize < 32 or kind not in (KIND_PTX, KIND_ELF):
                break
            arch = struct.unpack_from("<I", blob, entry + 28)[0]
            (ptx if kind == KIND_PTX else sass).add(arch)
            entry += ehsize + payload
        pos = blob.find(magic, max(end, pos + 4))
    return {"sass": sorted(sass), "ptx": sorted(ptx)}


def elf_section(path: str, name: str) -> Optional[bytes]:
    """Bytes of section ``name`` of a 64-bit little-endian ELF file (``None`` if absent or not such a file)."""
    with open(path, "rb") as f:
        head = f.read(64)
        if head[:4] != b"\x7fELF" or head[4] != 2 or head[5] != 1:
            return None
        shoff = struct.unpack_from("<Q", head, 0x28)[0]
        shentsize, shnum, shstrndx = struct.unpack_from("<HHH", head, 0x3A)
        f.seek(shoff)
        table = f.read(shentsize * shnum)
        sections = [struct.unpack_from("<IIQQQQ", table, i * shentsize) for i in range(shnum)]
        _, _, _, _, str_off, str_size = sections[shstrndx]
        f.seek(str_off)
        names = f.read(str_size)
        for sh_name, _, _, _, off, size in sections:
            end = names.find(b"\0", sh_name)
            if names[sh_name:end].decode("ascii", "replace") == name:
                f.seek(off)
                return f.read(size)
    return None


def library_archs(path: str) -> Dict[str, List[int]]:
    """:func:`fatbin_archs` of a shared library's ``.nv_fatbin`` section (the whole file if it has none)."""
    blob = elf_section(path, ".nv_fatbin")
    if blob is None:
        with open(path, "rb") as f:
            blob = f.read()
    return fatbin_archs(blob)


def can_run(cc: str, archs: Dict[str, List[int]]) -> Tuple[bool, str]:
    """Whether a GPU of compute capability ``cc`` ('9.0') can run code with these SASS/PTX architectures.

    CUDA's rules: SASS for sm_XY runs on X.Z with Z >= Y (same major); PTX for compute_XY is JIT-compiled by the
    driver for any GPU of capability >= X.Y.
    """
    major, minor = (int(v) for v in cc.split("."))
    target = major * 10 + minor
    sass = [a for a in archs.get("sass", []) if a // 10 == major and a % 10 <= minor]
    if sass:
        return True, f"sm_{max(sass)} machine code runs on compute capability {cc}"
    ptx = [a for a in archs.get("ptx", []) if a <= target]
    if ptx:
        return True, f"the driver JIT-compiles compute_{max(ptx)} PTX for compute capability {cc}"
    have = ",".join(f"sm_{a}" for a in archs.get("sass", [])) or "none"
    have_ptx = ",".join(f"compute_{a}" for a in archs.get("ptx", [])) or "no"
    return False, (f"compute capability {cc} (sm_{target}) has no machine code among {have} and {have_ptx} PTX "
                   f"to JIT-compile")


def explain(error: Optional[str], cc: Optional[str] = None, archs: Optional[dict] = None) -> str:
    """Why no kernel ran, as ``'KIND: detail'`` with KIND one of architecture, driver/CUDA, library, no GPU, error."""
    text = (error or "").strip()
    low = text.lower()
    if cc and archs:
        ok, why = can_run(cc, archs)
        if not ok:
            return f"architecture: {why}" + (f" (MXNet: {text})" if text else "")
    if "no kernel image" in low or "invalid device function" in low:
        return f"architecture: {text}"
    if "driver version is insufficient" in low or "forward compatibility" in low or "cuda driver version" in low:
        return f"driver/CUDA: {text}"
    m = re.search(r"(lib[\w.+-]+\.so[.\d]*): cannot open shared object file", text)
    if m:
        extra = " (it comes with the NVIDIA driver)" if m.group(1) == DRIVER_LIB else ""
        return f"library: {m.group(1)} not found{extra}"
    if "no cuda-capable device" in low or "0 gpu(s)" in low:
        return f"no GPU: {text}"
    return f"error: {text or 'unknown'}"


def _last_line(text: str) -> str:
    lines = [ln.strip() for ln in (text or "").strip().splitlines() if ln.strip()]
    return lines[-1] if lines else "no output"


# ------------------------------------------------------------------------------------------------------ install
MXNET_DISTS = ("mxnet", "mxnet-cu112", "mxnet-cu117")


def _run(cmd: Sequence[str], env: Optional[dict] = None, timeout: int = 900) -> subprocess.CompletedProcess:
    print("+ " + " ".join(cmd), file=sys.stderr, flush=True)
    return subprocess.run(list(cmd), env=env, capture_output=True, text=True, timeout=timeout)


def _pip(py: str, args: Sequence[str], what: str, wheels: Optional[str], env: Optional[dict] = None) -> None:
    cmd = [py, "-m", "pip", "install", "--disable-pip-version-check", "--progress-bar", "off", "--retries", "1",
           "--timeout", "20"]
    if wheels:  # a wheel folder means offline: everything must be in it (``download`` fills one)
        cmd += ["--no-index", "--find-links", wheels]
    proc = _run(cmd + list(args), env=env)
    print(proc.stdout[-4000:] + proc.stderr[-4000:], file=sys.stderr)  # the install log keeps pip's own words
    if proc.returncode != 0:
        raise EnvError(f"pip could not install {what}: {pip_error(proc.stdout + proc.stderr)}")


def pip_error(text: str) -> str:
    """pip's telling line: the last ``ERROR: ...``/``error: ...`` line (pip ends with hints), else the last line."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    for ln in reversed(lines):
        if re.match(r"(ERROR|error)\b", ln):
            return ln
    return _last_line(text)


def _site_packages(py: str) -> str:
    proc = _run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"])
    return proc.stdout.strip()


def install(venv: str, package: str, root: str, wheels: Optional[str] = None) -> dict:
    """Install ``package==1.9.1`` (``mxnet`` or ``mxnet-cuNNN``), ``numpy<1.24``, the project and the CUDA 11
    libraries the system lacks into ``venv``. Nothing is installed when the venv already has all of it (a rerun).

    Returns ``{'package', 'reused', 'imported', 'error', 'mxnet_version', 'missing_libs', 'cuda_packages',
    'ld_dirs', 'archs'}``; ``ld_dirs`` go first on ``LD_LIBRARY_PATH`` for every later step.
    """
    py = os.path.join(venv, "bin", "python")
    site = _site_packages(py)
    lib = os.path.join(site, "mxnet", "libmxnet.so")
    cuda = package != "mxnet"
    result = {"package": package, "reused": False, "missing_libs": [], "cuda_packages": [], "archs": None}
    if _ready(py, package, nvidia_lib_dirs(site)) is None:
        result["reused"] = True
    else:
        proc = _run([py, "-c", "import importlib.metadata as m, sys\nfor d in sys.argv[1:]:\n"
                     "    try: m.version(d); print(d)\n    except m.PackageNotFoundError: pass", *MXNET_DISTS])
        others = [d for d in proc.stdout.split() if d != package]
        if others:  # each build provides the same 'mxnet' module
            _run([py, "-m", "pip", "uninstall", "-y", *others])
        _pip(py, [f"{package}=={MXNET_VERSION}", "numpy<1.24"], f"{package}=={MXNET_VERSION}", wheels)
        _pip(py, ["setuptools>=61", "wheel"], "setuptools and wheel (they build the project)", wheels)
        env = dict(os.environ, MXNET_PACKAGE=package)
        _pip(py, ["--no-build-isolation", "-e", root], "the project and its dependencies", wheels, env=env)
        if cuda and os.path.isfile(lib):
            missing = _ldd_missing(lib, nvidia_lib_dirs(site))
            reqs, unknown = packages_for([so for so in missing if so != DRIVER_LIB])
            if reqs:
                _pip(py, reqs, "the CUDA 11 libraries " + ", ".join(r.split("==")[0] for r in reqs), wheels)
            result["cuda_packages"] = reqs
            if unknown:
                print(f"note: no pip package known for {', '.join(unknown)}", file=sys.stderr)
    result["ld_dirs"] = nvidia_lib_dirs(site)
    if cuda and os.path.isfile(lib):
        result["missing_libs"] = _ldd_missing(lib, result["ld_dirs"])
        result["archs"] = library_archs(lib)
    env = dict(os.environ, LD_LIBRARY_PATH=ld_path_with(result["ld_dirs"], os.environ.get("LD_LIBRARY_PATH")))
    error = _import_error(py, env)
    result.update(imported=error is None, error=error, mxnet_version=_mxnet_version(py, env) if not error else None)
    return result


_READY = """import importlib.metadata as m, sys
m.version(sys.argv[1])
import numpy
assert tuple(int(v) for v in numpy.__version__.split('.')[:2]) < (1, 24), 'numpy ' + numpy.__version__
import mxnet, cv2, easydict, tqdm, matplotlib, sklearn
"""


def _ready(py: str, package: str, dirs: Sequence[str]) -> Optional[str]:
    """``None`` when ``py`` already has ``package``, numpy<1.24, the project's dependencies and a loadable MXNet."""
    env = dict(os.environ, LD_LIBRARY_PATH=ld_path_with(dirs, os.environ.get("LD_LIBRARY_PATH")))
    proc = _run([py, "-c", _READY, package], env=env, timeout=300)
    return None if proc.returncode == 0 else _last_line(proc.stderr)


def _ldd_missing(lib: str, dirs: Sequence[str]) -> List[str]:
    if shutil.which("ldd") is None:
        return []
    env = dict(os.environ, LD_LIBRARY_PATH=ld_path_with(dirs, os.environ.get("LD_LIBRARY_PATH")))
    return missing_sonames(_run(["ldd", lib], env=env).stdout)


def _import_error(py: str, env: dict) -> Optional[str]:
    proc = _run([py, "-c", "import mxnet"], env=env, timeout=300)
    return None if proc.returncode == 0 else _last_line(proc.stderr)


def _mxnet_version(py: str, env: dict) -> Optional[str]:
    proc = _run([py, "-c", "import mxnet; print(mxnet.__version__)"], env=env, timeout=300)
    return (proc.stdout.strip() or None) if proc.returncode == 0 else None


def download(dest: str, root: str, packages: Sequence[str], python_version: Optional[str] = None) -> None:
    """Fill ``dest`` with every wheel an offline ``install`` needs (run it where pip reaches a registry)."""
    cmd = [sys.executable, "-m", "pip", "download", "--disable-pip-version-check", "--progress-bar", "off",
           "-d", dest]
    if python_version:
        cmd += ["--only-binary=:all:", "--python-version", python_version, "--platform", "manylinux2014_x86_64",
                "--platform", "manylinux1_x86_64", "--platform", "manylinux_2_17_x86_64"]
    reqs = [f"{p}=={MXNET_VERSION}" for p in packages] + ["numpy<1.24", "setuptools>=61", "wheel"]
    reqs += sorted(set(CUDA_LIBS.values())) if any(p != "mxnet" for p in packages) else []
    env = dict(os.environ, MXNET_PACKAGE=packages[0])  # setup.py's mxnet requirement follows it
    for args in (reqs, [root]):
        proc = _run(cmd + args, env=env)
        if proc.returncode != 0:
            raise EnvError(f"pip download failed: {_last_line(proc.stderr or proc.stdout)}")


# ---------------------------------------------------------------------------------------------------------- CLI
def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser("gpu-info")
    p = sub.add_parser("find-python")
    p.add_argument("--python")
    p = sub.add_parser("install")
    p.add_argument("--venv", required=True)
    p.add_argument("--package", required=True, choices=MXNET_DISTS)
    p.add_argument("--root", required=True)
    p.add_argument("--wheels")
    p = sub.add_parser("archs")
    p.add_argument("library")
    p = sub.add_parser("verdict")
    p.add_argument("--cc", required=True)
    p.add_argument("--package", choices=sorted(KNOWN_ARCHS))
    p.add_argument("--archs-json", help="JSON {'sass': [...], 'ptx': [...]} (else the package's measured list)")
    p = sub.add_parser("explain")
    p.add_argument("--error", default="")
    p.add_argument("--cc")
    p.add_argument("--archs-json")
    p = sub.add_parser("download")
    p.add_argument("--dest", required=True)
    p.add_argument("--root", required=True)
    p.add_argument("--packages", default="mxnet-cu117,mxnet-cu112")
    p.add_argument("--python-version")
    args = parser.parse_args(argv)
    try:
        if args.cmd == "gpu-info":
            print(json.dumps(gpu_info()))
        elif args.cmd == "find-python":
            exe, ver = find_python(args.python)
            print(f"{exe} {ver}")
        elif args.cmd == "install":
            print(json.dumps(install(args.venv, args.package, args.root, args.wheels)))
        elif args.cmd == "archs":
            print(json.dumps(library_archs(args.library)))
        elif args.cmd == "verdict":
            archs = json.loads(args.archs_json) if args.archs_json else KNOWN_ARCHS[args.package or "mxnet-cu117"]
            ok, why = can_run(args.cc, archs)
            print(json.dumps({"can_run": ok, "why": why}))
        elif args.cmd == "explain":
            print(explain(args.error, args.cc, json.loads(args.archs_json) if args.archs_json else None))
        elif args.cmd == "download":
            download(args.dest, args.root, [p for p in args.packages.split(",") if p], args.python_version)
    except EnvError as exc:
        print(f"{PREFIX} {exc}", file=sys.stderr)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
