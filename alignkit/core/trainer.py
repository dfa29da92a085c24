"""The one training loop, for every task and modality.

The optimizer and LR schedule from config (:mod:`alignkit.core.optim`), gradient accumulation,
bf16 autocast, clipping, periodic eval, checkpoints with exact resume, and DDP/FSDP under
``torchrun``. Everything else runs as callbacks at fixed hook points
(:mod:`alignkit.core.callbacks`: logging, throughput and memory, EMA, best-model selection,
the progress bar, and any passed as ``Trainer(callbacks=[...])``); a checkpoint holds what each
callback adds in ``on_save`` and gives it back in ``on_load``. Tasks hand the trainer batches, an
eval function and an export function; they never write loops of their own.

Interruptions never cost exactness. SIGINT/SIGTERM only set a flag (:mod:`alignkit.core.interrupts`):
the step in flight completes, all ranks agree, a checkpoint is written, and :class:`Interrupted`
is raised. A ``KeyboardInterrupt`` raised inside a step (an exception, not a signal) is handled by
the phase it hit: before the optimizer step the step is dropped and the checkpoint holds the
state from before it; after the optimizer step the step's bookkeeping is completed first; during
an eval the checkpoint records the eval as pending, so the resumed run evaluates first.
"""
from __future__ import annotations

import signal
from contextlib import ExitStack, nullcontext
from pathlib import Path
from typing import Any, Iterator, Protocol, Sequence, TypeVar

import torch
from torch import Tensor, nn
from torch.distributed.tensor import DTensor

from alignkit.core import checkpoint as ckpt
from alignkit.core import parallel
from alignkit.core.adapter import HOST, Batch, HostCopy, StudentOutput
from alignkit.core.callbacks import BestModel, Callback, ProgressBar, Throughput
from alignkit.core.checkpointer import Checkpointer, TrainerState
from alignkit.core.config import TrainConfig
from alignkit.core.distributed import DistInfo, agree, all_reduce_mean, max_over_ranks
from alignkit.core.ema import WeightAverage
from alignkit.core.engine import AlignmentEngine
from alignkit.core.errors import ConfigError, Interrupted, MissingPackage
from alignkit.core.interrupts import StopRequests
from alignkit.core.optim import build_lr_schedule, build_optimizer
from alignkit.core.registry import LOGGERS, LR_SCHEDULES, OPTIMIZERS
from alignkit.core.run_report import CurvesPlot, RunReport

C = TypeVar("C", bound=Callback)


class Task(Protocol):
    """What the trainer needs from a task (text pretraining, time-series classification, ...)."""

    def train_batches(self, micro_batch_size: int) -> Iterator[Batch]: ...

    def state_dict(self) -> dict[str, Any]: ...  # data position, for exact resume

    def load_state_dict(self, state: dict[str, Any]) -> None: ...

    def resharded_state(self, states: list[dict[str, Any]]) -> dict[str, Any]:
        """A rank's data position on another process count, from every saved rank's (or refuse)."""
        ...

    def evaluate(self, student: nn.Module, device: torch.device) -> dict[str, float]:
        """Called on every rank; must return the same numbers on each (all-reduce)."""
        ...

    def export(self, student: nn.Module, directory: Path) -> None: ...


class StepModule(nn.Module):
    """Student + engine as one module, so DDP syncs the student and any learned projection."""

    def __init__(self, student: nn.Module, engine: AlignmentEngine | None) -> None:
        super().__init__()
        self.student = student
        self.engine = engine

    def forward(self, batch: Batch, step: int) -> tuple[Tensor, StudentOutput, dict[str, Tensor]]:
        if self.engine is None:
            out = self.student(batch, [])
            return out.loss, out, {}
        # logits inside the student's forward: under FSDP its head is unsharded only there
        logits = {"logits": True} if self.engine.wants_student_logits(step) else {}
        out = self.student(batch, self.engine.student_layers(step), **logits)
        aux, metrics = self.engine(out, batch, step)
        return out.loss + aux, out, metrics


def to_device(batch: Batch, device: torch.device) -> dict[str, Any]:
    """``batch`` on ``device``, with its host tensors under :data:`~alignkit.core.adapter.HOST`
    (a batch moved before keeps the copy it has)."""
    moved = {k: v.to(device, non_blocking=True) if isinstance(v, Tensor) else v for k, v in batch.items()}
    moved.setdefault(HOST, HostCopy(batch))
    return moved


def precision_context(precision: str, device: torch.device) -> Any:
    """The autocast of ``train.precision`` on ``device`` (a no-op for float32): what training and
    evaluation run under."""
    return torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bfloat16" else nullcontext()


def config_problems(cfg: TrainConfig, section: str = "train") -> list[str]:
    """The names in ``cfg`` that no registry knows (optimizer, LR schedule, loggers) and loggers
    that cannot work (a missing package), one message each: what a config check can report
    before any model is built."""
    found = []
    for table, key, names in ((OPTIMIZERS, "optimizer", [cfg.optimizer]), (LR_SCHEDULES, "lr_schedule", [cfg.lr_schedule]),
                              (LOGGERS, "loggers", cfg.loggers)):
        for name in names:
            try:
                getattr(table.get(name, f"{section}.{key}"), "check", lambda: None)()
            except (ConfigError, MissingPackage) as err:
                found.append(str(err))
    return found


class Trainer:
    """Trains ``student`` (with ``engine``'s alignment terms, if any) on ``task`` for ``cfg.steps``
    optimizer steps; ``callbacks`` run after the built-in ones (see :mod:`alignkit.core.callbacks`)."""

    def __init__(
        self,
        *,
        cfg: TrainConfig,
        student: nn.Module,
        engine: AlignmentEngine | None,
        task: Task,
        run_dir: Path,
        device: torch.device,
        dist: DistInfo = DistInfo(),
        progress: bool = True,
        callbacks: Sequence[Callback] = (),
    ) -> None:
        self.cfg, self.task, self.run_dir, self.device, self.dist = cfg, task, Path(run_dir), device, dist
        self.module = StepModule(student, engine).to(device)
        self.student, self.engine = self.module.student, engine
        self.model, self.parallel = parallel.wrap_model(self.module, cfg, dist)
        self.params = [p for p in self.module.parameters() if p.requires_grad]
        self.optimizer = build_optimizer(cfg, self.module, device)
        self.checkpointer = Checkpointer(self.run_dir, self.module, self.optimizer, dist, device,
                                         sharded=self.parallel == "fsdp", keep=cfg.keep_checkpoints,
                                         export=lambda directory: task.export(self.student, directory))
        self._pending_tokens = 0  # this rank's tokens since the last host sync
        self.lr_at = build_lr_schedule(cfg)
        self.step, self.tokens = 0, 0
        self.callbacks = self._builtin_callbacks(progress) + list(callbacks)
        self.loss_name = getattr(task, "loss_name", "task_loss")  # e.g. "nll" for text
        self.autocast = precision_context(cfg.precision, device)
        self.optimizer.register_step_post_hook(lambda *_: setattr(self, "_phase", "applied"))
        self.signals = StopRequests()
        self.resume_hint = f"alignkit train --resume {self.run_dir}"  # printed when interrupted ("" = none)
        self.role = "student"  # what is trained, in messages (the teacher pre-training stage says "teacher")
        self.eval_pending = False  # an eval interrupted by an exception: run it first on resume
        self.last_eval: dict[str, float] = {}
        self._phase = "idle"
        self._saved_step = -1
        self._snapshot: tuple[dict[str, Any], tuple[Any, ...]] = ({}, ())
        self._step_stats: tuple[Any, ...] = ()

    def _builtin_callbacks(self, progress: bool) -> list[Callback]:
        cfg, main = self.cfg, self.dist.is_main
        loggers = [LOGGERS.get(name, "train.loggers") for name in cfg.loggers]  # names checked on every rank
        found: list[Callback] = [Throughput()] + ([make(run_dir=self.run_dir) for make in loggers] if main else [])
        if cfg.ema_decay > 0:
            found.append(WeightAverage(module=self.student, decay=cfg.ema_decay))
        if cfg.select_metric:
            found.append(BestModel(metric=cfg.select_metric, mode=cfg.select_mode, tiebreak=cfg.select_tiebreak))
        if main:
            found += [RunReport(), CurvesPlot()]
        if progress and main:
            found.append(ProgressBar())
        return found

    def callback(self, kind: type[C]) -> C | None:
        """The first registered callback of type ``kind`` (None if there is none)."""
        return next((c for c in self.callbacks if isinstance(c, kind)), None)

    def _call(self, hook: str, *args: Any) -> None:
        for callback in self.callbacks:
            getattr(callback, hook)(self, *args)

    # --- resume / checkpoints (the Checkpointer writes and reads; the trainer decides when) ---
    def resume(self, directory: Path) -> None:
        """Continue from the checkpoint in ``directory``."""
        self._restore(*self.checkpointer.load(directory, prepare=self._retire_parameters))

    def resume_latest(self) -> Path | None:
        """Continue from the newest readable checkpoint of the run (older ones if the newest is
        damaged, half-written ones removed); None when the run has none."""
        found = self.checkpointer.load_latest(prepare=self._retire_parameters)
        if found is None:
            return None
        self._restore(*found)
        return found[0]

    @property
    def global_batch(self) -> int:
        """Sequences per optimizer step over all processes."""
        return self.cfg.micro_batch_size * self.cfg.grad_accum * self.dist.world_size

    def _restore(self, directory: Path, state: TrainerState, record: dict[str, Any],
                 data_states: list[dict[str, Any]]) -> None:
        """Continue from a loaded checkpoint; on another process count (elastic) the global
        batch must be the run's, the task maps the saved data positions, and a rank the run did
        not have seeds its RNG from the seed, its rank and the step."""
        if state.global_batch and state.global_batch != self.global_batch:
            raise ConfigError(f"{directory}: the run's global batch is {state.global_batch} sequences, this resume's "
                              f"{self.global_batch} (train.micro_batch_size x train.grad_accum x {self.dist.world_size} "
                              f"processes): set train.global_batch_size={state.global_batch}")
        self.step, self.tokens = state.step, state.tokens
        self.eval_pending, self.last_eval = state.eval_pending, state.last_eval
        if state.world_size == self.dist.world_size:
            self.task.load_state_dict(data_states[0])
        else:
            self.task.load_state_dict(self.task.resharded_state(data_states))
            if self.dist.rank >= state.world_size:
                ckpt.seed_everything(ckpt.rank_seed(self.cfg.seed, self.dist.rank, state.step))
        if self.engine is not None and self.engine.after_step(self.step - 1):  # teachers over before this step
            self._teacher_released()
        self._call("on_load", directory, record)

    def save(self, data_state: dict[str, Any], rng: tuple[Any, ...]) -> Path:
        """Checkpoint the current step (see :class:`Checkpointer`)."""
        self._reduce([])  # self.tokens up to date (a compute-plane collective every rank reaches)
        state = TrainerState(step=self.step, tokens=self.tokens, eval_pending=self.eval_pending, last_eval=self.last_eval,
                             global_batch=self.global_batch)
        path = self.checkpointer.save(state, data_state, rng,
                                      on_save=lambda staging, record: self._call("on_save", staging, record))
        self._saved_step = self.step
        return path

    def evaluate(self) -> dict[str, float]:
        """Every rank evaluates (tasks shard and all-reduce, so all ranks get equal results)."""
        self.student.eval()
        with ExitStack() as weights:  # e.g. the EMA's; model selection sees the same weights
            for callback in self.callbacks:
                weights.enter_context(callback.eval_weights(self))
            with torch.no_grad(), self.autocast:
                results = self.task.evaluate(self.student, self.device)
            self._call("on_eval", results)
        self.student.train()
        self.last_eval, self.eval_pending = results, False
        return results

    # --- the loop ----------------------------------------------------------------------------
    def fit(self) -> dict[str, float]:
        stream = iter(self.task.train_batches(self.cfg.micro_batch_size))
        self._call("on_fit_start")
        with self.signals.installed():
            try:
                if self.eval_pending:  # resumed from an interrupt during this step's eval
                    self._phase = "eval"
                    self._boundary(evaluate=True)
                while self.step < self.cfg.steps:
                    self._run_step(stream)
                    signum = max_over_ranks(self.signals.signum, self.dist)
                    if signum:
                        self._stop(signum)
            except KeyboardInterrupt:
                if self.signals.forced:
                    raise
                self._save_after_exception()
        if self.engine is not None:  # the run is over: free the teachers (a cached one writes what it holds)
            self.engine.release_all()
        results = dict(self.last_eval)
        self._call("on_fit_end", results)  # e.g. the EMA or the selected weights into the student
        with parallel.gathered(self.student, self.dist):  # fsdp: full weights on the main rank
            # the others wait on the control plane: a long export never meets NCCL's timeout,
            # and a failed one stops every rank with its message
            final = self.run_dir / "final"
            export = ckpt.as_write_error(lambda: ckpt.export_staged(lambda folder: self.task.export(self.student, folder), final),
                                         final, "the final export")
            agree(export if self.dist.is_main else None, self.dist)
        return results

    def _run_step(self, stream: Iterator[Batch]) -> None:
        self._snapshot = (self.task.state_dict(), ckpt.rng_snapshot())
        self._call("on_step_begin")
        self._phase = "accumulate"
        self._accumulate(stream)
        self.optimizer.step()  # its post-hook marks the phase "applied" the moment weights moved
        self._finish_step()
        self._phase = "eval"
        self._boundary(evaluate=self._eval_due())
        self._phase = "idle"

    def _eval_due(self) -> bool:
        return bool(self.cfg.eval_every and self.step % self.cfg.eval_every == 0) or self.step == self.cfg.steps

    def _boundary(self, evaluate: bool) -> None:
        """Eval and checkpoint after a step, as the schedule says."""
        if evaluate:
            self.evaluate()
        self._phase = "save"
        cfg = self.cfg
        if (cfg.save_every and self.step % cfg.save_every == 0) or self.step == cfg.steps:
            self.save(self.task.state_dict(), ckpt.rng_snapshot())

    def _stop(self, signum: int, path: Path | None = None) -> None:
        if path is None:
            path = self.checkpointer.path(self.step)
            if self._saved_step != self.step:
                path = self.save(self.task.state_dict(), ckpt.rng_snapshot())
        self._call("on_interrupt", path)
        hint = f"; continue with: {self.resume_hint}" if self.resume_hint else ""
        raise Interrupted(f"{signal.Signals(signum).name} at step {self.step}: saved {path}{hint}", signum)

    def _save_after_exception(self) -> None:
        """A KeyboardInterrupt inside a step: save the consistent state nearest to it."""
        if self._phase == "accumulate":  # the step never happened: state from before it
            self.optimizer.zero_grad(set_to_none=True)
            path = self.save(*self._snapshot)
        else:
            if self._phase == "applied":  # the weights moved: finish the step's bookkeeping
                self._finish_step()
                self.eval_pending = self._eval_due()
            elif self._phase == "eval":
                self.eval_pending = True
            path = self.save(self.task.state_dict(), ckpt.rng_snapshot())
        self._stop(signal.SIGINT, path)

    def _accumulate(self, stream: Iterator[Batch]) -> None:
        """Forward and backward over the step's micro-batches, then clip; metrics stay on the
        device (the host syncs only on logging steps and saves)."""
        cfg, step = self.cfg, self.step
        lr = self.lr_at(step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        sums: dict[str, Tensor] = {}
        tokens = 0
        for micro in range(cfg.grad_accum):
            host_batch = next(stream)
            batch = to_device(host_batch, self.device)
            with parallel.grad_sync(self.model, micro == cfg.grad_accum - 1, cfg.fsdp_reduce_every_micro_batch):
                with self.autocast:
                    total, out, metrics = self.model(batch, step)
                (total / cfg.grad_accum).backward()
            for key, value in {"loss": total.detach(), self.loss_name: out.loss.detach(), **metrics}.items():
                sums[key] = sums.get(key, 0.0) + value.float() / cfg.grad_accum
            mask = host_batch.get("attention_mask")  # host tensors: counting them needs no device sync
            tokens += int(mask.sum()) if mask is not None else host_batch["input_ids"].numel()
            del total, out, metrics  # no logits alive into the next micro-batch
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, cfg.clip_grad if cfg.clip_grad > 0 else float("inf"))
        self._step_stats = (sums, tokens, grad_norm, lr)

    def _finish_step(self) -> None:
        """Everything after the optimizer step: teacher release, counters, the record, callbacks."""
        sums, tokens, grad_norm, lr = self._step_stats
        step = self.step
        self.optimizer.zero_grad(set_to_none=True)
        teacher_active = self.engine is not None and self.engine.active(step)
        if self.engine is not None and self.engine.after_step(step):
            self._teacher_released()
        self._retire_parameters(step + 1)
        self.step += 1
        self._pending_tokens += tokens
        record = None
        if self.step % self.cfg.log_every == 0 or self.step == self.cfg.steps:  # the loop's only host syncs
            keys = sorted(sums)
            if isinstance(grad_norm, DTensor):  # fsdp
                grad_norm = grad_norm.full_tensor()
            values = self._reduce([sums[k] for k in keys] + [grad_norm])
            record = {"step": self.step, **dict(zip(keys, values[:-1])), "lr": lr, "grad_norm": values[-1],
                      "tokens": self.tokens, "teacher_active": teacher_active}
            if self.engine is not None:
                # seconds in the teachers over the steps whose time this record's tokens_per_s
                # covers (Throughput), so compare.teacher_step_cost prices the teacher from those
                # very steps; read after the sync above, so a CUDA timer waits on nothing. 0.0 once
                # released: an aligned run's train lines keep one set of keys. Each rank times its
                # own teachers; the log is rank 0's, as its tokens_per_s is rank 0's time.
                record["teacher_s"] = self.engine.teacher_time.read()
        self._call("on_step_end", record)

    def _retire_parameters(self, step: int) -> None:
        """The learned projections of alignment terms that are over by ``step`` leave the step
        module (and so checkpoints), the optimizer (groups and state) and gradient clipping;
        DDP is rewrapped without them. Called after each step, and on resume before the
        checkpoint's weights are loaded (whose optimizer state no longer holds them)."""
        retired = {id(p) for p in self.engine.retire(step)} if self.engine is not None else set()
        if not retired:
            return
        for group in self.optimizer.param_groups:
            for param in group["params"]:
                if id(param) in retired:
                    self.optimizer.state.pop(param, None)
            group["params"] = [p for p in group["params"] if id(p) not in retired]
        self.params = [p for p in self.params if id(p) not in retired]
        if self.parallel == "ddp":
            self.model = parallel.ddp(self.module)

    def _teacher_released(self) -> None:
        release = getattr(self.task, "release_teacher", None)  # optional in the Task protocol
        if release is not None:
            release()

    def _reduce(self, values: list[Tensor]) -> list[float]:
        """Means of ``values`` over ranks, in one collective and one host sync; also adds the
        tokens of all ranks since the last call to ``self.tokens``."""
        tokens = torch.tensor(float(self._pending_tokens * self.dist.world_size), device=self.device)
        reduced = all_reduce_mean(torch.stack([v.double() for v in values] + [tokens.double()]), self.dist).tolist()
        self.tokens, self._pending_tokens = self.tokens + int(reduced[-1]), 0
        return reduced[:-1]
