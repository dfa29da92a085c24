"""Trainer callbacks: what the loop does besides training (logging, throughput, weight
averaging, model selection, the progress bar) runs at fixed hook points.

The trainer calls every callback of its list, in order, at each point (all hooks are no-ops
unless overridden; ``trainer`` gives ``step``, ``tokens``, ``cfg``, ``student``, ``optimizer``,
``task``, ``run_dir``, ``device`` and ``dist``). Hooks run on every rank unless said otherwise.

  on_fit_start(trainer)               fit() begins (after any resume)
  on_step_begin(trainer)              before the first micro-batch of an optimizer step
  on_step_end(trainer, record)        after the optimizer step; ``trainer.step`` counts it. ``record``:
                                      the step's metrics averaged over ranks on logging steps
                                      (``train.log_every``), else None; a callback may add entries
                                      for the ones after it
  eval_weights(trainer)               a context manager around each evaluation (EMA swaps its weights in)
  on_eval(trainer, results)           after an evaluation (inside ``eval_weights``)
  on_save(trainer, directory, state)  main rank, while a checkpoint is staged in ``directory`` (renamed
                                      once complete): write files there, add JSON entries to ``state``
  on_load(trainer, directory, state)  on resume from ``directory``, with what on_save added to ``state``
  on_interrupt(trainer, checkpoint)   a stop by signal or Ctrl-C, once ``checkpoint`` is written
  on_fit_end(trainer, results)        training done, before the export: may set the student's
                                      weights and add entries to ``results``

A logger (``train.loggers``) is a callback registered in LOGGERS as a factory ``f(*, run_dir)``;
its optional static ``check()`` raises when it cannot work (a missing package), which config
checks call before any model is built.

Built in, in this order: :class:`Throughput`; the loggers that ``train.loggers`` names (main
rank; the LOGGERS registry: ``jsonl``, ``tensorboard``); :class:`~alignkit.core.ema.WeightAverage`
(``train.ema_decay``); :class:`BestModel` (``train.select_metric``); on the main rank
:class:`~alignkit.core.run_report.RunReport` and :class:`~alignkit.core.run_report.CurvesPlot`
(the run's plan, a line per eval, ``curves.png``); :class:`ProgressBar`.
Callbacks passed as ``Trainer(callbacks=[...])`` come after them.
"""
from __future__ import annotations

import json
import math
import resource
import time
import warnings
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor
from tqdm.auto import tqdm

from alignkit.core.errors import ConfigError, MissingPackage
from alignkit.core.registry import LOGGERS

Record = dict[str, Any]


class Callback:
    """Base class: override the hooks you need (see the module docstring)."""

    def on_fit_start(self, trainer: Any) -> None: ...

    def on_step_begin(self, trainer: Any) -> None: ...

    def on_step_end(self, trainer: Any, record: Record | None) -> None: ...

    def eval_weights(self, trainer: Any) -> AbstractContextManager[Any]:
        return nullcontext()

    def on_eval(self, trainer: Any, results: dict[str, float]) -> None: ...

    def on_save(self, trainer: Any, directory: Path, state: dict[str, Any]) -> None: ...

    def on_load(self, trainer: Any, directory: Path, state: dict[str, Any]) -> None: ...

    def on_interrupt(self, trainer: Any, checkpoint: Path) -> None: ...

    def on_fit_end(self, trainer: Any, results: dict[str, float]) -> None: ...


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


class Throughput(Callback):
    """Adds ``tokens_per_s`` (all ranks' tokens per second of training since the last record;
    evals and saves do not count) and ``peak_mem_mb`` to every logged record."""

    def on_fit_start(self, trainer: Any) -> None:
        self.tokens, self.seconds, self.started = trainer.tokens, 0.0, time.perf_counter()

    def on_step_begin(self, trainer: Any) -> None:
        self.started = time.perf_counter()

    def on_step_end(self, trainer: Any, record: Record | None) -> None:
        self.seconds += time.perf_counter() - self.started
        if record is not None:
            record.update(tokens_per_s=(record["tokens"] - self.tokens) / max(self.seconds, 1e-9),
                          peak_mem_mb=peak_memory_mb(trainer.device))
            self.tokens, self.seconds = record["tokens"], 0.0


@LOGGERS.register("jsonl")
class JsonlLogger(Callback):
    """``RUN_DIR/metrics.jsonl``: one JSON object per logged step and per evaluation. On resume,
    the lines after the checkpoint go, so the log reads as if the run had never stopped."""

    def __init__(self, *, run_dir: Path) -> None:
        self.path = Path(run_dir) / "metrics.jsonl"

    def _write(self, record: Record) -> None:
        with open(self.path, "a") as handle:
            handle.write(json.dumps(record) + "\n")

    def on_step_end(self, trainer: Any, record: Record | None) -> None:
        if record is not None:
            self._write(record)

    def on_eval(self, trainer: Any, results: dict[str, float]) -> None:
        self._write({"step": trainer.step, **results})

    def on_load(self, trainer: Any, directory: Path, state: dict[str, Any]) -> None:
        if not self.path.is_file():
            return
        kept = []
        for number, line in enumerate(self.path.read_text(errors="replace").splitlines(), 1):
            try:
                record = json.loads(line)
            except ValueError:
                warnings.warn(f"{self.path}:{number}: dropping an unreadable line (cut off by a kill?)", stacklevel=2)
                continue
            if isinstance(record, dict) and record.get("step", math.inf) <= state["step"]:
                kept.append(line)
        staging = self.path.with_name(self.path.name + ".tmp")  # a kill mid-rewrite must not cut the log
        staging.write_text("".join(line + "\n" for line in kept))
        staging.replace(self.path)


@LOGGERS.register("tensorboard")
class TensorBoardLogger(Callback):
    """TensorBoard event files in ``RUN_DIR/tensorboard`` (``train/<metric>`` per logged step,
    ``eval/<metric>`` per evaluation); on resume, events after the checkpoint are purged."""

    def __init__(self, *, run_dir: Path) -> None:
        writer = self.check()
        self.open = lambda purge_step: writer(str(Path(run_dir) / "tensorboard"), purge_step=purge_step)
        self.writer: Any = None
        self.purge_step: int | None = None

    @staticmethod
    def check() -> Any:
        """The writer class, or :class:`MissingPackage` (config checks call this before any model is built)."""
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise MissingPackage("train.loggers names 'tensorboard', which needs the tensorboard package "
                                 "(pip install tensorboard)") from None
        return SummaryWriter

    def _write(self, prefix: str, values: Record, step: int) -> None:
        if self.writer is None:
            self.writer = self.open(self.purge_step)
        for key, value in values.items():
            if isinstance(value, (int, float)) and key != "step":
                self.writer.add_scalar(f"{prefix}/{key}", value, step)

    def on_step_end(self, trainer: Any, record: Record | None) -> None:
        if record is not None:
            self._write("train", record, trainer.step)

    def on_eval(self, trainer: Any, results: dict[str, float]) -> None:
        self._write("eval", results, trainer.step)

    def on_load(self, trainer: Any, directory: Path, state: dict[str, Any]) -> None:
        self.purge_step = state["step"] + 1

    def on_interrupt(self, trainer: Any, checkpoint: Path) -> None:
        self.on_fit_end(trainer, {})

    def on_fit_end(self, trainer: Any, results: dict[str, float]) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


class BestModel(Callback):
    """Keeps the weights of the best evaluation by ``train.select_metric`` (the first of equal
    ones, unless a later one is lower on ``train.select_tiebreak``); they are checkpointed and
    exported. Under EMA the candidates are the averaged weights."""

    FILE = "best.safetensors"

    def __init__(self, *, metric: str, mode: str = "max", tiebreak: str = "") -> None:
        self.metric, self.mode, self.tiebreak = metric, mode, tiebreak
        self.best: tuple[tuple[float, float], dict[str, Tensor]] | None = None  # ((metric, tiebreak), weights)

    def on_eval(self, trainer: Any, results: dict[str, float]) -> None:
        for key, name in ((self.metric, "select_metric"), (self.tiebreak, "select_tiebreak")):
            if key and key not in results:
                raise ConfigError(f"train.{name}={key!r} is not among the eval metrics {sorted(results)}")
        value = (results[self.metric], results[self.tiebreak] if self.tiebreak else math.inf)
        if self.best is None:
            better = True
        elif value[0] == self.best[0][0]:
            better = value[1] < self.best[0][1]
        else:
            better = value[0] > self.best[0][0] if self.mode == "max" else value[0] < self.best[0][0]
        if better:
            self.best = (value, {k: v.detach().cpu().clone() for k, v in trainer.student.state_dict().items()})

    def on_save(self, trainer: Any, directory: Path, state: dict[str, Any]) -> None:
        value, tiebreak = self.best[0] if self.best else (None, None)
        state.update(best_value=value, best_tiebreak=None if tiebreak in (None, math.inf) else tiebreak)
        if self.best is not None:
            save_file({k: v.contiguous() for k, v in self.best[1].items()}, str(directory / self.FILE))

    def on_load(self, trainer: Any, directory: Path, state: dict[str, Any]) -> None:
        if state.get("best_value") is not None:
            tiebreak = state.get("best_tiebreak")
            key = (state["best_value"], math.inf if tiebreak is None else tiebreak)
            self.best = (key, load_file(str(directory / self.FILE)))

    def on_fit_end(self, trainer: Any, results: dict[str, float]) -> None:
        if self.best is not None:
            trainer.student.load_state_dict(self.best[1])
            results[f"best_{self.metric}"] = self.best[0][0]


class ProgressBar(Callback):
    """A tqdm bar over the run's steps with the latest loss and, in a run that aligns, its weight."""

    def on_fit_start(self, trainer: Any) -> None:
        self.bar = tqdm(total=trainer.cfg.steps, initial=trainer.step, desc=trainer.role, dynamic_ncols=True)

    def on_step_end(self, trainer: Any, record: Record | None) -> None:
        self.bar.update(1)
        if record is not None:
            lam = {"lam": f"{record['lambda']:.3g}"} if "lambda" in record else {}
            self.bar.set_postfix(loss=f"{record['loss']:.3f}", **lam)

    def on_interrupt(self, trainer: Any, checkpoint: Path) -> None:
        self.bar.close()

    def on_fit_end(self, trainer: Any, results: dict[str, float]) -> None:
        self.bar.close()
