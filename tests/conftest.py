"""Settings every test module shares.

* Under pytest-xdist (the README's ``-n 2``) each worker, and every process its tests start,
  runs one torch thread: two workers of two threads each on two cores would spin against each
  other and run slower than one worker.
* The development loop (``-m "not slow and not dist"``) stays fast because a test that ran
  longer than :data:`FAST_LOOP_LIMIT_S` without either marker is named at the end of the run.
"""
from __future__ import annotations

import os

import pytest

if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = "1"  # inherited by torchrun / subprocess runs
    import torch

    torch.set_num_threads(1)

FAST_LOOP_LIMIT_S = 10.0
_unmarked_slow: list[tuple[str, float]] = []


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.when == "call" and report.duration > FAST_LOOP_LIMIT_S:
        if not {"slow", "dist"} & set(report.keywords):
            _unmarked_slow.append((report.nodeid, report.duration))


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if _unmarked_slow:
        terminalreporter.section("tests to mark slow or dist (they slow the development loop)")
        for nodeid, seconds in sorted(_unmarked_slow, key=lambda item: -item[1]):
            terminalreporter.write_line(f"{seconds:6.1f} s  {nodeid}")
