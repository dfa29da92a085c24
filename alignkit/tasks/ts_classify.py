"""Time-series classification with LET (paper App. E): an LLM student classifies UEA series
while its layer ``align.early_layer`` (default: a quarter of its depth) is aligned to a small
pretrained TimesNet teacher's final-layer features, time step by time step.

The task is data, evaluation and export; a TimesNet teacher without weights is pre-trained
first by its own stage (:mod:`alignkit.teacher_stage`, configured by ``task.teacher_pretrain``).
Batches: ``x`` [B, T, C] float32, ``attention_mask`` [B, T] long, ``labels`` [B] long (and
``dataset`` [B] when several datasets are combined), see :mod:`alignkit.tasks.uea`.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Iterator, Mapping

import torch
from torch import nn

from alignkit.core.adapter import Batch, DataInfo
from alignkit.core.config import ConfigError
from alignkit.core.distributed import DistInfo
from alignkit.core.trainer import to_device
from alignkit.tasks.base import TaskBase, TaskConfig, TaskContext, TeacherPretrainConfig, TeacherTraining
from alignkit.tasks.uea import UEABatches, UEADataConfig, UEASplits, describe_uea, load_uea

PLACEHOLDER = DataInfo(num_classes=2, num_channels=1)  # `alignkit check` when the data is not local


@dataclass
class TSTaskConfig(TaskConfig):
    """``task`` section of ``ts_classify``."""

    uea: UEADataConfig = field(default_factory=UEADataConfig)
    teacher_pretrain: TeacherPretrainConfig = field(default_factory=TeacherPretrainConfig)
    teacher_datasets: list[str] = field(default_factory=list)  # [] = task.uea.datasets


def teacher_training(cfg: TSTaskConfig) -> TeacherTraining:
    """A teacher without weights trains on ``teacher_datasets`` (default ``uea.datasets``) with
    ``teacher_pretrain``; the UEA settings but where the data is read from key its cache."""
    datasets = list(cfg.teacher_datasets or cfg.uea.datasets)
    task = replace(cfg, uea=replace(cfg.uea, datasets=datasets))
    uea = {k: v for k, v in asdict(task.uea).items() if k not in ("extract_path", "download")}
    label = "+".join(datasets) if len(datasets) <= 3 else f"{len(datasets)}datasets"
    return TeacherTraining(task=task, train=cfg.teacher_pretrain, identity={"uea": uea}, label=label)


class TSClassifyTask(TaskBase):
    loss_name = "ce"

    def __init__(self, section: Any, *, context: TaskContext, dist: DistInfo, device: torch.device) -> None:
        super().__init__(section, context=context, dist=dist, device=device)
        if dist.world_size > 1:
            raise ConfigError("task.name=ts_classify runs in one process (the UEA sets are small); drop torchrun")

    def build_data(self, teachers: Mapping[str, Any]) -> DataInfo:
        uea = self.section.uea
        self.splits: UEASplits = load_uea(uea)
        self.stream: UEABatches | None = None  # made by train_batches, at the trainer's batch size
        self._position: dict[str, Any] | None = None  # a resumed position, until the stream exists
        return self.splits.data_info()

    @property
    def num_train_examples(self) -> int:
        return len(self.splits.train)

    def describe_data(self, teachers: Mapping[str, Any]) -> DataInfo:
        """From the headers of the local ``.ts`` files; a dataset that is not local gives the
        sizes the student's options set, else :data:`PLACEHOLDER` (said in ``notes``)."""
        info, notes = describe_uea(self.section.uea)
        self.notes += notes
        if info is not None:
            return info
        options = self.context.student.options
        self.notes.append("the student is sized from student.options.num_classes / num_channels where set, "
                          f"else the placeholder {PLACEHOLDER.num_classes} classes, {PLACEHOLDER.num_channels} channel")
        return DataInfo(num_classes=getattr(options, "num_classes", 0) or PLACEHOLDER.num_classes,
                        num_channels=getattr(options, "num_channels", 0) or PLACEHOLDER.num_channels,
                        datasets=tuple(self.section.uea.datasets))

    def train_batches(self, micro_batch_size: int) -> Iterator[Batch]:
        uea = self.section.uea
        self.stream = self.splits.train_batches(micro_batch_size, crop_min=uea.crop_min, jitter=uea.jitter)
        if self._position is not None:
            self.stream.load_state_dict(self._position)
        return self.stream

    def state_dict(self) -> dict[str, Any]:
        return self.stream.state_dict() if self.stream is not None else dict(self._position or {})

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._position = state
        if self.stream is not None:
            self.stream.load_state_dict(state)

    def predict(self, student: nn.Module, split: str) -> tuple[torch.Tensor, torch.Tensor, float]:
        """(predictions, labels, mean loss) over a whole split."""
        predictions, labels, loss_sum = [], [], 0.0
        for batch in self.splits.eval_batches(split, batch_size=64):
            batch = to_device(batch, self.device)
            out = student(batch, [])
            predictions.append(out.logits.argmax(-1).cpu())
            labels.append(batch["labels"].cpu())
            loss_sum += float(out.loss) * len(batch["labels"])
        y = torch.cat(labels)
        return torch.cat(predictions), y, loss_sum / max(len(y), 1)

    def evaluate(self, student: nn.Module, device: torch.device) -> dict[str, float]:
        """Validation accuracy (the model-selection metric; the test split is never used here)."""
        predicted, labels, loss = self.predict(student, "val")
        return {"val_accuracy": float((predicted == labels).float().mean()), "val_loss": loss}

    def export(self, student: nn.Module, directory: Path) -> None:
        """The student's own format where it has one (``save_pretrained``, e.g. TimesNet's),
        else ``model.safetensors`` with ``task.json`` (what it was trained on)."""
        from safetensors.torch import save_model

        directory.mkdir(parents=True, exist_ok=True)
        if hasattr(student, "save_pretrained"):
            student.save_pretrained(directory)
            return
        save_model(student, str(directory / "model.safetensors"))
        (directory / "task.json").write_text(json.dumps(self.splits.info(), indent=2))

    def report(self, student: nn.Module, run_dir: Path, role: str = "student") -> dict[str, Any]:
        """Test accuracy and confusion matrix of the selected model (JSON + PNG in run_dir)."""
        student.eval()
        with torch.no_grad():
            predicted, labels, loss = self.predict(student, "test")
        n = self.splits.num_classes
        confusion = torch.zeros(n, n, dtype=torch.long)
        confusion.index_put_((labels, predicted), torch.ones_like(labels), accumulate=True)
        results = {
            "test_accuracy": float((predicted == labels).float().mean()),
            "test_loss": loss,
            "test_size": len(labels),
            "class_names": self.splits.class_names,
            "confusion_matrix": confusion.tolist(),
        }
        (run_dir / "test_results.json").write_text(json.dumps(results, indent=2))
        plot_confusion(confusion, self.splits.class_names, run_dir / "confusion_matrix.png", results["test_accuracy"])
        print(f"{role}'s test accuracy: {results['test_accuracy']:.4f} ({len(labels)} series)")
        return {k: results[k] for k in ("test_accuracy", "test_loss", "test_size")}


def plot_confusion(confusion: torch.Tensor, names: list[str], path: Path, accuracy: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(names)
    fig, ax = plt.subplots(figsize=(max(4, 0.5 * n + 2), max(3.5, 0.5 * n + 1.5)))
    ax.imshow(confusion.numpy(), cmap="Blues")
    for i in range(n):
        for j in range(n):
            ax.text(j, i, int(confusion[i, j]), ha="center", va="center", fontsize=8)
    ax.set_xticks(range(n), names, rotation=90, fontsize=7)
    ax.set_yticks(range(n), names, fontsize=7)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(f"test accuracy {accuracy:.3f}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
