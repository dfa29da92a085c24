"""The build chain's model steps, shared by ``train`` (:mod:`alignkit.train`), ``check``
(:mod:`alignkit.check`, the same steps on the meta device) and the teacher pre-training stage
(:mod:`alignkit.teacher_stage`):

  data (the task reports a DataInfo) -> student(cfg.student, DataInfo) -> teachers -> engine

A TimesNet teacher without weights is trained by the teacher pre-training stage before the
chain runs; on the meta device (``check``) it is built untrained from its options instead,
which gives the same layers and widths.
"""
from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import nn

from alignkit.core.adapter import DataInfo, TeacherAdapter
from alignkit.core.config import ModelConfig
from alignkit.core.engine import AlignmentEngine, build_engine
from alignkit.core.registry import build_student, build_teacher
from alignkit.core.terms import expand_terms


def teacher_configs(cfg: Any) -> dict[str, ModelConfig]:
    """The teachers a run uses: the main one as ``default``, then the named extras (none
    when no alignment term is set, e.g. ``align.method: none``)."""
    if not expand_terms(cfg.align):
        return {}
    return {"default": cfg.teacher, **cfg.teachers}


def teacher_key(name: str) -> str:
    """The config section of teacher ``name`` (for error messages)."""
    return "teacher" if name == "default" else f"teachers.{name}"


def needs_pretraining(model: ModelConfig) -> bool:
    """A TimesNet teacher without weights: the teacher pre-training stage trains it first."""
    return model.kind == "timesnet" and not model.name_or_path


def build_teachers(configs: Mapping[str, ModelConfig], *, device: torch.device, data: DataInfo) -> dict[str, TeacherAdapter]:
    teachers = {}
    for name, model in configs.items():
        if needs_pretraining(model) and device.type == "meta":  # `check`: the shape the stage would train
            from alignkit.adapters.timesnet import TimesNetTeacher

            teachers[name] = TimesNetTeacher(build_student(model, device=device, data=data))
        else:
            teachers[name] = build_teacher(model, device=device, data=data, key=teacher_key(name))
    return teachers


def build_models(cfg: Any, task: Any, data: DataInfo, teachers: Mapping[str, ModelConfig],
                 device: torch.device) -> tuple[nn.Module, dict[str, TeacherAdapter], AlignmentEngine | None]:
    """Student (sized by ``data``, checked by the task), teachers and the alignment engine."""
    student = build_student(cfg.student, device=device, data=data)
    task.check_student(student, data)
    built = build_teachers(teachers, device=device, data=data)
    return student, built, build_engine(cfg.align, student, built)
