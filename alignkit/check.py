"""``alignkit check``: validate a recipe without training, by running the build chain of
``train`` (:mod:`alignkit.chain`) on the meta device -- the task describes its data offline
(no download, no tokenizing: :meth:`~alignkit.tasks.base.TaskBase.describe_data`), the
student and the teachers are built with no memory and no weights read, and the alignment
engine is built on them, so what ``train`` would reject (layers out of range, widths that need
a projection, logit KD across tokenizers, ...) is rejected here in seconds. Then the
batch/token arithmetic of the run at ``train.num_processes`` processes and an estimate of memory
per GPU (:mod:`alignkit.memory`) for ddp and fsdp, with and without activation checkpointing,
saying plainly whether the chosen setting fits an 80 GB GPU.

What cannot be known offline (a tokenizer only the hub has, a dataset that is not local) is
skipped and listed under ``notes``.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch

from alignkit.chain import build_models, task_context, teacher_configs
from alignkit.core.adapter import ModelShape
from alignkit.core.config import ConfigError, ModelConfig, resolve_grad_accum
from alignkit.core.distributed import DistInfo
from alignkit.core.registry import adapter_spec
from alignkit.core.terms import Term, logit_kd_terms
from alignkit.experiment import ExperimentConfig
from alignkit.memory import GB, GPU_BYTES, RunSetting, estimate_memory
from alignkit.tasks import build_task

MODES = {"ddp": ("ddp", False), "ddp+ckpt": ("ddp", True), "fsdp": ("fsdp", False), "fsdp+ckpt": ("fsdp", True)}
META = torch.device("meta")


def count_processes(n: int) -> str:
    """"1 process", "2 processes"."""
    return f"{n} process" if n == 1 else f"{n} processes"


def _teacher_size(teacher: Any, model: ModelConfig) -> tuple[int, int, int]:
    """(parameters, final-layer width, bytes per parameter) of a teacher built on meta; no
    parameters for a family whose adapter does not give its shape."""
    shape = adapter_spec(model, "teacher").memory_shape
    params = shape(teacher).params if shape is not None else 0
    return params, teacher.width(-1) if params else 0, getattr(torch, model.dtype).itemsize if params else 2


def _memory(cfg: ExperimentConfig, shape: ModelShape, main_teacher: Any, seq_len: int, processes: int,
            grad_accum: int) -> dict[str, Any]:
    """Estimated GB per GPU for each mode, and the verdict for the recipe's own setting."""
    teacher = _teacher_size(main_teacher, cfg.teacher) if main_teacher is not None else (0, 0, 2)
    run = RunSetting(
        micro_batch=cfg.train.micro_batch_size, seq_len=seq_len, precision=cfg.train.precision,
        processes=processes, grad_accum=grad_accum,
        fsdp_reduce_every_micro_batch=cfg.train.fsdp_reduce_every_micro_batch, teacher_params=teacher[0],
        teacher_width=teacher[1], teacher_bytes_per_param=teacher[2], logit_kd=bool(logit_kd_terms(cfg.align)),
    )
    table = {}
    for mode, (parallel, ckpt) in MODES.items():
        table[mode] = {k: round(v / GB, 1) for k, v in
                       estimate_memory(shape, replace(run, activation_checkpointing=ckpt), parallel).items()}
    chosen = ("fsdp" if cfg.train.parallel == "fsdp" else "ddp") + ("+ckpt" if cfg.train.activation_checkpointing else "")
    peak = table[chosen]["peak"]
    fits = peak * GB <= GPU_BYTES
    fitting = [mode for mode in MODES if table[mode]["peak"] * GB <= GPU_BYTES]
    verdict = (
        f"{chosen} at {count_processes(processes)}: about {peak:.1f} GB per GPU: "
        + ("fits an 80 GB GPU" if fits else
           "DOES NOT FIT an 80 GB GPU" + (f" (fits: {', '.join(fitting)}; set train.parallel / "
                                           "train.activation_checkpointing)" if fitting else
                                           " in any mode: lower train.micro_batch_size or add processes"))
    )
    return {"teacher_params": teacher[0], "memory_gb_per_gpu": table, "setting": chosen,
            "fits_80gb": fits, "verdict": verdict}


def _term_summary(term: Term) -> dict[str, Any]:
    """One alignment term as ``check`` reports it: what the user wrote and what it became."""
    c = term.cfg
    return {"origin": term.origin, "type": c.type, "teacher": c.teacher, "lambda0": c.lambda0,
            "schedule": c.schedule, "stop_step": None if term.stop is None and c.lambda0 else c.stop_step}


def check_experiment(cfg: ExperimentConfig) -> dict[str, Any]:
    """The chain of ``train`` on the meta device, then the run's arithmetic and memory."""
    task = build_task(cfg.task, task_context(cfg), dist=DistInfo(), device=META)
    teacher_cfgs = teacher_configs(cfg)
    data = task.describe_data(teacher_cfgs)
    student, teachers, _ = build_models(cfg.student, cfg.align, cfg.train, task, data, teacher_cfgs, META)
    train = cfg.train
    if train.num_processes < 1:
        raise ConfigError(f"train.num_processes must be >= 1, got {train.num_processes}")
    processes = train.num_processes
    grad_accum = resolve_grad_accum(train, processes)
    per_process = train.micro_batch_size * grad_accum
    seq_len = data.seq_len or 0  # a time-series set of unequal lengths declares none
    report = {
        "student_params": sum(p.numel() for p in student.parameters()),
        "student_layers": student.num_layers,
        "student_width": student.width(-1),
        "teachers": {name: {"layers": t.num_layers, "width": t.width(-1)} for name, t in teachers.items()},
        "data": {"num_classes": data.num_classes, "num_channels": data.num_channels, "seq_len": data.seq_len,
                 "vocab_size": data.vocab_size},
        "processes": processes,
        "grad_accum": grad_accum,
        "global_batch_per_process": per_process,
        "global_batch": per_process * processes,
        "tokens_per_step": per_process * processes * seq_len,
        "terms": [_term_summary(term) for term in cfg.align.expanded],
        "steps": train.steps,
        "notes": task.notes,
    }
    shape = adapter_spec(cfg.student, "student").memory_shape
    report["memory"] = f"not estimated for {cfg.student.kind} students" if shape is None else "estimated"
    if shape is not None:
        report.update(_memory(cfg, shape(student), teachers.get("default"), seq_len, processes, grad_accum))
    return report


def report_text(report: dict[str, Any]) -> str:
    """A :func:`check_experiment` report for people: the models, the batch, the terms, the notes
    and the memory table."""
    teachers = ", ".join(f"{name} {t['layers']} layers x {t['width']}" for name, t in report["teachers"].items())
    lines = [
        f"student     {report['student_params']:,} parameters, {report['student_layers']} layers x {report['student_width']}",
        f"teachers    {teachers or 'none'}",
        f"batch       {report['global_batch']} sequences per step ({report['global_batch_per_process']} per process, "
        f"grad_accum {report['grad_accum']}, {count_processes(report['processes'])}), {report['tokens_per_step']:,} tokens",
        f"steps       {report['steps']}",
    ]
    lines += [f"term        {t['origin']}: {t['type']} on teacher {t['teacher']}, lambda0 {t['lambda0']}, "
              f"{t['schedule']}, stop_step {t['stop_step'] if t['stop_step'] is not None else 'never'}"
              for t in report["terms"]] or ["term        none (no alignment)"]
    lines += [f"note        {note}" for note in report["notes"]]
    return "\n".join(lines + [memory_table(report)])


def memory_table(report: dict[str, Any]) -> str:
    """The memory estimate of a :func:`check_experiment` report as a text table."""
    table = report.get("memory_gb_per_gpu")
    if not table:
        return f"memory: {report['memory']}"
    rows = ["weights", "gradients", "accumulated_gradients", "optimizer", "activations", "loss_buffers", "teacher",
            "build", "peak"]
    header = f"GB per GPU, {count_processes(report['processes'])}"
    lines = [f"{header:<32}" + "".join(f"{m:>11}" for m in table)]
    lines += [f"{row:<32}" + "".join(f"{table[m][row]:>11.1f}" for m in table) for row in rows]
    return "\n".join(lines + [report["verdict"]])
