"""What a task is: its config section, its spec in the task registry, and the data,
evaluation and export it provides to the build chain (:mod:`alignkit.train`) and the trainer.

A task never builds models or trains: the chain asks it for its data
(:meth:`TaskBase.build_data`, which reports a :class:`~alignkit.core.adapter.DataInfo`),
builds the student and teachers from that, and hands the task to the one trainer loop.

A task sees its own ``task`` section and a :class:`TaskContext` (the few values it needs from
the rest of the recipe), never the whole experiment: :func:`alignkit.chain.task_context` makes
the context, :func:`alignkit.tasks.build_task` the task.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import torch
from torch import nn

from alignkit.core.adapter import Batch, DataInfo
from alignkit.core.config import ModelConfig, TrainConfig, above, at_least, checked
from alignkit.core.distributed import DistInfo
from alignkit.core.errors import DataError


@dataclass
class TaskConfig:
    """The keys every task section has; a task's own config dataclass extends it."""

    preset: str = ""  # a file stem in tasks/ (or a YAML path) merged under this section
    name: str = "text_pretrain"  # the registered task (alignkit.core.registry.TASKS)


@dataclass
class TeacherPretrainConfig(TrainConfig):
    """The ``train`` section of a teacher's pre-training (:mod:`alignkit.teacher_stage`).
    Budget: ``epochs`` over the training split (``steps`` > 0 overrides it), stopped early when
    ``patience`` evals in a row bring no better ``select_metric``."""

    steps: int = checked(0, at_least(0))  # 0 = epochs x batches per epoch
    epochs: int = checked(100, at_least(1))
    patience: int = checked(10, at_least(0))  # evals without a better select_metric; 0 = never stop early
    micro_batch_size: int = checked(32, at_least(1))
    lr: float = checked(1e-3, above(0))
    eval_every: int = checked(10, at_least(0))
    select_metric: str = "val_accuracy"


@dataclass(frozen=True)
class TeacherTraining:
    """How a task pre-trains a teacher that has no weights: the ``task`` and ``train`` sections
    of that run, what of the data changes the teacher (``identity``, part of the cache key) and
    the data's name in the cache folder (``label``)."""

    task: Any
    train: TeacherPretrainConfig
    identity: dict[str, Any] = field(default_factory=dict)
    label: str = ""


@dataclass(frozen=True)
class TaskContext:
    """What a task reads outside its own ``task`` section, and why:

    * ``student``: the student's model config -- a text task loads its tokenizer; a
      classification task sizes the student from its options when ``check`` cannot read the data.
    * ``extra_teachers``: the names under ``teachers`` -- a text task refuses them when the main
      teacher's tokenizer differs from the student's (only the main teacher may differ).
    * ``logit_kd_origins``: where each logit-KD term on the main teacher was written (e.g.
      ``align.terms.1``) -- a text task refuses them across tokenizers, naming the term.
    * ``eval_batch_size``: sequences per evaluation batch (the run's ``train.micro_batch_size``).
    """

    student: ModelConfig = field(default_factory=ModelConfig)
    extra_teachers: tuple[str, ...] = ()
    logit_kd_origins: tuple[str, ...] = ()
    eval_batch_size: int = 1


@dataclass(frozen=True)
class TaskSpec:
    """A task in the registry: ``config`` types the recipe's ``task`` section, ``build(section, *,
    context, dist, device)`` makes the task (``section``: that typed section; ``context``: a
    :class:`TaskContext`), ``metrics`` are the eval metrics it reports (what
    ``train.select_metric`` may name). ``teacher_training(task_section)`` says how the task
    pre-trains a teacher without weights (None: it does not; such a teacher needs weights)."""

    config: type
    build: Callable[..., "TaskBase"]
    metrics: tuple[str, ...] = ()
    teacher_training: Callable[[Any], TeacherTraining] | None = None


class TaskBase:
    """Subclasses fill in data, evaluation and export; the chain and the trainer drive them."""

    loss_name = "task_loss"

    def __init__(self, section: Any, *, context: TaskContext, dist: DistInfo, device: torch.device) -> None:
        self.section, self.context, self.dist, self.device = section, context, dist, device
        self.notes: list[str] = []  # what describe_data could not check (printed by `alignkit check`)

    # --- the build chain -------------------------------------------------------------------
    def build_data(self, teachers: Mapping[str, Any]) -> DataInfo:
        """Load the data for training and evaluation; ``teachers`` maps names (``default``
        for the main one) to the teacher configs (some data depends on them, e.g. a teacher
        tokenizer); returns what the model builders need to know of the data."""
        raise NotImplementedError

    def describe_data(self, teachers: Mapping[str, Any]) -> DataInfo:
        """What :meth:`build_data` would report, cheaply and offline (no download, no
        tokenizing): ``alignkit check`` builds the models on the meta device from it. What
        cannot be known offline is filled in as documented by the task and said in ``notes``."""
        raise NotImplementedError

    @property
    def num_train_examples(self) -> int:
        """Examples in the training split once the data is built (a teacher pre-training's epoch)."""
        raise NotImplementedError

    def check_student(self, student: nn.Module, data: DataInfo) -> None:
        """Refuse a student that cannot take this data (after it is built, before training)."""

    def check_teacher_eval(self, teacher: ModelConfig) -> None:
        """Refuse to score ``teacher`` on the students' data (:func:`alignkit.teacher_eval.evaluate_teacher`,
        after :meth:`build_data`) when its score would not compare with theirs; default: it would."""

    # --- the trainer's Task protocol ------------------------------------------------------
    def train_batches(self, micro_batch_size: int) -> Iterator[Batch]:
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        raise NotImplementedError

    def load_state_dict(self, state: dict[str, Any]) -> None:
        raise NotImplementedError

    def resharded_state(self, states: list[dict[str, Any]]) -> dict[str, Any]:
        """The data position for a rank of a new process count, from every saved rank's state
        (``states[r]`` is rank r's); a task whose position cannot be mapped refuses."""
        raise DataError(f"task.name={self.section.name}: its data position is kept per process: resume on the "
                        f"run's {len(states)} processes")

    def evaluate(self, student: nn.Module, device: torch.device) -> dict[str, float]:
        raise NotImplementedError

    def release_teacher(self) -> None:
        """The trainer freed the teachers (``align.stop_step``): drop teacher-only data work."""

    def export(self, student: nn.Module, directory: Path) -> None:
        raise NotImplementedError

    def report(self, student: nn.Module, run_dir: Path, role: str = "student") -> dict[str, Any]:
        """Final results after training (on the main rank; ``role``: what was trained, for
        messages); default: nothing extra."""
        return {}
