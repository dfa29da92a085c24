"""``alignkit check``: validate a recipe without training — the config, then the student built
on the meta device (no memory, so the 1.4B/7B paper recipes check on a laptop), its layer
indices against the alignment pairs, and the batch/token arithmetic of the run."""
from __future__ import annotations

from typing import Any

import torch

from alignkit.core.adapter import resolve_layer
from alignkit.core.config import ConfigError
from alignkit.core.registry import build_student
from alignkit.experiment import ExperimentConfig


def check_experiment(cfg: ExperimentConfig) -> dict[str, Any]:
    import alignkit.adapters  # noqa: F401  (registers the built-in adapters)

    student = build_student(cfg.student, device=torch.device("meta"), num_classes=2, num_channels=1, seq_len=cfg.task.seq_len)
    params = sum(p.numel() for p in student.parameters())
    if cfg.align.method == "let":
        default_early = getattr(student, "align_layer", None) or 3
        early = cfg.align.early_layer if cfg.align.early_layer is not None else default_early
        layers = [p.student_layer for p in cfg.align.pairs] or [early]
        for i, layer in enumerate(layers):
            key = f"align.pairs[{i}].student_layer" if cfg.align.pairs else "align.early_layer"
            resolve_layer(layer, student.num_layers, key)
    train = cfg.train
    global_batch = train.micro_batch_size * train.grad_accum
    if cfg.student.kind == "hf_causal" and cfg.student.arch.get("max_position_embeddings", 1 << 30) < cfg.task.seq_len:
        raise ConfigError(
            f"task.seq_len={cfg.task.seq_len} exceeds student.arch.max_position_embeddings="
            f"{cfg.student.arch['max_position_embeddings']}"
        )
    return {
        "student_params": params,
        "student_layers": student.num_layers,
        "student_width": student.width(-1),
        "global_batch_per_process": global_batch,
        "tokens_per_step_per_process": global_batch * cfg.task.seq_len,
        "method": cfg.align.method,
        "stop_step": cfg.align.stop_step,
        "steps": train.steps,
    }
