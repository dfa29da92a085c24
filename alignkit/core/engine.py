"""The alignment engine: turns student features + teacher features + the step into the
auxiliary loss, and owns the teachers' lifecycle.

Methods (``align.method``):
  let   feature alignment of each pair, weight lambda(step) * pair.weight (paper Alg. 1)
  rkd   logit KD from the (small) teacher for the whole run (paper eq. 2)
  salt  logit KD for the first ``n_kd`` steps, then plain training (Rawat et al. 2024)
  none  plain training: no engine is built at all.
The teachers run only while some term's weight is above zero and are released (their memory
returned) at the release step, so from then on a run costs what a plain run costs.
"""
from __future__ import annotations

import gc
from typing import Callable

import torch
from torch import Tensor, nn

from alignkit.core.adapter import Batch, StudentOutput, TeacherAdapter, align_teacher, alignment_mask
from alignkit.core.config import AlignConfig, ConfigError
from alignkit.core.objectives import cosine_similarity, get_objective, kd, logsum
from alignkit.core.pairing import Pair, strategy_pairs, validate_pairs
from alignkit.core.projections import build_projection
from alignkit.core.schedules import Schedule, build_weight_schedule

METHODS = ("none", "let", "rkd", "salt")


class AlignmentEngine(nn.Module):
    """Holds the projections (trainable for ``linear``) as submodules; teachers are kept
    outside the module tree so they never enter the optimizer, DDP or checkpoints."""

    def __init__(
        self,
        teachers: dict[str, TeacherAdapter],
        pairs: list[Pair],
        projections: list[nn.Module],
        objective: Callable[..., Tensor],
        weight: Schedule,
        method: str = "let",
        release_step: int | None = None,
        kd_weight: float = 0.0,
        kd_temperature: float = 1.0,
        kd_steps: int | None = None,
    ) -> None:
        super().__init__()
        self.teachers = dict(teachers)
        self.pairs = pairs if method == "let" else []
        self.projections = nn.ModuleList(projections if method == "let" else [])
        self.objective = objective
        self.weight = weight
        self.method = method
        self.release_step = release_step
        self.kd_weight_value = kd_weight if method in ("rkd", "salt") else 0.0
        self.kd_temperature = kd_temperature
        self.kd_steps = kd_steps  # None = whole run
        self.released = False

    # --- what is active when -------------------------------------------------------------
    def feature_weight(self, step: int) -> float:
        return self.weight(step) if self.pairs else 0.0

    def kd_weight(self, step: int) -> float:
        if self.kd_steps is not None and step >= self.kd_steps:
            return 0.0
        return self.kd_weight_value

    def active(self, step: int) -> bool:
        return not self.released and (self.feature_weight(step) > 0 or self.kd_weight(step) > 0)

    def student_layers(self, step: int) -> list[int]:
        """Student layers to tap at this step (none once alignment is over: no hook cost)."""
        if self.feature_weight(step) <= 0:
            return []
        return sorted({pair.student_layer for pair in self.pairs})

    def _teacher_layers(self) -> dict[str, list[int]]:
        needed: dict[str, set[int]] = {}
        for pair in self.pairs:
            needed.setdefault(pair.teacher, set()).add(pair.teacher_layer)
        return {name: sorted(layers) for name, layers in needed.items()}

    # --- the loss --------------------------------------------------------------------------
    def forward(self, out: StudentOutput, batch: Batch, step: int) -> tuple[Tensor, dict[str, Tensor]]:
        """Auxiliary loss to add to the student's task loss, and its metrics (detached)."""
        zero = out.loss.new_zeros(())
        lam, kd_w = self.feature_weight(step), self.kd_weight(step)
        metrics: dict[str, Tensor] = {"lambda": zero + lam}
        if self.released or (lam <= 0 and kd_w <= 0):
            return zero, metrics
        mask = alignment_mask(batch)
        features, teacher_logits = self._run_teachers(batch, want_logits=kd_w > 0, want_features=lam > 0)
        total = zero
        for pair, projection in zip(self.pairs, self.projections):
            if lam <= 0:
                break
            student = projection(out.features[pair.student_layer].float())
            teacher = align_teacher(features[pair.teacher][pair.teacher_layer].float(), batch)
            value = self.objective(student, teacher, mask)
            total = total + lam * pair.weight * value
            metrics[f"align/{pair.name}"] = value.detach()
            metrics[f"cos/{pair.name}"] = cosine_similarity(student.detach(), teacher, mask)
        if kd_w > 0:
            logits = out.get_logits()
            if logits is None:
                raise RuntimeError("align.method needs student logits but the student returned none")
            value = kd(logits, teacher_logits, alignment_mask(batch), self.kd_temperature)
            total = total + kd_w * value
            metrics["kd"] = value.detach()
            metrics["kd_weight"] = zero + kd_w
        metrics["align_loss"] = total.detach()
        return total, metrics

    def _run_teachers(
        self, batch: Batch, want_logits: bool, want_features: bool
    ) -> tuple[dict[str, dict[int, Tensor]], Tensor | None]:
        layers = self._teacher_layers() if want_features else {}
        features: dict[str, dict[int, Tensor]] = {}
        logits = None
        if want_logits:
            # KD uses the default teacher's logits; its features come from the same pass.
            teacher = self.teachers["default"]
            features["default"], logits = teacher.features_and_logits(batch, layers.get("default", []))  # type: ignore[attr-defined]
            layers.pop("default", None)
        for name, wanted in layers.items():
            features[name] = self.teachers[name].features(batch, wanted)
        return features, logits

    # --- lifecycle -------------------------------------------------------------------------
    def after_step(self, step: int) -> bool:
        """Call after optimizer step ``step``; frees the teachers once they are no longer
        needed. Returns True on the step they were released."""
        if self.released or self.release_step is None or step + 1 < self.release_step:
            return False
        self.release()
        return True

    def release(self) -> None:
        for teacher in self.teachers.values():
            release = getattr(teacher, "release", None)
            if release is not None:
                release()
        self.teachers.clear()
        self.released = True
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


DEFAULT_EARLY_LAYER = 3  # paper App. B/J: the student's third layer


def build_pairs(cfg: AlignConfig, teacher_layers: dict[str, int], student_layers: int,
                early_layer: int = DEFAULT_EARLY_LAYER) -> list[Pair]:
    """Pairs from ``align.pairs`` or the named strategy; ``early_layer`` is used when
    ``align.early_layer`` is unset."""
    if cfg.pairs:
        pairs = [Pair(p.teacher_layer, p.student_layer, p.weight, p.teacher) for p in cfg.pairs]
    else:
        early = cfg.early_layer if cfg.early_layer is not None else early_layer
        pairs = strategy_pairs(cfg.strategy, teacher_layers["default"], student_layers, early)
    validate_pairs(pairs, teacher_layers, student_layers)
    return pairs


def release_step_for(cfg: AlignConfig) -> int | None:
    """The step from which no teacher is needed (None: needed for the whole run)."""
    if cfg.method == "let":
        return cfg.stop_step
    if cfg.method == "salt":
        return cfg.n_kd if cfg.n_kd >= 0 else cfg.stop_step
    return None


def check_align_config(cfg: AlignConfig, total_steps: int) -> None:
    """Checks that need no model: method names and steps against the run length."""
    if cfg.method not in METHODS:
        raise ConfigError(f"align.method={cfg.method!r} is unknown (choose from {', '.join(METHODS)})")
    if cfg.method == "none":
        return
    build_weight_schedule(cfg.schedule, cfg.lambda0, max(cfg.stop_step, 1))
    get_objective(cfg.objective)
    if cfg.method in ("let", "salt") and cfg.stop_step <= 0:
        raise ConfigError(f"align.stop_step must be > 0, got {cfg.stop_step}")
    release = release_step_for(cfg)
    if release is not None and release > total_steps:
        key = "align.stop_step" if cfg.method == "let" or cfg.n_kd < 0 else "align.n_kd"
        raise ConfigError(
            f"{key}={release} is beyond the run (train.steps={total_steps}): the teacher would "
            f"never be dropped; lower {key} or raise train.steps"
        )


def build_engine(cfg: AlignConfig, student: nn.Module, teachers: dict[str, TeacherAdapter]) -> AlignmentEngine | None:
    """The engine for ``cfg`` (None for method ``none``). ``teachers`` maps names to adapters;
    the main one is ``default``."""
    if cfg.method == "none":
        return None
    if "default" not in teachers:
        raise ConfigError(f"align.method={cfg.method!r} needs a teacher (set the `teacher` section)")
    depths = {name: teacher.num_layers for name, teacher in teachers.items()}
    early = getattr(student, "align_layer", None) or DEFAULT_EARLY_LAYER
    pairs = build_pairs(cfg, depths, student.num_layers, early) if cfg.method == "let" else []
    projections = [
        build_projection(cfg.projection, student.width(p.student_layer), teachers[p.teacher].width(p.teacher_layer))
        for p in pairs
    ]
    objective = get_objective(cfg.objective)
    if objective is logsum:
        alpha = cfg.logsum_alpha
        objective = lambda s, t, mask=None: logsum(s, t, mask, alpha)  # noqa: E731
    salt_steps = release_step_for(cfg) if cfg.method == "salt" else None
    return AlignmentEngine(
        teachers=teachers,
        pairs=pairs,
        projections=projections,
        objective=objective,
        weight=build_weight_schedule(cfg.schedule, cfg.lambda0, cfg.stop_step),
        method=cfg.method,
        release_step=release_step_for(cfg),
        kd_weight=cfg.kd_weight,
        kd_temperature=cfg.kd_temperature,
        kd_steps=salt_steps,
    )
