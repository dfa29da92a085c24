"""Image classification with LET: a student (e.g. a timm ViT, kind ``timm_vision``) classifies
images while one of its early layers is aligned to a small pretrained image teacher's final-layer
features, position by position (see :mod:`alignkit.adapters.timm_vision` for positions and grids).

The task is data (:mod:`alignkit.tasks.image_data`: scikit-learn's digits offline, or your own
``ImageFolder``), evaluation on the validation split carved from train (``val_accuracy``,
``val_loss``) and, at the end, test accuracy and a confusion matrix (``test_results.json``,
``confusion_matrix.png``). Evaluation, the test report and the resumable data position are time
series classification's (:class:`~alignkit.tasks.ts_classify.TSClassifyTask`): only the data, the
batches and the export differ. A teacher without weights is pre-trained first on the same data by
the teacher stage (:func:`teacher_training`, configured by ``task.teacher_pretrain``).
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping

import torch
from torch import nn

from alignkit.core.adapter import Batch, DataInfo
from alignkit.core.distributed import DistInfo
from alignkit.core.errors import ConfigError
from alignkit.tasks.base import TaskConfig, TaskContext, TeacherPretrainConfig, TeacherTraining
from alignkit.tasks.image_data import FOLDER_CHANNELS, ImageDataConfig, ImageSplits, folder_classes, load_images
from alignkit.tasks.ts_classify import TSClassifyTask

DIGITS = DataInfo(num_classes=10, num_channels=1, class_names=tuple(map(str, range(10))), datasets=("digits",))


@dataclass
class ImageTaskConfig(TaskConfig):
    """``task`` section of ``image_classify``."""

    data: ImageDataConfig = field(default_factory=ImageDataConfig)
    teacher_pretrain: TeacherPretrainConfig = field(default_factory=TeacherPretrainConfig)


def teacher_training(cfg: ImageTaskConfig) -> TeacherTraining:
    """A teacher without weights trains on the same images with ``teacher_pretrain``; every
    ``data`` setting keys its cache (the source, the split seed and the augmentation change it)."""
    return TeacherTraining(task=cfg, train=cfg.teacher_pretrain, identity={"data": asdict(cfg.data)},
                           label=cfg.data.source)


class ImageClassifyTask(TSClassifyTask):
    """Images in, class logits out; batches ``{"pixel_values": [B, C, S, S], "labels": [B]}``."""

    def __init__(self, section: Any, *, context: TaskContext, dist: DistInfo, device: torch.device) -> None:
        if dist.world_size > 1:
            raise ConfigError("task.name=image_classify runs in one process (the data sets are small); drop torchrun")
        super().__init__(section, context=context, dist=dist, device=device)
        self.mask_positions = 1  # see check_student

    def build_data(self, teachers: Mapping[str, Any]) -> DataInfo:
        self.splits: ImageSplits = load_images(self.section.data)
        self.stream = None  # made by train_batches, at the trainer's batch size
        self._position: dict[str, Any] | None = None  # a resumed position, until the stream exists
        return self.splits.data_info()

    def describe_data(self, teachers: Mapping[str, Any]) -> DataInfo:
        """Digits: known without loading; a folder: its class folder names (images read as RGB)."""
        data = self.section.data
        if data.source == "digits":
            return DIGITS
        classes = folder_classes(data)
        return DataInfo(num_classes=len(classes), num_channels=FOLDER_CHANNELS, class_names=tuple(classes),
                        datasets=(data.source,))

    def check_student(self, student: nn.Module, data: DataInfo) -> None:
        """Size the training batches' ``attention_mask`` to the positions of the student's
        features at its align layer: the trainer counts a batch by its ``attention_mask``, or
        else by ``input_ids``, which images have not (core/trainer.py); every position is real."""
        if hasattr(student, "positions"):
            self.mask_positions = student.positions(getattr(student, "align_layer", -1))

    def train_batches(self, micro_batch_size: int) -> Iterator[Batch]:
        self.stream = self.splits.train_batches(micro_batch_size, self.mask_positions)
        if self._position is not None:
            self.stream.load_state_dict(self._position)
        return self.stream

    def export(self, student: nn.Module, directory: Path) -> None:
        """The student's own format where it has one (``save_pretrained``), else time series'
        (``model.safetensors``); ``task.json`` says what it was trained on."""
        if not hasattr(student, "save_pretrained"):
            super().export(student, directory)
            return
        student.save_pretrained(directory)
        (directory / "task.json").write_text(json.dumps(self.splits.info(), indent=2))
