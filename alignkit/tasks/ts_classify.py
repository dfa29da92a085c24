"""Time-series classification with LET (paper App. E): an LLM student classifies UEA series
while its layer ``align.early_layer`` (default: a quarter of its depth) is aligned to a small
pretrained TimesNet teacher's final-layer features, time step by time step.

If ``teacher.name_or_path`` is empty, the TimesNet teacher is first pre-trained (same trainer,
no teacher of its own) on ``task.teacher_datasets`` (default: the task's datasets), selected
on the validation split carved from TRAIN, and cached under
``<output_dir>/teachers/<datasets>-<hash>/final`` for reuse by later runs.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any, Iterator

import torch
from safetensors.torch import save_model
from torch import nn

import alignkit.adapters  # noqa: F401  (registers timesnet / hf_ts_classifier)
from alignkit.adapters.timesnet import TimesNetClassifier, save_timesnet
from alignkit.core.adapter import Batch, TeacherAdapter
from alignkit.core.checkpoint import rng_snapshot, rng_state, seed_everything, set_rng_state
from alignkit.core.config import AlignConfig, ConfigError
from alignkit.core.distributed import DistInfo, resolve_device
from alignkit.core.folder_lock import FolderLock
from alignkit.core.registry import build_student, build_teacher
from alignkit.core.trainer import Trainer, to_device
from alignkit.tasks.base import TaskBase
from alignkit.tasks.uea import UEASplits, load_uea


class TSClassifyTask(TaskBase):
    loss_name = "ce"

    def build_student(self) -> nn.Module:
        if self.dist.world_size > 1:
            raise ConfigError("task.name=ts_classify runs in one process (the UEA sets are small); drop torchrun")
        self.splits: UEASplits = load_uea(self.cfg.task.uea)
        self.student = build_student(self.cfg.student, device=self.device, data=self.splits.data_info())
        return self.student

    def build_teachers(self) -> dict[str, TeacherAdapter]:
        teacher = self.cfg.teacher
        if teacher.kind == "timesnet" and not teacher.name_or_path:
            path = pretrain_timesnet_teacher(self.cfg, self.device)
            teacher = dataclasses.replace(teacher, source="checkpoint", name_or_path=str(path))
        return {"default": build_teacher(teacher, device=self.device)}

    def build_data(self) -> None:
        uea = self.cfg.task.uea
        self.stream = self.splits.train_batches(self.cfg.train.micro_batch_size, crop_min=uea.crop_min, jitter=uea.jitter)

    def train_batches(self, micro_batch_size: int) -> Iterator[Batch]:
        return self.stream

    def state_dict(self) -> dict[str, Any]:
        return self.stream.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
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
        directory.mkdir(parents=True, exist_ok=True)
        if isinstance(student, TimesNetClassifier):
            save_timesnet(student, directory)
            return
        save_model(student, str(directory / "model.safetensors"))
        (directory / "task.json").write_text(json.dumps(self.splits.info(), indent=2))

    def report(self, student: nn.Module, run_dir: Path) -> dict[str, Any]:
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
        print(f"test accuracy: {results['test_accuracy']:.4f} ({len(labels)} series)")
        return {k: results[k] for k in ("test_accuracy", "test_loss", "test_size")}


def teacher_cache_dir(cfg: Any) -> Path:
    datasets = list(cfg.task.teacher_datasets or cfg.task.uea.datasets)
    spec = json.dumps(
        {"datasets": datasets, "teacher": dataclasses.asdict(cfg.teacher), "train": dataclasses.asdict(cfg.task.teacher_pretrain),
         "uea": {k: v for k, v in dataclasses.asdict(cfg.task.uea).items() if k != "datasets"}},
        sort_keys=True, default=str,
    )
    digest = hashlib.sha256(spec.encode()).hexdigest()[:10]
    name = "+".join(datasets) if len(datasets) <= 3 else f"{len(datasets)}datasets"
    return Path(cfg.output_dir) / "teachers" / f"timesnet-{name}-{digest}"


def pretrain_timesnet_teacher(cfg: Any, device: torch.device) -> Path:
    """Pre-train (or reuse) the TimesNet teacher described by ``cfg.teacher``; returns the
    folder of the selected model."""
    run_dir = teacher_cache_dir(cfg)
    final = run_dir / "final"
    if (final / "timesnet.json").is_file():
        print(f"reusing pre-trained TimesNet teacher {final}")
        return final
    with FolderLock(run_dir, "teacher cache folder"):  # two runs never train one teacher together
        if (final / "timesnet.json").is_file():  # finished by another run just before the lock
            return final
        _pretrain(cfg, run_dir, device)
    return final


def _pretrain(cfg: Any, run_dir: Path, device: torch.device) -> None:
    datasets = list(cfg.task.teacher_datasets or cfg.task.uea.datasets)
    sub = dataclasses.replace(
        cfg,
        student=cfg.teacher,
        align=AlignConfig(method="none"),
        train=cfg.task.teacher_pretrain,
        task=dataclasses.replace(cfg.task, uea=dataclasses.replace(cfg.task.uea, datasets=datasets)),
    )
    outer_rng = rng_snapshot()  # the run's own RNG must not depend on whether the cache was hit
    seed_everything(sub.train.seed)
    device = device if sub.train.device == "auto" else resolve_device(sub.train.device, DistInfo())
    task = TSClassifyTask(sub, DistInfo(), device)
    student = task.build_student()
    task.build_data()
    trainer = Trainer(cfg=sub.train, student=student, engine=None, task=task, run_dir=run_dir, device=device)
    trainer.resume_hint = ""  # the outer run says how to continue
    resumed = trainer.resume_latest()
    if resumed is None:
        (run_dir / "metrics.jsonl").unlink(missing_ok=True)  # an attempt killed before its first checkpoint
    print(f"{'continuing' if resumed else 'pre-training'} the TimesNet teacher on {', '.join(datasets)} "
          f"({sub.train.steps} steps) -> {run_dir / 'final'}")
    trainer.fit()
    (run_dir / "results.json").write_text(json.dumps(task.report(student, run_dir), indent=2))
    set_rng_state(rng_state(outer_rng))


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
