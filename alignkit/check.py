"""``alignkit check``: validate a recipe without training -- the config, then the student and
teacher built on the meta device (no memory, so the 1.4B/7B paper recipes check on a laptop),
its layer indices against the alignment pairs, the batch/token arithmetic of the run at
``train.num_processes`` processes, and an estimate of memory per GPU (:mod:`alignkit.memory`)
for ddp and fsdp, with and without activation checkpointing, saying plainly whether the chosen
setting fits an 80 GB GPU.

A GGUF teacher cannot be built on the meta device (its config lives in the file): its
parameter count and width come from the GGUF header.
"""
from __future__ import annotations

import os
from typing import Any

import torch

from alignkit.core.adapter import DataInfo, resolve_layer
from alignkit.core.config import ConfigError, ModelConfig, resolve_grad_accum
from alignkit.core.registry import build_student, build_teacher
from alignkit.experiment import ExperimentConfig
from alignkit.memory import GB, GPU_BYTES, RunSetting, estimate_memory, gguf_size, transformer_shape

MODES = {"ddp": ("ddp", False), "ddp+ckpt": ("ddp", True), "fsdp": ("fsdp", False), "fsdp+ckpt": ("fsdp", True)}


def _teacher_size(cfg: ModelConfig) -> tuple[int, int, int]:
    """(parameters, final-layer width, bytes per parameter) of a causal-LM teacher."""
    from alignkit.adapters.hf_causal import _gguf_location, _torch_dtype

    itemsize = _torch_dtype(cfg.dtype).itemsize
    if cfg.source == "gguf":
        params, width = gguf_size(os.path.join(*_gguf_location(cfg)))
        return params, width, itemsize
    teacher = build_teacher(cfg, device=torch.device("meta"))
    unique = {id(p): p for p in teacher.model.parameters()}.values()  # tied embeddings once
    return sum(p.numel() for p in unique), teacher.width(-1), itemsize


def _memory(cfg: ExperimentConfig, student: Any, processes: int, grad_accum: int) -> dict[str, Any]:
    """Estimated GB per GPU for each mode, and the verdict for the recipe's own setting."""
    teacher = _teacher_size(cfg.teacher) if cfg.align.method != "none" and cfg.teacher.kind == "hf_causal" else (0, 0, 2)
    run = RunSetting(
        micro_batch=cfg.train.micro_batch_size, seq_len=cfg.task.seq_len, precision=cfg.train.precision,
        processes=processes, grad_accum=grad_accum, teacher_params=teacher[0], teacher_width=teacher[1],
        teacher_bytes_per_param=teacher[2], logit_kd=cfg.align.method in ("rkd", "salt"),
    )
    from alignkit.adapters.hf_causal import find_blocks

    shape = transformer_shape(student.model, find_blocks(student.model).blocks)
    table = {}
    for mode, (parallel, ckpt) in MODES.items():
        run.activation_checkpointing = ckpt
        table[mode] = {k: round(v / GB, 1) for k, v in estimate_memory(shape, run, parallel).items()}
    chosen = ("fsdp" if cfg.train.parallel == "fsdp" else "ddp") + ("+ckpt" if cfg.train.activation_checkpointing else "")
    peak = table[chosen]["peak"]
    fits = peak * GB <= GPU_BYTES
    fitting = [mode for mode in MODES if table[mode]["peak"] * GB <= GPU_BYTES]
    verdict = (
        f"{chosen} at {processes} processes: about {peak:.1f} GB per GPU: "
        + ("fits an 80 GB GPU" if fits else
           "DOES NOT FIT an 80 GB GPU" + (f" (fits: {', '.join(fitting)}; set train.parallel / "
                                           "train.activation_checkpointing)" if fitting else
                                           " in any mode: lower train.micro_batch_size or add processes"))
    )
    return {"teacher_params": teacher[0], "memory_gb_per_gpu": table, "setting": chosen,
            "fits_80gb": fits, "verdict": verdict}


def check_experiment(cfg: ExperimentConfig) -> dict[str, Any]:
    import alignkit.adapters  # noqa: F401  (registers the built-in adapters)

    student = build_student(cfg.student, device=torch.device("meta"), data=DataInfo(num_classes=2, num_channels=1, seq_len=cfg.task.seq_len))
    params = sum(p.numel() for p in student.parameters())
    if cfg.align.method == "let":
        default_early = getattr(student, "align_layer", None) or 3
        early = cfg.align.early_layer if cfg.align.early_layer is not None else default_early
        layers = [p.student_layer for p in cfg.align.pairs] or [early]
        for i, layer in enumerate(layers):
            key = f"align.pairs[{i}].student_layer" if cfg.align.pairs else "align.early_layer"
            resolve_layer(layer, student.num_layers, key)
    train = cfg.train
    if train.num_processes < 1:
        raise ConfigError(f"train.num_processes must be >= 1, got {train.num_processes}")
    processes = train.num_processes
    grad_accum = resolve_grad_accum(train, processes)
    per_process = train.micro_batch_size * grad_accum
    if cfg.student.kind == "hf_causal" and cfg.student.options.arch.get("max_position_embeddings", 1 << 30) < cfg.task.seq_len:
        raise ConfigError(
            f"task.seq_len={cfg.task.seq_len} exceeds student.options.arch.max_position_embeddings="
            f"{cfg.student.options.arch['max_position_embeddings']}"
        )
    report = {
        "student_params": params,
        "student_layers": student.num_layers,
        "student_width": student.width(-1),
        "processes": processes,
        "grad_accum": grad_accum,
        "global_batch_per_process": per_process,
        "global_batch": per_process * processes,
        "tokens_per_step": per_process * processes * cfg.task.seq_len,
        "method": cfg.align.method,
        "stop_step": cfg.align.stop_step,
        "steps": train.steps,
    }
    if cfg.student.kind == "hf_causal":  # the activation model is one of causal-LM blocks
        report.update(_memory(cfg, student, processes, grad_accum))
    return report


def memory_table(report: dict[str, Any]) -> str:
    """The memory estimate of a :func:`check_experiment` report as a text table."""
    table = report.get("memory_gb_per_gpu")
    if not table:
        return "memory: estimated for hf_causal students only"
    rows = ["weights", "gradients", "optimizer", "activations", "loss_buffers", "teacher", "peak"]
    header = f"GB per GPU, {report['processes']} processes"
    lines = [f"{header:<32}" + "".join(f"{m:>11}" for m in table)]
    lines += [f"{row:<32}" + "".join(f"{table[m][row]:>11.1f}" for m in table) for row in rows]
    return "\n".join(lines + [report["verdict"]])
