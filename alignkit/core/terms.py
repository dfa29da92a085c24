"""``align`` as a list of terms: the one-word presets' expansion, and the checks that need no model.

``align.terms`` lists the terms as written. When it is empty, ``align.method`` is a preset that
:func:`expand_terms` turns into terms, numbers unchanged:
  let   one feature term: ``strategy``/``pairs``, ``objective`` (``logsum_alpha``), ``projection``,
        ``lambda0``, ``schedule``, ``stop_step`` of ``align``
  rkd   one logit_kd term: weight ``kd_weight``, ``kd_temperature``, constant, never stops
  salt  one logit_kd term: as rkd, stopping at ``n_kd`` (-1: ``stop_step``)
  none  no term (no engine, no teacher)
Each :class:`Term` remembers the config keys the user wrote, so an error about an expanded preset
names ``align.stop_step``, not a term the user never wrote.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field, fields, replace

from alignkit.core.config import TERM_DEFAULTS, AlignConfig, ConfigError, TermConfig
from alignkit.core.objectives import Objective
from alignkit.core.registry import OBJECTIVES, PROJECTIONS, SCHEDULES

FEATURE_ONLY = ("pairs", "strategy", "early_layer", "objective", "objective_options", "projection")
KD_ONLY = ("temperature",)
NEVER = -1  # stop_step of a term that runs the whole run
NOT_PRESET = ("terms", "teacher_cache", "teacher_cache_dtype")  # align fields that go with terms too


@dataclass(frozen=True)
class Term:
    """A term with every default filled in, and where its fields came from in the config."""

    cfg: TermConfig
    index: int  # position in the term list (metric names of repeated types use it)
    prefix: str  # "align.terms.<i>." or "align." for a preset
    renames: dict[str, str] = field(default_factory=dict)  # term field -> preset field
    origin: str = ""  # what the user wrote: "align.terms.<i>" or "align.method=<preset>"

    @property
    def kind(self) -> str:
        return self.cfg.type

    @property
    def stop(self) -> int | None:
        """The step from which the weight is 0 (None: never); a zero weight stops at once."""
        if self.cfg.lambda0 == 0:
            return 0
        return None if self.cfg.stop_step == NEVER else self.cfg.stop_step

    def key(self, name: str) -> str:
        """The config key the user wrote for the term field ``name``."""
        return self.prefix + self.renames.get(name, name)


def _preset_terms(cfg: AlignConfig) -> list[Term]:
    if cfg.method == "let":
        options = {"alpha": cfg.logsum_alpha} if cfg.objective == "logsum" else {}
        term = TermConfig(type="feature", pairs=list(cfg.pairs), strategy=cfg.strategy, early_layer=cfg.early_layer,
                          objective=cfg.objective, objective_options=options, projection=cfg.projection,
                          lambda0=cfg.lambda0, schedule=cfg.schedule, stop_step=cfg.stop_step)
        return [Term(term, 0, "align.", {"objective_options": "logsum_alpha"}, "align.method='let'")]
    if cfg.method in ("rkd", "salt"):
        stop = NEVER if cfg.method == "rkd" else (cfg.n_kd if cfg.n_kd >= 0 else cfg.stop_step)
        term = TermConfig(type="logit_kd", temperature=cfg.kd_temperature, lambda0=cfg.kd_weight,
                          schedule="constant", stop_step=stop)
        stop_key = "n_kd" if cfg.method == "salt" and cfg.n_kd >= 0 else "stop_step"
        return [Term(term, 0, "align.", {"lambda0": "kd_weight", "temperature": "kd_temperature",
                                         "stop_step": stop_key}, f"align.method={cfg.method!r}")]
    return []


def _check_preset_fields_unset(cfg: AlignConfig) -> None:
    default = AlignConfig()
    for spec in fields(AlignConfig):
        value = getattr(cfg, spec.name)
        if spec.name not in NOT_PRESET and value != getattr(default, spec.name):
            raise ConfigError(f"align.terms and align.{spec.name}={value!r} are both set: align.{spec.name} belongs to "
                              f"the one-word presets, which align.terms replaces (set it inside a term, or drop it)")


def _fill(term: TermConfig, prefix: str) -> TermConfig:
    """Per-type defaults, and an error for a field of the other type."""
    blank = TermConfig()
    foreign = KD_ONLY if term.type == "feature" else FEATURE_ONLY
    for name in foreign:
        if getattr(term, name) != getattr(blank, name):
            other = "logit_kd" if term.type == "feature" else "feature"
            raise ConfigError(f"{prefix}{name} applies to {other} terms only (this term has type={term.type})")
    filled = {name: value for name, value in TERM_DEFAULTS[term.type].items() if getattr(term, name) is None}
    return replace(term, **filled)


def expand_terms(cfg: AlignConfig) -> list[Term]:
    """The terms ``cfg`` describes: ``align.terms`` as written, else the preset's expansion.
    Callers read them once expanded, from :attr:`AlignConfig.expanded`."""
    if not cfg.terms:
        return _preset_terms(cfg)
    _check_preset_fields_unset(cfg)
    return [Term(_fill(term, f"align.terms.{i}."), i, f"align.terms.{i}.", origin=f"align.terms.{i}")
            for i, term in enumerate(cfg.terms)]


def logit_kd_terms(cfg: AlignConfig, teacher: str = "default") -> list[Term]:
    """The logit-distillation terms that use ``teacher``."""
    return [term for term in cfg.expanded if term.kind == "logit_kd" and term.cfg.teacher == teacher]


def objective_of(term: Term) -> Objective:
    """The registered objective of a feature term with its ``objective_options`` bound."""
    objective = OBJECTIVES.get(term.cfg.objective, term.key("objective"))
    options = dict(term.cfg.objective_options)
    try:
        inspect.signature(objective).bind(None, None, None, **options)
    except TypeError:
        known = list(inspect.signature(objective).parameters)[3:]
        raise ConfigError(f"{term.key('objective_options')}={options}: objective {term.cfg.objective!r} takes "
                          f"the options {', '.join(known) or 'none'}") from None
    if not options:
        return objective
    return lambda s, t, mask=None: objective(s, t, mask, **options)


def check_terms(cfg: AlignConfig, total_steps: int) -> list[Term]:
    """Every check that needs no model: names against the registries, per-type fields, stop
    steps against the run. Returns the terms."""
    terms = list(cfg.expanded)
    for term in terms:
        c = term.cfg
        SCHEDULES.get(c.schedule, term.key("schedule"))
        if c.type == "feature":
            objective_of(term)
            PROJECTIONS.get(c.projection, term.key("projection"))
        if c.stop_step == NEVER and c.schedule != "constant":
            raise ConfigError(f"{term.key('stop_step')}=-1 (never stop) needs schedule 'constant', "
                              f"not {term.key('schedule')}={c.schedule!r}")
        if term.stop is not None and term.stop > total_steps:
            key = term.key("stop_step")
            raise ConfigError(f"{key}={term.stop} is beyond the run (train.steps={total_steps}): the teacher would "
                              f"never be dropped; lower {key} or raise train.steps")
    return terms
