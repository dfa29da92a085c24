"""The experiment schema (what a recipe YAML may set) and how it is loaded and validated.

A recipe composes presets by name: ``student.preset`` / ``teacher.preset`` / ``teachers.<name>.preset``
name files in ``adapters/``, ``task.preset`` a file in ``tasks/``. Fields set in the recipe
override the preset's, and ``a.b=c`` command-line overrides override both.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from alignkit.core.config import (
    AlignConfig, ConfigError, ModelConfig, TrainConfig, at_least, checked, load_config, one_of, problems, to_yaml,
)
from alignkit.core.engine import check_align_config
from alignkit.core.registry import load_plugins, typed_options
from alignkit.core.trainer import config_problems
from alignkit.tasks.text_data import TextDataConfig
from alignkit.tasks.uea import UEADataConfig

REPO_ROOT = Path(__file__).resolve().parents[1]
# each task's eval metrics: what train.select_metric / select_tiebreak may name
TASK_METRICS = {"text_pretrain": ("eval_loss", "eval_ppl"), "ts_classify": ("val_accuracy", "val_loss")}


def _teacher_pretrain_default() -> TrainConfig:
    return TrainConfig(steps=600, micro_batch_size=32, lr=1e-3, eval_every=50, select_metric="val_accuracy")


@dataclass
class TaskConfig:
    preset: str = ""
    name: str = checked("text_pretrain", one_of(*TASK_METRICS))
    seq_len: int = checked(256, at_least(2))  # text: tokens per sequence
    text: TextDataConfig = field(default_factory=TextDataConfig)
    uea: UEADataConfig = field(default_factory=lambda: UEADataConfig(datasets=["JapaneseVowels"]))
    # ts_classify: how the TimesNet teacher is pre-trained when teacher.name_or_path is empty
    teacher_pretrain: TrainConfig = field(default_factory=_teacher_pretrain_default)
    teacher_datasets: list[str] = field(default_factory=list)  # [] = task.uea.datasets


@dataclass
class ExperimentConfig:
    run_name: str = ""  # "" = <config stem>-<timestamp>
    output_dir: str = "runs"
    student: ModelConfig = field(default_factory=ModelConfig)
    teacher: ModelConfig = field(default_factory=ModelConfig)
    teachers: dict[str, ModelConfig] = field(default_factory=dict)  # extra named teachers
    task: TaskConfig = field(default_factory=TaskConfig)
    align: AlignConfig = field(default_factory=AlignConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


def preset_dirs() -> dict[str, list[Path]]:
    adapters = [REPO_ROOT / "adapters", Path.cwd() / "adapters"]
    return {"student": adapters, "teacher": adapters, "teachers": adapters,
            "task": [REPO_ROOT / "tasks", Path.cwd() / "tasks"]}


def _run_name_problem(name: str) -> str | None:
    """Run names are single folder names inside output_dir (no ``..``, ``/`` or absolute paths)."""
    if name and (name in (".", "..") or "/" in name or "\\" in name or Path(name).name != name):
        return f"run_name={name!r}: must be a single folder name (no '/', '..' or absolute path)"
    return None


def validate(cfg: ExperimentConfig) -> None:
    """Every problem that needs no model, reported together (layer ranges and widths are
    checked when the models exist)."""
    found = problems(cfg)
    found += [why for why in [_run_name_problem(cfg.run_name)] if why]
    selections = [("train", cfg.train, cfg.task.name)]
    if cfg.task.name == "ts_classify":
        selections.append(("task.teacher_pretrain", cfg.task.teacher_pretrain, "ts_classify"))
    for section, train, task in selections:
        found += config_problems(train, section)  # optimizer, LR schedule and loggers by name
        names = TASK_METRICS.get(task, ())
        for key in ("select_metric", "select_tiebreak"):
            value = getattr(train, key)
            if value and names and value not in names:
                found.append(f"{section}.{key}={value!r}: not an eval metric of {task} ({', '.join(names)})")
    try:
        check_align_config(cfg.align, cfg.train.steps)
    except ConfigError as err:
        found.append(str(err))
    if found:
        raise ConfigError(found[0] if len(found) == 1 else f"{len(found)} config problems:\n  " + "\n  ".join(found))


def load_experiment(path: str | Path | None, overrides: list[str] | None = None) -> ExperimentConfig:
    load_plugins()  # the registries must know every name the recipe may use
    cfg = load_config(ExperimentConfig, path, overrides, preset_dirs())
    type_model_options(cfg)
    validate(cfg)
    return cfg


def type_model_options(cfg: ExperimentConfig) -> None:
    """Each model's ``options`` mapping becomes its adapter's options dataclass (unknown or
    mistyped options fail here, naming the key; their range rules join :func:`validate`)."""
    cfg.student = typed_options(cfg.student, "student")
    if cfg.align.method != "none":
        cfg.teacher = typed_options(cfg.teacher, "teacher")
    cfg.teachers = {name: typed_options(model, f"teachers.{name}") for name, model in cfg.teachers.items()}


def save_resolved(cfg: ExperimentConfig, run_dir: Path) -> None:
    (run_dir / "config.yaml").write_text(to_yaml(cfg))
