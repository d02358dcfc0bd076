"""Every command in the README's code blocks runs (issue 15): as written where it is cheap, else through an explicit
tiny equivalent (same script and flags, small sizes, CPU devices), against a workspace laid out as the README
describes (``../models/model-y1-test2/model,0``, ``../datasets/mine``, ``models/run/model,3``, ``faces/``, ...).

A README command without an entry in :data:`COMMANDS` fails the test (add how to run it, or why it cannot run
here); an entry whose command left the README fails too. So the README cannot drift from the code again.
"""
import contextlib
import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from typing import Dict, List, NamedTuple, Optional

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMMAND_RE = re.compile(r"^(?:[A-Z_]+=(?:\$\([^)]*\)|\S+)\s+)*(?:python3?|bash|pip|ruff|cd|export)\b")
MTCNN = os.path.join(os.path.dirname(ROOT), "shared", "models", "mtcnn")
RAW = os.path.join(os.path.dirname(ROOT), "shared", "raw")


class Run(NamedTuple):
    """Run the command with ``replace`` (text substitutions making it tiny) and ``append`` (extra arguments);
    ``check`` names a function checking its outcome; ``serve``: a server, polled on /health then stopped;
    ``needs``: 'mtcnn' when it needs insightface's MTCNN weights and real photos (``../shared``; skipped without)."""

    replace: Dict[str, str] = {}
    append: str = ""
    env: Dict[str, str] = {}
    check: Optional[str] = None
    serve: bool = False
    needs: Optional[str] = None


class Skip(NamedTuple):
    reason: str


TINY_TRAIN = " --per-batch-size 8 --max-steps 2 --verbose 2 --frequent 1"
COMMANDS = {
    'python3 -m venv .venv && . .venv/bin/activate': Skip("installation (CI installs the same way)"),
    'pip install -e ".[onnx,test]"': Skip("installation (CI installs the same way)"),
    'MXNET_PACKAGE=mxnet-cu112 pip install -e ".[onnx,test]"': Skip("GPU installation"),
    "bash run.sh demo": Run(env={"PRE_STEPS": "6", "HEAD_STEPS": "2", "ALL_STEPS": "3"}, check="demo"),
    "ruff check . && python -m pytest -q tests": Skip("the test suite itself (it would run this test again)"),
    "python recognition/train.py --pretrained ../models/model-y1-test2/model,0 --data-dir ../datasets/mine "
    "--loss arcface --target lfw,mine_val --fc7-init imprint --stages head:1ep@0.1,all:3ep --lr 0.01 "
    "--backbone-lr-mult 0.1 --bn-mode frozen --eval-pretrained --source-targets lfw --max-source-drop 0.005":
        Run(append=" --per-batch-size 8 --verbose 100", check="finetune"),  # as written: 36 images, 4 + 12 steps
    "python recognition/advise.py --pretrained ../models/model-y1-test2/model,0 --data ../datasets/mine": Run(),
    "python recognition/train.py --network r100 --loss arcface --data-dir ../datasets/faces_emore "
    "--target lfw,cfp_fp,agedb_30 --per-batch-size 128 --lr 0.1 --lr-steps 100000,160000,220000":
        Run(replace={"r100": "tiny", " --per-batch-size 128": ""}, append=TINY_TRAIN),
    "cd recognition && python train_softmax.py --network y1 --loss-type 4 --margin-s 64 --margin-m 0.5 ...":
        Run(replace={"y1": "tiny", "...": "--data-dir {W}/datasets/mine --target lfw --models-root {W}/runs"
                     + TINY_TRAIN}),
    "python recognition/train_parall.py --ctx gpu:0,gpu:1,gpu:2,gpu:3 --network r100 --loss arcface "
    "--data-dir ../datasets/glint360k --sample-ratio 0.1 --pretrained ../models/r100/model,0":
        Run(replace={"gpu:0,gpu:1,gpu:2,gpu:3": "cpu:0,cpu:1", "r100 ": "tiny ", "--sample-ratio 0.1":
                     "--sample-ratio 0.5"}, append=" --target lfw --per-batch-size 4 --max-steps 1 --verbose 1"),
    "python -m recognition.launch --num-workers 2 --num-servers 1 -- python recognition/train.py --kvstore "
    "dist_sync --network r50 --data-dir ../datasets/mine ...":
        Run(replace={"r50": "tiny", "...": "--target lfw --per-batch-size 4 --max-steps 1 --verbose 1"}),
    "python deploy/model_slim.py --model models/run/model,3": Run(check="slim"),
    "python -m recognition.verification --model models/run/models,0 --target lfw.bin,cfp_fp.bin --roc-png roc.png":
        Run(check="roc"),
    "python deploy/export_onnx.py --model models/run/models,0 --output face.onnx --dynamic-batch":
        Run(check="onnx"),
    "python deploy/extract.py --model models/run/models,0 --input faces/ --output feats/": Run(),
    "python deploy/compare.py --model models/run/models,0 a.jpg b.jpg": Run(),
    "python deploy/search.py --model models/run/models,0 --gallery people/ --query q.jpg --top-k 5": Run(),
    'python deploy/align.py --image photo.jpg --landmarks "x1,y1,...,x5,y5" --output aligned.jpg':
        Run(replace={"x1,y1,...,x5,y5": "38.3,51.7,73.5,51.5,56.0,71.7,41.5,92.4,70.7,92.2"}),
    "python deploy/server.py --model models/run/models,0 --db gallery.sqlite --port 8080 --insecure-no-auth":
        Run(replace={"8080": "{PORT}"}, serve=True),
    "python deploy/align.py --image photo.jpg --detect ../models/mtcnn --output aligned.jpg":
        Run(replace={"photo.jpg": "raw1.jpg"}, needs="mtcnn"),
    "export IFR_API_KEY=$(openssl rand -hex 16)": Skip("sets the key of the next command (given to it here)"),
    "python deploy/server.py --model models/run/models,0 --db gallery.sqlite --host 0.0.0.0 --port 8080":
        Run(replace={"0.0.0.0": "127.0.0.1", "8080": "{PORT}"}, env={"IFR_API_KEY": "k" * 32}, serve=True),
    "python -m datasets.tools align --src photos/ --out aligned/ --detector ../models/mtcnn": Run(needs="mtcnn"),
    "python -m datasets.tools folder2rec --src aligned/ --out data/mine":
        Run(replace={"data/mine": "data/mine_aligned"}, needs="mtcnn"),
    "python deploy/compare.py --model M,0 --detect ../models/mtcnn raw1.jpg raw2.jpg":
        Run(replace={"M,0": "models/run/models,0"}, needs="mtcnn"),
    "python deploy/extract.py --model M,0 --detect ../models/mtcnn --input photos/ --output feats/":
        Run(replace={"M,0": "models/run/models,0", "feats/": "feats_raw/"}, needs="mtcnn"),
    "python deploy/search.py --model M,0 --detect ../models/mtcnn --gallery photos/ --query raw.jpg":
        Run(replace={"M,0": "models/run/models,0"}, needs="mtcnn"),
    "python deploy/align.py --detect ../models/mtcnn --image group.jpg --output face.jpg --faces all":
        Run(needs="mtcnn"),
    "IFR_API_KEY=$(openssl rand -hex 16) python deploy/server.py --model M,0 --detect ../models/mtcnn --db "
    "gallery.sqlite":
        Run(replace={"M,0": "models/run/models,0"}, append=" --port {PORT}", serve=True, needs="mtcnn"),
    "python -m datasets.tools align --src photos/ --out faces/ --detector ../models/mtcnn":
        Run(replace={"faces/": "faces_detected/"}, needs="mtcnn"),
    "python -m datasets.synth --out data/A --domain A --num-classes 200 --images-per-class 20":
        Run(replace={"200": "4", "20": "3"}),
    "python -m datasets.tools folder2rec --src faces/ --out data/mine": Run(),
    "python -m datasets.tools rec2folder --rec data/mine --out faces_out/": Run(),
    "python -m datasets.tools pairs2bin --pairs pairs.txt --root faces/ --out data/mine/mine_val.bin": Run(),
    "python -m datasets.tools bin2images --bin lfw.bin --out lfw_images/": Run(),
    "python -m datasets.tools info data/mine": Run(),
    "python -m datasets.tools shift --src data/mine --out data/mine_lowres --kind lowres@0.9 --seed 0": Run(),
    "SHARED=../shared bash run.sh strategies-real --no-flip --steps 80 --per-batch-size 32 --bn-mode frozen":
        Skip("hours of training on real faces; tests/test_strategies_real.py checks its flags and arithmetic"),
    "PRETRAINED=../shared/fixtures/model-y1-test2/model,0 DATA_DIR=OUT/data/lowres0.9 "
    "TARGETS=OUT/data/lowres0.9/lowres0.9_val.bin,../shared/real/lfw_dev/val.bin SOURCE_TARGETS=val VERBOSE=1ep "
    "bash run.sh finetune --seed 0":
        Run(replace={"../shared/fixtures/model-y1-test2": "../models/model-y1-test2",
                     "OUT/data/lowres0.9 ": "{W}/datasets/mine ",
                     "OUT/data/lowres0.9/lowres0.9_val.bin,../shared/real/lfw_dev/val.bin SOURCE_TARGETS=val":
                     "lfw,mine_val SOURCE_TARGETS=lfw",
                     "bash run.sh": "PER_BATCH_SIZE=8 MAX_SOURCE_DROP=1 MODELS_ROOT={W}/runs_sh bash run.sh"},
            check="run_sh_finetune"),  # run.sh finetune's defaults as they are, on the 36-image set
}


def readme_commands(path: str = os.path.join(ROOT, "README.md")) -> List[str]:
    """Commands of the README's indented code blocks: continuation lines joined, comments and spaces normalised;
    lines that are not commands (printed output) are left out."""
    with open(path) as f:
        lines = f.read().split("\n")
    blocks, cur, prev_blank = [], [], True
    for line in lines + [""]:
        if line.startswith("    ") and (cur or prev_blank):
            cur.append(line[4:])
        elif cur:
            blocks.append(cur)
            cur = []
        prev_blank = not line.strip()
    out = []
    for block in blocks:
        for cmd in "\n".join(block).replace("\\\n", " ").split("\n"):
            cmd = re.sub(r"\s+#.*$", "", cmd).strip()
            cmd = " ".join(cmd.split())
            if COMMAND_RE.match(cmd):
                out.append(cmd)
    return out


def test_every_readme_command_has_a_mapping():
    found = readme_commands()
    missing = [c for c in found if c not in COMMANDS]
    assert not missing, "README commands without an entry in tests/test_readme_commands.py COMMANDS:\n" + \
        "\n".join(missing)
    stale = [c for c in COMMANDS if c not in found]
    assert not stale, "COMMANDS entries no longer in the README:\n" + "\n".join(stale)


# ------------------------------------------------------------------------------------------------- workspace
def _write_png(path, rgb):
    import cv2

    os.makedirs(os.path.dirname(path), exist_ok=True)
    cv2.imwrite(path, rgb[:, :, ::-1])


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """``W/clone`` (the working folder: links to the code, ``models/run/model,3``, ``faces/``, ``people/``,
    images, ``lfw.bin``, ``pairs.txt``, ``data/mine``) beside ``W/models`` and ``W/datasets``, as the README
    assumes."""
    import numpy as np

    from datasets.synth import generate_dataset
    from recognition.verification import read_bin

    w = tmp_path_factory.mktemp("readme")
    clone = w / "clone"
    clone.mkdir()
    for name in ("recognition", "deploy", "datasets", "benchmarks", "run.sh", "pyproject.toml", "setup.py"):
        os.symlink(os.path.join(ROOT, name), clone / name)
    mine = w / "datasets" / "mine"
    info = generate_dataset(str(mine), num_classes=6, images_per_class=6, num_holdout=6, holdout_images=2,
                            num_pairs=20, seed=0, bin_names=("lfw",))
    for name in ("mine_val", "cfp_fp", "agedb_30"):
        shutil.copy(mine / "lfw.bin", mine / f"{name}.bin")
    for name in ("faces_emore", "glint360k"):
        shutil.copytree(mine, w / "datasets" / name)
    env = _env(w)
    # a pretrained tiny checkpoint where the README's model-zoo checkpoints go, and a full one at models/run/model,3
    pre = [sys.executable, os.path.join(ROOT, "recognition", "train.py"), "--network", "tiny", "--loss", "softmax",
           "--data-dir", str(mine), "--target", "", "--per-batch-size", "8", "--max-steps", "1", "--ckpt", "0",
           "--lr", "0.01"]
    _run(pre + ["--prefix", str(w / "models" / "model-y1-test2" / "model"), "--ckpt-embedding", "1"], clone, env)
    os.rename(w / "models" / "model-y1-test2" / "model-0001.params", w / "models" / "model-y1-test2" /
              "model-0000.params")
    shutil.copytree(w / "models" / "model-y1-test2", w / "models" / "r100")
    _run(pre + ["--prefix", str(clone / "models" / "run" / "model"), "--ckpt-embedding", "0"], clone, env)
    os.rename(clone / "models" / "run" / "model-0001.params", clone / "models" / "run" / "model-0003.params")
    images, _ = read_bin(info["bins"][0])
    rgb = [im.transpose(1, 2, 0) for im in images]
    for i, im in enumerate(rgb[:8]):  # faces/ and people/: identity sub-folders of aligned faces
        _write_png(str(clone / "faces" / f"p{i % 2}" / f"p{i % 2}_{i // 2 + 1:04d}.png"), im)
        _write_png(str(clone / "people" / f"p{i % 2}" / f"{i}.png"), im)
    for name, im in (("a.jpg", rgb[0]), ("b.jpg", rgb[1]), ("q.jpg", rgb[2]), ("photo.jpg", rgb[3])):
        _write_png(str(clone / name), im)
    (clone / "pairs.txt").write_text("p0/p0_0001.png p0/p0_0002.png 1\np0/p0_0001.png p1/p1_0001.png 0\n")
    if os.path.isdir(MTCNN) and os.path.isdir(RAW):  # the --detect commands: real photos, the real detector
        os.symlink(MTCNN, w / "models" / "mtcnn")
        for person, files in (("Rob_Lowe", ("Rob_Lowe_0001.jpg", "Rob_Lowe_0002.jpg")),
                              ("Nathalie_Baye", ("Nathalie_Baye_0002.jpg",))):
            os.makedirs(clone / "photos" / person)
            for f in files:
                shutil.copy(os.path.join(RAW, f), clone / "photos" / person / f)
        for name, src in (("raw1.jpg", "Rob_Lowe_0001.jpg"), ("raw2.jpg", "Rob_Lowe_0002.jpg"),
                          ("raw.jpg", "Nathalie_Baye_0002.jpg"), ("group.jpg", "t1.jpg")):
            shutil.copy(os.path.join(RAW, src), clone / name)
    shutil.copy(mine / "lfw.bin", clone / "lfw.bin")
    shutil.copy(mine / "lfw.bin", clone / "cfp_fp.bin")
    assert np.asarray(images).shape[1:] == (3, 112, 112)
    return w


def _env(w) -> dict:
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
               OUT=str(w / "demo"), PY=sys.executable)
    bin_dir = w / "bin"  # `python` of the README is this interpreter (a wrapper: a symlink would lose its venv)
    bin_dir.mkdir(exist_ok=True)
    for name in ("python", "python3"):
        if not (bin_dir / name).exists():
            (bin_dir / name).write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
            os.chmod(bin_dir / name, 0o755)
    env["PATH"] = str(bin_dir) + os.pathsep + env.get("PATH", "")
    return env


def _run(argv, cwd, env, timeout=900) -> subprocess.CompletedProcess:
    out = subprocess.run(argv, cwd=str(cwd), env=env, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, f"{argv}\nstdout:\n{out.stdout[-3000:]}\nstderr:\n{out.stderr[-3000:]}"
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _check(kind: Optional[str], w, out: subprocess.CompletedProcess) -> None:
    clone = w / "clone"
    if kind == "demo":  # the last line names the slim model, and it is there (and slim)
        from recognition.load_report import read_meta

        last = out.stdout.strip().splitlines()[-1]
        m = re.match(r"demo done: fine-tuned slim model (\S+),(\d+) ", last)
        assert m and m.group(1) == str(w / "demo" / "models" / "ft" / "model"), last
        assert os.path.isfile("%s-%04d.params" % (m.group(1), int(m.group(2))))
        assert read_meta(m.group(1))["slim"] is True
    elif kind == "finetune":
        runs = [d for d in os.listdir(clone / "models") if d != "run"]
        assert len(runs) == 1
        with open(clone / "models" / runs[0] / "config.json") as f:
            built = json.load(f)["built"]
        assert built["network"].startswith("checkpoint graph of ../models/model-y1-test2/model")
        assert "verification before/after" in out.stderr
        assert "head:4@0.1, all:12 (one pass over the data = 4 steps)" in out.stderr  # 36 images / batch 8
        assert "finished at step 16" in out.stdout + out.stderr  # head:1ep + all:3ep
    elif kind == "run_sh_finetune":  # defaults in passes; the source watched once a pass, in metrics.jsonl
        runs = os.listdir(w / "runs_sh")
        assert len(runs) == 1
        run = w / "runs_sh" / runs[0]
        assert "head:4@0.1, all:12 (one pass over the data = 4 steps)" in out.stderr
        with open(run / "metrics.jsonl") as f:
            kept = [r for r in map(json.loads, f) if r.get("kind") == "kept"]
        assert [r["step"] for r in kept] == [4, 8, 12, 16] and {r["target"] for r in kept} == {"lfw"}
        with open(run / "config.json") as f:  # the watch is on (a drop of 1 never stops this tiny, noisy run)
            cfg = json.load(f)
        assert (cfg["max_source_drop"], cfg["stop_on_source_drop"], cfg["seed"]) == (1.0, True, 0)
    elif kind == "slim":
        assert os.path.isfile(clone / "models" / "run" / "models-0000.params")
    elif kind == "roc":
        assert os.path.isfile(clone / "roc.png")
    elif kind == "onnx":
        assert os.path.isfile(clone / "face.onnx")


@pytest.mark.slow
def test_readme_commands_run(workspace):
    """Each README command, in README order, from ``W/clone``."""
    w = workspace
    env = _env(w)
    failures = []
    for cmd in readme_commands():
        spec = COMMANDS[cmd]
        if isinstance(spec, Skip) or (spec.needs == "mtcnn" and not os.path.exists(w / "models" / "mtcnn")):
            continue
        if "export_onnx" in cmd:
            pytest.importorskip("onnx")
            pytest.importorskip("onnxruntime")
        text = cmd
        for old, new in spec.replace.items():
            text = text.replace(old, new)
        port = _free_port()
        text = (text + spec.append).replace("{W}", str(w)).replace("{PORT}", str(port))
        run_env = dict(env, **spec.env)
        if spec.serve:
            proc = subprocess.Popen(text, shell=True, cwd=str(w / "clone"), env=run_env, stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT, text=True, start_new_session=True)
            try:
                ok = False
                for _ in range(240):
                    try:
                        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                            ok = r.status == 200
                            break
                    except OSError:
                        if proc.poll() is not None:
                            break
                        time.sleep(0.5)
            finally:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, 15)
                output = proc.communicate(timeout=60)[0]
            if not ok:
                failures.append(f"{cmd}\n  ran: {text}\n  no /health answer: {output.strip()[-1500:]}")
            continue
        out = subprocess.run(["bash", "-c", text], cwd=str(w / "clone"), env=run_env, capture_output=True,
                             text=True, timeout=900)
        if out.returncode != 0:
            failures.append(f"{cmd}\n  ran: {text}\n  exit {out.returncode}: {out.stderr.strip()[-1500:]}")
            continue
        try:
            _check(spec.check, w, out)
        except AssertionError as exc:
            failures.append(f"{cmd}: {exc}")
    assert not failures, "\n\n".join(failures)


def test_mapping_entries_are_well_formed():
    for cmd, spec in COMMANDS.items():
        assert isinstance(spec, (Run, Skip)), cmd
        assert shlex.split(cmd)  # parses as a shell line
        if isinstance(spec, Run):
            assert all(old in cmd for old in spec.replace), cmd  # a substitution that no longer applies
