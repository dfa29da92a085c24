"""Entry point of a training run: config -> student -> teacher -> data -> engine -> trainer.

Run:  alignkit train CONFIG [key=value ...] [--resume RUN_DIR]
      torchrun --nproc_per_node N -m alignkit train CONFIG ...
"""
from __future__ import annotations

import json
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from alignkit.core.checkpoint import latest_checkpoint
from alignkit.core.distributed import DistInfo, cleanup, init_distributed, resolve_device
from alignkit.core.engine import build_engine
from alignkit.core.parallel import shard_teacher
from alignkit.core.trainer import Trainer
from alignkit.experiment import ExperimentConfig, save_resolved
from alignkit.tasks import build_task


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def prepare_run_dir(cfg: ExperimentConfig, config_path: str | None, resume: str | None, info: DistInfo) -> Path:
    if resume:
        run_dir = Path(resume)
        if not run_dir.is_dir():
            raise FileNotFoundError(f"--resume {resume}: no such run directory")
        return run_dir
    name = cfg.run_name or f"{Path(config_path).stem if config_path else 'run'}-{time.strftime('%Y%m%d-%H%M%S')}"
    if info.world_size > 1:  # every rank must agree on the folder
        holder = [name]
        dist.broadcast_object_list(holder, src=0)
        name = holder[0]
    run_dir = Path(cfg.output_dir) / name
    if info.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        if (run_dir / "metrics.jsonl").exists():
            raise FileExistsError(f"{run_dir} already holds a run: pass --resume {run_dir} or choose another run_name")
    return run_dir


def build_trainer(cfg: ExperimentConfig, run_dir: Path, info: DistInfo, device: torch.device, progress: bool = True) -> Trainer:
    """Task, student, teachers, data and engine, wired into a trainer (benchmarks call this too)."""
    seed_everything(cfg.train.seed)  # same on every rank: randomly built models must agree
    task = build_task(cfg, info, device)
    student = task.build_student()
    teachers = task.build_teachers() if cfg.align.method != "none" else {}
    task.build_data()
    engine = build_engine(cfg.align, student, teachers)
    if teachers and cfg.teacher.options.get("shard"):  # a large frozen teacher: shard it like the student
        shard_teacher(teachers["default"], device)
    seed_everything(cfg.train.seed + info.rank)  # per-rank streams (dropout) from here on
    return Trainer(cfg.train, student, engine, task, run_dir, device, info, progress=progress)


def run(cfg: ExperimentConfig, config_path: str | None = None, resume: str | None = None, progress: bool = True) -> dict[str, Any]:
    info = init_distributed(cfg.train.device)
    try:
        device = resolve_device(cfg.train.device, info)
        run_dir = prepare_run_dir(cfg, config_path, resume, info)
        if info.is_main:
            save_resolved(cfg, run_dir)
        checkpoint = latest_checkpoint(run_dir) if resume else None
        if resume and checkpoint is None:
            raise FileNotFoundError(f"--resume {resume}: no checkpoint in {run_dir / 'checkpoints'}")

        trainer = build_trainer(cfg, run_dir, info, device, progress)
        if checkpoint is not None:
            trainer.resume(checkpoint)
        results = trainer.fit()
        if info.is_main:
            results.update(trainer.task.report(trainer.student, run_dir))
            results["run_dir"] = str(run_dir)
            (run_dir / "results.json").write_text(json.dumps(results, indent=2, default=str))
        return results
    finally:
        cleanup()



