"""Time spent in one part of the training step, summed over the step's micro-batches until read.

The engine times its teachers with it, so a run logs the teachers' share of the very steps it
trained (``teacher_s`` in ``metrics.jsonl``) and :func:`alignkit.compare.teacher_step_cost` prices
the teacher from those steps, whatever the machine's load did meanwhile.
"""
from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Iterator

import torch


class SectionTimer:
    """Seconds spent inside :meth:`measure` since the last :meth:`read`."""

    def __init__(self) -> None:
        self._seconds = 0.0
        self._pending: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []  # CUDA sections not yet read

    @contextmanager
    def measure(self, device: torch.device) -> Iterator[None]:
        """Time the body, run on ``device``: on CPU with the host clock (its ops are synchronous);
        on CUDA with events on the device's stream, since the host only queues the work there and
        its clock would time the launches. The events are read later, so the step never waits."""
        if device.type != "cuda":
            started = time.perf_counter()
            yield
            self._seconds += time.perf_counter() - started
            return
        stream = torch.cuda.current_stream(device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record(stream)
        yield
        end.record(stream)
        self._pending.append((start, end))
        self._collect()

    def read(self) -> float:
        """The seconds measured since the last call, and start again from zero. On CUDA it waits
        for the last section to finish: called where the loop syncs anyway (logging), it is done."""
        if self._pending:
            self._pending[-1][1].synchronize()
        self._collect()
        seconds, self._seconds = self._seconds, 0.0
        return seconds

    def _collect(self) -> None:
        """Add the sections the GPU has finished, without waiting for the others (one stream runs
        them in order), so a long interval between reads holds few events."""
        while self._pending and self._pending[0][1].query():
            start, end = self._pending.pop(0)
            self._seconds += start.elapsed_time(end) / 1000.0
