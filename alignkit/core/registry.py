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
from typing import Any, Callable, Generic, Iterator, TypeVar

from alignkit.core.adapter import DataInfo
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
    (``data``: the :class:`~alignkit.core.adapter.DataInfo` the task reported) and the
    dataclass that ``cfg.options`` must fit (None: the adapter takes no options)."""

    student: Callable[..., Any] | None = None
    teacher: Callable[..., Any] | None = None
    options: type | None = None


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
) -> None:
    """Register the builders (and options dataclass) of the model family ``kind``: each is
    called as ``builder(cfg, device=..., data=DataInfo(...))``."""
    ADAPTERS.register(kind, AdapterSpec(student, teacher, options), replace=replace)


def typed_options(cfg: Any, key: str) -> Any:
    """``cfg`` (a ModelConfig at config key ``key``) with ``options`` turned into its adapter's
    options dataclass: an unknown or mistyped option is a ConfigError naming
    ``<key>.options.<name>`` and the valid names."""
    spec = ADAPTERS.get(cfg.kind, f"{key}.kind")
    if spec.options is None:
        if cfg.options:
            raise ConfigError(f"{key}.options: adapter {cfg.kind!r} takes no options (got {sorted(cfg.options)})")
        return cfg
    return replace(cfg, options=structured(spec.options, cfg.options, f"{key}.options"))


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
