"""What every task provides to the entry point and to the one trainer loop."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from alignkit.core.adapter import Batch, TeacherAdapter
from alignkit.core.distributed import DistInfo
from alignkit.core.registry import build_teacher


class TaskBase:
    """Subclasses fill in data, evaluation and export; the trainer drives them."""

    loss_name = "task_loss"

    def __init__(self, cfg: Any, dist: DistInfo, device: torch.device) -> None:
        self.cfg, self.dist, self.device = cfg, dist, device

    # --- building (the entry point calls these in order) ---------------------------------
    def build_student(self) -> nn.Module:
        raise NotImplementedError

    def build_teachers(self) -> dict[str, TeacherAdapter]:
        """The main teacher as ``default`` plus any named extra teachers."""
        configs = {"default": self.cfg.teacher, **self.cfg.teachers}
        return {name: build_teacher(cfg, device=self.device) for name, cfg in configs.items()}

    def build_data(self) -> None:
        raise NotImplementedError

    # --- the trainer's Task protocol ------------------------------------------------------
    def train_batches(self, micro_batch_size: int) -> Iterator[Batch]:
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        raise NotImplementedError

    def load_state_dict(self, state: dict[str, Any]) -> None:
        raise NotImplementedError

    def evaluate(self, student: nn.Module, device: torch.device) -> dict[str, float]:
        raise NotImplementedError

    def release_teacher(self) -> None:
        """The trainer freed the teachers (``align.stop_step``): drop teacher-only data work."""

    def export(self, student: nn.Module, directory: Path) -> None:
        raise NotImplementedError

    def report(self, student: nn.Module, run_dir: Path) -> dict[str, Any]:
        """Final results after training (on the main rank); default: nothing extra."""
        return {}
