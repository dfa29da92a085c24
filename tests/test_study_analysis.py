"""The study's analysis math (alignkit/compare.py, benchmarks/study_analysis.py) on synthetic metric records:
steps-to-target interpolation, speedups, throughput from log intervals, paired differences,
summaries over seeds, the verdict rule, the teacher's pre-training priced in and the size trend
fit, and when a student passes its frozen teacher and what its lead does after that. No training, no timing."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from study_analysis import (best_verdict, course_verdict, crossing, larger_verdict, lead_after, lead_course,  # noqa: E402
                            speedup_course, summarize, teacher_passing, teacher_priced, trend_fit, trend_verdict, verdict)

from alignkit.compare import aligned_cosine, paired, pooled_speedup, run_numbers, teacher_step_cost, train_time  # noqa: E402


def records(evals: list[tuple[int, float]], tokens_per_s: float, tokens_per_step: int = 100,
            cos: float | None = None, active_until: int = 0) -> list[dict]:
    """Train records for every step up to the last eval, plus the eval records."""
    out = []
    for step in range(1, evals[-1][0] + 1):
        row = {"step": step, "tokens": step * tokens_per_step, "tokens_per_s": tokens_per_s,
               "teacher_active": step <= active_until}
        if cos is not None and step <= active_until:
            row["cos/t-1-s3"] = cos
        out.append(row)
        out += [{"step": s, "eval_loss": v} for s, v in evals if s == step]
    return out


BASE = [(10, 5.0), (20, 4.0), (30, 3.0)]


def test_steps_to_target_interpolates_between_evals() -> None:
    base = run_numbers(records(BASE, 100.0))
    # reaches 3.0 half-way between step 10 (4.0) and step 20 (2.0): step 15 -> 30 / 15 = 2x
    faster = run_numbers(records([(10, 4.0), (20, 2.0), (30, 1.5)], 100.0))
    pair = paired(faster, base)
    assert pair["steps"] == pytest.approx(15.0)
    assert pair["baseline_steps"] == 30
    assert pair["speedup"] == pytest.approx(2.0)
    assert pair["reached"]
    assert pair["loss_diff"] == pytest.approx(1.5 - 3.0)


def test_never_reached_is_an_upper_bound_and_fails_the_verdict() -> None:
    base = run_numbers(records(BASE, 100.0))
    slower = run_numbers(records([(10, 5.5), (20, 4.5), (30, 3.2)], 100.0))
    pair = paired(slower, base)
    assert pair["steps"] is None and not pair["reached"]
    assert pair["speedup"] == pytest.approx(1.0)  # baseline's 30 steps / its last step 30
    assert pair["loss_diff"] == pytest.approx(0.2)
    summary = summarize({0: pair}, {0: slower})
    assert summary["speedup_is_upper_bound"] and summary["reached"] == 0
    assert verdict(summary) == "does not hold"


def test_throughput_and_wall_clock_speedup() -> None:
    base = run_numbers(records(BASE, 100.0))
    # teacher on for 10 steps at 50 tokens/s, then 100 tokens/s: 10*100/50 + 20*100/100 = 40 s for 3000 tokens
    rows = records([(10, 4.0), (20, 2.0), (30, 1.5)], 100.0, cos=0.4, active_until=10)
    for row in rows:
        if row.get("teacher_active"):
            row["tokens_per_s"] = 50.0
    tokens, seconds = train_time(rows)
    assert (tokens, seconds) == (3000, pytest.approx(40.0))
    run = run_numbers(rows)
    pair = paired(run, base)
    assert pair["throughput_ratio"] == pytest.approx(75.0 / 100.0)
    assert pair["wall_speedup"] == pytest.approx(2.0 * 0.75)
    assert aligned_cosine(rows) == pytest.approx(0.4)
    assert run["cosine_aligned"] == pytest.approx(0.4)


def test_summary_over_seeds_and_verdicts() -> None:
    base = run_numbers(records(BASE, 100.0))
    runs = {seed: run_numbers(records([(10, 4.0), (20, target), (30, target - 0.5)], 100.0))
            for seed, target in ((0, 2.0), (1, 3.0), (2, 2.5))}
    pairs = {seed: paired(run, base) for seed, run in runs.items()}
    # steps to 3.0: 15, 20, 50/3 -> speedups 2.0, 1.5, 1.8
    summary = summarize(pairs, runs)
    assert summary["speedup"]["values"] == pytest.approx([2.0, 1.5, 1.8])
    assert summary["speedup"]["mean"] == pytest.approx(1.7667, abs=1e-4)
    assert summary["speedup"]["std"] == pytest.approx(0.2517, abs=1e-4)  # sample std
    assert summary["speedup"]["min"] == pytest.approx(1.5)
    assert summary["loss_diff"]["values"] == pytest.approx([-1.5, -0.5, -1.0])
    assert verdict(summary) == "holds"
    weaker = dict(summary, speedup=dict(summary["speedup"], mean=1.2))
    assert verdict(weaker) == "holds weaker"
    assert verdict(dict(summary, speedup=dict(summary["speedup"], mean=1.04))) == "does not hold"
    one_seed_short = dict(summary, reached=2)
    assert verdict(one_seed_short) == "holds weaker"


def entry(mean: float, std: float) -> dict:
    return {"seeds": [0, 1, 2], "reached": 3, "speedup": {"mean": mean, "std": std, "min": mean - std}}


def test_best_of_grid_verdict() -> None:
    grid = {"a": entry(1.5, 0.2), "b": entry(1.4, 0.05), "c": entry(1.0, 0.1)}
    assert best_verdict(grid, "a") == "holds"
    assert best_verdict(grid, "b") == "holds weaker"  # within the best's std
    assert best_verdict(grid, "c") == "does not hold"
    assert best_verdict(grid, "missing") == "no data"
    # best of a grid where nothing speeds up: only weaker
    assert best_verdict({"a": entry(1.02, 0.01), "b": entry(0.9, 0.01)}, "a") == "holds weaker"


def test_grows_verdict() -> None:
    assert larger_verdict(entry(1.6, 0.1), entry(1.2, 0.2)) == "holds"
    assert larger_verdict(entry(1.3, 0.1), entry(1.2, 0.2)) == "holds weaker"
    assert larger_verdict(entry(1.1, 0.1), entry(1.2, 0.2)) == "does not hold"
    assert larger_verdict(entry(1.1, 0.1), {}) == "no data"


def test_teacher_step_cost_falls_back_to_on_off_for_records_without_teacher_s() -> None:
    rows = records(BASE, 100.0, active_until=10)  # an older run: no teacher_s
    for row in rows:
        if row.get("teacher_active"):
            row["tokens_per_s"] = 80.0  # 1.25x the time per token while the teacher runs
    cost, fraction, method = teacher_step_cost(rows)
    assert cost == pytest.approx(0.25) and fraction == pytest.approx(1 / 3) and method == "on/off"
    run = run_numbers(rows)
    assert run["teacher_step_cost"] == pytest.approx(0.25) and run["teacher_cost_method"] == "on/off"
    assert teacher_step_cost(records(BASE, 100.0)) == (None, 0.0, None)  # a baseline has no teacher
    pair = paired(run, run_numbers(records(BASE, 100.0)))  # same curve: speedup 1, only the teacher's cost
    assert pair["speedup"] == pytest.approx(1.0)
    assert pair["wall_speedup_in_run"] == pytest.approx(1 / (1 + 0.25 / 3))


def test_teacher_step_cost_in_step_ignores_load_drift_and_prices_a_teacher_that_never_drops() -> None:
    # the teacher runs all along (on/off has nothing to compare with); each step is 1 s of
    # student and 0.1 s of teacher, all twice as slow from step 16 on (load)
    rows = records(BASE, 100.0, active_until=30)
    for row in rows:
        if "tokens_per_s" in row:
            load = 1.0 if row["step"] <= 15 else 2.0
            row.update(tokens_per_s=100.0 / (1.1 * load), teacher_s=0.1 * load)
    assert teacher_step_cost(rows) == (pytest.approx(0.1), pytest.approx(1.0), "in-step")
    run = run_numbers(rows)
    pair = paired(run, run_numbers(records(BASE, 100.0)))
    assert pair["wall_speedup_in_run"] == pytest.approx(1 / 1.1)
    summary = summarize({0: pair}, {0: run})
    assert summary["teacher_cost_method"] == "in-step" and summary["wall_speedup_in_run"]["mean"] == pytest.approx(1 / 1.1)
    # logged every 2 steps, the teacher dropped after step 3: the interval it drops in is left out
    mixed = [{"step": 2, "tokens": 200, "tokens_per_s": 200 / 2.2, "teacher_active": True, "teacher_s": 0.2},
             {"step": 4, "tokens": 400, "tokens_per_s": 200 / 2.1, "teacher_active": False, "teacher_s": 0.1},
             {"step": 6, "tokens": 600, "tokens_per_s": 200 / 2.0, "teacher_active": False, "teacher_s": 0.0}]
    assert teacher_step_cost(mixed) == (pytest.approx(0.1), pytest.approx(1 / 3), "in-step")


def test_teacher_pretraining_counted_once_over_seeds_and_as_zero() -> None:
    assert pooled_speedup([30.0, 30.0], [15.0, 15.0]) == pytest.approx(2.0)
    assert pooled_speedup([30.0, 30.0], [15.0, 15.0], teacher_seconds=30.0) == pytest.approx(1.0)
    base = run_numbers(records(BASE, 100.0))  # 1 s a step: 30 s to its final loss
    faster = records([(10, 4.0), (20, 2.0), (30, 1.5)], 100.0)  # there at step 15: 15 s
    pairs = {s: paired(run_numbers(faster), base, faster, records(BASE, 100.0)) for s in (0, 1, 2)}
    priced = teacher_priced(pairs, teacher_seconds=45.0)
    assert priced["reused"] == pytest.approx(2.0) and priced["counted_once"] == pytest.approx(90 / (45 + 45))
    assert not priced["upper_bound"] and priced["seeds"] == [0, 1, 2]
    assert teacher_priced({0: paired(run_numbers(faster), base)}, 45.0) is None  # no records, no seconds


def _line(slope: float, noise: float) -> list[tuple[float, float]]:
    """Three seeds at four size ratios: log speedup = 0.1 + slope x log ratio, +- noise by seed."""
    import math

    return [(ratio, math.exp(0.1 + slope * math.log(ratio) + noise * wiggle))
            for ratio in (1.4, 5.0, 11.6, 21.5) for wiggle in (-1.0, 0.3, 0.7)]


def test_trend_fit_recovers_a_known_slope() -> None:
    fit = trend_fit(_line(0.25, 0.02))
    assert fit["points"] == 12 and fit["slope"] == pytest.approx(0.25, abs=1e-9)  # the noise is the same at each ratio
    assert fit["intercept"] == pytest.approx(0.1, abs=1e-9) and fit["slope_se"] < 0.02
    assert fit["interval"][0] < 0.25 < fit["interval"][1]
    assert trend_verdict(fit) == "grows"
    assert trend_verdict(trend_fit(_line(-0.25, 0.02))) == "shrinks"


def test_flat_or_noisy_data_gives_flat_and_too_little_gives_no_data() -> None:
    assert trend_verdict(trend_fit(_line(0.0, 0.05))) == "flat"
    noisy = [(r, s * (1.5 if i % 2 else 0.7)) for i, (r, s) in enumerate(_line(0.05, 0.0))]
    fit = trend_fit(noisy)
    assert fit["interval"][0] < 0 < fit["interval"][1] and trend_verdict(fit) == "flat"
    assert trend_fit([(2.0, 1.5), (4.0, 1.6)]) is None  # fewer than 3 points
    assert trend_fit([(2.0, 1.5), (2.0, 1.6), (2.0, 1.4)]) is None  # one ratio: no slope
    assert trend_verdict(None) == "no data"


TEACHER = 5.0
BASELINE = [(10, 7.0), (20, 6.0), (30, 5.5), (40, 5.2), (50, 5.1)]


def test_a_student_passes_its_teacher_at_the_first_eval_strictly_below() -> None:
    assert crossing([(10, 6.0), (20, 5.0), (30, 4.9), (40, 5.1)], TEACHER) == {"step": 30, "last_step": 40, "gap_at_end": pytest.approx(0.1)}
    never = crossing(BASELINE, TEACHER)  # 5.1 at the end: never below, 0.1 short
    assert never["step"] is None and never["gap_at_end"] == pytest.approx(0.1)


def test_the_lead_after_the_crossing_is_read_against_the_same_steps_of_the_baseline() -> None:
    config = [(10, 6.5), (20, 5.4), (30, 4.9), (40, 4.7), (50, 4.95)]  # passes at 30, ahead by 0.6 then, 0.15 at the end
    lead = lead_after(config, BASELINE, 30)
    assert lead["at_crossing"] == pytest.approx(-0.6) and lead["at_end"] == pytest.approx(-0.15)
    assert lead["min"] == pytest.approx(-0.6) and lead["max"] == pytest.approx(-0.15)  # steps before 30 do not count
    assert lead["course"] == "shrinks"
    assert lead_after(config, BASELINE[::2], 20) is None  # the baseline has no eval at the crossing


def test_the_course_of_the_lead() -> None:
    assert lead_course(-0.2, -0.3) == "grows"
    assert lead_course(-0.2, -0.22) == lead_course(-0.2, -0.17) == "persists"  # within 20% either way
    assert lead_course(-0.2, -0.1) == "shrinks"
    assert lead_course(-0.2, 0.0) == lead_course(-0.2, 0.05) == "lost"
    assert lead_course(0.0, -0.3) == lead_course(0.1, -0.3) == "none at crossing"


def test_teacher_passing_per_seed_gives_a_lead_only_to_a_configuration_that_crossed() -> None:
    config = {0: [(10, 6.0), (20, 4.9)], 1: [(10, 6.0), (20, 5.3)], 2: []}  # seed 2: no eval yet
    baselines = {0: [(10, 6.5), (20, 5.2)], 1: [(10, 6.5), (20, 5.4)]}
    passing = teacher_passing(config, TEACHER, baselines)
    assert sorted(passing) == [0, 1]
    assert passing[0]["step"] == 20 and passing[0]["lead"]["at_crossing"] == pytest.approx(-0.3)
    assert passing[1]["step"] is None and passing[1]["lead"] is None
    assert "lead" not in teacher_passing(baselines, TEACHER)[0]  # a baseline has no lead over itself


LONG_BASE = [(10, 8.0), (20, 6.0), (30, 5.0), (40, 4.5), (50, 4.2), (60, 4.0), (70, 3.9), (80, 3.8)]


def test_speedup_course_reads_the_baseline_at_each_fraction_and_ends_at_the_paired_speedup() -> None:
    # ahead by 10 steps throughout: the lead in steps shrinks as a ratio (2x at a quarter, 1.14x at the end)
    run = [(s, loss) for s, loss in zip(range(10, 80, 10), [6.0, 5.0, 4.5, 4.2, 4.0, 3.9, 3.8])]
    course = speedup_course(run, LONG_BASE)
    assert list(course) == ["0.25", "0.5", "0.75", "1"]
    assert [c["baseline_step"] for c in course.values()] == [20, 40, 60, 80]
    assert [c["speedup"] for c in course.values()] == pytest.approx([2.0, 4 / 3, 1.2, 8 / 7])
    assert course["1"]["speedup"] == pytest.approx(paired(run_numbers(records(run, 100.0)), run_numbers(records(LONG_BASE, 100.0)))["speedup"])
    short = speedup_course(run[:2], LONG_BASE)  # stops at 5.0 (step 20): 4.5 and below never reached, bounded by its last step
    assert short["0.5"] == {"baseline_step": 40, "target": 4.5, "reached": False, "speedup": 2.0}


def test_course_verdict_compares_the_end_with_the_first_quarter() -> None:
    course = lambda first, end: {"course": {"0.25": {"mean": first, "std": 0.1}, "1": {"mean": end, "std": 0.2}}}  # noqa: E731
    assert course_verdict(course(1.5, 2.0)) == "grows"
    assert course_verdict(course(1.5, 1.6)) == course_verdict(course(1.5, 1.4)) == "persists"  # within the larger std
    assert course_verdict(course(2.0, 1.5)) == "shrinks"
    assert course_verdict({"course": None}) == "no data"
