"""Open registries: every name a recipe may use for a component maps to code through one of
these tables, so downstream projects add components without touching alignkit.

  ADAPTERS     ``student.kind`` / ``teacher.kind``   -> :class:`AdapterSpec` (builders + options dataclass)
  TASKS        ``task.name``                         -> the task's spec (config dataclass + builder)
  OBJECTIVES   a feature term's ``objective``        -> ``f(s, t, mask, **options) -> loss``
  PROJECTIONS  a feature term's ``projection``       -> ``f(student_width, teacher_width, key) -> nn.Module``
  SCHEDULES    a term's ``schedule``                 -> ``f(lambda0, stop_step) -> (step -> weight)``
  OPTIMIZERS   ``train.optimizer``                   -> ``f(param_groups, train_cfg, device) -> Optimizer``
  LR_SCHEDULES ``train.lr_schedule``                 -> ``f(peak, total_steps, warmup_steps, min_ratio) -> (step -> lr)``
  LOGGERS      an entry of ``train.loggers``         -> ``f(*, run_dir) -> Callback`` (see core/callbacks.py)

Plug-ins: :func:`alignkit.plugins.load_plugins` imports every module named in ``$ALIGNKIT_PLUGINS`` (comma
separated) and calls every entry point of the group ``alignkit.plugins``; either registers its
components at import (``OBJECTIVES.register("mine", fn)``) or in the function the entry point names.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Generic, Iterator, TypeVar

from alignkit.core.adapter import DataInfo, ModelShape
from alignkit.core.config import did_you_mean, structured
from alignkit.core.errors import ConfigError

T = TypeVar("T")
PLUGIN_GROUP = "alignkit.plugins"
PLUGIN_ENV = "ALIGNKIT_PLUGINS"


class Registry(Generic[T]):
    """Names -> components of one kind. A name is registered once; ``replace=True`` says an
    override of a built-in is meant."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str, item: T | None = None, *, replace: bool = False) -> Any:
        """``register("x", thing)``, or ``@register("x")`` as a decorator."""
        if item is None:
            return lambda thing: self.register(name, thing, replace=replace)
        if name in self._items and not replace and self._items[name] is not item:
            raise ConfigError(f"{self.kind} {name!r} is already registered (pass replace=True to override it)")
        self._items[name] = item
        return item

    def get(self, name: str, key: str) -> T:
        """The component called ``name``; ``key`` is the config key that named it (for the error)."""
        if name not in self._items:
            known = ", ".join(sorted(self._items)) or "none registered"
            raise ConfigError(f"{key}={name!r} is not a registered {self.kind}{did_you_mean(name, self.names())} (known: {known})")
        return self._items[name]

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())


@dataclass(frozen=True)
class AdapterSpec:
    """One model family: builders ``student(cfg, *, device, data)`` / ``teacher(cfg, *, device, data)``
    (``data``: the :class:`~alignkit.core.adapter.DataInfo` the task reported), the dataclass
    that ``cfg.options`` must fit (None: the adapter takes no options), and its capabilities,
    each None where the family has none (what the generic code then does is said per field):

    * ``check_options(options, key)``: rules the dataclass cannot state (e.g. keys of a nested
      mapping); raises a ConfigError naming ``<key>.options.<name>``.
    * ``weight_files(cfg)``: the local files a model's weights come from (the teacher cache's
      key); None: the cache keys on the config only.
    * ``tokenizer(cfg)``: the model's tokenizer (text tasks); None: the family reads no text.
    * ``hub_tokenizer(cfg)``: the hub id ``tokenizer(cfg)`` would download from, "" when it loads
      without the network; ``alignkit check`` (offline) loads only the latter. None: unknown, so
      ``check`` loads none of the family's tokenizers and says so in a note (it never goes online).
    * ``teacher_from_student(student)``: the family's student wrapped as a frozen teacher; it
      says that a teacher of this kind without ``name_or_path`` has no weights: the task's teacher
      stage pre-trains it (:mod:`alignkit.teacher_stage`), and ``check`` builds it untrained.
    * ``memory_shape(model)``: the :class:`~alignkit.core.adapter.ModelShape` of a built
      student or teacher (also on the meta device) for the memory estimate of ``check``; None:
      memory is not estimated for this family.
    """

    student: Callable[..., Any] | None = None
    teacher: Callable[..., Any] | None = None
    options: type | None = None
    check_options: Callable[[Any, str], None] | None = None
    weight_files: Callable[[Any], list[Path]] | None = None
    tokenizer: Callable[[Any], Any] | None = None
    hub_tokenizer: Callable[[Any], str] | None = None
    teacher_from_student: Callable[[Any], Any] | None = None
    memory_shape: Callable[[Any], ModelShape] | None = None


ADAPTERS: Registry[AdapterSpec] = Registry("adapter")
TASKS: Registry[Any] = Registry("task")
OBJECTIVES: Registry[Callable[..., Any]] = Registry("objective")
PROJECTIONS: Registry[Callable[..., Any]] = Registry("projection")
SCHEDULES: Registry[Callable[..., Any]] = Registry("schedule")
OPTIMIZERS: Registry[Callable[..., Any]] = Registry("optimizer")
LR_SCHEDULES: Registry[Callable[..., Any]] = Registry("learning-rate schedule")
LOGGERS: Registry[Callable[..., Any]] = Registry("logger")


def register_adapter(
    kind: str,
    student: Callable[..., Any] | None = None,
    teacher: Callable[..., Any] | None = None,
    options: type | None = None,
    *,
    replace: bool = False,
    **capabilities: Any,
) -> None:
    """Register the builders (and options dataclass) of the model family ``kind``: each is
    called as ``builder(cfg, device=..., data=DataInfo(...))``; ``capabilities`` are the other
    fields of :class:`AdapterSpec`."""
    ADAPTERS.register(kind, AdapterSpec(student, teacher, options, **capabilities), replace=replace)


def adapter_spec(cfg: Any, key: str) -> AdapterSpec:
    """The spec of the family ``cfg.kind`` (a ModelConfig at config key ``key``)."""
    return ADAPTERS.get(cfg.kind, f"{key}.kind")


def typed_options(cfg: Any, key: str) -> Any:
    """``cfg`` (a ModelConfig at config key ``key``) with ``options`` turned into its adapter's
    options dataclass: an unknown or mistyped option is a ConfigError naming
    ``<key>.options.<name>`` and the valid names."""
    spec = adapter_spec(cfg, key)
    if spec.options is None:
        if cfg.options:
            raise ConfigError(f"{key}.options: adapter {cfg.kind!r} takes no options (got {sorted(cfg.options)})")
        return cfg
    typed = replace(cfg, options=structured(spec.options, cfg.options, f"{key}.options"))
    if spec.check_options is not None:
        spec.check_options(typed.options, key)
    return typed


def build_student(cfg: Any, *, device: Any = "cpu", data: DataInfo = DataInfo()) -> Any:
    """The student ``cfg`` describes, sized by what the data reports (``data``)."""
    builder = ADAPTERS.get(cfg.kind, "student.kind").student
    if builder is None:
        raise ConfigError(f"student.kind={cfg.kind!r} has no student builder (it is a teacher-only adapter)")
    return builder(typed_options(cfg, "student"), device=device, data=data)


def build_teacher(cfg: Any, *, device: Any = "cpu", data: DataInfo = DataInfo(), key: str = "teacher") -> Any:
    """The frozen teacher ``cfg`` describes; ``key`` names its config section in errors."""
    builder = ADAPTERS.get(cfg.kind, f"{key}.kind").teacher
    if builder is None:
        raise ConfigError(f"{key}.kind={cfg.kind!r} has no teacher builder (it is a student-only adapter)")
    return builder(typed_options(cfg, key), device=device, data=data)
