"""The study's numbers over seeds (pure functions: numbers in, numbers out).

Per run and per configuration and seed against the baseline of the same seed, the figures come
from :mod:`alignkit.compare` (``run_numbers``, ``paired``: final eval loss, eval curve, training
throughput, teacher cost per step measured inside the run (``in-step`` from the teachers' timed
seconds, so a teacher that never drops is priced too; ``on/off`` for runs logged before that),
cosine while aligned; steps to the baseline's final eval loss, speedups in steps and wall-clock,
the paired loss difference). Here: mean +- std over seeds and a verdict (rule below); with a small
teacher pre-trained by the study, the time speedup pooled over seeds with its pre-training counted
once and as zero (reused); and the trend of the speedup with the student/teacher size ratio (a
least-squares fit in log-log); and against the frozen teacher's eval loss, when each student
passes its teacher and what the configuration's lead over its baseline does after that (LEAD_RULE).
"""
from __future__ import annotations

import math
from typing import Any

from alignkit.compare import Curve, pooled_speedup, speedup_to, spread

# Verdict on a configuration's speedup in steps over seeds (VERDICT_RULE says it in words).
HOLDS_MEAN, HOLDS_WEAKER_MEAN = 1.3, 1.05
VERDICT_RULE = (f"holds: mean speedup >= {HOLDS_MEAN} and every seed > 1.0; holds weaker: mean > {HOLDS_WEAKER_MEAN}; "
                "does not hold: otherwise. A seed that never reaches the baseline's loss counts at its upper bound "
                "(baseline steps / its last step, <= 1). For 'best of the grid' claims: holds when the named "
                "configuration has the highest mean speedup, holds weaker when it is within one std of the best, "
                "does not hold otherwise; a best configuration whose own speedup does not hold only holds weaker. "
                "For 'A grows over B' claims: holds when A's mean exceeds B's by more than the larger of their stds, "
                "holds weaker when it exceeds it at all. For 'trend' claims: least squares of log(speedup in steps) on "
                "log(student parameters / teacher parameters) over every (configuration, seed) point, the counts read from "
                "the runs' results.json; grows when the slope's 95% interval (slope +- t(0.975, points - 2) x its standard "
                "error) lies above 0, shrinks when below, flat when it spans 0. For 'course' claims: the speedup in steps "
                "to the same-seed baseline's eval loss at its eval nearest a quarter, half and three quarters of its run "
                "and at its end (the last is the speedup above); grows when the mean at the end exceeds the mean at a "
                "quarter by more than the larger of their stds, shrinks when it falls short by more than that, persists "
                "otherwise.")
COURSE_FRACTIONS = (0.25, 0.5, 0.75, 1.0)
TIME_SOURCE = "sum over train log intervals of (tokens in the interval / tokens_per_s): training steps only, teacher included, eval and saves excluded"


def summarize(pairs: dict[int, dict[str, Any]], runs: dict[int, dict[str, Any]]) -> dict[str, Any]:
    """Mean +- std (and min, max) over seeds of a configuration's paired figures."""
    seeds = sorted(pairs)
    figure = lambda key, source: spread([source[s][key] for s in seeds]) if seeds and all(  # noqa: E731
        source[s][key] is not None for s in seeds) else None
    return {"seeds": seeds, "reached": sum(pairs[s]["reached"] for s in seeds),
            "speedup": figure("speedup", pairs), "speedup_is_upper_bound": not all(pairs[s]["reached"] for s in seeds),
            "wall_speedup": figure("wall_speedup", pairs), "wall_speedup_in_run": figure("wall_speedup_in_run", pairs),
            "throughput_ratio": figure("throughput_ratio", pairs),
            "loss_diff": figure("loss_diff", pairs), "final_eval_loss": figure("final_eval_loss", runs),
            "cosine_aligned": figure("cosine_aligned", runs), "teacher_step_cost": figure("teacher_step_cost", runs),
            "teacher_cost_method": ", ".join(sorted({runs[s]["teacher_cost_method"] for s in seeds} - {None})) or None,
            "course": {f: spread([pairs[s]["course"][f]["speedup"] for s in seeds]) for f in pairs[seeds[0]]["course"]}
            if seeds and all("course" in pairs[s] for s in seeds) else None}


def verdict(summary: dict[str, Any]) -> str:
    """holds / holds weaker / does not hold, for a speedup summary (see VERDICT_RULE)."""
    speedup = summary.get("speedup")
    if not speedup:
        return "no data"
    per_seed_ok = summary["reached"] == len(summary["seeds"]) and speedup["min"] > 1.0
    if speedup["mean"] >= HOLDS_MEAN and per_seed_ok:
        return "holds"
    return "holds weaker" if speedup["mean"] > HOLDS_WEAKER_MEAN else "does not hold"


def best_verdict(summaries: dict[str, dict[str, Any]], name: str) -> str:
    """Whether configuration ``name`` is the best of ``summaries`` by mean speedup (VERDICT_RULE)."""
    ranked = {n: s["speedup"] for n, s in summaries.items() if s.get("speedup")}
    if name not in ranked:
        return "no data"
    best = max(ranked, key=lambda n: ranked[n]["mean"])
    if best == name:
        return "holds" if verdict(summaries[name]) != "does not hold" else "holds weaker"
    return "holds weaker" if ranked[best]["mean"] - ranked[name]["mean"] <= ranked[best]["std"] else "does not hold"


def larger_verdict(summary: dict[str, Any], other: dict[str, Any]) -> str:
    """Whether ``summary``'s mean speedup exceeds ``other``'s (VERDICT_RULE)."""
    a, b = summary.get("speedup"), other.get("speedup")
    if not (a and b):
        return "no data"
    if a["mean"] - b["mean"] > max(a["std"], b["std"]):
        return "holds"
    return "holds weaker" if a["mean"] > b["mean"] else "does not hold"


def speedup_course(curve: Curve, baseline: Curve, fractions: tuple[float, ...] = COURSE_FRACTIONS) -> dict[str, dict[str, Any]]:
    """The speedup in steps over a run (VERDICT_RULE, 'course'): per fraction of the baseline's run,
    its eval nearest that step, that eval's loss as the target, and steps the baseline first needs to
    reach it over steps the run needs (a run that never gets there: over its last step, an upper
    bound). At 1 this is the speedup :func:`alignkit.compare.paired` gives. Keys: the fractions as text."""
    last = baseline[-1][0]
    out = {}
    for fraction in fractions:
        step, target = min(baseline, key=lambda entry: abs(entry[0] - fraction * last))
        _, steps, speedup = speedup_to(curve, baseline, target)
        out[f"{fraction:g}"] = {"baseline_step": step, "target": target, "reached": steps is not None, "speedup": speedup}
    return out


def course_verdict(summary: dict[str, Any]) -> str:
    """grows / persists / shrinks: the mean speedup at the end of the run against at its first
    fraction (VERDICT_RULE, 'course')."""
    course = summary.get("course")
    if not course:
        return "no data"
    first, end = course[min(course, key=float)], course[max(course, key=float)]
    margin = max(first["std"], end["std"])
    return "grows" if end["mean"] - first["mean"] > margin else "shrinks" if first["mean"] - end["mean"] > margin else "persists"


def teacher_priced(pairs: dict[int, dict[str, Any]], teacher_seconds: float) -> dict[str, Any] | None:
    """Training seconds to the baseline's final eval loss summed over seeds, the baseline's over the
    configuration's, with the small teacher's pre-training counted once (the study trained it for these
    seeds) and as zero (a teacher reused from elsewhere). A seed that never got there counts its whole
    run, so the figures are then upper bounds."""
    seeds = [s for s in sorted(pairs) if pairs[s].get("baseline_seconds") and pairs[s].get("seconds_bound")]
    if not seeds:
        return None
    base, own = [pairs[s]["baseline_seconds"] for s in seeds], [pairs[s]["seconds_bound"] for s in seeds]
    return {"seeds": seeds, "teacher_seconds": teacher_seconds, "counted_once": pooled_speedup(base, own, teacher_seconds),
            "reused": pooled_speedup(base, own), "upper_bound": not all(pairs[s]["reached"] for s in seeds)}


def trend_fit(points: list[tuple[float, float]]) -> dict[str, Any] | None:
    """Least squares of log(speedup) on log(size ratio) over (ratio, speedup) points: speedup ~
    exp(intercept) x ratio^slope, the slope's standard error and 95% interval (Student t with
    points - 2 degrees of freedom: each point is one seed of one configuration). None with fewer
    than 3 points or a single ratio."""
    xs, ys = [math.log(r) for r, _ in points], [math.log(s) for _, s in points]
    n = len(points)
    if n < 3 or len(set(xs)) < 2:
        return None
    from scipy.special import stdtrit  # Student t quantile; scipy comes with aeon, an alignkit dependency

    mean_x, mean_y = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mean_x) ** 2 for x in xs)
    slope = sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys)) / sxx
    intercept = mean_y - slope * mean_x
    residual = sum((y - intercept - slope * x) ** 2 for x, y in zip(xs, ys))
    se = math.sqrt(residual / (n - 2) / sxx)
    half = float(stdtrit(n - 2, 0.975)) * se
    return {"points": n, "slope": slope, "slope_se": se, "interval": [slope - half, slope + half], "intercept": intercept}


def trend_verdict(fit: dict[str, Any] | None) -> str:
    """grows / flat / shrinks by where the slope's 95% interval lies (VERDICT_RULE)."""
    if fit is None:
        return "no data"
    low, high = fit["interval"]
    return "grows" if low > 0 else "shrinks" if high < 0 else "flat"


GAIN_RULE = ("holds: the mean paired gain exceeds its std over seeds; holds weaker: the mean gain is above zero; "
             "does not hold: otherwise")


def gain_verdict(diff: dict[str, Any]) -> str:
    """holds / holds weaker / does not hold, for a paired difference over seeds (``mean``, ``std``:
    a method minus its baseline, higher better; see GAIN_RULE)."""
    return "holds" if diff["mean"] > diff["std"] else "holds weaker" if diff["mean"] > 0 else "does not hold"


def paired_gain(scores: list[float], baseline: list[float]) -> dict[str, Any]:
    """Per-seed ``scores`` minus ``baseline`` (the same seeds, in the same order; higher better):
    :func:`spread` of the differences (``values``) and how many seeds win, tie and lose. Paired
    because the two runs of a seed share the data order, the initialisation and the teacher."""
    if len(scores) != len(baseline):
        raise ValueError(f"paired_gain: {len(scores)} scores against {len(baseline)} baseline scores")
    diffs = [a - b for a, b in zip(scores, baseline)]
    return {**spread(diffs), "wins": sum(d > 0 for d in diffs), "ties": sum(d == 0 for d in diffs),
            "losses": sum(d < 0 for d in diffs)}


# The course of a configuration's lead over its baseline after its student passes the teacher.
LEAD_STEADY = 0.2
LEAD_RULE = ("crossing: the first eval step at which a student's eval loss is below its frozen teacher's (never: the gap, "
             "student minus teacher, at the last eval); lead: the configuration's eval loss minus its same-seed baseline's "
             "at the same eval (negative: ahead). After the crossing the lead grows when it ends more than "
             f"{LEAD_STEADY:.0%} larger than at the crossing, shrinks when it ends more than {LEAD_STEADY:.0%} smaller but "
             "still ahead, is lost when the configuration ends no better than its baseline, and persists otherwise; a "
             "configuration not ahead at its crossing has none")


def crossing(curve: Curve, teacher_loss: float) -> dict[str, Any]:
    """When a student passes its frozen teacher: the first eval step with an eval loss below
    ``teacher_loss`` (None: never), and the gap, student minus teacher, at the last eval."""
    step = next((s for s, loss in curve if loss < teacher_loss), None)
    return {"step": step, "last_step": curve[-1][0], "gap_at_end": curve[-1][1] - teacher_loss}


def lead_after(curve: Curve, baseline: Curve, step: int) -> dict[str, Any] | None:
    """A configuration's lead over its same-seed baseline from eval ``step`` on (each eval both
    logged: its eval loss minus the baseline's, negative ahead): at ``step``, at the last eval, its
    min and max in between and its course (LEAD_RULE). None when the baseline has no eval at ``step``."""
    base = dict(baseline)
    if step not in base:
        return None
    leads = [loss - base[s] for s, loss in curve if s >= step and s in base]
    return {"at_crossing": leads[0], "at_end": leads[-1], "min": min(leads), "max": max(leads),
            "course": lead_course(leads[0], leads[-1])}


def lead_course(at_crossing: float, at_end: float) -> str:
    """grows / persists / shrinks / lost / none at crossing (see LEAD_RULE)."""
    if at_crossing >= 0:
        return "none at crossing"
    if at_end >= 0:
        return "lost"
    ratio = at_end / at_crossing
    return "grows" if ratio > 1 + LEAD_STEADY else "shrinks" if ratio < 1 - LEAD_STEADY else "persists"


def teacher_passing(curves: dict[int, Curve], teacher_loss: float,
                    baselines: dict[int, Curve] | None = None) -> dict[int, dict[str, Any]]:
    """Per seed with an eval: its :func:`crossing` and, given the same-seed baseline curves (a
    configuration, not a baseline), its :func:`lead_after` that crossing (None: it never crossed)."""
    out = {}
    for seed, curve in sorted(curves.items()):
        if not curve:
            continue
        entry = crossing(curve, teacher_loss)
        if baselines is not None and seed in baselines:
            entry["lead"] = lead_after(curve, baselines[seed], entry["step"]) if entry["step"] is not None else None
        out[seed] = entry
    return out
