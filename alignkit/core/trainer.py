"""The one training loop, for every task and modality.

AdamW (no decay on norms/biases), warmup + cosine LR to a floor, gradient accumulation,
bf16 autocast, clipping, periodic eval, best-model selection, checkpoints with exact resume,
``metrics.jsonl`` logging, a progress bar, and DDP under ``torchrun``. Tasks hand it batches,
an eval function and an export function; they never write loops of their own.
"""
from __future__ import annotations

import json
import math
import resource
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Iterator, Protocol

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from torch.distributed.tensor import DTensor
from tqdm.auto import tqdm

from alignkit.core import checkpoint as ckpt
from alignkit.core import parallel
from alignkit.core.adapter import Batch, StudentOutput
from alignkit.core.config import TrainConfig
from alignkit.core.distributed import DistInfo, all_reduce_mean, barrier
from alignkit.core.ema import WeightAverage
from alignkit.core.engine import AlignmentEngine
from alignkit.core.schedules import warmup_cosine

BEST_FILE = "best.safetensors"


class Task(Protocol):
    """What the trainer needs from a task (text pretraining, time-series classification, ...)."""

    def train_batches(self, micro_batch_size: int) -> Iterator[Batch]: ...

    def state_dict(self) -> dict[str, Any]: ...  # data position, for exact resume

    def load_state_dict(self, state: dict[str, Any]) -> None: ...

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
        layers = self.engine.student_layers(step) if self.engine is not None else []
        out = self.student(batch, layers)
        if self.engine is None:
            return out.loss, out, {}
        aux, metrics = self.engine(out, batch, step)
        return out.loss + aux, out, metrics


def _param_groups(module: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    decay, no_decay = [], []
    for param in module.parameters():
        if param.requires_grad:
            (decay if param.ndim >= 2 else no_decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def to_device(batch: Batch, device: torch.device) -> dict[str, Tensor]:
    return {k: v.to(device, non_blocking=True) if isinstance(v, Tensor) else v for k, v in batch.items()}


class Trainer:
    def __init__(
        self,
        cfg: TrainConfig,
        student: nn.Module,
        engine: AlignmentEngine | None,
        task: Task,
        run_dir: Path,
        device: torch.device,
        dist: DistInfo = DistInfo(),
        progress: bool = True,
    ) -> None:
        self.cfg, self.task, self.run_dir, self.device, self.dist = cfg, task, Path(run_dir), device, dist
        self.module = StepModule(student, engine).to(device)
        self.student, self.engine = self.module.student, engine
        self.model, self.parallel = parallel.wrap_model(self.module, cfg, dist)
        self.params = [p for p in self.module.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(_param_groups(self.module, cfg.weight_decay), lr=cfg.lr, betas=tuple(cfg.betas),
                                           fused=device.type == "cuda")
        self._pending_tokens = 0  # this rank's tokens since the last host sync
        self.lr_at = warmup_cosine(cfg.lr, cfg.steps, int(cfg.warmup_ratio * cfg.steps), cfg.min_lr_ratio)
        self.step, self.tokens = 0, 0
        self.ema = WeightAverage(self.student, cfg.ema_decay) if cfg.ema_decay > 0 else None
        self.best: tuple[tuple[float, float], dict[str, Tensor]] | None = None  # (metric, tiebreak)
        self.progress = progress and dist.is_main
        self.loss_name = getattr(task, "loss_name", "task_loss")  # e.g. "nll" for text
        self.autocast = (
            torch.autocast(device.type, dtype=torch.bfloat16) if cfg.precision == "bfloat16" else nullcontext()
        )

    # --- resume / checkpoints ---------------------------------------------------------------
    def resume(self, directory: Path) -> None:
        if self.parallel == "fsdp":
            state, data_state = ckpt.load_sharded(directory, self.module, self.optimizer, self.dist.rank)
        else:
            state, data_state = ckpt.load_checkpoint(directory, self.module, self.optimizer, self.dist.rank, self.device)
        self.step, self.tokens = state["step"], state["tokens"]
        if state.get("best_value") is not None:
            tiebreak = state.get("best_tiebreak")
            key = (state["best_value"], math.inf if tiebreak is None else tiebreak)
            self.best = (key, load_file(str(directory / BEST_FILE)))
        self.task.load_state_dict(data_state)
        if self.ema is not None:
            self.ema.load(directory)
        if self.engine is not None and self.engine.release_step is not None and self.step >= self.engine.release_step:
            self.engine.release()
        self._truncate_metrics(self.step)

    def _truncate_metrics(self, step: int) -> None:
        path = self.run_dir / "metrics.jsonl"
        if self.dist.is_main and path.is_file():
            kept = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
            path.write_text("".join(line + "\n" for line in kept))

    def save(self, data_state: dict[str, Any], rng: tuple[Any, ...]) -> Path:
        staging = self.run_dir / "checkpoints" / f".tmp_step_{self.step:06d}"
        if self.dist.is_main:
            staging = ckpt.staging_dir(self.run_dir, self.step)
        barrier(self.dist)
        ckpt.save_rank_state(staging, self.dist.rank, data_state, rng)
        self._reduce([])  # self.tokens up to date
        if self.parallel == "fsdp":  # every rank writes its shards; no gathered model/ export
            ckpt.save_sharded(staging, self.module, self.optimizer)
        if self.dist.is_main:
            best = self.best[0] if self.best else (None, None)
            trainer_state = {"step": self.step, "tokens": self.tokens, "best_value": best[0],
                             "best_tiebreak": None if best[1] in (None, math.inf) else best[1]}
            if self.parallel == "fsdp":
                ckpt.save_trainer_state(staging, trainer_state)
            else:
                ckpt.save_main_state(staging, self.module, self.optimizer, trainer_state)
                self.task.export(self.student, staging / "model")
            if self.best is not None:  # the selected weights, so a resumed run exports the same model
                save_file({k: v.contiguous() for k, v in self.best[1].items()}, str(staging / BEST_FILE))
            if self.ema is not None:
                self.ema.save(staging)
        barrier(self.dist)
        final = self.run_dir / "checkpoints" / f"step_{self.step:06d}"
        if self.dist.is_main:
            final = ckpt.publish(staging, self.run_dir, self.step, self.cfg.keep_checkpoints)
        barrier(self.dist)
        return final

    # --- logging / eval ---------------------------------------------------------------------
    def _log(self, record: dict[str, Any]) -> None:
        if self.dist.is_main:
            with open(self.run_dir / "metrics.jsonl", "a") as handle:
                handle.write(json.dumps(record) + "\n")

    def evaluate(self) -> dict[str, float]:
        """Every rank evaluates (tasks shard and all-reduce, so all ranks get equal results)."""
        self.student.eval()
        with self.ema.swapped_in(self.student) if self.ema is not None else nullcontext():
            with torch.no_grad(), self.autocast:
                results = self.task.evaluate(self.student, self.device)
            self._log({"step": self.step, **results})
            self._maybe_keep_best(results)  # under EMA, the averaged weights are the candidates
        self.student.train()
        return results

    def _maybe_keep_best(self, results: dict[str, float]) -> None:
        key = self.cfg.select_metric
        if not key:
            return
        if key not in results:
            raise KeyError(f"train.select_metric={key!r} is not among the eval metrics {sorted(results)}")
        tiebreak = self.cfg.select_tiebreak
        if tiebreak and tiebreak not in results:
            raise KeyError(f"train.select_tiebreak={tiebreak!r} is not among the eval metrics {sorted(results)}")
        value = (results[key], results[tiebreak] if tiebreak else math.inf)
        if self.best is None:
            better = True
        elif value[0] == self.best[0][0]:
            better = value[1] < self.best[0][1]
        else:
            better = value[0] > self.best[0][0] if self.cfg.select_mode == "max" else value[0] < self.best[0][0]
        if better:
            self.best = (value, {k: v.detach().cpu().clone() for k, v in self.student.state_dict().items()})

    # --- the loop ----------------------------------------------------------------------------
    def fit(self) -> dict[str, float]:
        cfg = self.cfg
        stream = iter(self.task.train_batches(cfg.micro_batch_size))
        bar = tqdm(total=cfg.steps, initial=self.step, disable=not self.progress, desc="train", dynamic_ncols=True)
        window_start, window_tokens = time.perf_counter(), 0
        eval_results: dict[str, float] = {}
        while self.step < cfg.steps:
            data_state, rng = self.task.state_dict(), ckpt.rng_snapshot()
            try:
                raw = self._train_step(stream)
            except KeyboardInterrupt:
                if self.dist.world_size == 1:
                    path = self.save(data_state, rng)
                    bar.write(f"interrupted: saved {path}; continue with --resume {self.run_dir}")
                raise
            done = self.step == cfg.steps
            bar.update(1)
            if self.step % cfg.log_every == 0 or done:  # the only host syncs of the loop
                record = self._synced(raw)
                window_tokens += record.pop("step_tokens")
                elapsed = time.perf_counter() - window_start
                record.update(tokens_per_s=window_tokens / max(elapsed, 1e-9), peak_mem_mb=peak_memory_mb(self.device))
                self._log(record)
                window_start, window_tokens = time.perf_counter(), 0
                bar.set_postfix(loss=f"{record['loss']:.3f}", lam=f"{record.get('lambda', 0.0):.3g}")
            if (cfg.eval_every and self.step % cfg.eval_every == 0) or done:
                eval_results = self.evaluate()
                window_start, window_tokens = time.perf_counter(), 0  # throughput: training time only
            if (cfg.save_every and self.step % cfg.save_every == 0) or done:
                self.save(self.task.state_dict(), ckpt.rng_snapshot())
                window_start, window_tokens = time.perf_counter(), 0
        bar.close()
        if self.best is None and self.ema is not None:
            self.student.load_state_dict(self.ema.shadow, strict=False)
        if self.best is not None:
            self.student.load_state_dict(self.best[1])
            eval_results = {**eval_results, f"best_{self.cfg.select_metric}": self.best[0][0]}
        with parallel.gathered(self.student, self.dist):  # fsdp: full weights on the main rank
            if self.dist.is_main:
                self.task.export(self.student, self.run_dir / "final")
        barrier(self.dist)
        return eval_results

    def _train_step(self, stream: Iterator[Batch]) -> dict[str, Any]:
        """One optimizer step; metrics stay on the device (no host sync) until :meth:`_synced`."""
        cfg, step = self.cfg, self.step
        lr = self.lr_at(step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        sums: dict[str, Tensor] = {}
        tokens = 0
        for micro in range(cfg.grad_accum):
            host_batch = next(stream)
            batch = to_device(host_batch, self.device)
            with parallel.grad_sync(self.model, micro == cfg.grad_accum - 1):
                with self.autocast:
                    total, out, metrics = self.model(batch, step)
                (total / cfg.grad_accum).backward()
            for key, value in {"loss": total.detach(), self.loss_name: out.loss.detach(), **metrics}.items():
                sums[key] = sums.get(key, 0.0) + value.float() / cfg.grad_accum
            tokens += int(host_batch["attention_mask"].sum())  # a host tensor: no device sync
            del total, out, metrics  # no logits alive into the next micro-batch
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, cfg.clip_grad if cfg.clip_grad > 0 else float("inf"))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema is not None:
            self.ema.update()
        teacher_active = self.engine is not None and self.engine.active(step)
        if self.engine is not None:
            self.engine.after_step(step)
        self.step, self._pending_tokens = self.step + 1, self._pending_tokens + tokens
        return {"step": self.step, "sums": sums, "lr": lr, "grad_norm": grad_norm, "teacher_active": teacher_active}

    def _synced(self, raw: dict[str, Any]) -> dict[str, Any]:
        """The log record of a step, its metrics averaged over ranks."""
        keys = sorted(raw["sums"])
        grad_norm = raw["grad_norm"]
        if isinstance(grad_norm, DTensor):  # fsdp
            grad_norm = grad_norm.full_tensor()
        values, window = self._reduce([raw["sums"][k] for k in keys] + [grad_norm])
        record = {"step": raw["step"], **dict(zip(keys, values[:-1])), "lr": raw["lr"], "grad_norm": values[-1]}
        record.update(tokens=self.tokens, step_tokens=window, teacher_active=raw["teacher_active"])
        return record

    def _reduce(self, values: list[Tensor]) -> tuple[list[float], int]:
        """Means of ``values`` over ranks, in one collective and one host sync; also adds the
        tokens of all ranks since the last call to ``self.tokens``. Returns (means, those tokens)."""
        tokens = torch.tensor(float(self._pending_tokens * self.dist.world_size), device=self.device)
        reduced = all_reduce_mean(torch.stack([v.double() for v in values] + [tokens.double()]), self.dist).tolist()
        window = int(reduced[-1])
        self.tokens, self._pending_tokens = self.tokens + window, 0
        return reduced[:-1], window
