"""Tasks: data -> batches -> metrics, for each modality. ``build_task`` picks one by name."""
from __future__ import annotations

from typing import Any

import torch

from alignkit.core.errors import ConfigError
from alignkit.core.distributed import DistInfo


def build_task(cfg: Any, dist: DistInfo, device: torch.device) -> Any:
    # Imported here so a text run never imports aeon and a time-series run never needs datasets.
    if cfg.task.name == "text_pretrain":
        from alignkit.tasks.text_pretrain import TextPretrainTask

        return TextPretrainTask(cfg, dist, device)
    if cfg.task.name == "ts_classify":
        from alignkit.tasks.ts_classify import TSClassifyTask

        return TSClassifyTask(cfg, dist, device)
    raise ConfigError(f"task.name={cfg.task.name!r} is unknown")
