"""Typed config schema (dataclasses) and the YAML loader.

YAML (omegaconf) only sets values: every key must exist in a dataclass below (or in the
experiment schema that composes them), or loading fails naming the key. Precedence, lowest
first: preset YAML (``preset: name`` inside a section) < the recipe file < ``a.b=c`` overrides.
Overrides may index lists (``train.betas.0=0.8``, ``align.pairs.0.teacher_layer=1``).

Every field carries its own range or choice check (``checked(default, rule)``); :func:`problems`
walks a loaded config and returns every violation at once, NaN and infinities included.
"""
from __future__ import annotations

import difflib
import functools
import math
import os
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence, TypeVar

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException

from alignkit.core.errors import ConfigError

T = TypeVar("T")
Rule = Callable[[Any], Optional[str]]  # value -> None if fine, else what is wrong


def checked(default: Any = None, rule: Rule | None = None, factory: Callable[[], Any] | None = None) -> Any:
    """A dataclass field with a validation rule (see :func:`problems`)."""
    if factory is not None:
        return field(default_factory=factory, metadata={"rule": rule})
    return field(default=default, metadata={"rule": rule})


def at_least(low: float) -> Rule:
    return lambda v: None if v >= low else f"must be >= {low}"


def at_most(high: float, why: str = "") -> Rule:
    return lambda v: None if v <= high else f"must be <= {high}" + (f" ({why})" if why else "")


def all_of(*rules: Rule) -> Rule:
    """The first problem any of ``rules`` finds."""
    return lambda v: next((m for rule in rules if (m := rule(v))), None)


def above(low: float) -> Rule:
    return lambda v: None if v > low else f"must be > {low}"


def between(low: float, high: float, high_open: bool = False) -> Rule:
    bracket = ")" if high_open else "]"
    return lambda v: None if low <= v and (v < high if high_open else v <= high) else f"must be in [{low}, {high}{bracket}"


def one_of(*choices: Any) -> Rule:
    return lambda v: None if v in choices else f"must be one of {', '.join(map(str, choices))}"


def each(rule: Rule) -> Rule:
    return lambda values: next((f"item {i} {m}" for i, v in enumerate(values) if (m := rule(v))), None)


def _non_finite(value: Any) -> bool:
    if isinstance(value, float):
        return not math.isfinite(value)
    return isinstance(value, (list, tuple)) and any(_non_finite(v) for v in value)


def problems(obj: Any, prefix: str = "") -> list[str]:
    """Every field of the dataclass ``obj`` (recursively) that breaks its rule, as ``key=value: why``."""
    found: list[str] = []
    for spec in fields(obj):
        key, value = f"{prefix}{spec.name}", getattr(obj, spec.name)
        rule = spec.metadata.get("rule")
        if _non_finite(value):
            found.append(f"{key}={value}: must be a finite number")
        elif rule is not None and value is not None and (why := rule(value)):
            found.append(f"{key}={value!r}: {why}")
        if is_dataclass(value):
            found += problems(value, f"{key}.")
        elif isinstance(value, list):
            for i, item in enumerate(value):
                found += problems(item, f"{key}.{i}.") if is_dataclass(item) else []
        elif isinstance(value, dict):
            for name, item in value.items():
                found += problems(item, f"{key}.{name}.") if is_dataclass(item) else []
    return found


@dataclass
class ModelConfig:
    """One model (student or teacher). ``preset`` names a YAML in adapters/ whose values are
    merged under the fields set here. ``options`` holds the adapter's own settings: a mapping in
    YAML, checked against (and turned into) the options dataclass the adapter registered, so
    an unknown or mistyped option is an error naming the key."""

    preset: str = ""
    kind: str = "hf_causal"  # registry key: hf_causal | timesnet | hf_ts_classifier | (yours)
    source: str = checked("config", one_of("config", "pretrained", "gguf", "checkpoint"))  # config (random init, e.g. hf_causal options.arch) | pretrained (hub id or dir) | gguf | checkpoint
    name_or_path: str = ""  # hub id, local dir, "pkg:<python package>" (dir of an installed package), or run dir
    final_layer: str = checked("post_norm", one_of("post_norm", "pre_norm"))  # what layer -1 means: post_norm (HF hidden_states[-1]) | pre_norm
    dtype: str = checked("float32", one_of("float32", "bfloat16", "float16"))  # teacher weights
    options: Any = field(default_factory=dict)  # the adapter's options dataclass (a mapping in YAML)


@dataclass
class PairConfig:
    teacher_layer: int = -1
    student_layer: int = 3
    weight: float = checked(1.0, at_least(0))
    teacher: str = ""  # "" = the term's teacher (presets: the main one, `default`)


STRATEGIES = ("L2E", "L2M", "L2L", "M2E", "M2M", "M2L")
TERM_TYPES = ("feature", "logit_kd")
# a term's weight at step 0 and schedule when it does not set them (the one-word presets too)
TERM_DEFAULTS: dict[str, dict[str, Any]] = {"feature": {"lambda0": 0.1, "schedule": "linear_decay"},
                                            "logit_kd": {"lambda0": 1.0, "schedule": "constant"}}


@dataclass
class TermConfig:
    """One alignment term (``align.terms.<i>``). ``type: feature`` pulls student layers toward a
    teacher's layers; ``type: logit_kd`` distils the teacher's logits into the student's. Fields
    marked (feature) / (logit_kd) belong to that type only. Objective, projection and schedule
    names are registry names (:mod:`alignkit.core.registry`), checked when the config is validated."""

    type: str = checked("feature", one_of(*TERM_TYPES))
    teacher: str = "default"  # `default` = the `teacher` section; other names: entries of `teachers`
    pairs: list[PairConfig] = field(default_factory=list)  # (feature) explicit pairs; [] = `strategy`
    strategy: str = checked("L2E", one_of(*STRATEGIES))  # (feature)
    early_layer: Optional[int] = None  # (feature) E of the strategy; None: see AlignConfig.early_layer
    objective: str = "cosine"  # (feature) registered objective
    objective_options: dict[str, Any] = field(default_factory=dict)  # (feature) keyword options, e.g. {alpha: 4} for logsum
    projection: str = "interpolate"  # (feature) registered projection
    temperature: float = checked(1.0, above(0))  # (logit_kd)
    lambda0: Optional[float] = checked(None, at_least(0))  # weight at step 0; None: the type's TERM_DEFAULTS
    schedule: Optional[str] = None  # registered schedule; None: the type's TERM_DEFAULTS
    stop_step: int = checked(200, at_least(-1))  # weight 0 from here on; -1 = never (schedule `constant` only)


@dataclass
class AlignConfig:
    """Alignment: ``terms`` (a list of :class:`TermConfig`), or -- when ``terms`` is empty -- the
    one-word preset ``method`` with the fields below, which expands to terms
    (:func:`alignkit.core.terms.expand_terms`)."""

    terms: list[TermConfig] = field(default_factory=list)
    method: str = checked("let", one_of("none", "let", "rkd", "salt"))
    strategy: str = checked("L2E", one_of(*STRATEGIES))  # ignored when `pairs` is given
    # the student's "early" layer for E strategies; None = the student adapter's `align_layer`
    # (hf_ts_classifier: a quarter of its depth, as in App. E), else 3 (the paper's)
    early_layer: Optional[int] = None
    pairs: list[PairConfig] = field(default_factory=list)
    objective: str = "cosine"  # registered objective: cosine | logsum | cca | mse | (yours)
    logsum_alpha: float = checked(4.0, above(0))
    projection: str = "interpolate"  # registered projection: interpolate | linear | none | (yours)
    lambda0: float = checked(TERM_DEFAULTS["feature"]["lambda0"], above(0))
    schedule: str = TERM_DEFAULTS["feature"]["schedule"]  # registered schedule: linear_decay | constant | cosine | step | (yours)
    stop_step: int = checked(200, at_least(1))  # a fifth of the default run, as the paper's 1500 of 7630
    kd_weight: float = checked(TERM_DEFAULTS["logit_kd"]["lambda0"], at_least(0))  # rkd / salt: weight of the logit-KD term
    kd_temperature: float = checked(1.0, above(0))
    n_kd: int = checked(-1, at_least(-1))  # salt: KD for the first n_kd steps; -1 = stop_step
    # record the teachers' outputs into this folder on a first run, replay them on later runs
    # with the same teacher and batches (alignkit.core.teacher_cache); "" = off
    teacher_cache: str = ""
    teacher_cache_dtype: str = checked("bfloat16", one_of("bfloat16", "float32"))

    @functools.cached_property
    def expanded(self) -> tuple[Any, ...]:
        """The terms, every default filled in (:func:`alignkit.core.terms.expand_terms`): expanded
        once, when the config is validated, and kept (a config is never changed in place)."""
        from alignkit.core.terms import expand_terms  # terms.py builds on this schema

        return tuple(expand_terms(self))


# 31 years at 1000 steps/s; step-derived numbers (warm-up steps, float64 metrics, JSON) stay
# exact far below 2**53, and a typo such as 10**29 fails here instead of deep in torch
MAX_STEPS = 10**12


@dataclass
class TrainConfig:
    steps: int = checked(1000, all_of(at_least(1), at_most(MAX_STEPS, "31 years at 1000 steps/s")))
    micro_batch_size: int = checked(8, at_least(1))
    grad_accum: int = checked(1, at_least(1))
    optimizer: str = "adamw"  # registry key (core/optim.py): adamw | adam | sgd (momentum betas[0]) | (yours)
    lr: float = checked(4e-4, above(0))
    lr_schedule: str = "warmup_cosine"  # registry key (core/optim.py): warmup_cosine | warmup_linear | constant | (yours)
    warmup_ratio: float = checked(0.1, between(0, 1))
    min_lr_ratio: float = checked(0.1, between(0, 1))
    betas: tuple[float, float] = checked((0.9, 0.999), each(between(0, 1, high_open=True)))
    weight_decay: float = checked(0.01, at_least(0))
    clip_grad: float = checked(1.0, at_least(0))  # 0 = no clipping
    precision: str = checked("float32", one_of("float32", "bfloat16"))  # autocast; weights stay fp32
    device: str = checked("auto", one_of("auto", "cpu", "cuda"))
    seed: int = checked(0, at_least(0))
    log_every: int = checked(1, at_least(1))
    loggers: list[str] = field(default_factory=lambda: ["jsonl"])  # registry keys (core/callbacks.py): jsonl (metrics.jsonl) | tensorboard | (yours)
    eval_every: int = checked(100, at_least(0))  # 0 = only at the end
    save_every: int = checked(0, at_least(0))  # 0 = only at the end (and on interruption)
    keep_checkpoints: int = checked(2, at_least(0))  # 0 = keep all
    select_metric: str = ""  # e.g. "val_accuracy": keep and export the best model by it
    select_mode: str = checked("max", one_of("max", "min"))
    ema_decay: float = checked(0.0, between(0, 1, high_open=True))  # > 0: evaluate, select and export an EMA of the weights
    select_tiebreak: str = ""  # e.g. "val_loss": lower wins among evals equal on select_metric
    # Scale (see `alignkit check`): data/model parallelism, memory, and the global batch
    # auto = ddp for > 1 process; fsdp = FSDP2 (sharded weights, grads, optimizer)
    parallel: str = checked("auto", one_of("auto", "none", "ddp", "fsdp"))
    # fsdp with grad_accum > 1: reduce-scatter every micro-batch's gradients (sharded, more
    # communication) instead of only the last one's; off, FSDP2 keeps the unsharded fp32
    # gradients (4 bytes x all parameters per GPU) across the micro-batches
    fsdp_reduce_every_micro_batch: bool = False
    activation_checkpointing: bool = False  # recompute each block's activations in backward
    compile: bool = False  # torch.compile each block
    global_batch_size: int = checked(0, at_least(0))  # sequences per optimizer step over all processes; 0 = micro x accum x world
    num_processes: int = checked(1, at_least(1))  # the process count `alignkit check` estimates memory for (a hint)



def resolve_grad_accum(cfg: TrainConfig, world_size: int) -> int:
    """Micro-batches per optimizer step on each process. With ``global_batch_size`` set, the
    accumulation follows the process count so a recipe means the same training on any number
    of GPUs; otherwise ``grad_accum`` as given."""
    if cfg.global_batch_size <= 0:
        return cfg.grad_accum
    per_pass = cfg.micro_batch_size * world_size
    if cfg.global_batch_size % per_pass:
        raise ConfigError(
            f"train.global_batch_size={cfg.global_batch_size} is not a multiple of train.micro_batch_size x "
            f"processes = {cfg.micro_batch_size} x {world_size} = {per_pass}"
        )
    return cfg.global_batch_size // per_pass


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
    one of ``directories``, then in ``$ALIGNKIT_PRESET_PATH`` (searched after the shipped
    presets, so it adds presets but cannot silently replace one)."""
    candidate = Path(name)
    if candidate.suffix in (".yaml", ".yml"):
        for base in ([relative_to] if relative_to else []) + [Path.cwd()]:
            if (base / candidate).is_file():
                return base / candidate
        if candidate.is_file():
            return candidate
    extra = [Path(p) for p in os.environ.get("ALIGNKIT_PRESET_PATH", "").split(os.pathsep) if p]
    searched = directories + extra
    for directory in searched:
        for suffix in (".yaml", ".yml"):
            if (directory / f"{name}{suffix}").is_file():
                return directory / f"{name}{suffix}"
    available = sorted({p.stem for d in searched if d.is_dir() for p in d.glob("*.y*ml")})
    raise ConfigError(f"{key}={name!r}: no such preset{did_you_mean(name, available)} "
                      f"(available: {', '.join(available) or 'none'})")


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


def _is_indexed(key: str) -> bool:
    return any(part.isdigit() for part in key.split("."))


def _set_indexed(cfg: DictConfig, key: str, value: Any, item: str) -> None:
    """``a.b.2=v`` on a list or tuple field (tuples are immutable in omegaconf: the whole
    sequence is replaced), ``a.0.b=v`` on a list of sections."""
    parts = key.split(".")
    for i, part in enumerate(parts):
        if part.isdigit():
            prefix = ".".join(parts[:i])
            sequence = OmegaConf.select(cfg, prefix)
            if not isinstance(sequence, Sequence) or isinstance(sequence, str):
                raise ConfigError(f"override {item!r}: {prefix} is not a list")
            if int(part) >= len(sequence):
                raise ConfigError(f"override {item!r}: {prefix} has {len(sequence)} item(s); set the whole list instead")
    parent, _, last = key.rpartition(".")
    try:
        if last.isdigit():
            values = list(OmegaConf.to_container(OmegaConf.select(cfg, parent)))
            values[int(last)] = value
            OmegaConf.update(cfg, parent, values, merge=False)
        else:
            OmegaConf.update(cfg, key, value, merge=True)
    except OmegaConfBaseException as err:
        raise ConfigError(f"override {item!r}: {str(err).splitlines()[0]}") from None


def load_config(
    schema: type[T],
    path: str | Path | None,
    overrides: list[str] | None = None,
    preset_dirs: Mapping[str, list[Path]] | None = None,
) -> T:
    """Load ``path`` (YAML) + ``overrides`` (``a.b=c``) into an instance of ``schema``.

    ``preset_dirs`` maps a section name (e.g. ``student``) to the folders its presets live in.
    Overrides with a list index (``a.0.b=c``) apply after the merge, when the list exists."""
    raw = _read_yaml(Path(path), "config") if path else OmegaConf.create({})
    overrides = list(overrides or [])
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key=value (e.g. train.steps=10)")
    indexed = [item for item in overrides if _is_indexed(item.split("=", 1)[0])]
    try:
        raw = OmegaConf.merge(raw, OmegaConf.from_dotlist([o for o in overrides if o not in indexed]))
    except OmegaConfBaseException as err:
        raise ConfigError(f"bad override: {str(err).splitlines()[0]}") from None
    recipe_dir = Path(path).resolve().parent if path else None
    try:  # reading a node resolves its ${...}: a missing key or resolver is an error here
        raw = _resolve_presets(raw, preset_dirs or {}, "", recipe_dir)
        merged = OmegaConf.merge(OmegaConf.structured(schema), raw)
        for item in indexed:
            key = item.split("=", 1)[0]
            value = OmegaConf.from_dotlist([f"value={item.split('=', 1)[1]}"]).value
            _set_indexed(merged, key, value, item)
        return OmegaConf.to_object(merged)  # type: ignore[return-value]
    except OmegaConfBaseException as err:
        raise _config_error(err, "") from None


def structured(schema: type[T], values: Any, key: str) -> T:
    """``values`` (a mapping, or already a ``schema``) as an instance of the dataclass
    ``schema``; ``key`` is where the values sit in the config (``student.options``), so an
    unknown key or a wrong type is reported as ``student.options.<name>``."""
    if isinstance(values, schema):
        return values
    if values is None:
        values = {}
    if not isinstance(values, Mapping) and not is_dataclass(values):
        raise ConfigError(f"{key}: expected a mapping of {schema.__name__} fields, got {values!r}")
    try:
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(schema), values))  # type: ignore[return-value]
    except OmegaConfBaseException as err:
        raise _config_error(err, f"{key}.", schema) from None


def closest(word: str, choices: Sequence[str]) -> str | None:
    """The choice a mistyped ``word`` most likely meant, or None when none is close."""
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return close[0] if close else None


def did_you_mean(word: str, choices: Sequence[str], key: str = "") -> str:
    """``"; did you mean 'x'?"`` for the :func:`closest` choice (written as ``key`` with its last
    part replaced, when given), or "" when none is close."""
    match = closest(word, choices)
    if match is None:
        return ""
    return f"; did you mean '{key.rpartition('.')[0] + '.' if '.' in key else ''}{match}'?"


def _config_error(err: OmegaConfBaseException, prefix: str, schema: type | None = None) -> ConfigError:
    """One line naming the full key (``prefix`` + omegaconf's key) and, for an unknown key, the
    closest valid one and all valid ones (of ``schema``, else of the section omegaconf names)."""
    key = prefix + str(getattr(err, "full_key", None) or str(err).split("\n")[0])
    if isinstance(err, (ConfigKeyError, ConfigAttributeError)):
        owner = schema or getattr(err, "object_type", None)
        if owner is None or not is_dataclass(owner):
            return ConfigError(f"unknown config key '{key}' (check spelling; see README config reference)")
        names = [f.name for f in fields(owner)]
        return ConfigError(f"unknown config key '{key}'{did_you_mean(str(err.key), names, key)} (valid: {', '.join(names)})")
    return ConfigError(f"config key '{key}': {str(err).splitlines()[0]}")


def to_yaml(cfg: Any) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))
