#!/usr/bin/env bash
# Does the GPU path work, and how fast is it? One command, about 8 minutes, safe to rerun (the venv is reused).
#
#   bash benchmarks/gpu_check.sh                          # pip reaches a registry
#   bash benchmarks/gpu_check.sh --wheels /data/wheels    # offline: every wheel in that folder (see --help)
#   bash benchmarks/gpu_check.sh --cpu-dry-run --venv .venv   # every step on cpu contexts, tiny sizes
#
# Steps: the GPU (nvidia-smi) and what the mxnet-cu* 1.9.1 wheels can run on it; a Python 3.8-3.11; a virtual
# environment with the CUDA build of MXNet 1.9.1 (mxnet-cu117, then mxnet-cu112), numpy<1.24, the project and the
# CUDA 11 libraries; a kernel on gpu:0; then benchmarks/gpu_check.py (speed, embeddings vs CPU, train_parall on
# two contexts, --resume, determinism). Prints one table and writes OUT/gpu_check.json.
# Exit status: 0 every check passed, 1 a check failed, 2 bad arguments, 3 the GPU path cannot run here (one line
# starting "GPU CHECK:" says why: no GPU, driver/CUDA, architecture, library, no suitable Python, no wheels).
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
WHEELS="${IFR_GPU_WHEELS:-}"
VENV="${IFR_GPU_VENV:-$ROOT/.venv-gpu}"
PY="${IFR_GPU_PYTHON:-}"
OUTDIR="${IFR_GPU_OUT:-${OUT:-$ROOT/gpu_check_out}}"
PACKAGES="${IFR_MXNET_PACKAGES:-}"
DRY="${IFR_GPU_DRY_RUN:-0}"
BUDGET="${IFR_GPU_BUDGET:-480}"
CHECKS="${IFR_GPU_CHECKS:-}"

usage() {
    cat <<EOF
usage: bash benchmarks/gpu_check.sh [--wheels DIR] [--venv DIR] [--python PY] [--out DIR] [--packages LIST]
                                    [--budget SECONDS] [--checks LIST] [--cpu-dry-run]
  --wheels DIR     install offline from DIR only (env IFR_GPU_WHEELS); fill it where pip works with
                   python3 benchmarks/gpu_env.py download --dest DIR --root . --python-version 3.11
  --venv DIR       virtual environment, created once and reused (env IFR_GPU_VENV; default .venv-gpu)
  --python PY      interpreter for a new venv, 3.8-3.11 (env IFR_GPU_PYTHON; default: the newest found)
  --out DIR        gpu_check.json, gpu_check.log (env IFR_GPU_OUT, else \$OUT, else gpu_check_out)
  --packages LIST  MXNet builds to try in order (env IFR_MXNET_PACKAGES; default "mxnet-cu117 mxnet-cu112")
  --budget S       seconds for everything (env IFR_GPU_BUDGET; default 480)
  --checks LIST    subset of probe,speed,embed,parall,resume,determinism (env IFR_GPU_CHECKS)
  --cpu-dry-run    every step on cpu contexts with tiny sizes and the CPU build (env IFR_GPU_DRY_RUN=1)
EOF
}

while [ $# -gt 0 ]; do
    case "$1" in
        --wheels|--venv|--python|--out|--packages|--budget|--checks)
            [ $# -ge 2 ] || { echo "gpu_check.sh: $1 needs a value" >&2; exit 2; }
            case "$1" in
                --wheels) WHEELS="$2" ;; --venv) VENV="$2" ;; --python) PY="$2" ;; --out) OUTDIR="$2" ;;
                --packages) PACKAGES="$2" ;; --budget) BUDGET="$2" ;; --checks) CHECKS="$2" ;;
            esac
            shift 2 ;;
        --cpu-dry-run) DRY=1; shift ;;
        -h|--help) usage; exit 0 ;;
        *) echo "gpu_check.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
done
case "$BUDGET" in ''|*[!0-9]*) echo "gpu_check.sh: --budget $BUDGET: expected whole seconds" >&2; exit 2 ;; esac
if [ -n "$WHEELS" ] && [ ! -d "$WHEELS" ]; then
    echo "gpu_check.sh: --wheels $WHEELS: no such folder" >&2; exit 2
fi
if [ "$DRY" = 1 ]; then CTX=cpu:0; PACKAGES="${PACKAGES:-mxnet}"; else CTX=gpu:0; PACKAGES="${PACKAGES:-mxnet-cu117 mxnet-cu112}"; fi

START=$(date +%s)
mkdir -p "$OUTDIR" || { echo "gpu_check.sh: cannot create $OUTDIR" >&2; exit 2; }
HOSTPY="$(command -v python3 || command -v python || true)"
[ -n "$HOSTPY" ] || { echo "GPU CHECK: no python3 on PATH"; exit 3; }
ENVPY=("$HOSTPY" "$ROOT/benchmarks/gpu_env.py")
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
FACTS="$OUTDIR/env.json"
"$HOSTPY" -c 'import json,sys; json.dump({"dry_run": sys.argv[2] == "1", "packages": {}}, open(sys.argv[1], "w"))' \
    "$FACTS" "$DRY"

note() {  # note KEY JSON: record a fact in env.json
    "$HOSTPY" - "$FACTS" "$1" "$2" <<'EOF'
import json, sys
path, key, value = sys.argv[1:]
doc = json.load(open(path))
try:
    value = json.loads(value)
except ValueError:
    pass
cur = doc
*parents, last = key.split(".")
for p in parents:
    cur = cur.setdefault(p, {})
cur[last] = value
json.dump(doc, open(path + ".tmp", "w"), indent=1)
import os; os.replace(path + ".tmp", path)
EOF
}
stop() {  # stop REASON: the one line, the JSON, exit 3
    note cannot_run "$1"
    cp "$FACTS" "$OUTDIR/gpu_check.json"
    echo "GPU CHECK: $1"
    exit 3
}
last_line() { grep -v '^+ ' "$1" | grep -v '^\s*$' | tail -n 1 | sed 's/^GPU CHECK: //'; }

# 1. the GPU, and what the wheels' machine code can run on it ---------------------------------------------
CC=""
if [ "$DRY" = 1 ]; then
    echo "== cpu dry run: every step on $CTX with tiny sizes"
else
    if ! GPU_JSON="$("${ENVPY[@]}" gpu-info 2>"$OUTDIR/step.err")"; then stop "$(last_line "$OUTDIR/step.err")"; fi
    note gpu "$GPU_JSON"
    CC="$("$HOSTPY" -c 'import json,sys; print(json.loads(sys.argv[1])["gpus"][0]["compute_cap"])' "$GPU_JSON")"
    echo "== GPU: $("$HOSTPY" -c 'import json,sys; print(json.loads(sys.argv[1])["summary"])' "$GPU_JSON")"
    for pkg in $PACKAGES; do
        EXPECT="$("${ENVPY[@]}" verdict --cc "$CC" --package "$pkg" 2>/dev/null)" || continue
        note "expected.$pkg" "$EXPECT"
        echo "   expected from $pkg 1.9.1's machine code: $("$HOSTPY" -c 'import json,sys; d=json.loads(sys.argv[1])
print(("can run: " if d["can_run"] else "CANNOT run: ") + d["why"])' "$EXPECT")"
    done
fi

# 2. a Python that mxnet 1.9.1 + numpy<1.24 run on, and the venv ------------------------------------------
if [ -x "$VENV/bin/python" ] && "${ENVPY[@]}" find-python --python "$VENV/bin/python" >/dev/null 2>&1; then
    echo "== reusing $VENV ($("$VENV/bin/python" -V 2>&1))"
else
    if [ -e "$VENV" ] && [ -n "$(ls -A "$VENV" 2>/dev/null)" ]; then  # never delete what the user named
        echo "gpu_check.sh: --venv $VENV exists and is not a Python 3.8-3.11 virtual environment; name a new folder" >&2
        exit 2
    fi
    if ! PYLINE="$("${ENVPY[@]}" find-python ${PY:+--python "$PY"} 2>"$OUTDIR/step.err")"; then
        stop "$(last_line "$OUTDIR/step.err")"
    fi
    echo "== creating $VENV with ${PYLINE}"
    "${PYLINE% *}" -m venv "$VENV" 2>"$OUTDIR/step.err" || stop "python -m venv $VENV failed: $(last_line "$OUTDIR/step.err")"
fi
note python "$("$VENV/bin/python" -c 'import sys; print(sys.version.split()[0])')"

# 3. install the MXNet build that runs a kernel -----------------------------------------------------------
CHOSEN=""; REASONS=()
ORDER="$PACKAGES"
if [ -f "$VENV/.ifr-gpu-choice" ] && [ "$DRY" != 1 ]; then  # a rerun tries the build that worked first
    PREV="$(cat "$VENV/.ifr-gpu-choice")"; ORDER="$PREV $(echo " $PACKAGES " | sed "s/ $PREV / /")"
fi
for pkg in $ORDER; do
    echo "== $pkg 1.9.1: install (or reuse)"
    if ! INST="$("${ENVPY[@]}" install --venv "$VENV" --package "$pkg" --root "$ROOT" ${WHEELS:+--wheels "$WHEELS"} \
            2>"$OUTDIR/install-$pkg.log")"; then
        REASONS+=("$pkg: $(last_line "$OUTDIR/install-$pkg.log")"); note "packages.$pkg" "{\"installed\": false}"
        echo "   not installed: $(last_line "$OUTDIR/install-$pkg.log")"; continue
    fi
    note "packages.$pkg" "$INST"
    LDDIRS="$("$HOSTPY" -c 'import json,sys; print(":".join(json.loads(sys.argv[1])["ld_dirs"]))' "$INST")"
    ARCHS="$("$HOSTPY" -c 'import json,sys; print(json.dumps(json.loads(sys.argv[1])["archs"] or ""))' "$INST")"
    IMPORT_ERR="$("$HOSTPY" -c 'import json,sys; print(json.loads(sys.argv[1])["error"] or "")' "$INST")"
    if [ -n "$IMPORT_ERR" ]; then
        WHY="$("${ENVPY[@]}" explain --error "$IMPORT_ERR")"
        REASONS+=("$pkg does not import: $WHY"); echo "   import mxnet failed: $WHY"; continue
    fi
    echo "   imported ($("$HOSTPY" -c 'import json,sys; d=json.loads(sys.argv[1]); print("reused" if d["reused"] else "installed", d["mxnet_version"])' "$INST"))"
    PROBE="$(LD_LIBRARY_PATH="$LDDIRS${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" timeout 180 "$VENV/bin/python" \
        "$ROOT/benchmarks/gpu_check.py" --_child probe "[\"$CTX\"]" 2>"$OUTDIR/probe-$pkg.log" | tail -n 1)"
    RAN="$("$HOSTPY" -c 'import json,sys
try: d = json.loads(sys.argv[1])
except ValueError: d = {}
print("yes" if d.get("kernel_ran") else d.get("ops", {}).get("elementwise", ""))' "$PROBE")"
    note "packages.$pkg.probe" "${PROBE:-null}"
    if [ "$RAN" = yes ]; then
        echo "   a kernel ran on $CTX"; CHOSEN="$pkg"; break
    fi
    ERR="${RAN:-$(last_line "$OUTDIR/probe-$pkg.log")}"
    WHY="$("${ENVPY[@]}" explain --error "$ERR" ${CC:+--cc "$CC"} ${ARCHS:+--archs-json "$ARCHS"})"
    REASONS+=("$pkg imported, no kernel ran: $WHY"); echo "   no kernel ran on $CTX: $WHY"
done
if [ -z "$CHOSEN" ]; then
    JOINED=""
    for reason in "${REASONS[@]}"; do JOINED="${JOINED:+$JOINED; }$reason"; done
    stop "no MXNet 1.9.1 build ran a kernel on $CTX: $JOINED"
fi
note chosen "\"$CHOSEN\""
[ "$DRY" = 1 ] || echo "$CHOSEN" > "$VENV/.ifr-gpu-choice"

# 4. the checks ------------------------------------------------------------------------------------------
LEFT=$(( BUDGET - ($(date +%s) - START) ))
[ "$LEFT" -gt 30 ] || LEFT=30
echo "== checks with $CHOSEN on $CTX ($LEFT s left)"
export LD_LIBRARY_PATH="$LDDIRS${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
ARGS=(--ctx "$CTX" --out "$OUTDIR" --budget "$LEFT" --env-json "$FACTS")
[ "$DRY" = 1 ] && ARGS+=(--dry-run)
[ -n "$CHECKS" ] && ARGS+=(--checks "$CHECKS")
"$VENV/bin/python" "$ROOT/benchmarks/gpu_check.py" "${ARGS[@]}"
