"""Entry point of a training run, one visible build chain (:func:`build_trainer`):

  config -> task (tasks.build_task) -> teacher pre-training stage (only a teacher without
         weights: teacher_stage) -> data (task.build_data reports a DataInfo)
         -> student -> teachers -> engine (chain.build_models) -> trainer (core.trainer) -> fit

Run:  alignkit train CONFIG [key=value ...]
      alignkit train [CONFIG] --resume RUN_DIR [key=value ...]   # exact resume (see run_folder)
      torchrun --nproc_per_node N -m alignkit train CONFIG ...

The run folder is locked for the whole run (a second run into it is refused). SIGINT/SIGTERM
end the run at a step boundary with a checkpoint (exit code 128 + signal).
"""
from __future__ import annotations

import json
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from alignkit.chain import build_models, shards_weights, task_context
from alignkit.core.checkpoint import checkpoint_dirs, seed_everything
from alignkit.core.config import resolve_grad_accum
from alignkit.core.distributed import DistInfo, cleanup, init_distributed, max_over_ranks, resolve_device
from alignkit.core.errors import AlignkitError, Interrupted, RunDirError
from alignkit.core.folder_lock import FolderLock
from alignkit.core.parallel import shard_teacher
from alignkit.core.trainer import Trainer
from alignkit.experiment import ExperimentConfig
from alignkit.run_folder import (
    discard_unstarted, existing_run, is_finished, new_run_dir, open_new, open_resumed, record_resume, resumed_grad_accum,
)
from alignkit.tasks import build_task
from alignkit.teacher_stage import with_pretrained_teachers


def run_dir_for(cfg: ExperimentConfig, config_path: str | None, resume: str | None, info: DistInfo) -> Path:
    if resume:
        return existing_run(resume)
    name = cfg.run_name or f"{Path(config_path).stem if config_path else 'run'}-{time.strftime('%Y%m%d-%H%M%S')}"
    if info.world_size > 1:  # every rank must agree on the folder
        holder = [name]
        dist.broadcast_object_list(holder, src=0)
        name = holder[0]
    return new_run_dir(cfg.output_dir, name)


def run(cfg: ExperimentConfig, config_path: str | None = None, resume: str | None = None, progress: bool = True) -> dict[str, Any]:
    info = init_distributed(cfg.train.device)
    try:
        device = resolve_device(cfg.train.device, info)
        # global batch -> per-process accumulation
        cfg = replace(cfg, train=replace(cfg.train, grad_accum=resolve_grad_accum(cfg.train, info.world_size)))
        run_dir = run_dir_for(cfg, config_path, resume, info)
        if resume and is_finished(run_dir, cfg):
            print(f"{run_dir} is finished (results.json); nothing to do. To train longer: "
                  f"alignkit train --resume {run_dir} train.steps=N", file=sys.stderr)
            return json.loads((run_dir / "results.json").read_text())
        if resume:  # the run's global batch on this many processes (every rank reads the same files)
            cfg = replace(cfg, train=replace(cfg.train, grad_accum=resumed_grad_accum(cfg, run_dir, info.world_size)))
        lock = FolderLock(run_dir)
        failure: AlignkitError | None = None
        record = None
        if info.is_main:  # one rank claims the folder; all ranks stop if it was refused
            try:
                lock.acquire()
                record = _open_folder(cfg, run_dir, bool(resume))
            except AlignkitError as err:
                failure = err
        if max_over_ranks(int(failure is not None), info):
            lock.release()
            raise failure or RunDirError(f"{run_dir} was refused on rank 0 (its message says why)")
        try:
            return _train(cfg, run_dir, bool(resume), record, info, device, progress)
        except Exception as err:  # an Interrupted teacher stage continues with --resume of this folder
            if info.is_main and not resume and not isinstance(err, Interrupted):
                discard_unstarted(run_dir)
            raise
        finally:
            lock.release()
    finally:
        cleanup()


def _open_folder(cfg: ExperimentConfig, run_dir: Path, resume: bool) -> dict[str, Any] | None:
    """Claim the folder; a resume's record, written once its checkpoint has loaded."""
    if not resume:
        open_new(cfg, run_dir)
        return None
    record = open_resumed(cfg, run_dir)
    if not checkpoint_dirs(run_dir):
        print(f"{run_dir} has no checkpoint yet: starting the run over", file=sys.stderr)
    return record


def build_trainer(cfg: ExperimentConfig, run_dir: Path, info: DistInfo, device: torch.device, progress: bool = True) -> Trainer:
    """The build chain, wired into a trainer (benchmarks call this too)."""
    seed_everything(cfg.train.seed)  # same on every rank: randomly built models must agree
    task = build_task(cfg.task, task_context(cfg), dist=info, device=device)
    try:
        teacher_cfgs = with_pretrained_teachers(cfg, device=device, progress=progress)
    except Interrupted as err:  # the teacher pre-training stage was stopped: it resumes with this run
        raise Interrupted(f"teacher pre-training {err}; continue with: alignkit train --resume {run_dir}",
                          err.exit_code - 128) from None
    data = task.build_data(teacher_cfgs)
    student, teachers, engine = build_models(cfg.student, cfg.align, cfg.train, task, data, teacher_cfgs, device)
    if teachers and shards_weights(teacher_cfgs["default"]):  # a large frozen teacher
        shard_teacher(teachers["default"], device)
    del teachers  # the engine owns them and frees them when no term needs them any more
    seed_everything(cfg.train.seed + info.rank)  # per-rank streams (dropout) from here on
    return Trainer(cfg=cfg.train, student=student, engine=engine, task=task, run_dir=run_dir, device=device,
                   dist=info, progress=progress)


def _train(cfg: ExperimentConfig, run_dir: Path, resume: bool, record: dict[str, Any] | None, info: DistInfo,
           device: torch.device, progress: bool) -> dict[str, Any]:
    trainer = build_trainer(cfg, run_dir, info, device, progress)
    if resume:
        trainer.resume_latest()
        if record is not None:  # main rank: the resume was accepted
            record_resume(run_dir, record)
    results = trainer.fit()
    if info.is_main:
        results.update(trainer.task.report(trainer.student, run_dir))
        results["run_dir"] = str(run_dir)
        # the student's size, for studies that relate a result to it (a sharded parameter counts whole)
        results["student_params"] = sum(p.numel() for p in trainer.student.parameters())
        (run_dir / "results.json").write_text(json.dumps(results, indent=2, default=str))
    return results
