"""Several ``alignkit train`` runs in one process, for the distributed tests: one ``torchrun``
launch pays the start-up once for a whole matrix of runs.

  python -m torch.distributed.run --standalone --nproc_per_node 2 tests/dist_runs.py SPEC.json

SPEC: ``{"runs": [[arg, ...], ...], "faults": [...], "out": DIR}``. A fault
``{"run": i, "target": "module:Class.attr", "rank": r, "call": n, "error": "OSError"}`` makes
that callable raise ``error`` on its ``n``-th call (1-based) during run ``i`` on rank ``r``
(-1: every rank). Each rank writes ``OUT/rank<r>.json``: per run, the exit code and the last
line it printed to stderr,
and its warnings.
"""
import builtins
import contextlib
import importlib
import io
import json
import os
import sys
from pathlib import Path
from typing import Any, Callable

import alignkit.train
from alignkit.cli import main
from alignkit.core.distributed import cleanup


def _armed(original: Callable, fault: dict[str, Any]) -> Callable:
    calls = [0]

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        calls[0] += 1
        if calls[0] == fault["call"]:
            raise getattr(builtins, fault["error"])(f"injected {fault['error']} in {fault['target']}")
        return original(*args, **kwargs)

    return wrapper


@contextlib.contextmanager
def faults_of(run: int, faults: list[dict[str, Any]], rank: int):
    undo = []
    for fault in faults:
        if fault["run"] != run or fault["rank"] not in (-1, rank):
            continue
        module_name, _, path = fault["target"].partition(":")
        owner: Any = importlib.import_module(module_name)
        *parents, attr = path.split(".")
        for name in parents:
            owner = getattr(owner, name)
        original = owner.__dict__[attr]
        setattr(owner, attr, _armed(original, fault))
        undo.append((owner, attr, original))
    try:
        yield
    finally:
        for owner, attr, original in undo:
            setattr(owner, attr, original)


def run_all(spec: dict[str, Any]) -> None:
    rank = int(os.environ.get("RANK", "0"))
    # one process group for all runs: torchrun's rendezvous does not take a second one
    alignkit.train.cleanup = lambda: None
    results = []
    for index, args in enumerate(spec["runs"]):
        err = io.StringIO()
        with faults_of(index, spec.get("faults", []), rank), contextlib.redirect_stderr(err):
            code = main([*args, "--no-progress"])
        lines = [line for line in err.getvalue().splitlines() if line.startswith("alignkit:")]
        warned = [line for line in err.getvalue().splitlines() if "Warning:" in line]
        results.append({"code": code, "message": lines[-1] if lines else "", "warnings": warned})
    Path(spec["out"], f"rank{rank}.json").write_text(json.dumps(results))
    cleanup()


if __name__ == "__main__":
    run_all(json.loads(Path(sys.argv[1]).read_text()))
    # the results are on disk: skip the interpreter's teardown, where a c10d thread was seen to
    # abort a rank under heavy load ("terminate called without an active exception")
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
