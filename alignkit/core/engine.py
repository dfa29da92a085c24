"""The alignment engine: turns the student's output, the teachers' outputs and the step into the
auxiliary loss, and owns the teachers' lifecycle.

The engine computes a list of terms (:mod:`alignkit.core.terms`: ``align.terms`` or a preset's
expansion), each with its own weight schedule and stop step:
  feature   sum over its pairs of weight(step) * pair.weight * objective(projection(student), teacher)
  logit_kd  weight(step) * kd(student logits, teacher logits, temperature) (paper eq. 2)
At each step only the terms with a weight above zero run, and each teacher they need runs once
(features at every layer asked for, plus logits if a logit_kd term wants them). A teacher is
released the step after the last term using it stops; a term's learned projection is dropped
at its stop (:meth:`AlignmentEngine.retire`: the trainer takes it out of the optimizer), so from
then on a run costs what a plain run costs. The time spent running teachers (a cached teacher's
replay included) is summed in :attr:`AlignmentEngine.teacher_time`; the trainer logs it as
``teacher_s``.

Metrics: a feature term logs ``lambda``, ``align/<pair>`` and ``cos/<pair>``, a logit_kd term
``kd`` and ``kd_weight``; with more than one term of a type, those names get the prefix
``term<i>/`` (``i``: the term's index in ``align.terms``). ``align_loss`` is the sum.
"""
from __future__ import annotations

import gc
import math

import torch
from torch import Tensor, nn

from alignkit.core.adapter import LOGITS_KINDS, Batch, StudentOutput, TeacherAdapter, align_teacher, alignment_mask, resolve_layer
from alignkit.core.config import AlignConfig, ConfigError, problems
from alignkit.core.objectives import Objective, cosine_similarity, kd
from alignkit.core.pairing import DEFAULT_EARLY_LAYER, Pair, strategy_pairs, validate_pairs
from alignkit.core.projections import build_projection
from alignkit.core.schedules import Schedule, build_weight_schedule
from alignkit.core.terms import Term, check_terms, objective_of
from alignkit.core.timing import SectionTimer

__all__ = ["AlignmentEngine", "FeatureTerm", "LogitTerm", "build_engine", "check_align_config"]


class _TermModule(nn.Module):
    """What both term types share: the schedule, the stop step and the metric prefix."""

    def __init__(self, weight: Schedule, stop: int | None, prefix: str) -> None:
        super().__init__()
        self.weight, self.stop, self.prefix = weight, stop, prefix

    def weight_at(self, step: int) -> float:
        return 0.0 if self.stop is not None and step >= self.stop else self.weight(step)


class FeatureTerm(_TermModule):
    """Feature alignment of ``pairs``; the projections are submodules (trained for ``linear``)."""

    def __init__(self, pairs: list[Pair], projections: list[nn.Module], objective: Objective,
                 weight: Schedule, stop: int | None, prefix: str = "") -> None:
        super().__init__(weight, stop, prefix)
        self.pairs, self.objective = pairs, objective
        self.projections = nn.ModuleList(projections)

    def teacher_layers(self) -> dict[str, set[int]]:
        needed: dict[str, set[int]] = {}
        for pair in self.pairs:
            needed.setdefault(pair.teacher, set()).add(pair.teacher_layer)
        return needed

    def forward(self, out: StudentOutput, batch: Batch, weight: float, features: dict[str, dict[int, Tensor]],
                logits: dict[str, Tensor], metrics: dict[str, Tensor]) -> Tensor:
        mask = alignment_mask(batch)
        total = out.loss.new_zeros(())
        for pair, projection in zip(self.pairs, self.projections):
            student = projection(out.features[pair.student_layer].float())
            teacher = align_teacher(features[pair.teacher][pair.teacher_layer].float(), batch)
            value = self.objective(student, teacher, mask)
            total = total + weight * pair.weight * value
            metrics[f"{self.prefix}align/{pair.name}"] = value.detach()
            metrics[f"{self.prefix}cos/{pair.name}"] = cosine_similarity(student.detach(), teacher, mask)
        return total


class LogitTerm(_TermModule):
    """Logit distillation from ``teacher``: per token ([B, S, V], masked) or per sample ([B, C])."""

    def __init__(self, teacher: str, kind: str, temperature: float, weight: Schedule, stop: int | None,
                 prefix: str = "", key: str = "align.terms") -> None:
        super().__init__(weight, stop, prefix)
        self.teacher, self.kind, self.temperature, self.key = teacher, kind, temperature, key

    def forward(self, out: StudentOutput, batch: Batch, weight: float, features: dict[str, dict[int, Tensor]],
                logits: dict[str, Tensor], metrics: dict[str, Tensor]) -> Tensor:
        student = out.logits
        if student is None:
            raise RuntimeError(f"{self.key}: logit KD needs student logits but the student returned none")
        teacher = logits[self.teacher]
        if self.kind == "per_sample" and student.shape != teacher.shape:
            raise ConfigError(f"{self.key}: logit KD needs the teacher's classes to be the student's; the teacher gives "
                              f"logits {tuple(teacher.shape)}, the student {tuple(student.shape)}")
        if "teacher_index" in batch:
            raise ConfigError(f"{self.key}: logit KD needs teacher and student to share a tokenizer")
        mask = alignment_mask(batch) if self.kind == "per_token" else None
        value = kd(student, teacher, mask, self.temperature)
        metrics[f"{self.prefix}kd"] = value.detach()
        return weight * value


class AlignmentEngine(nn.Module):
    """Holds the terms (and so the projections) as submodules; teachers are kept outside the
    module tree so they never enter the optimizer, DDP or checkpoints."""

    def __init__(self, teachers: dict[str, TeacherAdapter], terms: list[FeatureTerm | LogitTerm]) -> None:
        super().__init__()
        self.teachers = dict(teachers)
        self.terms = nn.ModuleList(terms)
        self.teacher_time = SectionTimer()  # every teacher call, until the trainer reads it at a log
        # the step from which each teacher is no longer needed (None: never); a teacher no
        # term uses is released after the first step
        self.teacher_stops: dict[str, int | None] = {name: 0 for name in teachers}
        for term in terms:
            for name in term.teacher_layers() if isinstance(term, FeatureTerm) else [term.teacher]:
                stops = [self.teacher_stops[name], term.stop]
                self.teacher_stops[name] = None if None in stops else max(stops)  # type: ignore[type-var]

    # --- what is active when -------------------------------------------------------------
    @property
    def released(self) -> bool:
        """Every teacher has been released."""
        return not self.teachers

    def active(self, step: int) -> bool:
        return any(term.weight_at(step) > 0 for term in self.terms)

    def wants_student_logits(self, step: int) -> bool:
        """A logit-KD term is active at ``step``: the student's forward returns logits."""
        return any(isinstance(term, LogitTerm) and term.weight_at(step) > 0 for term in self.terms)

    def student_layers(self, step: int) -> list[int]:
        """Student layers to tap at this step (none once feature alignment is over: no hook cost)."""
        return sorted({pair.student_layer for term in self.terms if isinstance(term, FeatureTerm)
                       and term.weight_at(step) > 0 for pair in term.pairs})

    # --- the loss --------------------------------------------------------------------------
    def forward(self, out: StudentOutput, batch: Batch, step: int) -> tuple[Tensor, dict[str, Tensor]]:
        """Auxiliary loss to add to the student's task loss, and its metrics (detached)."""
        zero = out.loss.new_zeros(())
        weights = [term.weight_at(step) for term in self.terms]
        metrics: dict[str, Tensor] = {}
        for term, weight in zip(self.terms, weights):
            name = "lambda" if isinstance(term, FeatureTerm) else "kd_weight"
            metrics[f"{term.prefix}{name}"] = zero + weight
        if not any(isinstance(term, FeatureTerm) for term in self.terms):
            metrics["lambda"] = zero  # no feature alignment (logged as by the let preset after its stop)
        if not any(w > 0 for w in weights):
            return self._keep_used(zero, weights), metrics
        with self.teacher_time.measure(out.loss.device):
            features, logits = self._run_teachers(batch, step)
        total = zero
        for term, weight in zip(self.terms, weights):
            if weight > 0:
                total = total + term(out, batch, weight, features, logits, metrics)
        metrics["align_loss"] = total.detach()
        return self._keep_used(total, weights), metrics

    def _keep_used(self, total: Tensor, weights: list[float]) -> Tensor:
        """A learned projection whose term has weight 0 before its stop (a schedule that starts
        at 0) still takes part in the graph, with a zero gradient: DDP then needs no
        ``find_unused_parameters``."""
        idle = [p for term, w in zip(self.terms, weights) if w <= 0 for p in term.parameters()]
        return total + sum(p.sum() for p in idle) * 0.0 if idle else total

    def _run_teachers(self, batch: Batch, step: int) -> tuple[dict[str, dict[int, Tensor]], dict[str, Tensor]]:
        """Each teacher an active term needs, once: features at all its layers, logits if asked."""
        layers: dict[str, set[int]] = {}
        want_logits: set[str] = set()
        for term in self.terms:
            if term.weight_at(step) <= 0:
                continue
            if isinstance(term, FeatureTerm):
                for name, wanted in term.teacher_layers().items():
                    layers.setdefault(name, set()).update(wanted)
            else:
                layers.setdefault(term.teacher, set())
                want_logits.add(term.teacher)
        features, logits = {}, {}
        for name, wanted in layers.items():
            features[name], teacher_logits = self.teachers[name].run(batch, sorted(wanted), logits=name in want_logits)
            if teacher_logits is not None:
                logits[name] = teacher_logits
        return features, logits

    # --- lifecycle -------------------------------------------------------------------------
    def after_step(self, step: int) -> bool:
        """Call after optimizer step ``step`` (on resume: with the last step done); releases each
        teacher no term needs from ``step + 1`` on. True when this call released the last one."""
        done = [name for name, stop in self.teacher_stops.items()
                if name in self.teachers and stop is not None and stop <= step + 1]
        for name in done:
            self._release(name)
        if done:
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        return bool(done) and self.released

    def release_all(self) -> None:
        """Release every teacher still held (the run is over; a term that never stops keeps its
        teacher until then)."""
        for name in list(self.teachers):
            self._release(name)

    def retire(self, step: int) -> list[nn.Parameter]:
        """Drop the projections of the feature terms whose weight is 0 from ``step`` on, so
        checkpoints no longer hold them; returns their parameters (for the optimizer to drop)."""
        retired: list[nn.Parameter] = []
        for term in self.terms:
            if isinstance(term, FeatureTerm) and term.stop is not None and term.stop <= step and len(term.projections):
                retired += list(term.projections.parameters())
                term.projections = nn.ModuleList()
        return retired

    def _release(self, name: str) -> None:
        # a custom teacher may have no release(): dropping the engine's reference frees it
        # once nothing else holds it
        release = getattr(self.teachers.pop(name), "release", None)
        if release is not None:
            release()


def check_align_config(cfg: AlignConfig, total_steps: int) -> None:
    """Checks that need no model (:func:`alignkit.core.terms.check_terms`), once the fields
    keep their own rules (a broken one is reported by :func:`alignkit.core.config.problems`)."""
    if (cfg.method == "none" and not cfg.terms) or problems(cfg):
        return
    check_terms(cfg, total_steps)


def _early_layer(term: Term, student: nn.Module) -> int:
    """The E of a strategy: the term's ``early_layer``, else the student adapter's ``align_layer``,
    else 3 (the paper's); a key-naming error when it is beyond the student."""
    if term.cfg.early_layer is not None:
        return resolve_layer(term.cfg.early_layer, student.num_layers, term.key("early_layer"))
    early = getattr(student, "align_layer", None) or DEFAULT_EARLY_LAYER
    if early > student.num_layers:
        raise ConfigError(f"{term.key('early_layer')} is unset and the default early layer {early} (the paper's third "
                          f"layer) is beyond this {student.num_layers}-layer student: set {term.key('early_layer')} "
                          f"(1..{student.num_layers})")
    return early


def _feature_term(term: Term, student: nn.Module, teachers: dict[str, TeacherAdapter], prefix: str) -> FeatureTerm:
    c = term.cfg
    depths = {name: teacher.num_layers for name, teacher in teachers.items()}
    if c.pairs:
        pairs = [Pair(p.teacher_layer, p.student_layer, p.weight, p.teacher or c.teacher) for p in c.pairs]
        validate_pairs(pairs, depths, student.num_layers, term.key("pairs"))
    else:
        # L and M are in range by construction; E is checked against the student here
        early = _early_layer(term, student) if c.strategy.endswith("E") else DEFAULT_EARLY_LAYER
        pairs = strategy_pairs(c.strategy, depths[c.teacher], student.num_layers, early, c.teacher, term.key("strategy"))
    projections = [build_projection(c.projection, student.width(p.student_layer),
                                    teachers[p.teacher].width(p.teacher_layer), term.key("projection")) for p in pairs]
    return FeatureTerm(pairs, projections, objective_of(term), _schedule(term), term.stop, prefix)


def _logit_term(term: Term, student: nn.Module, teachers: dict[str, TeacherAdapter], prefix: str) -> LogitTerm:
    c = term.cfg
    kind = getattr(teachers[c.teacher], "logits_kind", None)
    where = term.origin
    if kind is None:
        raise ConfigError(f"{where}: logit KD, but teacher {c.teacher!r} ({type(teachers[c.teacher]).__name__}) "
                          "gives no logits (its logits_kind is None)")
    if kind not in LOGITS_KINDS:
        raise ConfigError(f"{where}: teacher {c.teacher!r} declares logits_kind={kind!r} (known: {', '.join(LOGITS_KINDS)})")
    student_kind = getattr(student, "logits_kind", None)
    if student_kind is not None and student_kind != kind:
        raise ConfigError(f"{where}: logit KD needs logits of one kind, but teacher {c.teacher!r} gives {kind} "
                          f"logits and the student {student_kind}")
    return LogitTerm(c.teacher, kind, c.temperature, _schedule(term), term.stop, prefix, term.origin)


def _schedule(term: Term) -> Schedule:
    stop = math.inf if term.stop is None else term.cfg.stop_step
    return build_weight_schedule(term.cfg.schedule, term.cfg.lambda0, stop, term.key("schedule"))


def build_engine(cfg: AlignConfig, student: nn.Module, teachers: dict[str, TeacherAdapter]) -> AlignmentEngine | None:
    """The engine for ``cfg`` (None when there is no term: method ``none``). ``teachers`` maps
    names to adapters (the main one is ``default``); each term is checked against its teacher
    and the student, with errors naming the config key the user wrote."""
    terms = cfg.expanded
    if not terms:
        return None
    built: list[FeatureTerm | LogitTerm] = []
    for term in terms:
        if term.cfg.teacher not in teachers:
            if term.origin.startswith("align.method"):
                raise ConfigError(f"{term.origin} needs a teacher (set the `teacher` section)")
            raise ConfigError(f"{term.key('teacher')}={term.cfg.teacher!r} names no configured teacher "
                              f"(known: {', '.join(sorted(teachers)) or 'none'})")
        if not callable(getattr(teachers[term.cfg.teacher], "run", None)):
            raise ConfigError(f"teacher {term.cfg.teacher!r} ({type(teachers[term.cfg.teacher]).__name__}) has no "
                              "run(batch, layers, logits) method (see README: Add your own teacher)")
        same = sum(t.kind == term.kind for t in terms) > 1
        prefix = f"term{term.index}/" if same else ""
        build = _feature_term if term.kind == "feature" else _logit_term
        built.append(build(term, student, teachers, prefix))
    return AlignmentEngine(teachers, built)
