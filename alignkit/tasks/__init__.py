"""Tasks: data -> batches -> metrics, for each modality, registered by name in
:data:`alignkit.core.registry.TASKS` (``task.name`` in a recipe). A downstream task registers
a :class:`~alignkit.tasks.base.TaskSpec` the same way (see :mod:`alignkit.core.registry`).

The built-in task modules import their heavy libraries (aeon, datasets) only when data is
loaded, so registering both costs nothing and a text run never imports aeon.
"""
from __future__ import annotations

import torch

from alignkit.core.distributed import DistInfo
from alignkit.core.registry import TASKS
from alignkit.tasks.base import TaskBase, TaskConfig, TaskContext, TaskSpec
from alignkit.tasks import image_classify
from alignkit.tasks.text_pretrain import TextPretrainTask, TextTaskConfig
from alignkit.tasks.ts_classify import TSClassifyTask, TSTaskConfig, teacher_training

TASKS.register("text_pretrain", TaskSpec(TextTaskConfig, TextPretrainTask, ("eval_loss", "eval_ppl")))
TASKS.register("ts_classify", TaskSpec(TSTaskConfig, TSClassifyTask, ("val_accuracy", "val_loss"), teacher_training))
TASKS.register("image_classify", TaskSpec(image_classify.ImageTaskConfig, image_classify.ImageClassifyTask,
                                          ("val_accuracy", "val_loss"), image_classify.teacher_training))


def build_task(section: TaskConfig, context: TaskContext, *, dist: DistInfo, device: torch.device) -> TaskBase:
    """The task ``section.name`` names, given its typed ``task`` section and the
    :class:`TaskContext` it needs from the rest of the recipe (:func:`alignkit.chain.task_context`)."""
    spec: TaskSpec = TASKS.get(section.name, "task.name")
    return spec.build(section, context=context, dist=dist, device=device)


__all__ = ["TaskBase", "TaskConfig", "TaskContext", "TaskSpec", "build_task"]
