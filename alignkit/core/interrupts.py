"""SIGINT and SIGTERM as stop requests that the trainer honours at a step boundary.

A signal only sets a flag; the trainer finishes the step it is in (and an eval or save under
way), all ranks agree on stopping, a consistent checkpoint is written, and the run exits with
128 + the signal number. A second Ctrl-C stops at once without saving (the previous
checkpoint stays). SIGTERM is what schedulers (Slurm, Kubernetes, torchrun) send before a kill.
"""
from __future__ import annotations

import signal
import sys
import threading
from contextlib import contextmanager
from typing import Iterator

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopRequests:
    def __init__(self) -> None:
        self.signum = 0  # the first signal received, 0 = none
        self.forced = False  # a second SIGINT: stop now, save nothing

    def _handle(self, signum: int, _frame: object) -> None:
        if self.signum and signum == signal.SIGINT:
            self.forced = True
            raise KeyboardInterrupt
        if not self.signum:
            self.signum = signum
            name = signal.Signals(signum).name
            print(f"\n{name}: stopping after this step and saving a checkpoint (Ctrl-C again: stop now, no save)",
                  file=sys.stderr, flush=True)

    @contextmanager
    def installed(self) -> Iterator["StopRequests"]:
        """Handle the signals while the body runs (handlers can only be set in the main thread;
        elsewhere, e.g. a trainer run from a worker thread, the defaults stay)."""
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        previous = {s: signal.signal(s, self._handle) for s in SIGNALS}
        try:
            yield self
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
