"""The experiment schema (what a recipe YAML may set) and how it is loaded and validated.

``task`` is typed by the registered task's own config dataclass (``TASKS[task.name].config``,
e.g. :class:`~alignkit.tasks.text_pretrain.TextTaskConfig`): the section is merged as a plain
mapping (presets, recipe, overrides), then structured with that dataclass.

A recipe composes presets by name: ``student.preset`` / ``teacher.preset`` / ``teachers.<name>.preset``
name files in ``adapters/``, ``task.preset`` a file in ``tasks/``. Fields set in the recipe
override the preset's, and ``a.b=c`` command-line overrides override both.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from alignkit.core.config import (
    AlignConfig, ConfigError, ModelConfig, TrainConfig, closest, load_config, problems, structured, to_yaml,
)
from alignkit.core.engine import check_align_config
from alignkit.core.errors import MissingFile
from alignkit.core.registry import TASKS, typed_options
from alignkit.plugins import load_plugins
from alignkit.core.trainer import config_problems
from alignkit.tasks.base import TaskConfig, TaskSpec

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_TASK = "text_pretrain"


def task_spec(name: str) -> TaskSpec:
    """The registered task ``name`` (built-ins and plug-ins loaded first)."""
    load_plugins()
    return TASKS.get(name, "task.name")


def structure_task(section: Any) -> TaskConfig:
    """The recipe's ``task`` section (a mapping, after presets and overrides) as the config
    dataclass of the task it names; an unknown key is an error naming ``task.<key>``."""
    if isinstance(section, TaskConfig):
        return section
    values = dict(section or {})
    name = str(values.get("name") or DEFAULT_TASK)
    try:
        return structured(task_spec(name).config, {**values, "name": name}, "task")
    except ConfigError as err:  # the valid keys depend on the task: say which one
        raise ConfigError(f"{err} for task.name={name}") from None


@dataclass
class ExperimentConfig:
    run_name: str = ""  # "" = <config stem>-<timestamp>
    output_dir: str = "runs"
    student: ModelConfig = field(default_factory=ModelConfig)
    teacher: ModelConfig = field(default_factory=ModelConfig)
    teachers: dict[str, ModelConfig] = field(default_factory=dict)  # extra named teachers
    # typed by the task's own config dataclass (TASKS[task.name].config) once loaded
    task: Any = field(default_factory=lambda: {"name": DEFAULT_TASK})
    align: AlignConfig = field(default_factory=AlignConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self) -> None:
        self.task = structure_task(self.task)


def preset_dirs() -> dict[str, list[Path]]:
    adapters = [REPO_ROOT / "adapters", Path.cwd() / "adapters"]
    return {"student": adapters, "teacher": adapters, "teachers": adapters,
            "task": [REPO_ROOT / "tasks", Path.cwd() / "tasks"]}


def _run_name_problem(name: str) -> str | None:
    """Run names are single folder names inside output_dir (no ``..``, ``/`` or absolute paths),
    printable, without surrounding whitespace (a name a shell and a log line show as it is)."""
    if name and (name in (".", "..") or "/" in name or "\\" in name or Path(name).name != name):
        return f"run_name={name!r}: must be a single folder name (no '/', '..' or absolute path)"
    if name and (name.strip() != name or not name.isprintable()):
        return f"run_name={name!r}: must be printable, without line breaks or surrounding whitespace"
    return None


def validate(cfg: ExperimentConfig) -> None:
    """Every problem that needs no model, reported together (layer ranges and widths are
    checked when the models exist)."""
    found = problems(cfg)
    found += [why for why in [_run_name_problem(cfg.run_name)] if why]
    names = task_spec(cfg.task.name).metrics
    trains = [("train", cfg.train)] + [(f"task.{f.name}", getattr(cfg.task, f.name)) for f in fields(cfg.task)
                                       if isinstance(getattr(cfg.task, f.name), TrainConfig)]
    for section, train in trains:  # a task's own training runs (teacher pre-training) evaluate the same way
        found += config_problems(train, section)  # optimizer, LR schedule and loggers by name
        for key in ("select_metric", "select_tiebreak"):
            value = getattr(train, key)
            if value and names and value not in names:
                found.append(f"{section}.{key}={value!r}: not an eval metric of {cfg.task.name} ({', '.join(names)})")
    try:
        check_align_config(cfg.align, cfg.train.steps)
    except ConfigError as err:
        found.append(str(err))
    if found:
        raise ConfigError(found[0] if len(found) == 1 else f"{len(found)} config problems:\n  " + "\n  ".join(found))


def _shown(path: Path) -> str:
    """``path`` relative to the working directory when it is inside it."""
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def missing_recipe(path: Path) -> MissingFile:
    """The error for a recipe path that does not exist: names the recipes under ``configs/``
    (the working directory's, then alignkit's) with the same file name, or the closest name."""
    recipes = {p.resolve() for root in (Path.cwd() / "configs", REPO_ROOT / "configs") if root.is_dir()
               for p in root.rglob("*.y*ml")}
    same = sorted(_shown(p) for p in recipes if p.name == path.name)
    by_stem = {p.stem: _shown(p) for p in sorted(recipes)}
    if not same and (match := closest(path.stem, list(by_stem))):
        same = [by_stem[match]]
    hint = f"; did you mean {' or '.join(same)}?" if same else " (recipes are under configs/)"
    return MissingFile(f"{path}: no such recipe file{hint}")


def load_experiment(path: str | Path | None, overrides: list[str] | None = None) -> ExperimentConfig:
    if path and not Path(path).is_file():
        raise missing_recipe(Path(path))
    load_plugins()  # the registries must know every name the recipe may use
    cfg = type_model_options(load_config(ExperimentConfig, path, overrides, preset_dirs()))
    validate(cfg)
    return cfg


def type_model_options(cfg: ExperimentConfig) -> ExperimentConfig:
    """``cfg`` with each model's ``options`` mapping as its adapter's options dataclass (unknown
    or mistyped options fail here, naming the key; their range rules join :func:`validate`)."""
    return replace(cfg, student=typed_options(cfg.student, "student"), teacher=typed_options(cfg.teacher, "teacher"),
                   teachers={name: typed_options(model, f"teachers.{name}") for name, model in cfg.teachers.items()})


def save_resolved(cfg: ExperimentConfig, run_dir: Path) -> None:
    (run_dir / "config.yaml").write_text(to_yaml(cfg))
