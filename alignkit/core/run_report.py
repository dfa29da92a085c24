"""A run talks while it runs (main rank, built-in callbacks; see :mod:`alignkit.core.callbacks`).

:class:`RunReport` says at the start where the run writes and what will happen (what is trained
and its size, each teacher's size and the step it is dropped at, the eval and checkpoint
cadence), then, after a few steps, the tokens per step and the time the rest should take; one
line per evaluation as it happens, with the time spent and left. :class:`CurvesPlot` redraws
``RUN_DIR/curves.png`` (train loss and each eval metric by step) after every evaluation, from
``metrics.jsonl`` (nothing without the jsonl logger).
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from torch import nn
from tqdm.auto import tqdm

from alignkit.core.callbacks import Callback, Record

ESTIMATE_AFTER = 4  # steps timed (after the first, which warms up) before the time estimate


def say(text: str) -> None:
    tqdm.write(text)  # above a progress bar, if one is showing


def millions(module: Any) -> str:
    params = sum(p.numel() for p in module.parameters()) if isinstance(module, nn.Module) else 0
    if not params:
        return "size unknown"
    return f"{params / 1e6:.1f}M parameters" if params >= 100_000 else f"{params:,} parameters"


def duration(seconds: float) -> str:
    minutes, seconds = divmod(int(round(seconds)), 60)
    return f"{minutes}m{seconds:02d}s" if minutes else f"{seconds}s"


def teacher_plan(trainer: Any) -> list[str]:
    """One line per teacher: its size and when the run drops it."""
    engine = trainer.engine
    if engine is None:
        return []
    lines = []
    for name, teacher in engine.teachers.items():
        stop = engine.teacher_stops[name]
        when = ("for the whole run" if stop is None or stop >= trainer.cfg.steps else
                f"up to step {stop}, then dropped (the remaining {trainer.cfg.steps - stop} steps cost what a plain run costs)")
        lines.append(f"teacher {name}: {millions(getattr(teacher, 'model', None))}, frozen, used {when}")
    return lines


class RunReport(Callback):
    """The run's plan at the start, a time estimate after a few steps, one line per eval."""

    def on_fit_start(self, trainer: Any) -> None:
        cfg = trainer.cfg
        self.start_step, self.start_tokens = trainer.step, trainer.tokens
        self.started = time.perf_counter()
        self.step_seconds, self.timed_steps, self.estimated = 0.0, 0, False
        resumed = f", resuming at step {trainer.step}" if trainer.step else ""
        say(f"run folder: {trainer.run_dir}{resumed}")
        say(f"{trainer.role}: {millions(trainer.student)}; {cfg.steps} steps of "
            f"{cfg.micro_batch_size * cfg.grad_accum * trainer.dist.world_size} examples")
        for line in teacher_plan(trainer):
            say(line)
        saves = f", checkpoints every {cfg.save_every} steps" if cfg.save_every else ""
        say(f"evaluates every {cfg.eval_every or cfg.steps} steps (a line each, curves.png redrawn){saves}")

    def on_step_begin(self, trainer: Any) -> None:
        self.step_started = time.perf_counter()

    def on_step_end(self, trainer: Any, record: Record | None) -> None:
        if trainer.step == self.start_step + 1 or self.estimated:  # the first step warms up
            return
        self.step_seconds += time.perf_counter() - self.step_started  # steps only: evals and saves are not timed
        self.timed_steps += 1
        if record is None or self.timed_steps < ESTIMATE_AFTER:
            return
        self.estimated = True
        per_step = self.step_seconds / self.timed_steps
        tokens = (record["tokens"] - self.start_tokens) / (trainer.step - self.start_step)
        left = trainer.cfg.steps - trainer.step
        say(f"{tokens:.0f} tokens per step, {per_step:.2f} s per step: about {duration(per_step * left)} "
            f"for the remaining {left} steps, evals and checkpoints not counted")

    def on_eval(self, trainer: Any, results: dict[str, float]) -> None:
        elapsed = time.perf_counter() - self.started
        done, total = trainer.step - self.start_step, trainer.cfg.steps - self.start_step
        left = f", ~{duration(elapsed / done * (total - done))} left" if 0 < done < total else ""
        values = "  ".join(f"{key} {value:.4g}" for key, value in results.items() if isinstance(value, (int, float)))
        say(f"step {trainer.step}/{trainer.cfg.steps}  {values}  ({duration(elapsed)} elapsed{left})")


class CurvesPlot(Callback):
    """``RUN_DIR/curves.png``, redrawn after each evaluation from ``metrics.jsonl``."""

    def on_eval(self, trainer: Any, results: dict[str, float]) -> None:
        from alignkit.compare import eval_curve, plot_panels, read_records, teacher_dropped

        if not (trainer.run_dir / "metrics.jsonl").is_file():
            return
        records = read_records(trainer.run_dir)
        dropped = teacher_dropped(records)
        marks = {"teacher dropped": dropped} if dropped and dropped < trainer.cfg.steps else {}
        panels = [{"title": "train loss", "ylabel": "loss", "curves": {"train": eval_curve(records, "loss")}, "vlines": marks}]
        panels += [{"title": key, "ylabel": key, "curves": {"eval": eval_curve(records, key)}, "vlines": marks}
                   for key, value in results.items() if isinstance(value, (int, float))]
        plot_panels(trainer.run_dir / "curves.png", panels, title=f"{Path(trainer.run_dir).name}, step {trainer.step}")
