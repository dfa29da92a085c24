"""Adapter registry: maps a model config's ``kind`` to builders, so downstream projects can add
modalities without touching the core (``register_adapter("mykind", student=..., teacher=...)``)."""
from __future__ import annotations

from typing import Any, Callable

from alignkit.core.errors import ConfigError

_STUDENTS: dict[str, Callable[..., Any]] = {}
_TEACHERS: dict[str, Callable[..., Any]] = {}


def register_adapter(
    kind: str,
    student: Callable[..., Any] | None = None,
    teacher: Callable[..., Any] | None = None,
) -> None:
    """Register builders ``student(cfg, **context)`` / ``teacher(cfg, **context)`` for ``kind``."""
    if student is not None:
        _STUDENTS[kind] = student
    if teacher is not None:
        _TEACHERS[kind] = teacher


def _lookup(table: dict[str, Callable[..., Any]], kind: str, role: str) -> Callable[..., Any]:
    if kind not in table:
        known = ", ".join(sorted(table)) or "none registered"
        raise ConfigError(f"{role}.kind={kind!r} is not a registered adapter (known: {known})")
    return table[kind]


def build_student(cfg: Any, **context: Any) -> Any:
    return _lookup(_STUDENTS, cfg.kind, "student")(cfg, **context)


def build_teacher(cfg: Any, **context: Any) -> Any:
    return _lookup(_TEACHERS, cfg.kind, "teacher")(cfg, **context)
