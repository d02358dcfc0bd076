"""Trace where one training run's configuration and plan travel: ``python docs/trace_run_plan.py``.

Generates a tiny synthetic dataset in a temporary folder, runs ``recognition/train.py``'s ``main`` for one step
(network ``tiny``, ArcFace, CPU) and records, from the call that parses the flags until the first
``forward_backward``, every Python call in a ``recognition`` module that receives the run configuration (what
:func:`recognition.train_config.resolve_config` returns), the run plan (what
:func:`recognition.run_plan.prepare_run` returns) or an object holding the plan (the trainer) as an argument (the
plan's own methods excluded). Prints the modules in the order the plan reaches them (consecutive calls in one module
collapsed), the number of distinct modules, and the returns: how often the plan comes back to a module it had
already left; then the same two counts for every call into a ``recognition`` module (helpers included) over the
same span.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
from typing import List, Tuple


def trace(argv: List[str]) -> Tuple[List[str], List[str]]:
    """Module names (``recognition.X``) in the order the plan/config reach them, and in the order any function of
    theirs is called, consecutive repeats collapsed."""
    from recognition.train import main

    targets: set = set()
    order: List[str] = []
    calls: List[str] = []
    state = {"done": False}

    def holds_plan(value) -> bool:
        if id(value) in targets:
            return True
        plan = getattr(value, "__dict__", {}).get("plan")
        return plan is not None and id(plan) in targets

    def prof(frame, event, arg):
        if state["done"]:
            return
        name = frame.f_globals.get("__name__", "")
        if event == "call" and frame.f_code.co_name == "forward_backward":
            state["done"] = True
            return
        if not name.startswith("recognition"):
            return
        if event == "call" and (not calls or calls[-1] != name):
            calls.append(name)
        if event == "return" and frame.f_code.co_name in ("resolve_config", "prepare_run") and arg is not None:
            targets.add(id(arg))
            if not order or order[-1] != name:
                order.append(name)
        elif event == "call" and targets:
            code = frame.f_code
            args = [frame.f_locals.get(v) for v in code.co_varnames[:code.co_argcount + code.co_kwonlyargcount]]
            if args and code.co_varnames[0] == "self" and id(args[0]) in targets:
                return  # the plan's own methods and properties: the plan reading itself, not travelling
            if any(holds_plan(a) for a in args) and (not order or order[-1] != name):
                order.append(name)

    sys.setprofile(prof)
    try:
        main(argv)
    finally:
        sys.setprofile(None)
    return order, calls


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.parse_args()
    from datasets.synth import generate_dataset

    with tempfile.TemporaryDirectory() as tmp:
        data = os.path.join(tmp, "data")
        generate_dataset(data, num_classes=6, images_per_class=4, num_holdout=2, holdout_images=2, num_pairs=10,
                         seed=0, image_size=112)
        order, calls = trace(["--network", "tiny", "--loss", "arcface", "--data-dir", data, "--max-steps", "1",
                       "--per-batch-size", "8", "--ctx", "cpu:0", "--prefix", os.path.join(tmp, "run", "model"),
                       "--num-workers", "1", "--target", ""])
    print("path: " + " -> ".join(m.rpartition(".")[2] for m in order))
    print(f"modules: {len(set(order))}; returns to a module already left: {len(order) - len(set(order))}")
    print(f"all recognition modules called before the first step: {len(set(calls))}; returns: "
          f"{len(calls) - len(set(calls))}")


if __name__ == "__main__":
    main()
