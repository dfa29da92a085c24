"""Layer pairing: which teacher layer pulls which student layer (paper Figures 3/4, App. J).

Strategy names read <teacher position>2<student position>, with L = late (the final layer,
index -1), M = middle (block L//2), E = early (the student's ``early_layer``, paper: 3).
``L2E`` is the paper's LET. Explicit lists of pairs override the strategy.
"""
from __future__ import annotations

from dataclasses import dataclass

from alignkit.core.errors import ConfigError
from alignkit.core.adapter import resolve_layer

STRATEGIES = ("L2E", "L2M", "L2L", "M2E", "M2M", "M2L")


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


def strategy_pairs(strategy: str, teacher_layers: int, student_layers: int, early_layer: int = 3) -> list[Pair]:
    """One pair for a named strategy. M and L on the teacher side use the teacher's depth,
    E/M/L on the student side the student's."""
    if strategy not in STRATEGIES:
        raise ConfigError(f"align.strategy={strategy!r} is unknown (choose from {', '.join(STRATEGIES)} or give align.pairs)")
    teacher_code, student_code = strategy[0], strategy[2]
    if teacher_code == "E":
        raise ConfigError("align.strategy: the teacher side must be L or M")
    return [
        Pair(
            teacher_layer=_position(teacher_code, teacher_layers, early_layer),
            student_layer=_position(student_code, student_layers, early_layer),
        )
    ]


def validate_pairs(pairs: list[Pair], teacher_layers: dict[str, int], student_layers: int) -> None:
    """Raise ValueError naming ``align.pairs[i].<field>`` for any out-of-range layer."""
    if not pairs:
        raise ConfigError("align.pairs: no layer pairs to align (give a strategy or explicit pairs)")
    for i, pair in enumerate(pairs):
        if pair.teacher not in teacher_layers:
            raise ConfigError(f"align.pairs[{i}].teacher={pair.teacher!r} names no configured teacher "
                             f"(known: {sorted(teacher_layers)})")
        resolve_layer(pair.teacher_layer, teacher_layers[pair.teacher], f"align.pairs[{i}].teacher_layer")
        resolve_layer(pair.student_layer, student_layers, f"align.pairs[{i}].student_layer")
        if pair.weight < 0:
            raise ConfigError(f"align.pairs[{i}].weight must be >= 0, got {pair.weight}")
