"""What the soak found: per-round work must not grow with the run (``benchmarks/soak.py`` measures the whole).

- MXNet 1.9.1's ``Symbol.tojson()``/``save()`` leak a graph copy per call; ``recognition.common.symbol_json`` does
  not, and no code of the toolkit calls the leaking methods.
- The curves PNG is drawn from a bounded :class:`Series`, whose bucket means must equal plain numpy means.
- One run log per process: a second run's file handler replaces the first's.
"""
import gc
import json
import logging
import os
import re

import numpy as np

from recognition.backbones import get_symbol
from recognition.common import setup_logging, symbol_graph, symbol_json
from recognition.metrics_log import MetricsLog, Series, plot_curves, read_metrics

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def test_symbol_json_is_tojson_without_the_leak():
    sym = get_symbol("y1", prelu="stock")
    assert symbol_json(sym) == sym.tojson()
    assert symbol_graph(sym) == json.loads(sym.tojson())
    gc.collect()
    before = rss_mb()
    for _ in range(300):
        symbol_json(sym)
    gc.collect()
    grown = rss_mb() - before
    # MXNet's own tojson() leaks ~230 KB per call on this graph (~70 MB over 300 calls, measured); allow noise only
    assert grown < 15, f"symbol_json grew RSS by {grown:.1f} MB over 300 calls"


def _leaking_calls(path):
    """Calls of ``X.tojson()`` (unless ``remove_amp_cast=False``), ``SYMBOL.save(...)`` and
    ``mx.model.save_checkpoint(...)`` in a source file (found in the syntax tree, so prose does not count)."""
    import ast

    with open(path) as f:
        tree = ast.parse(f.read(), path)
    found = []
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
            continue
        attr, owner = node.func.attr, ast.unparse(node.func.value)
        safe = any(k.arg == "remove_amp_cast" and isinstance(k.value, ast.Constant) and k.value.value is False
                   for k in node.keywords)
        if (attr == "tojson" and not safe) or (attr == "save" and re.search(r"sym|net\b|embedding", owner)) \
                or (attr == "save_checkpoint" and owner == "mx.model"):
            found.append(f"{os.path.relpath(path, ROOT)}:{node.lineno}: {ast.unparse(node)[:80]}")
    return found


def test_no_toolkit_code_calls_the_leaking_symbol_methods():
    offenders = []
    for top in ("recognition", "deploy", "datasets", "benchmarks"):
        for folder, _, files in os.walk(os.path.join(ROOT, top)):
            offenders += [c for name in sorted(files) if name.endswith(".py")
                          for c in _leaking_calls(os.path.join(folder, name))]
    assert not offenders, "use recognition.common.symbol_json/symbol_graph instead:\n" + "\n".join(offenders)


def test_the_leak_check_finds_real_calls(tmp_path):
    src = tmp_path / "sample.py"
    src.write_text("s = sym.tojson()\nt = sym.tojson(remove_amp_cast=False)\nnet.save('x')\n"
                   "mx.model.save_checkpoint('p', 1, net, {}, {})\n# sym.tojson() in a comment\n")
    assert [c.split(": ", 1)[0].rsplit(":", 1)[1] for c in _leaking_calls(str(src))] == ["1", "3", "4"]


def _records(n, seed=0):
    rng = np.random.RandomState(seed)
    out = []
    for step in range(1, n + 1):
        rec = {"kind": "train", "step": step, "loss": float(rng.rand() * 5), "acc": float(rng.rand()),
               "lr": 0.1 * 0.1 ** (step // 4000), "stage": "head" if step <= 500 else "all"}
        if step % 3:  # acc_nomargin only on some steps: its means must use its own counts
            rec["acc_nomargin"] = float(rng.rand())
        out.append(rec)
        if step % 250 == 0:
            out.append({"kind": "verify", "step": step, "target": "lfw", "acc": step / n, "std": 0.0, "xnorm": 1.0})
            out.append({"kind": "checkpoint", "step": step, "epoch": step // 250, "path": "x"})
    return out


def test_series_stays_bounded_and_its_means_are_exact():
    recs = _records(10007)
    s = Series(max_points=100)
    for r in recs:
        s.add(r)
    assert len(s.points) <= 100 and s.width == 128  # 10007 steps / 100 points -> width 2^7
    train = [r for r in recs if r["kind"] == "train"]
    steps = np.array([r["step"] for r in train])
    for name in Series.FIELDS:
        got = s.series(name)
        assert got[-1][0] == 10007
        lo = 0
        for step, mean in got:  # each point = the mean over the steps since the previous point (numpy reference)
            vals = [r[name] for r in train[lo:int(np.searchsorted(steps, step)) + 1] if name in r]
            assert np.isclose(mean, np.mean(vals), rtol=1e-9), (name, step)
            lo = int(np.searchsorted(steps, step)) + 1
    counts = [p[1] for p in s.points]
    assert sum(counts) == 10007 and max(counts) == 128
    assert s.verify == {"lfw": [(r["step"], r["acc"]) for r in recs if r["kind"] == "verify"]}
    assert s.stages == [(1, "head"), (501, "all")]  # one entry per change of stage, however long the run


def test_metrics_log_series_matches_the_file_and_survives_resume(tmp_path):
    path = str(tmp_path / "metrics.jsonl")
    log = MetricsLog(path)
    for r in _records(900):
        log.write(r.pop("kind"), **r)
    log.close()
    from_file = Series.from_file(path)
    assert from_file.points == log.series.points and from_file.verify == log.series.verify
    resumed = MetricsLog(path)  # a resumed run: reads the file once, then drops what is past the resume step
    assert resumed.series.points == log.series.points
    resumed.truncate_after(500)
    assert resumed.series.series("loss")[-1][0] == 500
    assert resumed.series.verify == {"lfw": [(250, 250 / 900), (500, 500 / 900)]}
    resumed.write("train", step=501, loss=1.0, acc=0.5)
    resumed.close()
    assert [r["step"] for r in read_metrics(path, "train")][-2:] == [500, 501]
    png = str(tmp_path / "curves.png")
    assert resumed.plot(png) == png and open(png, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    assert plot_curves(path, str(tmp_path / "again.png")) is not None
    assert plot_curves(str(tmp_path / "missing.jsonl"), str(tmp_path / "none.png")) is None


def test_one_run_log_per_process(tmp_path):
    root = logging.getLogger()
    before = list(root.handlers)
    a, b = str(tmp_path / "a.log"), str(tmp_path / "b.log")
    try:
        setup_logging(log_file=a)
        logging.getLogger("recognition").info("first run")
        setup_logging(log_file=a)  # the same run again (resume in-process): still one handler
        setup_logging(log_file=b)
        logging.getLogger("recognition").info("second run")
        files = [h for h in root.handlers if isinstance(h, logging.FileHandler) and getattr(h, "_ifr", False)]
        assert [h.baseFilename for h in files] == [b]
        assert "first run" in open(a).read() and "second run" not in open(a).read()
        assert "second run" in open(b).read() and "first run" not in open(b).read()
    finally:
        for h in list(root.handlers):
            if h not in before:
                root.removeHandler(h)
                h.close()

