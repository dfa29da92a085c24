"""Teacher pre-training, a stage of its own: a teacher that has no weights (no ``name_or_path``,
of a kind whose adapter declares ``teacher_from_student``, also among ``teachers``) is trained
on the task's data before the run that uses it, and cached for later runs. The task declares
how (:attr:`~alignkit.tasks.base.TaskSpec.teacher_training`: the run's task and train sections,
what of the data changes the teacher); a task that declares nothing refuses such a teacher.

  alignkit pretrain-teacher CONFIG [key=value ...]   # only this stage
  alignkit train CONFIG ...                          # runs it first when needed

It is one ordinary training run through the build chain (the teacher as student, no
alignment), selected on the task's validation split, with its own seed and device. Budget:
``epochs`` over the training split (``steps`` > 0 overrides it), stopped early once
``patience`` evals bring no better ``select_metric``. The stage says what it will do and cost
before it starts. The cache, ``<output_dir>/teachers/<kind>-<data>-<hash>/``, is keyed on what
changes the teacher (not on device, logging or checkpoint cadence); it is locked while in use
and resumes after an interruption. The run's own random state is the same whether the teacher
was trained or reused.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any

import torch

from alignkit.chain import build_models, needs_pretraining, task_context, teacher_configs
from alignkit.core.checkpoint import kept_rng, seed_everything
from alignkit.core.config import AlignConfig, ConfigError, ModelConfig
from alignkit.core.distributed import DistInfo, resolve_device
from alignkit.core.folder_lock import FolderLock
from alignkit.core.callbacks import Callback
from alignkit.core.trainer import Trainer
from alignkit.experiment import task_spec
from alignkit.tasks import build_task
from alignkit.tasks.base import TeacherTraining

# fields of the pre-training `train` section that do not change the trained teacher
NO_EFFECT = ("device", "log_every", "save_every", "keep_checkpoints", "num_processes", "parallel")
DONE = "results.json"  # written into the cache folder when the stage finished


def _training(cfg: Any, teacher: ModelConfig) -> TeacherTraining:
    """How the task of ``cfg`` pre-trains ``teacher``; an error when it does not."""
    declared = task_spec(cfg.task.name).teacher_training
    if declared is None:
        raise ConfigError(f"teacher.kind={teacher.kind} without name_or_path needs pre-training, which task.name="
                          f"{cfg.task.name} does not do: set teacher.name_or_path")
    return declared(cfg.task)


def teacher_run_config(cfg: Any, teacher: ModelConfig) -> Any:
    """The experiment that trains ``teacher``: it is the student, nothing is aligned."""
    training = _training(cfg, teacher)
    return dataclasses.replace(cfg, student=teacher, teacher=ModelConfig(), teachers={}, align=AlignConfig(method="none"),
                               train=training.train, task=training.task)


def teacher_cache_dir(sub: Any) -> Path:
    """``<output_dir>/teachers/<kind>-<data>-<hash of what changes the teacher>``."""
    training = _training(sub, sub.student)
    train = {k: v for k, v in dataclasses.asdict(sub.train).items() if k not in NO_EFFECT}
    if sub.train.steps:
        train.pop("epochs")  # steps override the epoch budget
    if not sub.train.select_metric:
        train.pop("patience")  # early stopping watches select_metric
    teacher = {"kind": sub.student.kind, "source": sub.student.source, "options": sub.student.options}
    spec = json.dumps({"teacher": teacher, "train": train, **training.identity}, sort_keys=True, default=str)
    digest = hashlib.sha256(spec.encode()).hexdigest()[:10]
    return Path(sub.output_dir) / "teachers" / f"{sub.student.kind}-{training.label}-{digest}"


class EarlyStopping(Callback):
    """Ends the run once ``patience`` evals in a row bring no better ``select_metric``. The count
    comes from the run's own ``metrics.jsonl``, so a resumed run stops where it would have."""

    def __init__(self, patience: int) -> None:
        self.patience = patience

    def on_eval(self, trainer: Any, results: dict[str, float]) -> None:
        if trainer.step < trainer.cfg.steps and self._exhausted(trainer):
            print(f"teacher pre-training: no better {trainer.cfg.select_metric} in {self.patience} evals; "
                  f"stopping early at step {trainer.step}")
            trainer.cfg = dataclasses.replace(trainer.cfg, steps=trainer.step)  # the loop ends after this step's checkpoint

    def on_load(self, trainer: Any, directory: Path, state: dict[str, Any]) -> None:
        if self._exhausted(trainer):  # it had stopped early just before the interruption
            trainer.cfg = dataclasses.replace(trainer.cfg, steps=trainer.step)

    def _exhausted(self, trainer: Any) -> bool:
        key, log = trainer.cfg.select_metric, trainer.run_dir / "metrics.jsonl"
        if not (self.patience and key and log.is_file()):
            return False
        values = [row[key] for row in map(json.loads, log.read_text().splitlines()) if key in row]
        if not values:
            return False
        best = max(values) if trainer.cfg.select_mode == "max" else min(values)
        return len(values) - 1 - values.index(best) >= self.patience


def budget(train: Any, examples: int) -> Any:
    """``train`` with ``steps`` resolved: as given, else epochs x micro-batches per epoch."""
    if train.steps:
        return dataclasses.replace(train)
    per_epoch = -(-examples // (train.micro_batch_size * train.grad_accum))
    return dataclasses.replace(train, steps=train.epochs * per_epoch)


def pretrain_teacher(cfg: Any, teacher: ModelConfig, *, device: torch.device, progress: bool = True) -> Path:
    """Train (or reuse from the cache) ``teacher``; returns the folder of the selected model."""
    sub = teacher_run_config(cfg, teacher)
    run_dir = teacher_cache_dir(sub)
    final = run_dir / "final"
    if (run_dir / DONE).is_file():
        print(f"reusing the pre-trained {teacher.kind} teacher {final}")
        return final
    with FolderLock(run_dir, "teacher cache folder"):  # two runs never train one teacher together
        if not (run_dir / DONE).is_file():  # else finished by another run just before the lock
            with kept_rng():  # the run's own RNG must not depend on whether the cache was hit
                _train(sub, run_dir, device, progress)
    return final


def _train(sub: Any, run_dir: Path, device: torch.device, progress: bool) -> None:
    seed_everything(sub.train.seed)
    if sub.train.device != "auto":
        device = resolve_device(sub.train.device, DistInfo())
    task = build_task(sub.task, task_context(sub), dist=DistInfo(), device=device)
    data = task.build_data({})
    train = budget(sub.train, task.num_train_examples)
    student, _, engine = build_models(sub.student, sub.align, train, task, data, {}, device)
    trainer = Trainer(cfg=train, student=student, engine=engine, task=task, run_dir=run_dir, device=device,
                      progress=progress, callbacks=[EarlyStopping(train.patience)])
    trainer.resume_hint = ""  # the caller says how to continue
    trainer.role = "teacher"  # in its messages and progress bar
    resumed = trainer.resume_latest()
    if resumed is None:
        (run_dir / "metrics.jsonl").unlink(missing_ok=True)  # an attempt killed before its first checkpoint
    print(f"{'continuing' if resumed else 'pre-training'} the {sub.student.kind} teacher on {', '.join(data.datasets)} "
          f"({task.num_train_examples} training examples, {data.num_classes} classes) on {device}: "
          f"{_plan(sub.train, train)}; cached in {run_dir} for later runs with the same teacher settings")
    trainer.fit()
    (run_dir / "results.json").write_text(json.dumps(task.report(student, run_dir, role="teacher"), indent=2))


def _plan(given: Any, train: Any) -> str:
    """The budget in words, e.g. ``up to 100 epochs = 700 steps of 32, early stop after 10 evals ...``."""
    size = f"{train.steps} steps of {train.micro_batch_size * train.grad_accum}"
    plan = size if given.steps else f"up to {given.epochs} epochs = {size}"
    if train.patience and train.select_metric:
        plan += (f", stopping early after {train.patience} evals (every {train.eval_every or train.steps} steps) "
                 f"without a better {train.select_metric}")
    return plan


def with_pretrained_teachers(cfg: Any, *, device: torch.device, progress: bool = True) -> dict[str, ModelConfig]:
    """:func:`~alignkit.chain.teacher_configs` with every teacher that needs pre-training
    trained (or reused) first and pointed at its weights."""
    configs = teacher_configs(cfg)
    for name, model in configs.items():
        if needs_pretraining(model):
            path = pretrain_teacher(cfg, model, device=device, progress=progress)
            configs[name] = dataclasses.replace(model, source="checkpoint", name_or_path=str(path))
    return configs
