"""The teacher's score on the run's own evaluation (:func:`evaluate_teacher`).

A teacher is frozen while a student trains, so its eval loss is one number; set next to the
student's eval curve it says when the student overtakes its teacher (benchmarks/study.py draws
it). The number must come from the evaluation the students get: the task's ``evaluate`` on the
students' eval data (the same batches, the same loss, the run's precision), with the teacher built
by its family's student builder, which gives it the task's loss. A task refuses a teacher whose
score would not compare with the students' (text: another tokenizer, :meth:`check_teacher_eval`).
"""
from __future__ import annotations

import torch

from alignkit.chain import needs_pretraining, task_context
from alignkit.core.checkpoint import seed_everything
from alignkit.core.distributed import DistInfo, resolve_device
from alignkit.core.errors import ConfigError
from alignkit.core.registry import build_student
from alignkit.core.trainer import precision_context
from alignkit.experiment import ExperimentConfig
from alignkit.tasks import build_task


def evaluate_teacher(cfg: ExperimentConfig, device: torch.device | None = None) -> dict[str, float]:
    """The main teacher's eval metrics (e.g. ``eval_loss``) under the students' evaluation of the
    experiment ``cfg``, on ``device`` (default: ``train.device``'s). Its weights must exist: a teacher
    the run would pre-train first is refused, as is one the task says does not compare."""
    teacher = cfg.teacher
    if needs_pretraining(teacher):
        raise ConfigError("teacher: no name_or_path, so the run pre-trains it first; point teacher.name_or_path at "
                          "its weights (alignkit pretrain-teacher prints where it cached them) to evaluate it")
    device = device or resolve_device(cfg.train.device, DistInfo())
    seed_everything(cfg.train.seed)  # as a run: a task or a model that draws random numbers draws the same
    task = build_task(cfg.task, task_context(cfg), dist=DistInfo(), device=device)
    data = task.build_data({})  # the students' data, with no teacher-side fields
    task.check_teacher_eval(teacher)
    model = build_student(teacher, device=device, data=data)
    task.check_student(model, data)
    model.eval()
    with torch.no_grad(), precision_context(cfg.train.precision, device):
        return task.evaluate(model, device)
