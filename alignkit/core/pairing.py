"""Layer pairing: which teacher layer pulls which student layer (paper Figures 3/4, App. J).

Strategy names read <teacher position>2<student position>, with L = late (the final layer,
index -1), M = middle (block L//2), E = early (the student's early layer: ``early_layer`` of
the term, else the student adapter's ``align_layer``, else 3 as in the paper).
``L2E`` is the paper's LET. Explicit lists of pairs override the strategy.
"""
from __future__ import annotations

from dataclasses import dataclass

from alignkit.core.adapter import resolve_layer
from alignkit.core.config import STRATEGIES
from alignkit.core.errors import ConfigError

DEFAULT_EARLY_LAYER = 3  # paper App. B/J: the student's third layer


@dataclass(frozen=True)
class Pair:
    teacher_layer: int
    student_layer: int
    weight: float = 1.0
    teacher: str = "default"  # which teacher (several may be active)

    @property
    def name(self) -> str:
        prefix = "" if self.teacher == "default" else f"{self.teacher}:"
        return f"{prefix}t{self.teacher_layer}-s{self.student_layer}"


def _position(code: str, num_layers: int, early_layer: int) -> int:
    return {"L": -1, "M": max(1, num_layers // 2), "E": early_layer}[code]


def strategy_pairs(strategy: str, teacher_layers: int, student_layers: int, early_layer: int = DEFAULT_EARLY_LAYER,
                   teacher: str = "default", key: str = "align.strategy") -> list[Pair]:
    """One pair for a named strategy. M and L on the teacher side use the teacher's depth,
    E/M/L on the student side the student's."""
    if strategy not in STRATEGIES:
        raise ConfigError(f"{key}={strategy!r} is unknown (choose from {', '.join(STRATEGIES)} or give pairs)")
    teacher_code, student_code = strategy[0], strategy[2]
    return [
        Pair(
            teacher_layer=_position(teacher_code, teacher_layers, early_layer),
            student_layer=_position(student_code, student_layers, early_layer),
            teacher=teacher,
        )
    ]


def validate_pairs(pairs: list[Pair], teacher_layers: dict[str, int], student_layers: int, key: str = "align.pairs") -> None:
    """Raise ConfigError naming ``<key>.<i>.<field>`` for an unknown teacher or an out-of-range layer."""
    if not pairs:
        raise ConfigError(f"{key}: no layer pairs to align (give a strategy or explicit pairs)")
    for i, pair in enumerate(pairs):
        if pair.teacher not in teacher_layers:
            raise ConfigError(f"{key}.{i}.teacher={pair.teacher!r} names no configured teacher "
                              f"(known: {', '.join(sorted(teacher_layers))})")
        resolve_layer(pair.teacher_layer, teacher_layers[pair.teacher], f"{key}.{i}.teacher_layer")
        resolve_layer(pair.student_layer, student_layers, f"{key}.{i}.student_layer")
