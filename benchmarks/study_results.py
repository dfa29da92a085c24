"""A finished study's numbers (issue 12, issue 19): per-run figures, each configuration paired with its
same-seed baseline (speedups, loss differences, verdicts), the small teacher's pre-training priced,
when each run passes the frozen teacher's eval loss, and the grid's claims with their verdicts.
study.py plans and runs the grid; study_analysis holds the statistics these use.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from study_analysis import (best_verdict, course_verdict, larger_verdict, speedup_course, summarize, teacher_passing,
                            teacher_priced, trend_fit, trend_verdict, verdict)
from study_runner import Run

from alignkit.compare import paired, read_records, run_numbers

TEACHER_KEYS = ("teacher.", "teachers.")
EVAL_KEYS = ("task.", "train.micro_batch_size", "train.precision")  # what sets the eval batches and how they are run


def override_key(override: str) -> str:
    """``a.b=c`` -> ``a.b``."""
    return override.split("=", 1)[0]


def run_facts(folder: Path) -> dict[str, Any]:
    """What a finished run's results.json records beside its metrics: the student's parameter count
    (None for runs from before alignkit recorded it)."""
    return {"student_params": json.loads((folder / "results.json").read_text()).get("student_params")}


def analyse(runs: list[Run], baseline_of: dict[str, str], out: Path, pretrain: Run | None = None,
            line: dict[str, Any] | None = None, reference: list[str] = ()) -> dict[str, Any]:
    """Per-run numbers, per-seed paired figures and the summary of every configuration; with the
    small teacher's finished pre-training run, its cost and size, and each configuration's time
    speedup with that cost counted once and as zero; with the teacher's eval loss (``line``, see
    study_teacher; ``reference``: the overrides that set the study's teacher and eval batches), when
    each run passes it and the lead after that (:func:`teacher_crossings`)."""
    finished = [r for r in runs if (out / r.name / "results.json").is_file()]
    records = {r.name: read_records(out / r.name) for r in finished}
    numbers = {r.name: run_numbers(records[r.name]) | run_facts(out / r.name) for r in finished}
    teacher = None
    if pretrain is not None and (out / pretrain.name / "results.json").is_file():
        teacher = {"run": pretrain.name, "overrides": pretrain.overrides, **run_facts(out / pretrain.name),
                   "train_seconds": run_numbers(read_records(out / pretrain.name))["train_seconds"]}
    by_config: dict[str, dict[int, dict[str, Any]]] = {}
    for r in runs:
        if r.name in numbers:
            by_config.setdefault(r.config, {})[r.seed] = numbers[r.name]
    configs = {}
    for name, baseline in baseline_of.items():
        seeds = sorted(set(by_config.get(name, {})) & set(by_config.get(baseline, {})))
        pairs = {s: paired(by_config[name][s], by_config[baseline][s], records[f"{name}-s{s}"], records[f"{baseline}-s{s}"])
                 for s in seeds}
        for s in seeds:
            pairs[s]["course"] = speedup_course(by_config[name][s]["eval_loss_curve"], by_config[baseline][s]["eval_loss_curve"])
        summary = summarize(pairs, {s: by_config[name][s] for s in seeds})
        configs[name] = {"baseline": baseline, "per_seed": pairs, "summary": summary, "verdict": verdict(summary)}
        if teacher is not None:
            configs[name]["teacher_priced"] = teacher_priced(pairs, teacher["train_seconds"])
    baselines = {b: {s: by_config[b][s]["final_eval_loss"] for s in sorted(by_config.get(b, {}))}
                 for b in sorted(set(baseline_of.values()))}
    result = {"runs": numbers, "configs": configs, "baseline_final_eval_loss": baselines, "teacher_pretrain": teacher}
    if line is not None:
        result["teacher_eval_loss"] = line
        if line["value"] is not None:
            result["teacher_crossings"] = teacher_crossings(runs, baseline_of, numbers, line["value"], reference)
    return result


def on_teacher_line(overrides: list[str], reference: list[str], baseline: bool) -> bool:
    """Whether the study's teacher eval loss applies to a run with ``overrides``: the same eval
    batches as ``reference`` (the overrides that set the study's teacher and data), and the same
    teacher unless the run is a baseline (it has none). A configuration of its own teacher (grid
    ``teacher``'s untrained one) is left out."""
    pick = lambda keys, items: {override_key(o): o for o in items if override_key(o).startswith(keys)}  # noqa: E731
    same = lambda keys: pick(keys, overrides) == pick(keys, reference)  # noqa: E731
    return same(EVAL_KEYS) and (baseline or same(TEACHER_KEYS))


def any_on_teacher_line(runs: list[Run], baseline_of: dict[str, str], reference: list[str]) -> bool:
    """Whether any configuration's run is compared with the study's teacher; when none is (every
    configuration brings a teacher of its own), that teacher's eval loss is not worth measuring."""
    return any(on_teacher_line(r.overrides, reference, False) for r in runs if r.config in baseline_of)


def teacher_crossings(runs: list[Run], baseline_of: dict[str, str], numbers: dict[str, dict[str, Any]], teacher_loss: float,
                      reference: list[str]) -> dict[str, dict[int, dict[str, Any]]]:
    """Per baseline and configuration on the teacher's line (:func:`on_teacher_line`), per finished
    seed: when its eval curve passes ``teacher_loss`` and, for a configuration, its lead over the
    same-seed baseline after that (study_analysis.teacher_passing)."""
    curves: dict[str, dict[int, Any]] = {}
    for r in runs:
        baseline = r.config not in baseline_of
        if r.name in numbers and on_teacher_line(r.overrides, reference, baseline):
            curves.setdefault(r.config, {})[r.seed] = numbers[r.name]["eval_loss_curve"]
    out = {b: teacher_passing(curves[b], teacher_loss) for b in sorted(set(baseline_of.values())) if b in curves}
    for name, baseline in baseline_of.items():
        if name in curves:
            out[name] = teacher_passing(curves[name], teacher_loss, curves.get(baseline, {}))
    return out


def trend_points(names: list[str], result: dict[str, Any]) -> list[dict[str, Any]]:
    """Each (configuration, seed) of ``names``: the student/teacher parameter ratio and the speedup in
    steps, for runs that recorded their student's size, against the small teacher's pre-training run."""
    teacher = (result.get("teacher_pretrain") or {}).get("student_params")
    points = []
    for name in names:
        for seed, pair in result["configs"].get(name, {}).get("per_seed", {}).items():
            params = result["runs"][f"{name}-s{seed}"]["student_params"]
            if teacher and params:
                points.append({"config": name, "seed": seed, "student_params": params, "ratio": params / teacher,
                               "speedup": pair["speedup"], "reached": pair["reached"]})
    return points


def claims(grid: dict[str, Any], result: dict[str, Any]) -> list[dict[str, Any]]:
    """The grid's paper claims with a verdict computed from the summaries (VERDICT_RULE); a trend
    claim fits its ``configs`` (default: all)."""
    configs = result["configs"]
    summaries = {n: c["summary"] for n, c in configs.items()}
    out = []
    for claim in grid.get("claims", []):
        kind = claim.get("kind", "speedup")
        if kind == "trend":
            names = [n for n in claim.get("configs", list(grid["configs"])) if n in configs]
            if names:
                points = trend_points(names, result)
                fit = trend_fit([(p["ratio"], p["speedup"]) for p in points])
                out.append(claim | {"verdict": trend_verdict(fit), "fit": fit, "points": points})
            continue
        name = claim["config"]
        if name not in configs or claim.get("than", name) not in configs:  # e.g. a study run with --only
            continue
        if kind == "best":
            judged = best_verdict(summaries, name)
        elif kind == "course":
            judged = course_verdict(summaries[name])
        elif kind == "larger_than":
            judged = larger_verdict(summaries[name], summaries[claim["than"]])
        else:
            judged = configs[name]["verdict"]
        out.append(claim | {"verdict": judged})
    return out
