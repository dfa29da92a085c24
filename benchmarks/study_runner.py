"""How the speedup study (:mod:`study`) runs its queue: one ``alignkit train`` process per run
folder, a finished folder with the same settings reused (here or in a sibling study folder), an
unfinished one continued with ``--resume``, ``jobs`` runs at a time, each folder locked so two
study.py processes never train the same run.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common import drop_weights

RUN_RECORD = "study_run.json"


@dataclass
class Run:
    name: str  # folder name: <configuration>-s<seed>
    config: str  # configuration name (a baseline's is "baseline" or "baseline@<configuration>")
    seed: int
    overrides: list[str]


class Runner:
    """Runs, reuses or resumes one run folder per call (called from worker threads)."""

    def __init__(self, base: Path, out: Path, resume: bool, keep_weights: bool, threads: int) -> None:
        self.base, self.out, self.resume, self.keep_weights = base, out, resume, keep_weights
        self.env = os.environ | {"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(threads))}
        self.lock = threading.Lock()
        self.base_sha = hashlib.sha256(base.read_bytes()).hexdigest()

    def say(self, text: str) -> None:
        with self.lock:
            print(text, flush=True)

    def record(self, run: Run) -> dict[str, Any]:
        return {"base": str(self.base), "base_sha256": self.base_sha, "overrides": run.overrides}

    def state(self, run: Run) -> str:
        """new | done | unfinished; a folder made with other settings stops the study."""
        folder = self.out / run.name
        if not folder.exists():
            return "new"
        saved = folder / RUN_RECORD
        if not saved.is_file() or self.settings(json.loads(saved.read_text())) != self.settings(self.record(run)):
            raise SystemExit(f"{folder} holds a run with other settings (see its {RUN_RECORD}); delete it or choose another --out")
        return "done" if (folder / "results.json").is_file() else "unfinished"

    @staticmethod
    def settings(record: dict[str, Any]) -> tuple:
        """What a run computes: the base recipe's content and its overrides (one per key, so their
        order does not matter)."""
        return record["base_sha256"], tuple(sorted(record["overrides"]))

    def same_run(self, run: Run) -> Path | None:
        """A finished folder of another name with this run's exact settings (a configuration that
        repeats another, e.g. a grid's default that another grid already ran), in this study folder
        or, failing that, in a sibling one (e.g. the baselines of a study that differs only in its
        teacher, which baselines never use)."""
        key = self.settings(self.record(run))
        here = sorted(self.out.glob(f"*/{RUN_RECORD}"))
        for saved in here + sorted(set(self.out.parent.glob(f"*/*/{RUN_RECORD}")) - set(here)):
            if saved.parent != self.out / run.name and not saved.parent.is_symlink() and (saved.parent / "results.json").is_file() \
                    and self.settings(json.loads(saved.read_text())) == key:
                return saved.parent
        return None

    @contextlib.contextmanager
    def claim(self, run: Run) -> Any:
        """Hold the run's lock: another study.py on the same folder (e.g. a second queue, or a grid
        sharing its baselines) waits for this run instead of training it at the same time."""
        locks = self.out / ".locks"
        locks.mkdir(parents=True, exist_ok=True)
        with open(locks / f"{run.name}.lock", "w") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                self.say(f"wait   {run.name} (another study.py is running it)")
                fcntl.flock(handle, fcntl.LOCK_EX)
            yield

    def __call__(self, run: Run, keep_weights: bool = False) -> bool:
        with self.claim(run):
            return self._start_or_reuse(run, keep_weights)

    def _start_or_reuse(self, run: Run, keep_weights: bool) -> bool:
        folder, state = self.out / run.name, self.state(run)
        if state == "done":
            self.say(f"reuse  {run.name}")
            return True
        same = self.same_run(run) if state == "new" else None
        if same is not None:
            link = os.path.relpath(same, self.out)  # relative: the results folder can move
            folder.symlink_to(link)
            self.say(f"reuse  {run.name} (the same run as {link})")
            return True
        if state == "unfinished" and not self.resume:
            raise SystemExit(f"{folder} is unfinished: pass --resume to continue it, or delete it")
        command = [sys.executable, "-m", "alignkit", "train"]
        if state == "unfinished":
            command += ["--resume", str(folder)]
        else:
            folder.mkdir(parents=True)
            (folder / RUN_RECORD).write_text(json.dumps(self.record(run), indent=2))
            command += [str(self.base), *run.overrides, f"output_dir={self.out}", f"run_name={run.name}"]
        self.say(f"{'resume' if state == 'unfinished' else 'start'}  {run.name}")
        started = time.time()
        with open(folder / "study.log", "a") as log:
            code = subprocess.run(command + ["--no-progress"], stdout=log, stderr=subprocess.STDOUT, env=self.env).returncode
        if code != 0 or not (folder / "results.json").is_file():
            tail = (folder / "study.log").read_text().splitlines()[-5:]
            self.say(f"FAILED {run.name} (exit {code}; {folder / 'study.log'}):\n  " + "\n  ".join(tail))
            return False
        if not (self.keep_weights or keep_weights):
            drop_weights(folder)
        self.say(f"done   {run.name} ({time.time() - started:.0f} s)")
        return True


def run_queue(runner: Runner, queue: list[Run], jobs: int) -> dict[str, bool]:
    """Run the queue ``jobs`` at a time; a run repeating another of the queue's exact settings is not
    trained: it is linked to that one the moment it finishes (Runner.same_run), so a mid-queue
    ``--analyse`` already sees it. Returns run name -> finished."""
    original: dict[str, Run] = {}  # run name -> the first run of the queue with its settings
    first: dict[tuple, Run] = {}
    for r in queue:
        original[r.name] = first.setdefault(runner.settings(runner.record(r)), r)
    done: dict[str, bool] = {}
    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        futures = {r.name: pool.submit(runner, r) for r in first.values()}
        for r in queue:
            if r is not original[r.name]:  # the callback runs in the worker that finished the original
                futures[original[r.name].name].add_done_callback(
                    lambda f, r=r: done.__setitem__(r.name, f.exception() is None and f.result() and runner(r)))
        done |= {name: f.result() for name, f in futures.items()}
    return done
