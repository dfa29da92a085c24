"""The study's numbers, from metric records only (pure functions: records in, numbers out).

Per run: final eval loss, eval curve, training throughput (total tokens / total training time;
the time comes from each log interval's tokens / tokens_per_s, so evaluation and checkpoint
writes are left out and the teacher's forward is counted), and the mean cosine to the teacher
while it is active, and the teacher's cost per step measured inside the run. Per configuration and seed, against the baseline of the same seed: steps to
reach the baseline's final eval loss (linear interpolation between evals), the speedup in
steps, the wall-clock speedup (steps speedup x throughput ratio; and the same with the ratio from the run's
own timing, 1 / (1 + teacher cost x aligned fraction), which machine load shared unevenly between
two runs cannot skew) and the paired difference of
final eval losses. Then mean +- std over seeds and a verdict (rule below).
"""
from __future__ import annotations

from typing import Any, Iterator

from common import eval_curve, spread, steps_to_reach

# Verdict on a configuration's speedup in steps over seeds (VERDICT_RULE says it in words).
HOLDS_MEAN, HOLDS_WEAKER_MEAN = 1.3, 1.05
VERDICT_RULE = (f"holds: mean speedup >= {HOLDS_MEAN} and every seed > 1.0; holds weaker: mean > {HOLDS_WEAKER_MEAN}; "
                "does not hold: otherwise. A seed that never reaches the baseline's loss counts at its upper bound "
                "(baseline steps / its last step, <= 1). For 'best of the grid' claims: holds when the named "
                "configuration has the highest mean speedup, holds weaker when it is within one std of the best, "
                "does not hold otherwise; a best configuration whose own speedup does not hold only holds weaker. "
                "For 'A grows over B' claims: holds when A's mean exceeds B's by more than the larger of their stds, "
                "holds weaker when it exceeds it at all.")
TIME_SOURCE = "sum over train log intervals of (tokens in the interval / tokens_per_s): training steps only, teacher included, eval and saves excluded"


def _intervals(records: list[dict[str, Any]]) -> Iterator[tuple[int, float, bool]]:
    """(tokens, seconds, teacher active) of each train log interval."""
    previous = 0
    for record in records:
        if "tokens_per_s" not in record:
            continue
        tokens, previous = record["tokens"] - previous, record["tokens"]
        seconds = tokens / record["tokens_per_s"] if record["tokens_per_s"] > 0 else 0.0
        yield tokens, seconds, bool(record.get("teacher_active"))


def train_time(records: list[dict[str, Any]]) -> tuple[int, float]:
    """(total tokens, training seconds) of a run from its train records."""
    tokens, seconds = 0, 0.0
    for interval, spent, _ in _intervals(records):
        tokens, seconds = tokens + interval, seconds + spent
    return tokens, seconds


def teacher_step_cost(records: list[dict[str, Any]]) -> tuple[float | None, float]:
    """(the teacher's extra time per step as a fraction of a student step, the fraction of tokens
    trained with the teacher active), from one run: seconds per token while the teacher is active
    over seconds per token after it is dropped, minus 1. Both halves come from the same process
    under the same machine load, unlike a throughput ratio between two runs."""
    side = {True: [0, 0.0], False: [0, 0.0]}  # teacher active -> [tokens, seconds]
    for interval, spent, active in _intervals(records):
        side[active][0] += interval
        side[active][1] += spent
    (on_tokens, on_s), (off_tokens, off_s) = side[True], side[False]
    fraction = on_tokens / (on_tokens + off_tokens) if on_tokens + off_tokens else 0.0
    if not (on_tokens and off_tokens and off_s):
        return None, fraction
    return (on_s / on_tokens) / (off_s / off_tokens) - 1, fraction


def aligned_cosine(records: list[dict[str, Any]]) -> float | None:
    """Mean cosine to the teacher over the steps it is active (pairs averaged per step)."""
    per_step = []
    for record in records:
        values = [v for k, v in record.items() if k.startswith("cos/")]
        if values and record.get("teacher_active", True):
            per_step.append(sum(values) / len(values))
    return sum(per_step) / len(per_step) if per_step else None


def run_numbers(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Everything the study keeps about one run."""
    curve = eval_curve(records)
    tokens, seconds = train_time(records)
    cost, fraction = teacher_step_cost(records)
    return {"eval_loss_curve": curve, "final_eval_loss": curve[-1][1] if curve else None,
            "last_step": curve[-1][0] if curve else None, "tokens": tokens, "train_seconds": seconds,
            "tokens_per_s": tokens / seconds if seconds else None, "cosine_aligned": aligned_cosine(records),
            "teacher_step_cost": cost, "teacher_fraction": fraction}


def paired(run: dict[str, Any], baseline: dict[str, Any]) -> dict[str, Any]:
    """One configuration against the baseline of the same seed (both from :func:`run_numbers`)."""
    target = baseline["final_eval_loss"]
    base_steps = steps_to_reach(baseline["eval_loss_curve"], target)
    steps = steps_to_reach(run["eval_loss_curve"], target)
    reached = steps is not None
    # never reached: the run needs more than its last step, so this bounds the speedup from above
    speedup = base_steps / (steps if reached else run["last_step"])
    throughput = (run["tokens_per_s"] / baseline["tokens_per_s"]) if run["tokens_per_s"] and baseline["tokens_per_s"] else None
    # the same, with the throughput ratio from the run's own timing (teacher cost over the aligned part)
    cost = run.get("teacher_step_cost")
    return {"target_eval_loss": target, "baseline_steps": base_steps, "steps": steps, "reached": reached,
            "speedup": speedup, "throughput_ratio": throughput,
            "wall_speedup": speedup * throughput if throughput is not None else None,
            "wall_speedup_in_run": speedup / (1 + cost * run["teacher_fraction"]) if cost is not None else None,
            "loss_diff": run["final_eval_loss"] - target}


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
            "cosine_aligned": figure("cosine_aligned", runs), "teacher_step_cost": figure("teacher_step_cost", runs)}


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
