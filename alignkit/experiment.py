"""The experiment schema (what a recipe YAML may set) and how it is loaded and validated.

A recipe composes presets by name: ``student.preset`` / ``teacher.preset`` / ``teachers.<name>.preset``
name files in ``adapters/``, ``task.preset`` a file in ``tasks/``. Fields set in the recipe
override the preset's, and ``a.b=c`` command-line overrides override both.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from alignkit.core.config import AlignConfig, ConfigError, ModelConfig, TrainConfig, load_config, to_yaml
from alignkit.core.engine import check_align_config
from alignkit.tasks.text_data import TextDataConfig
from alignkit.tasks.uea import UEADataConfig

REPO_ROOT = Path(__file__).resolve().parents[1]


def _teacher_pretrain_default() -> TrainConfig:
    return TrainConfig(steps=600, micro_batch_size=32, lr=1e-3, eval_every=50, select_metric="val_accuracy")


@dataclass
class TaskConfig:
    preset: str = ""
    name: str = "text_pretrain"  # text_pretrain | ts_classify
    seq_len: int = 256  # text: tokens per sequence
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


TASK_NAMES = ("text_pretrain", "ts_classify")


def validate(cfg: ExperimentConfig) -> None:
    """Checks that need no model (layer ranges and widths are checked when models exist)."""
    if cfg.task.name not in TASK_NAMES:
        raise ConfigError(f"task.name={cfg.task.name!r} is unknown (choose from {', '.join(TASK_NAMES)})")
    train = cfg.train
    for key in ("steps", "micro_batch_size", "grad_accum"):
        if getattr(train, key) < 1:
            raise ConfigError(f"train.{key} must be >= 1, got {getattr(train, key)}")
    if train.precision not in ("float32", "bfloat16"):
        raise ConfigError(f"train.precision={train.precision!r} must be float32 or bfloat16")
    if train.device not in ("auto", "cpu", "cuda"):
        raise ConfigError(f"train.device={train.device!r} must be auto, cpu or cuda")
    if cfg.task.name == "text_pretrain" and cfg.task.seq_len < 2:
        raise ConfigError(f"task.seq_len must be >= 2, got {cfg.task.seq_len}")
    check_align_config(cfg.align, train.steps)
    for role, model in [("student", cfg.student), ("teacher", cfg.teacher)] + [
        (f"teachers.{n}", m) for n, m in cfg.teachers.items()
    ]:
        if model.final_layer not in ("post_norm", "pre_norm"):
            raise ConfigError(f"{role}.final_layer={model.final_layer!r} must be post_norm or pre_norm")


def load_experiment(path: str | Path | None, overrides: list[str] | None = None) -> ExperimentConfig:
    cfg = load_config(ExperimentConfig, path, overrides, preset_dirs())
    validate(cfg)
    return cfg


def save_resolved(cfg: ExperimentConfig, run_dir: Path) -> None:
    (run_dir / "config.yaml").write_text(to_yaml(cfg))
