"""What the study writes for people: one PNG per grid (eval-loss curves, mean over seeds with
a min-max band, and the frozen teacher's eval loss as a line; speedups in steps and wall-clock with
per-seed dots; for a trend claim, speedup against the student/teacher size ratio with the fitted
line) and the markdown report (a table per grid, the small teacher's pre-training priced in, when
each student passes its teacher and the lead after that, the fitted trend, and the paper's claims
against our measurement), rebuilt from the JSONs.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from common import save_figure
from study_analysis import HOLDS_MEAN, LEAD_RULE, VERDICT_RULE, gain_verdict


def _curves(payload: dict[str, Any], config: str) -> list[list[tuple[int, float]]]:
    return [payload["runs"][f"{config}-s{seed}"]["eval_loss_curve"] for seed in payload["seeds"]
            if f"{config}-s{seed}" in payload["runs"]]


# several baselines (a budget grid) are all black, told apart by dash pattern
BASELINE_DASHES = ("-", "--", ":", "-.")


def plot_study(path: Path, payload: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    trend = next((c for c in payload.get("claims", []) if c.get("fit")), None)
    courses = [c["config"] for c in payload.get("claims", []) if c.get("kind") == "course"
               and (payload["configs"].get(c["config"], {}).get("summary") or {}).get("course")]
    panels = 2 + bool(trend) + bool(courses)
    fig, axes = plt.subplots(1, panels, figsize=(6.5 * panels, 4.8))
    left, right = axes[:2]
    configs = payload["configs"]
    baselines = sorted({c["baseline"] for c in configs.values()})
    for name in baselines + list(configs):
        curves = _curves(payload, name)
        if not curves:
            continue
        steps = [s for s, _ in curves[0]]
        columns = [[c[i][1] for c in curves if len(c) > i] for i in range(len(steps))]
        mean = [sum(col) / len(col) for col in columns]
        style = {}
        if name in baselines:
            style = {"color": "black", "linewidth": 2, "linestyle": BASELINE_DASHES[baselines.index(name) % len(BASELINE_DASHES)]}
        line, = left.plot(steps, mean, label=name, **style)
        left.fill_between(steps, [min(c) for c in columns], [max(c) for c in columns], alpha=0.15, color=line.get_color())
    teacher = (payload.get("teacher_eval_loss") or {}).get("value")
    if teacher is not None:  # frozen while the students train: one number
        left.axhline(teacher, color="dimgrey", linestyle=":", linewidth=1.5, label=f"teacher (frozen): {teacher:.3f}")
    left.set_xlabel("step")
    left.set_ylabel("eval loss (mean over seeds, band min-max)")
    left.set_title(f"{payload['name']}: eval loss, seeds {payload['seeds']}")
    left.grid(alpha=0.3)
    left.legend(fontsize=8)
    names = list(configs)
    bars = (("speedup", "steps"), ("wall_speedup", "wall-clock"), ("wall_speedup_in_run", "wall-clock, in-run teacher cost"))
    for offset, (key, label) in zip((-0.27, 0.0, 0.27), bars):
        means = [(configs[n]["summary"].get(key) or {}).get("mean", 0.0) for n in names]
        right.bar([i + offset for i in range(len(names))], means, width=0.27, alpha=0.6, label=f"{label} (mean)")
        for i, name in enumerate(names):
            for seed, pair in configs[name]["per_seed"].items():
                if pair.get(key) is not None:
                    right.scatter(i + offset, pair[key], s=18, color="black",
                                  facecolors="black" if pair["reached"] else "none", zorder=3)
    right.axhline(1.0, color="grey", linewidth=1)
    right.axhline(HOLDS_MEAN, color="grey", linestyle="--", linewidth=1, label=f"'holds' threshold {HOLDS_MEAN}")
    right.set_xticks(range(len(names)), names, rotation=30, ha="right")
    right.set_ylabel("speedup to the baseline's final eval loss")
    right.set_title("per seed: dots (hollow: never reached, upper bound)")
    right.grid(alpha=0.3, axis="y")
    right.legend(fontsize=8)
    if trend:
        plot_trend(axes[2], trend)
    if courses:
        plot_course(axes[-1], payload, courses)
    save_figure(fig, path)
    print(f"wrote {path}")


def plot_trend(ax: Any, claim: dict[str, Any]) -> None:
    """A trend claim's points (per seed; hollow: never reached, upper bound) and fitted line, log-log."""
    import math

    from matplotlib.ticker import ScalarFormatter

    fit, points = claim["fit"], claim["points"]
    for name in dict.fromkeys(p["config"] for p in points):
        mine = [p for p in points if p["config"] == name]
        color = ax.scatter([p["ratio"] for p in mine], [p["speedup"] for p in mine], s=22, label=name).get_facecolor()[0]
        for p in mine:
            if not p["reached"]:
                ax.scatter(p["ratio"], p["speedup"], s=22, facecolors="white", edgecolors=color, zorder=3)
    low, high = min(p["ratio"] for p in points), max(p["ratio"] for p in points)
    ratios = [low * (high / low) ** (i / 20) for i in range(21)]
    ax.plot(ratios, [math.exp(fit["intercept"]) * r ** fit["slope"] for r in ratios], color="black", label="least squares")
    ax.axhline(1.0, color="grey", linewidth=1)
    ax.set_xscale("log")
    ax.set_yscale("log")
    for axis in (ax.xaxis, ax.yaxis):  # plain numbers on the log axes, not powers of ten
        axis.set_major_formatter(ScalarFormatter())
        axis.set_minor_formatter(ScalarFormatter())
    ax.set_xlabel("student / teacher parameters")
    ax.set_ylabel("speedup in steps")
    ax.set_title(f"slope {fit['slope']:.2f} ± {fit['slope_se']:.2f}: {claim['verdict']}")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)


def plot_course(ax: Any, payload: dict[str, Any], names: list[str]) -> None:
    """Each 'course' claim's configuration: its speedup in steps at each fraction of the baseline's run,
    the mean over seeds joined, the seeds as dots (hollow: never reached, upper bound)."""
    for name in names:
        entry = payload["configs"][name]
        fractions = list(entry["summary"]["course"])
        color = ax.plot([float(f) for f in fractions], [entry["summary"]["course"][f]["mean"] for f in fractions],
                        marker="o", label=name)[0].get_color()
        for pair in entry["per_seed"].values():
            for fraction, point in pair["course"].items():
                ax.scatter(float(fraction), point["speedup"], s=14, color=color, zorder=3,
                           facecolors=color if point["reached"] else "none")
    ax.axhline(1.0, color="grey", linewidth=1)
    ax.set_xlabel("fraction of the baseline's run")
    ax.set_ylabel("speedup in steps to the baseline's loss there")
    ax.set_title("speedup over the run (seeds: dots)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)


def trend_words(claim: dict[str, Any]) -> str:
    """A trend claim's fit in one line."""
    fit = claim.get("fit")
    if not fit:
        return f"trend: no data ({len(claim.get('points', []))} points with recorded sizes)"
    low, high = fit["interval"]
    bound = sum(not p["reached"] for p in claim["points"])
    return (f"speedup ∝ (student/teacher params)^{fit['slope']:.2f} (slope ± standard error {fit['slope']:.2f} ± "
            f"{fit['slope_se']:.2f}, 95% interval [{low:.2f}, {high:.2f}], {fit['points']} points"
            + (f", {bound} of them upper bounds" if bound else "") + f"): {claim['verdict']}")


def teacher_words(settings: dict[str, Any]) -> str:
    """Which teacher a study used; for the small one, what it was pre-trained on and how long."""
    if settings["teacher"] != "small":
        return settings["teacher"]
    corpus = settings.get("teacher_corpus_name") or "the student's train file"
    return f"small, pre-trained {settings['teacher_steps']} steps on {corpus}"


def corpus_words(settings: dict[str, Any]) -> str:
    """Which text a study trained and evaluated on (a grid's description names the corpus it was
    written for), and which of its configurations ran when --only picked some."""
    corpus = settings.get("corpus_name") if settings.get("corpus") else "wikitext2"
    holdout = f", {settings['holdout']:g} of the train file held out to evaluate" if settings.get("holdout") else ""
    only = f", only {settings['only'].replace(',', ', ')}" if settings.get("only") else ""
    return f"corpus {corpus}{holdout}{only}"


def teacher_cost_lines(payload: dict[str, Any]) -> list[str]:
    """The small teacher's pre-training priced into each configuration's time speedup."""
    teacher = payload.get("teacher_pretrain")
    if not teacher:
        return []
    params = f", {teacher['student_params'] / 1e6:.1f}M parameters" if teacher.get("student_params") else ""
    lines = [f"The small teacher's pre-training ({teacher['run']}{params}) took {teacher['train_seconds']:.0f} s of "
             "training steps. Training time to the baseline's final eval loss, summed over seeds, baseline / configuration "
             "(the runs' own times, so the load each run met is in them; a seed that never got there counts its whole run: "
             "an upper bound):", "",
             "| configuration | teacher reused (its pre-training counted as zero) | teacher trained for this study (counted once) |",
             "|---|---|---|"]
    for name, entry in payload["configs"].items():
        priced = entry.get("teacher_priced")
        if priced:
            bound = " (upper bound)" if priced["upper_bound"] else ""
            lines.append(f"| {name} | {priced['reused']:.2f}x{bound} | {priced['counted_once']:.2f}x{bound} |")
    return lines + [""]


def step_costs_by_study(results: Path) -> dict[str, tuple[str, dict[str, Any]]]:
    """Study name -> (file name, JSON) of each ``benchmarks/step_cost.py`` file under ``results``
    that priced a study (named step_cost-GRID or step_cost-STUDY; other copies are left out)."""
    found = {}
    for path in sorted(results.glob("step_cost-*.json")):
        payload = json.loads(path.read_text())
        study = Path(payload.get("study") or "").stem
        if payload.get("wall") and path.stem in (f"step_cost-{payload.get('grid')}", f"step_cost-{study}"):
            found[study] = (path.name, payload)
    return found


def step_cost_lines(priced: tuple[str, dict[str, Any]] | None) -> list[str]:
    """The study's seeds priced at step costs measured interleaved: wall-clock free of the load
    that the runs' own times (the table above) carry."""
    if not priced:
        return []
    name, payload = priced
    lines = [f"Wall-clock at step costs measured interleaved (`benchmarks/step_cost.py`, `{name}`): each seed's steps to "
             "the baseline's final eval loss priced at the measured time of a step with the teacher active and after it "
             "is dropped, over the baseline's step (a seed that never got there counts its whole run: an upper bound):", "",
             "| configuration | priced at | per seed | mean ± std | pooled over seeds, teacher reused | "
             "pooled, its pre-training counted once |", "|---|---|---|---|---|---|"]
    for config, entry in payload["wall"].items():
        seeds = " / ".join(f"{v['wall_speedup']:.2f}" for v in entry["per_seed"].values())
        wall, teacher = entry["wall_speedup"], entry.get("teacher_pretrain")
        pooled = (f"{teacher['reused']:.2f}x | {teacher['counted_once']:.2f}x ({teacher['seconds']:.0f} s = "
                  f"{teacher['baseline_steps']:.0f} baseline steps)") if teacher else "- | -"
        lines.append(f"| {config} | {payload['grid']}'s {(payload.get('priced_as') or {}).get(config, config)} | {seeds} | "
                     f"{wall['mean']:.2f} ± {wall['std']:.2f}x | {pooled} |")
    return lines + [""]


def _figure(summary: dict[str, Any], key: str, digits: int = 3) -> str:
    value = summary.get(key)
    if not value:
        return "-"
    return f"{value['mean']:.{digits}f} ± {value['std']:.{digits}f}"


def _per_seed(pairs: dict[Any, dict[str, Any]], key: str, fmt: str) -> str:
    values = [pairs[s][key] for s in sorted(pairs, key=int)]
    return " / ".join("-" if v is None else format(v, fmt) for v in values)


def _cost_method(numbers: dict[str, Any]) -> str | None:
    """How a run's (or a configuration's) teacher cost was measured: ``in-step``, ``on/off``. A
    study JSON written before alignkit timed its teachers has no such key: its costs are on/off."""
    return numbers.get("teacher_cost_method", "on/off")


def _pooled_cost(payload: dict[str, Any]) -> str:
    runs = [r for r in payload["runs"].values() if r.get("teacher_step_cost") is not None]
    if not runs:
        return ""
    costs = [r["teacher_step_cost"] for r in runs]
    mean = sum(costs) / len(costs)
    std = (sum((c - mean) ** 2 for c in costs) / max(1, len(costs) - 1)) ** 0.5
    methods = ", ".join(sorted({_cost_method(r) for r in runs}))
    return (f" Teacher cost per step measured inside each run ({methods}), pooled over its {len(costs)} runs with a "
            f"teacher: {mean:+.2f} ± {std:.2f} of a student step.")


def grid_table(payload: dict[str, Any], step_costs: tuple[str, dict[str, Any]] | None = None) -> list[str]:
    settings = payload["settings"]
    lines = [f"## {payload['name']}", "", payload.get("description", ""), "",
             f"Grid `{payload['grid']}`, {corpus_words(settings)}, seeds {payload['seeds']}, {settings['steps']} steps unless the configuration sets "
             f"its own, base `{Path(settings['base']).name}`, teacher: {teacher_words(settings)}, "
             f"{len(payload['runs'])} runs, {sum(r['train_seconds'] for r in payload['runs'].values()) / 60:.1f} min of training steps"
             + (f"; **failed: {', '.join(payload['runs_failed'])}**" if payload["runs_failed"] else "")
             + (f"; not run yet: {', '.join(payload['runs_pending'])}" if payload.get("runs_pending") else "") + "."
             + _pooled_cost(payload), "",
             "| configuration | speedup in steps (mean ± std) | per seed (min) | reached | wall-clock speedup | "
             "throughput vs baseline | teacher cost per step (in-run) | wall-clock at in-run cost | final eval loss | "
             "minus baseline, per seed | cosine while aligned | verdict |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, entry in payload["configs"].items():
        s, pairs = entry["summary"], entry["per_seed"]
        bound = " (upper bound)" if s.get("speedup_is_upper_bound") else ""
        minimum = f" ({s['speedup']['min']:.2f})" if s.get("speedup") else ""
        cost_method = f" ({_cost_method(s)})" if s.get("teacher_step_cost") else ""
        lines.append(f"| {name} | {_figure(s, 'speedup', 2)}{bound} | {_per_seed(pairs, 'speedup', '.2f')}{minimum} | "
                     f"{s['reached']}/{len(s['seeds'])} | {_figure(s, 'wall_speedup', 2)} | {_figure(s, 'throughput_ratio', 2)} | "
                     f"{_figure(s, 'teacher_step_cost', 2)}{cost_method} | {_figure(s, 'wall_speedup_in_run', 2)} | "
                     f"{_figure(s, 'final_eval_loss')} | {_per_seed(pairs, 'loss_diff', '+.3f')} | "
                     f"{_figure(s, 'cosine_aligned')} | {entry['verdict']} |")
    trends = [f"Trend ({claim['claim']}): {trend_words(claim)}." for claim in payload.get("claims", []) if claim.get("kind") == "trend"]
    return (lines + [""] + teacher_cost_lines(payload) + step_cost_lines(step_costs) + teacher_line_lines(payload) + course_lines(payload)
            + [line for trend in trends for line in (trend, "")])


def course_words(entry: dict[str, Any]) -> str:
    """A configuration's speedup over its run, mean ± std at each fraction (study_analysis.speedup_course)."""
    course = entry["summary"].get("course") or {}
    return " -> ".join(f"{spread['mean']:.2f} ± {spread['std']:.2f}x at {fraction}" for fraction, spread in course.items()) or "-"


def course_lines(payload: dict[str, Any]) -> list[str]:
    """Per 'course' claim's configuration: its speedup over the run, per seed at each fraction of
    the baseline's run, with the baseline's eval step and loss used as the target (seed 0's)."""
    lines = []
    for claim in payload.get("claims", []):
        entry = payload["configs"].get(claim["config"]) if claim.get("kind") == "course" else None
        if not entry or not entry["summary"].get("course"):
            continue
        seeds = sorted(entry["per_seed"], key=int)
        lines += [f"Speedup over the run ({claim['claim']}): {claim['config']} against {entry['baseline']}, the steps the "
                  "baseline needs to reach its eval loss at each fraction of its run over the steps the configuration needs "
                  f"(per seed {' / '.join(f's{s}' for s in seeds)}); {claim['verdict']}.", "",
                  "| fraction of the run | baseline eval step | speedup in steps (mean ± std) | per seed |", "|---|---|---|---|"]
        for fraction, spread in entry["summary"]["course"].items():
            points = [entry["per_seed"][s]["course"][fraction] for s in seeds]
            per_seed = " / ".join(f"{p['speedup']:.2f}" + ("" if p["reached"] else " (bound)") for p in points)
            lines.append(f"| {fraction} | {points[0]['baseline_step']} | {spread['mean']:.2f} ± {spread['std']:.2f}x | {per_seed} |")
        lines.append("")
    return lines


def _seeds_of(seeds: list[int], passing: dict[str, dict[str, Any]], show: Any) -> str:
    """One figure per seed of the study, ``show`` making it from the seed's entry ('-': the seed has
    not run, or ``show`` gives None)."""
    values = [show(passing[str(s)]) if str(s) in passing else None for s in seeds]
    return " / ".join("-" if v is None else v for v in values)


def _lead(key: str, fmt: str = "+.3f") -> Any:
    """What :func:`_seeds_of` shows of a seed's lead after its crossing (None: it has none)."""
    return lambda e: format(e["lead"][key], fmt) if e.get("lead") else None


def teacher_line_lines(payload: dict[str, Any]) -> list[str]:
    """The teacher's eval loss, and per run when its student passes it and what the lead over the
    baseline does after that (study_analysis.LEAD_RULE), per seed."""
    teacher = payload.get("teacher_eval_loss")
    if not teacher:
        return []
    if teacher["value"] is None:
        return [f"Teacher (frozen) eval loss: not available ({teacher['skipped']}).", ""]
    crossings, seeds = payload.get("teacher_crossings", {}), payload["seeds"]
    per_seed = lambda passing, show: _seeds_of(seeds, passing, show)  # noqa: E731
    lines = [f"Teacher (frozen) eval loss: **{teacher['value']:.3f}** ({teacher['source']}). Per seed "
             f"({' / '.join(f's{s}' for s in seeds)}; -: not run yet), when each student passes it and its lead over the "
             "same-seed baseline (eval loss minus the baseline's, negative: ahead) from then on:", "",
             "| run | passes the teacher at step (never: gap at the end) | lead at crossing | lead at end | "
             "largest lead after crossing | after crossing |", "|---|---|---|---|---|---|"]
    for name, passing in crossings.items():
        steps = per_seed(passing, lambda e: str(e["step"]) if e["step"] is not None else f"never ({e['gap_at_end']:+.3f})")
        if name in payload["configs"]:
            lines.append(f"| {name} | {steps} | {per_seed(passing, _lead('at_crossing'))} | {per_seed(passing, _lead('at_end'))} | "
                         f"{per_seed(passing, _lead('min'))} | {per_seed(passing, _lead('course', 's'))} |")
        else:
            lines.append(f"| {name} | {steps} | | | | |")
    apart = [n for n in payload["configs"] if n not in crossings]
    if apart:
        lines += ["", f"Not compared with this teacher (a teacher or eval batches of their own, or no finished run): {', '.join(apart)}."]
    return lines + [""]


TS_RESULTS = ("ts_uea_random_init.json", "ts_uea_random_init_ucr.json")  # benchmarks/ts_uea.py, issue 12 section 3
TS_INITS = {"llm_let": "pretrained", "rand_let": "random init"}


def time_series_rows(results: Path) -> list[str]:
    """The time-series claim, from ts_uea.py's LET-minus-baseline test accuracies (see ts_study.md).
    Verdict per dataset and student by study_analysis.gain_verdict; the row holds only if every cell does."""
    cells, verdicts, seeds = [], [], set()
    for name in TS_RESULTS:
        path = results / name
        if not path.is_file():
            continue
        payload = json.loads(path.read_text())
        seeds.add(payload["settings"]["seeds"])
        for dataset, by_config in payload["let_minus_baseline"].items():
            for config, d in by_config.items():
                init = next((label for prefix, label in TS_INITS.items() if config.startswith(prefix)), config)
                cells.append(f"{dataset} {init}: {100 * d['mean']:+.2f} ± {100 * d['std']:.2f} pts")
                verdicts.append(gain_verdict(d))
    if not cells:
        return []
    overall = "holds" if all(v == "holds" for v in verdicts) else "does not hold" if all(
        v == "does not hold" for v in verdicts) else "holds weaker"
    return [f"| LET improves time-series classification (TimesNet teacher, LLM student) | beats fine-tuned Qwen-0.5B on "
            f"10 UEA sets (App. E, Table 2) | ts_uea (see ts_study.md) | LET minus baseline, test accuracy: "
            f"{'; '.join(cells)} | {', '.join(sorted(seeds))} | {overall} |"]


def _seeds_run(payload: dict[str, Any], claim: dict[str, Any]) -> int:
    """Seeds of the claim's configuration that ran (a grid may have some pending; a trend: its most)."""
    names = [p["config"] for p in claim["points"]] if claim.get("kind") == "trend" else [claim["config"]]
    return max((len(payload["configs"][n]["summary"]["seeds"]) for n in names), default=0)


def _measured(payload: dict[str, Any], claim: dict[str, Any]) -> str:
    speed = lambda n: _figure(payload["configs"][n]["summary"], "speedup", 2) if n in payload["configs"] else "-"  # noqa: E731
    if claim.get("kind") == "best":
        ranked = sorted(payload["configs"], key=lambda n: -((payload["configs"][n]["summary"].get("speedup") or {}).get("mean", 0)))
        return f"{claim['config']}: {speed(claim['config'])}x; best {ranked[0]}: {speed(ranked[0])}x"
    if claim.get("kind") == "trend":
        return trend_words(claim)
    if claim.get("kind") == "course":
        return course_words(payload["configs"][claim["config"]])
    if claim.get("kind") == "larger_than":
        return f"{claim['config']}: {speed(claim['config'])}x vs {claim['than']}: {speed(claim['than'])}x"
    summary = payload["configs"][claim["config"]]["summary"]
    return f"{claim['config']}: {speed(claim['config'])}x, reached {summary['reached']}/{len(summary['seeds'])}"


def write_report(path: Path, root: Path) -> None:
    """Rebuild the markdown report from every study JSON under ``root`` (one folder per study)."""
    studies = []
    for candidate in sorted(root.glob("*/*.json")):
        payload = json.loads(candidate.read_text())
        if isinstance(payload, dict) and payload.get("kind") == "alignkit-study":
            studies.append(payload)
    lines = ["# The speedup study", "",
             "Written by `benchmarks/study.py` from the study JSONs (do not edit by hand). Speedup = steps the "
             "baseline of the same seed needs to reach its final eval loss / steps the configuration needs (linear "
             "interpolation between evals); wall-clock speedup = that x the throughput ratio (total tokens / total "
             "training time, teacher included). Runs share the machine (2 or 3 at a time), so a ratio between two runs carries "
             "the load each one met; teacher cost per step (in-run) = the seconds the teacher ran inside the steps it "
             "was active over the rest of those steps (in-step, timed by the trainer: a teacher that never drops is priced "
             "too; the teacher's forward only, a logit-KD term's student-side logits and loss show in the throughput ratio), "
             "or for runs logged before that, time per token with the teacher active over time per token after it "
             "is dropped, minus 1, from the same run (on/off), and wall-clock at in-run cost = speedup / (1 + "
             "that cost x the fraction of the run with the teacher active). "
             f"Verdict rule: {VERDICT_RULE} Teacher line: {LEAD_RULE}.", "",
             "## The paper's claims against our measurement", "",
             "| claim | paper | study | our measurement (mean ± std over seeds) | seeds | verdict |", "|---|---|---|---|---|---|"]
    for payload in studies:
        for claim in payload.get("claims", []):
            lines.append(f"| {claim['claim']} | {claim.get('paper', '')} | {payload['name']} | {_measured(payload, claim)} | "
                         f"{_seeds_run(payload, claim)} | {claim['verdict']} |")
    lines += time_series_rows(root.parent)
    lines.append("")
    step_costs = step_costs_by_study(root.parent)
    for payload in studies:
        lines += grid_table(payload, step_costs.get(payload["name"]))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines))
    print(f"wrote {path} ({len(studies)} studies)")
