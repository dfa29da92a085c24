"""Compare runs from their metric logs (``alignkit compare RUN [RUN ...]``); the speedup study
(benchmarks/study.py) and ``alignkit demo`` use the same functions.

Pure functions of a run's ``metrics.jsonl`` records: the eval curve of one metric, training
time (each train log interval's tokens / tokens_per_s, so evals and checkpoint writes are left
out and the teacher's forward is counted), the teacher's cost per step as a fraction of a student
step, and the mean cosine to the teacher while it is active. The teacher's cost is measured
``in-step`` when the records carry ``teacher_s`` (the seconds the teachers ran inside the logged
steps): teacher seconds over the rest of those steps' seconds, so load drift cancels and a teacher
that never drops is priced too; runs logged before that get the ``on/off`` estimate (time per
token while the teacher is active over time per token after it is dropped, minus 1). Against a
reference run: steps and training seconds to reach the reference's final value (linear
interpolation between evals; a run that never reaches it is bounded by its last step), the
speedups and the paired difference of final values (meaningful when both share a seed); over
seeds, the pooled time speedup with a teacher's pre-training counted once.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator, NamedTuple

from omegaconf import OmegaConf

from alignkit.core.errors import MissingFile

Records = list[dict[str, Any]]
Curve = list[tuple[int, float]]


def read_records(folder: Path) -> Records:
    """The run's ``metrics.jsonl``; a line cut off by a kill or by a run still writing is skipped."""
    path = Path(folder) / "metrics.jsonl"
    if not path.is_file():
        raise MissingFile(f"{folder}: no metrics.jsonl (not a run folder, or the run logged nothing yet)")
    rows = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:
            continue
    return [r for r in rows if isinstance(r, dict)]


def eval_curve(records: Records, key: str = "eval_loss") -> Curve:
    return [(r["step"], r[key]) for r in records if key in r]


def steps_to_reach(curve: Curve, target: float, mode: str = "min") -> float | None:
    """First step at which the curve reaches ``target`` (at or below it for ``min``, at or above
    for ``max``), linearly interpolated between evals; None if it never does."""
    sign = 1.0 if mode == "min" else -1.0
    previous = None
    for step, value in curve:
        if sign * value <= sign * target:
            if previous is None or previous[1] == value:
                return float(step)
            (s0, v0) = previous
            return s0 + (step - s0) * (v0 - target) / (v0 - value)
        previous = (step, value)
    return None


def spread(values: list[float]) -> dict[str, Any]:
    """Mean, sample std, min and max of one figure over seeds (or repeats), with the values."""
    mean = sum(values) / len(values)
    std = (sum((v - mean) ** 2 for v in values) / (len(values) - 1)) ** 0.5 if len(values) > 1 else 0.0
    return {"mean": mean, "std": std, "min": min(values), "max": max(values), "values": values}


class Interval(NamedTuple):
    """One train log interval: the steps since the previous train record, up to ``step``."""

    step: int
    tokens: int
    seconds: float
    teacher_active: bool  # at the interval's last step
    teacher_s: float | None  # seconds in the teachers (None: logged before alignkit timed them)


def intervals(records: Records) -> Iterator[Interval]:
    """The run's train log intervals, in order (eval records carry no ``tokens_per_s``)."""
    previous = 0
    for record in records:
        if "tokens_per_s" not in record:
            continue
        tokens, previous = record["tokens"] - previous, record["tokens"]
        seconds = tokens / record["tokens_per_s"] if record["tokens_per_s"] > 0 else 0.0
        yield Interval(record["step"], tokens, seconds, bool(record.get("teacher_active")), record.get("teacher_s"))


def train_time(records: Records) -> tuple[int, float]:
    """(total tokens, training seconds) of a run from its train records."""
    tokens, seconds = 0, 0.0
    for interval in intervals(records):
        tokens, seconds = tokens + interval.tokens, seconds + interval.seconds
    return tokens, seconds


def seconds_at(records: Records, step: float) -> float | None:
    """Training seconds spent up to (fractional) ``step``, interpolated within a log interval."""
    done, last = 0.0, 0
    for interval in intervals(records):
        if step <= interval.step:
            return done + interval.seconds * (step - last) / max(interval.step - last, 1)
        done, last = done + interval.seconds, interval.step
    return None


def teacher_step_cost(records: Records) -> tuple[float | None, float, str | None]:
    """(the teacher's extra time per step as a fraction of a student step, the fraction of tokens
    trained with the teacher active, how the cost was measured: ``in-step``, ``on/off`` or None
    when it could not be), from one run (see the module docstring)."""
    spans = list(intervals(records))
    on_tokens = sum(i.tokens for i in spans if i.teacher_active)
    total = sum(i.tokens for i in spans)
    fraction = on_tokens / total if total else 0.0
    for method, cost in (("in-step", _in_step_cost(spans)), ("on/off", _on_off_cost(spans))):
        if cost is not None:
            return cost, fraction, method
    return None, fraction, None


def _in_step_cost(intervals: list[Interval]) -> float | None:
    """Teacher seconds over student seconds (the rest) in the intervals with the teacher active
    that timed it: numerator and denominator come from the same steps. An interval whose teacher
    drops part-way counts as inactive (its last step) and is left out, as its student steps are."""
    timed = [i for i in intervals if i.teacher_active and i.teacher_s is not None]
    teacher = sum(i.teacher_s or 0.0 for i in timed)
    student = sum(i.seconds for i in timed) - teacher
    return teacher / student if timed and student > 0 else None


def _on_off_cost(intervals: list[Interval]) -> float | None:
    """Time per token with the teacher active over time per token after it is dropped, minus 1
    (needs both; the two halves may meet different machine load)."""
    side = {True: [0, 0.0], False: [0, 0.0]}  # teacher active -> [tokens, seconds]
    for interval in intervals:
        side[interval.teacher_active][0] += interval.tokens
        side[interval.teacher_active][1] += interval.seconds
    (on_tokens, on_s), (off_tokens, off_s) = side[True], side[False]
    if not (on_tokens and off_tokens and off_s):
        return None
    return (on_s / on_tokens) / (off_s / off_tokens) - 1


def aligned_cosine(records: Records) -> float | None:
    """Mean cosine to the teacher over the steps it is active (pairs averaged per step)."""
    per_step = []
    for record in records:
        values = [v for k, v in record.items() if k.startswith("cos/")]
        if values and record.get("teacher_active", True):
            per_step.append(sum(values) / len(values))
    return sum(per_step) / len(per_step) if per_step else None


def teacher_dropped(records: Records) -> int | None:
    """The last step trained with the teacher (None: none was)."""
    return max((r["step"] for r in records if r.get("teacher_active")), default=None)


def run_numbers(records: Records, metric: str = "eval_loss", mode: str = "min") -> dict[str, Any]:
    """What a comparison keeps about one run; ``<metric>_curve`` and ``final_<metric>`` name the
    eval metric compared (lower is better for ``mode`` min)."""
    curve = eval_curve(records, metric)
    tokens, seconds = train_time(records)
    cost, fraction, method = teacher_step_cost(records)
    return {"metric": metric, "mode": mode, f"{metric}_curve": curve, f"final_{metric}": curve[-1][1] if curve else None,
            "last_step": curve[-1][0] if curve else None, "tokens": tokens, "train_seconds": seconds,
            "tokens_per_s": tokens / seconds if seconds else None, "cosine_aligned": aligned_cosine(records),
            "teacher_step_cost": cost, "teacher_cost_method": method, "teacher_fraction": fraction,
            "teacher_dropped": teacher_dropped(records)}


def pooled_speedup(baseline_seconds: list[float], seconds: list[float], teacher_seconds: float = 0.0) -> float:
    """Training seconds summed over seeds, the baseline's over the run's plus a teacher's
    pre-training counted once (one pre-trained teacher serves every seed; 0: a reused one)."""
    return sum(baseline_seconds) / (sum(seconds) + teacher_seconds)


def speedup_to(curve: Curve, baseline: Curve, target: float, mode: str = "min") -> tuple[float | None, float | None, float]:
    """Steps the baseline first needs to reach ``target``, steps the run (``curve``) needs (None:
    never) and the speedup, the first over the second."""
    base_steps, steps = steps_to_reach(baseline, target, mode), steps_to_reach(curve, target, mode)
    # never reached: the run needs more than its last step, so this bounds the speedup from above
    return base_steps, steps, base_steps / (steps if steps is not None else curve[-1][0])


def paired(run: dict[str, Any], baseline: dict[str, Any], run_records: Records | None = None,
           baseline_records: Records | None = None) -> dict[str, Any]:
    """``run`` against ``baseline`` (both from :func:`run_numbers`, same metric): steps (and,
    given the records, training seconds) to the baseline's final value, and the speedups."""
    metric, mode = baseline["metric"], baseline["mode"]
    curve, final = f"{metric}_curve", f"final_{metric}"
    target = baseline[final]
    base_steps, steps, speedup = speedup_to(run[curve], baseline[curve], target, mode)
    reached = steps is not None
    throughput = (run["tokens_per_s"] / baseline["tokens_per_s"]) if run["tokens_per_s"] and baseline["tokens_per_s"] else None
    # the same, with the throughput ratio from the run's own timing (teacher cost over the aligned part)
    cost = run.get("teacher_step_cost")
    out = {f"target_{metric}": target, "baseline_steps": base_steps, "steps": steps, "reached": reached,
           "speedup": speedup, "throughput_ratio": throughput,
           "wall_speedup": speedup * throughput if throughput is not None else None,
           "wall_speedup_in_run": speedup / (1 + cost * run["teacher_fraction"]) if cost is not None else None,
           "loss_diff": run[final] - target}  # the compared metric's difference (a loss, usually)
    if run_records is not None and baseline_records is not None:
        base_s = seconds_at(baseline_records, base_steps)
        seconds = seconds_at(run_records, steps if reached else run["last_step"])
        out.update(baseline_seconds=base_s, seconds=seconds if reached else None, seconds_bound=seconds,
                   seconds_speedup=base_s / seconds if base_s and seconds else None)
    return out


def metric_of(folder: Path) -> tuple[str, str]:
    """The metric a run is compared on: its ``train.select_metric`` (and ``select_mode``) when
    set, else the first eval metric its task declares, lower being better."""
    from alignkit.experiment import task_spec

    config = Path(folder) / "config.yaml"
    if not config.is_file():
        raise MissingFile(f"{folder}: no config.yaml (not a run folder)")
    cfg = OmegaConf.load(config)
    if cfg.train.get("select_metric"):
        return cfg.train.select_metric, cfg.train.get("select_mode", "max")
    metrics = task_spec(cfg.task.get("name", "text_pretrain")).metrics
    return (metrics[0] if metrics else "eval_loss"), "min"


def compare(folders: list[Path], metric: str | None = None, mode: str | None = None) -> dict[str, Any]:
    """Every run against the first (see the module docstring); JSON-ready."""
    folders = [Path(f) for f in folders]
    if metric is None:
        metric, default_mode = metric_of(folders[0])
        mode = mode or default_mode
    mode = mode or "min"
    records = {f: read_records(f) for f in folders}
    numbers = {f: run_numbers(records[f], metric, mode) for f in folders}
    reference = folders[0]
    if numbers[reference][f"final_{metric}"] is None:
        raise MissingFile(f"{reference}: no {metric} evaluation logged yet (compare after its first eval, or pass --metric)")
    seeds = {f: OmegaConf.load(f / "config.yaml").train.get("seed") if (f / "config.yaml").is_file() else None for f in folders}
    runs = []
    for folder in folders:
        entry = {"name": folder.name, "folder": str(folder), "seed": seeds[folder],
                 "finished": (folder / "results.json").is_file(), **numbers[folder]}
        if numbers[folder][f"final_{metric}"] is not None:
            entry["vs_first"] = paired(numbers[folder], numbers[reference], records[folder], records[reference])
            entry["vs_first"]["same_seed"] = seeds[folder] == seeds[reference]
        runs.append(entry)
    return {"metric": metric, "mode": mode, "reference": reference.name, "runs": runs}


def _fmt(value: float | None, spec: str, suffix: str = "") -> str:
    return "-" if value is None else f"{value:{spec}}{suffix}"


def table(result: dict[str, Any]) -> str:
    """The comparison as a fixed-width table for the terminal."""
    metric = result["metric"]
    head = ("run", "seed", f"final {metric}", "diff (paired)", f"steps to {result['reference']}'s final", "x steps",
            "train s to it", "x time", "teacher cost/step", "state")
    rows = [head]
    for run in result["runs"]:
        pair = run.get("vs_first") or {}
        if pair and pair["reached"]:
            steps, seconds = _fmt(pair["steps"], ".1f"), _fmt(pair["seconds"], ".0f")
        elif pair:
            steps, seconds = f"not reached (>{run['last_step']})", f">{_fmt(pair['seconds_bound'], '.0f')}"
        else:
            steps = seconds = "-"
        diff = "-" if not pair else _fmt(pair["loss_diff"], "+.4f") + ("" if pair["same_seed"] else " (other seed)")
        bound = "<=" if pair and not pair["reached"] else ""
        rows.append((run["name"], str(run["seed"]), _fmt(run[f"final_{metric}"], ".4f"), diff, steps,
                     bound + _fmt(pair.get("speedup"), ".2f", "x"), seconds,
                     _fmt(pair.get("seconds_speedup"), ".2f", "x") if pair.get("reached") else "-",
                     _fmt(run["teacher_step_cost"], "+.2f", f" {run['teacher_cost_method']}"),
                     f"{'finished' if run['finished'] else 'running'} @ step {run['last_step']}"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows]
    return "\n".join([lines[0], "  ".join("-" * w for w in widths)] + lines[1:])


def plot_panels(path: Path, panels: list[dict[str, Any]], title: str = "") -> None:
    """Side by side, one axes per panel: ``{"title", "ylabel", "curves": {label: curve},
    "vlines": {label: x}, "hlines": {label: y}}`` (markers: dashed / dotted, with legend labels)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(7 * len(panels), 4.5), squeeze=False)
    for ax, panel in zip(axes[0], panels):
        for label, curve in panel["curves"].items():
            ax.plot([s for s, _ in curve], [v for _, v in curve], marker="o", markersize=3, label=label)
        for (label, x), style in zip(panel.get("vlines", {}).items(), ("--", "-.", ":", (0, (5, 5)))):
            ax.axvline(x, color="grey", linestyle=style, linewidth=1, label=label)
        for label, y in panel.get("hlines", {}).items():
            ax.axhline(y, color="black", linestyle=":", linewidth=1, label=label)
        ax.set_xlabel("step")
        ax.set_ylabel(panel.get("ylabel", ""))
        ax.set_title(panel.get("title", ""))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_curves(path: Path, curves: dict[str, Curve], title: str, ylabel: str = "eval loss",
                vlines: dict[str, float] | None = None, hlines: dict[str, float] | None = None) -> None:
    """One axes of curves (see :func:`plot_panels`)."""
    plot_panels(path, [{"title": title, "ylabel": ylabel, "curves": curves, "vlines": vlines or {}, "hlines": hlines or {}}])


def plot_comparison(path: Path, result: dict[str, Any]) -> None:
    """The eval curves of a :func:`compare` result."""
    metric, runs = result["metric"], result["runs"]
    plot_curves(path, {r["name"]: r[f"{metric}_curve"] for r in runs}, f"{metric} by step", metric,
                vlines={f"{r['name']}: teacher dropped": r["teacher_dropped"] for r in runs if r["teacher_dropped"]},
                hlines={f"{runs[0]['name']}'s final {metric}": runs[0][f"final_{metric}"]})
