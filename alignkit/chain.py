"""The build chain's model steps, shared by ``train`` (:mod:`alignkit.train`), ``check``
(:mod:`alignkit.check`, the same steps on the meta device) and the teacher pre-training stage
(:mod:`alignkit.teacher_stage`):

  task(cfg.task, task_context(cfg)) -> data (the task reports a DataInfo)
       -> student(cfg.student, DataInfo) -> teachers -> engine

A teacher without weights (its adapter declares ``teacher_from_student`` and it has no
``name_or_path``) is trained by the teacher pre-training stage before the chain runs; on the
meta device (``check``) it is built untrained from its options instead, which gives the same
layers and widths. With ``align.teacher_cache`` set, each teacher is a
:class:`~alignkit.core.teacher_cache.CachedTeacher`, built only when the cache cannot answer.
"""
from __future__ import annotations

import dataclasses
import functools
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from alignkit.core.adapter import DataInfo, TeacherAdapter
from alignkit.core.checkpoint import kept_rng
from alignkit.core.config import AlignConfig, ConfigError, ModelConfig, TrainConfig
from alignkit.core.engine import AlignmentEngine, build_engine
from alignkit.core.registry import adapter_spec, build_student, build_teacher, typed_options
from alignkit.core.teacher_cache import CachedTeacher, open_cached_teacher
from alignkit.core.terms import logit_kd_terms
from alignkit.tasks.base import TaskContext


def task_context(cfg: Any) -> TaskContext:
    """What the task of the experiment ``cfg`` may read outside its own section (the only
    place that picks those values out of a whole experiment)."""
    return TaskContext(student=cfg.student, extra_teachers=tuple(cfg.teachers),
                       logit_kd_origins=tuple(term.origin for term in logit_kd_terms(cfg.align)),
                       eval_batch_size=cfg.train.micro_batch_size)


def teacher_configs(cfg: Any) -> dict[str, ModelConfig]:
    """The teachers a run uses: the main one as ``default``, then the named extras (none
    when no alignment term is set, e.g. ``align.method: none``)."""
    if not cfg.align.expanded:
        return {}
    return {"default": cfg.teacher, **cfg.teachers}


def teacher_key(name: str) -> str:
    """The config section of teacher ``name`` (for error messages)."""
    return "teacher" if name == "default" else f"teachers.{name}"


def needs_pretraining(model: ModelConfig, key: str = "teacher") -> bool:
    """A teacher without weights, of a family that pre-trains its teachers: the teacher
    pre-training stage trains it first."""
    return not model.name_or_path and adapter_spec(model, key).teacher_from_student is not None


def build_teachers(configs: Mapping[str, ModelConfig], *, device: torch.device, data: DataInfo,
                   align: AlignConfig | None = None) -> dict[str, TeacherAdapter]:
    """The teachers, each behind the teacher cache when ``align.teacher_cache`` is set (not on
    the meta device). Building a teacher leaves the random streams as they were, so what is
    drawn next (a ``linear`` projection) does not depend on whether a teacher was built."""
    teachers = {}
    for name, model in configs.items():
        with kept_rng():
            if needs_pretraining(model, teacher_key(name)) and device.type == "meta":  # `check`: what the stage would train
                untrained = build_student(model, device=device, data=data)
                teachers[name] = adapter_spec(model, teacher_key(name)).teacher_from_student(untrained)
            elif align is not None and align.teacher_cache and device.type != "meta":
                teachers[name] = _cached_teacher(name, model, device, data, align)
            else:
                teachers[name] = build_teacher(model, device=device, data=data, key=teacher_key(name))
    return teachers


def weight_files(model: ModelConfig, key: str = "teacher") -> list[Path]:
    """The local files a teacher's weights come from, as its adapter reads them (none: a random
    init, a hub id, or a family that does not say)."""
    read = adapter_spec(model, key).weight_files
    return read(model) if read is not None else []


def _cached_teacher(name: str, model: ModelConfig, device: torch.device, data: DataInfo, align: AlignConfig) -> TeacherAdapter:
    key = teacher_key(name)
    typed = typed_options(model, key)
    if shards_weights(typed):  # a sharded teacher runs on all ranks together, a cache hit on one
        raise ConfigError(f"align.teacher_cache does not work with {key}.options.shard=true (ranks would miss "
                          "different batches); drop one of them")
    config = {k: v for k, v in dataclasses.asdict(typed).items() if k != "preset"}
    return open_cached_teacher(Path(align.teacher_cache), config=config, weight_files=weight_files(model, key),
                               build=functools.partial(build_teacher, model, device=device, data=data, key=key),
                               dtype=align.teacher_cache_dtype, device=device, label=name)


def build_models(student_cfg: ModelConfig, align: AlignConfig, train: TrainConfig, task: Any, data: DataInfo,
                 teachers: Mapping[str, ModelConfig], device: torch.device,
                 ) -> tuple[nn.Module, dict[str, TeacherAdapter], AlignmentEngine | None]:
    """Student (sized by ``data``, checked by the task), teachers and the alignment engine;
    ``train`` sizes the teacher cache (steps and micro-batches while each teacher is active)."""
    student = build_student(student_cfg, device=device, data=data)
    task.check_student(student, data)
    built = build_teachers(teachers, device=device, data=data, align=align)
    engine = build_engine(align, student, built)
    for name, teacher in built.items():  # the cache's size estimate: batches while each teacher is active
        if isinstance(teacher, CachedTeacher) and engine is not None:
            stop = engine.teacher_stops[name]
            teacher.expected_calls = min(train.steps, train.steps if stop is None else stop) * train.grad_accum
    return student, built, engine


def shards_weights(model: ModelConfig) -> bool:
    """Whether a teacher asks for its frozen weights to be sharded over the processes like the
    student (``options.shard``, for adapters whose options have it)."""
    return bool(getattr(model.options, "shard", False))
