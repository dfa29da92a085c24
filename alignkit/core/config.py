"""Typed config schema (dataclasses) and the YAML loader.

YAML (omegaconf) only sets values: every key must exist in a dataclass below (or in the
experiment schema that composes them), or loading fails naming the key. Precedence, lowest
first: preset YAML (``preset: name`` inside a section) < the recipe file < ``a.b=c`` overrides.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional, TypeVar

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException

T = TypeVar("T")


class ConfigError(ValueError):
    """A config problem; the message names the key (or file) to fix."""


@dataclass
class ModelConfig:
    """One model (student or teacher). ``preset`` names a YAML in adapters/ whose values are
    merged under the fields set here."""

    preset: str = ""
    kind: str = "hf_causal"  # registry key: hf_causal | timesnet | hf_ts_classifier | (yours)
    source: str = "config"  # config (random init from `arch`) | pretrained (hub id or dir) | gguf | checkpoint
    name_or_path: str = ""  # hub id, local dir, "pkg:<python package>" (dir of an installed package), or run dir
    gguf_file: str = ""  # GGUF file name inside name_or_path (source=gguf)
    arch: dict[str, Any] = field(default_factory=dict)  # HF config fields (model_type, hidden_size, ...) for source=config
    tokenizer: str = ""  # where the tokenizer comes from; "" = same as the model
    final_layer: str = "post_norm"  # what layer -1 means: post_norm (HF hidden_states[-1]) | pre_norm
    dtype: str = "float32"  # float32 | bfloat16 | float16 (teacher weights)
    trust_remote_code: bool = False
    options: dict[str, Any] = field(default_factory=dict)  # adapter-specific settings


@dataclass
class PairConfig:
    teacher_layer: int = -1
    student_layer: int = 3
    weight: float = 1.0
    teacher: str = "default"


@dataclass
class AlignConfig:
    method: str = "let"  # none | let | rkd | salt
    strategy: str = "L2E"  # L2E | L2M | L2L | M2E | M2M | M2L (ignored when `pairs` is given)
    # the student's "early" layer for E strategies; None = the student adapter's default
    # (`align_layer` attribute: 3 for causal LMs as in the paper, a quarter of the depth for
    # time-series students as in App. E)
    early_layer: Optional[int] = None
    pairs: list[PairConfig] = field(default_factory=list)
    objective: str = "cosine"  # cosine | logsum | cca | mse
    logsum_alpha: float = 4.0
    projection: str = "interpolate"  # interpolate | linear | none
    lambda0: float = 0.1
    schedule: str = "linear_decay"  # linear_decay | constant | cosine | step
    stop_step: int = 1500
    kd_weight: float = 1.0  # rkd / salt: weight of the logit-KD term
    kd_temperature: float = 1.0
    n_kd: int = -1  # salt: KD for the first n_kd steps; -1 = stop_step


@dataclass
class TrainConfig:
    steps: int = 1000
    micro_batch_size: int = 8
    grad_accum: int = 1
    lr: float = 4e-4
    warmup_ratio: float = 0.1
    min_lr_ratio: float = 0.1
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.01
    clip_grad: float = 1.0
    precision: str = "float32"  # float32 | bfloat16 (autocast; weights stay fp32)
    device: str = "auto"  # auto | cpu | cuda
    seed: int = 0
    log_every: int = 1
    eval_every: int = 100  # 0 = only at the end
    save_every: int = 0  # 0 = only at the end (and on interruption)
    keep_checkpoints: int = 2
    select_metric: str = ""  # e.g. "val_accuracy": keep and export the best model by it
    select_mode: str = "max"
    ema_decay: float = 0.0  # > 0: evaluate, select and export an EMA of the weights
    select_tiebreak: str = ""  # e.g. "val_loss": lower wins among evals equal on select_metric
    parallel: str = "auto"  # auto (ddp for > 1 process) | none | ddp | fsdp (FSDP2: sharded weights, grads, optimizer)
    activation_checkpointing: bool = False  # recompute each block's activations in backward
    compile: bool = False  # torch.compile each block
    global_batch_size: int = 0  # sequences per optimizer step over all processes; 0 = micro_batch_size x grad_accum x processes


def _read_yaml(path: Path, key: str) -> DictConfig:
    if not path.is_file():
        raise ConfigError(f"{key}: file not found: {path}")
    try:
        loaded = OmegaConf.load(path)
    except Exception as err:  # YAML syntax errors come in several exception types
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    if not isinstance(loaded, DictConfig):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    return loaded


def find_preset(name: str, directories: list[Path], key: str, relative_to: Path | None = None) -> Path:
    """A preset is a YAML path (absolute, or relative to the recipe / cwd) or a file stem in
    one of ``directories`` (plus ``$ALIGNKIT_PRESET_PATH``)."""
    candidate = Path(name)
    if candidate.suffix in (".yaml", ".yml"):
        for base in ([relative_to] if relative_to else []) + [Path.cwd()]:
            if (base / candidate).is_file():
                return base / candidate
        if candidate.is_file():
            return candidate
    extra = [Path(p) for p in os.environ.get("ALIGNKIT_PRESET_PATH", "").split(os.pathsep) if p]
    searched = extra + directories
    for directory in searched:
        for suffix in (".yaml", ".yml"):
            if (directory / f"{name}{suffix}").is_file():
                return directory / f"{name}{suffix}"
    available = sorted({p.stem for d in searched if d.is_dir() for p in d.glob("*.y*ml")})
    raise ConfigError(f"{key}={name!r}: no such preset (available: {', '.join(available) or 'none'})")


def _resolve_presets(node: Any, preset_dirs: Mapping[str, list[Path]], path: str, recipe_dir: Path | None) -> Any:
    """Depth-first: a mapping with a ``preset`` key is merged over that preset's YAML."""
    if not isinstance(node, DictConfig):
        return node
    for key in list(node.keys()):
        node[key] = _resolve_presets(node[key], preset_dirs, f"{path}.{key}" if path else str(key), recipe_dir)
    preset = node.get("preset") if "preset" in node else None
    section = path.split(".")[0] if path else ""  # teachers.<name> uses the "teachers" dirs
    if preset and section in preset_dirs:
        preset_file = find_preset(str(preset), preset_dirs[section], f"{path}.preset", recipe_dir)
        base = _read_yaml(preset_file, f"{path}.preset")
        if "preset" in base:
            raise ConfigError(f"{preset_file}: a preset may not name another preset")
        node = OmegaConf.merge(base, node)
    return node


def load_config(
    schema: type[T],
    path: str | Path | None,
    overrides: list[str] | None = None,
    preset_dirs: Mapping[str, list[Path]] | None = None,
) -> T:
    """Load ``path`` (YAML) + ``overrides`` (``a.b=c``) into an instance of ``schema``.

    ``preset_dirs`` maps a section name (e.g. ``student``) to the folders its presets live in."""
    raw = _read_yaml(Path(path), "config") if path else OmegaConf.create({})
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key=value (e.g. train.steps=10)")
    try:
        raw = OmegaConf.merge(raw, OmegaConf.from_dotlist(list(overrides or [])))
    except OmegaConfBaseException as err:
        raise ConfigError(f"bad override: {err}") from None
    recipe_dir = Path(path).resolve().parent if path else None
    raw = _resolve_presets(raw, preset_dirs or {}, "", recipe_dir)
    try:
        merged = OmegaConf.merge(OmegaConf.structured(schema), raw)
        return OmegaConf.to_object(merged)  # type: ignore[return-value]
    except (ConfigKeyError, ConfigAttributeError) as err:
        key = getattr(err, "full_key", None) or str(err).split("\n")[0]
        raise ConfigError(f"unknown config key '{key}' (check spelling; see README config reference)") from None
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", "")
        message = str(err).split("\n")[0]
        raise ConfigError(f"config key '{key}': {message}") from None


def to_yaml(cfg: Any) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))
