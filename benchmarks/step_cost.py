"""What each configuration of a study grid costs per training step, and the wall-clock speedup its
study's steps buy at those costs.

  python benchmarks/step_cost.py peers --data WIKITEXT2_DIR --teacher-run STUDY/small_teacher-s0/final \\
      --study STUDY/peers-small-teacher.json

A study grid's wall-clock columns compare runs made minutes or hours apart, so machine load moves
them (on 2 shared cores, 500 to 1,500 s for the same run). Here every configuration and the
baseline train a few steps, one run at a time, round after round (the order reversed every other
round), so load drifts into no configuration's figure; each run has one thread. Per configuration:
the median seconds per step while the teacher is active and after it is dropped (the first step,
warm-up, left out), each over the baseline's median step, and the in-step teacher share
(``teacher_s``). Expressions such as ``align.stop_step={steps//3}`` are expanded with the short run's
length, so each run drops its teacher at the same fraction as in the study. With ``--study``, each
configuration's wall-clock speedup per seed: the baseline's steps at the baseline's step time over
the configuration's steps to the baseline's final loss, each priced at its phase's time (active up
to the step its study run dropped the teacher). Writes benchmarks/results/step_cost-GRID.{json,png}.

  python benchmarks/step_cost.py paper_regime_peers --costs benchmarks/results/step_cost-paper_regime_peers.json \
      --study STUDY_ON_ANOTHER_CORPUS/paper_regime_peers-kjv.json

``--costs`` prices another study (e.g. the same shapes on another corpus: a step costs the same
whatever text it reads) at the costs an earlier run measured, without training, and writes
step_cost-STUDY.{json,png} under the study's own name. A study configuration is priced at the
earlier configuration of its name, or the one ``--as STUDY_CONFIG=COSTS_CONFIG`` names (another
grid's, e.g. ``--as logsum=let_recipe``); either way the two must agree on every setting but the
text read, the teacher's weights, seed, run length and the step the teacher drops at (each phase is
priced at its own cost), or the pricing is refused naming the keys.

  python benchmarks/step_cost.py teacher_reuse --costs benchmarks/results/step_cost-peers.json \
      --study STUDY/teacher_reuse-small-teacher-from-kjv.json --as logsum=let_recipe
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import tempfile
from pathlib import Path
from typing import Any

from common import RESULTS, drop_weights, run_experiment, save_figure, spread, wikitext_overrides, write_json
from study import expand, load_grid, merged

from alignkit.compare import intervals, pooled_speedup, teacher_step_cost

HERE = Path(__file__).resolve().parent


def step_times(records: list[dict[str, Any]]) -> dict[str, list[float]]:
    """Seconds per step of a run logged every step, split by whether the teacher was active;
    the first step (warm-up: allocations, first-touch of the weights) is left out."""
    phases: dict[str, list[float]] = {"active": [], "dropped": []}
    previous = 0
    for interval in intervals(records):
        steps = interval.step - previous
        if previous and steps:
            phases["active" if interval.teacher_active else "dropped"].append(interval.seconds / steps)
        previous = interval.step
    return phases


def grid_configs(grid: dict[str, Any], steps: int) -> dict[str, list[str]]:
    """The baseline and each configuration of ``grid``: its overrides, expressions expanded for ``steps``."""
    return {"baseline": ["align.method=none"]} | {
        name: [expand(o, steps) for o in list(grid.get("common", [])) + items] for name, items in grid["configs"].items()}


def measure(grid: dict[str, Any], shared: list[str], steps: int, rounds: int, work: Path) -> dict[str, Any]:
    """Every configuration and the baseline, ``rounds`` times, interleaved; per-run step times."""
    configs = grid_configs(grid, steps)
    order = list(configs)
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in order}
    for index in range(rounds):
        for name in order if index % 2 == 0 else order[::-1]:
            overrides = merged(shared, [f"train.steps={steps}", f"train.eval_every={steps}", "train.log_every=1",
                                        f"train.save_every={steps}", "--no-progress"], configs[name])
            print(f"round {index + 1}/{rounds}: {name}", flush=True)
            try:
                result = run_experiment(f"{name}-r{index}", work, overrides, str(HERE / "study_base.yaml"))
            except subprocess.CalledProcessError as err:  # alignkit printed why, naming the key or file
                raise SystemExit(f"{name}: alignkit train exited with {err.returncode}; overrides: {' '.join(overrides)}") from None
            drop_weights(Path(result["run_dir"]))
            runs[name].append({"phases": step_times(result["records"]), "teacher_share": teacher_step_cost(result["records"])[0]})
    return runs


def summarize(runs: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """Median seconds per step per phase (over every round's steps), as a ratio to the baseline's."""
    base = statistics.median(t for run in runs["baseline"] for t in run["phases"]["dropped"])
    out = {}
    for name, items in runs.items():
        entry: dict[str, Any] = {}
        for phase in ("active", "dropped"):
            times = [t for run in items for t in run["phases"][phase]]
            if times:
                rounds = [statistics.median(r["phases"][phase]) / base for r in items if r["phases"][phase]]
                entry[phase] = {"seconds": statistics.median(times), "ratio": statistics.median(times) / base,
                                "per_round": rounds, "spread": spread(rounds)}
        shares = [r["teacher_share"] for r in items if r["teacher_share"] is not None]
        entry["teacher_share"] = spread(shares) if shares else None
        out[name] = entry
    return {"baseline_seconds_per_step": base, "configs": out}


def wall_speedups(costs: dict[str, Any], study: dict[str, Any], priced_as: dict[str, str] | None = None) -> dict[str, Any]:
    """Per configuration and seed of a study JSON: its steps to the baseline's final loss priced at
    the measured phase times (of the configuration ``priced_as`` maps it to, else its own name),
    against the baseline's whole run at the baseline's step time. A study that pre-trained its
    teacher also gets the pooled speedup with that pre-training counted once over its seeds (in
    baseline steps at the measured baseline step time; a reused teacher's is the plain pooled one)."""
    priced_as = priced_as or {}
    teacher_seconds = (study.get("teacher_pretrain") or {}).get("train_seconds")
    out = {}
    for name, config in study["configs"].items():
        phase_cost = costs["configs"].get(priced_as.get(name, name))
        if not phase_cost or "active" not in phase_cost:
            continue
        values, priced_steps = {}, []
        for seed, pair in config["per_seed"].items():
            run = study["runs"][f"{name}-s{seed}"]
            steps = pair["steps"] if pair["reached"] else run["last_step"]  # never reached: its whole run, a bound
            active_steps = min(steps, run["teacher_dropped"] or 0)
            dropped = phase_cost.get("dropped", phase_cost["active"])["ratio"]
            priced = active_steps * phase_cost["active"]["ratio"] + (steps - active_steps) * dropped
            priced_steps.append(priced)
            values[seed] = {"steps_speedup": pair["baseline_steps"] / steps, "wall_speedup": pair["baseline_steps"] / priced,
                            "reached": pair["reached"]}
        out[name] = {"per_seed": values, "wall_speedup": spread([v["wall_speedup"] for v in values.values()])}
        if teacher_seconds:
            base = [pair["baseline_steps"] for pair in config["per_seed"].values()]
            teacher_steps = teacher_seconds / costs["baseline_seconds_per_step"]
            out[name]["teacher_pretrain"] = {
                "seconds": teacher_seconds, "baseline_steps": teacher_steps,
                "counted_once": pooled_speedup(base, priced_steps, teacher_steps), "reused": pooled_speedup(base, priced_steps)}
    return out


def measured_costs(path: str) -> dict[str, Any]:
    """An earlier step_cost JSON (for ``--costs``): its costs and how they were measured."""
    try:
        earlier = json.loads(Path(path).read_text())
    except (OSError, ValueError) as err:
        raise SystemExit(f"--costs: cannot read {path}: {err}") from None
    if earlier.get("kind") != "alignkit-step-cost" or "grid" not in earlier:
        raise SystemExit(f"--costs: {path} is not a step_cost JSON (kind {earlier.get('kind')!r})")
    kept = ("kind", "grid", "steps", "rounds", "overrides", "threads", "costs", "runs")
    return {k: earlier[k] for k in kept if k in earlier} | {"costs_from": str(path)}


# Settings that leave a step's cost alone: which text is read, the teacher's weights (not its
# shape), the seed and the run's length and logging.
# align.stop_step: each phase (teacher active, dropped) is priced at its own cost up to the step the
# study's run dropped its teacher, so where it drops moves no step's cost
COST_FREE_KEYS = ("task.preset", "task.text.source", "task.text.train_path", "task.text.eval_path",
                  "teacher.name_or_path", "train.seed", "train.steps", "train.eval_every", "train.log_every",
                  "train.save_every", "align.stop_step")


def cost_settings(overrides: list[str]) -> dict[str, str]:
    """key -> value of the overrides that can change what a step costs (later ones win); a run
    without alignment loads no teacher, so its teacher settings do not count either."""
    items = (o.partition("=") for o in overrides if "=" in o)
    settings = {key: value for key, _, value in items if key not in COST_FREE_KEYS}
    if settings.get("align.method") == "none":
        settings = {k: v for k, v in settings.items() if not k.startswith("teacher.")}
    return settings


def pricing_map(payload: dict[str, Any], study: dict[str, Any], pairs: list[str]) -> dict[str, str]:
    """Study configuration -> measured configuration: same names by default, ``--as`` pairs on top;
    each pair (and the baselines) checked to agree on every setting that can change a step's cost."""
    costs = payload["costs"]["configs"]
    mapping = {name: name for name in study["configs"] if name in costs}
    for pair in pairs:
        mine, _, theirs = pair.partition("=")
        if mine not in study["configs"] or theirs not in costs:
            raise SystemExit(f"--as {pair}: needs a configuration of the study ({', '.join(study['configs'])}) "
                             f"= one with measured costs ({', '.join(costs)})")
        mapping[mine] = theirs
    if not mapping:
        raise SystemExit(f"no configuration of {study['name']} has measured costs ({', '.join(costs)}): "
                         "name one with --as STUDY_CONFIG=COSTS_CONFIG")
    measured = grid_configs(load_grid(payload["grid"])[1], study["settings"]["steps"])
    seed = study["seeds"][0]
    checked = {study["configs"][name]["baseline"]: "baseline" for name in mapping} | mapping  # the student first
    for mine, theirs in checked.items():
        ran = cost_settings(study["run_overrides"][f"{mine}-s{seed}"])
        priced = cost_settings(merged(payload["overrides"], measured[theirs]))
        differ = sorted(k for k in ran.keys() | priced.keys() if ran.get(k) != priced.get(k))
        if differ:
            shown = "; ".join(f"{k}: {ran.get(k, '(unset)')} vs {priced.get(k, '(unset)')}" for k in differ)
            raise SystemExit(f"{mine} cannot be priced as {payload['grid']}'s {theirs}: settings differ ({shown})")
    return mapping


def plot(payload: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(payload["costs"]["configs"])
    fig, axes = plt.subplots(1, 2 if payload.get("wall") else 1, figsize=(12 if payload.get("wall") else 6, 4), squeeze=False)
    left = axes[0][0]
    for offset, phase in ((-0.2, "active"), (0.2, "dropped")):
        ratios = [payload["costs"]["configs"][n].get(phase, {}).get("ratio", 0.0) for n in names]
        left.bar([i + offset for i in range(len(names))], ratios, width=0.4, label=f"teacher {phase}")
    left.axhline(1.0, color="grey", linewidth=1)
    left.set_xticks(range(len(names)), names, rotation=30, ha="right")
    left.set_ylabel("seconds per step / baseline's")
    left.set_title(f"{payload['grid']}: step cost, {payload['rounds']} interleaved rounds")
    left.legend(fontsize=8)
    if payload.get("wall"):
        right = axes[0][1]
        wall = payload["wall"]
        for i, name in enumerate(wall):
            steps = [v["steps_speedup"] for v in wall[name]["per_seed"].values()]
            walls = [v["wall_speedup"] for v in wall[name]["per_seed"].values()]
            right.bar(i - 0.2, statistics.mean(steps), width=0.4, color="tab:blue", label="steps" if i == 0 else None)
            right.bar(i + 0.2, statistics.mean(walls), width=0.4, color="tab:orange", label="wall-clock at these costs" if i == 0 else None)
            right.scatter([i + 0.2] * len(walls), walls, color="black", s=12, zorder=3)
        right.axhline(1.0, color="grey", linewidth=1)
        right.set_xticks(range(len(wall)), list(wall), rotation=30, ha="right")
        right.set_ylabel("speedup to the baseline's final eval loss")
        right.set_title("the study's seeds, priced at the measured step costs")
        right.legend(fontsize=8)
    save_figure(fig, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("grid", help="a grid of benchmarks/grids/ (or a YAML path)")
    parser.add_argument("--data", help="WikiText-2 folder (valid.txt, test.txt); needed unless --costs")
    parser.add_argument("--teacher-run", help="a small teacher's final/ folder (the study's --teacher small); "
                                              "default: the base recipe's teacher")
    parser.add_argument("--study", help="the grid's study JSON: price its seeds' steps at the measured costs")
    parser.add_argument("--costs", help="an earlier step_cost JSON: price --study at its costs, no training")
    parser.add_argument("--as", dest="price_as", action="append", default=[], metavar="STUDY_CONFIG=COSTS_CONFIG",
                        help="price a study configuration at another measured one with the same settings (repeatable)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override for every run (repeatable)")
    parser.add_argument("--steps", type=int, default=18, help="steps per run (the teacher drops at the grid's fraction)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", default=str(RESULTS), help="folder for step_cost-GRID.{json,png}")
    args = parser.parse_args()

    name, grid = load_grid(args.grid)
    if args.costs and not args.study:
        raise SystemExit("--costs prices a study: pass its JSON with --study")
    if not args.costs and not args.data:
        raise SystemExit("--data WIKITEXT2_DIR is needed to measure (or pass --costs and --study to price only)")
    study = json.loads(Path(args.study).read_text()) if args.study else None
    if study is not None and study.get("grid") != name:
        raise SystemExit(f"--study {args.study} is a study of grid {study.get('grid')!r}, not {name!r}")
    if args.costs:
        payload = measured_costs(args.costs)
    else:
        teacher = [] if not args.teacher_run else [
            "teacher.preset=''", "teacher.kind=hf_causal", "teacher.source=checkpoint",
            f"teacher.name_or_path={Path(args.teacher_run).resolve()}"]
        shared = wikitext_overrides(Path(args.data).resolve()) + teacher + args.set
        with tempfile.TemporaryDirectory(prefix="step_cost-") as work:
            runs = measure(grid, shared, args.steps, args.rounds, Path(work))
        payload = {"kind": "alignkit-step-cost", "grid": name, "steps": args.steps, "rounds": args.rounds,
                   "overrides": shared, "threads": 1, "costs": summarize(runs), "runs": runs}
    if study is not None:
        payload["study"] = args.study
        payload["seeds"] = study["seeds"]  # the study seeds whose steps are priced (the rounds are the costs' repeats)
        payload["priced_as"] = pricing_map(payload, study, args.price_as)
        payload["wall"] = wall_speedups(payload["costs"], study, payload["priced_as"])
    stem = f"step_cost-{study['name'] if args.costs else name}"
    out = Path(args.out)
    write_json(out / f"{stem}.json", payload)
    plot(payload, out / f"{stem}.png")
    print(f"baseline: {payload['costs']['baseline_seconds_per_step']:.3f} s/step")
    for config, entry in payload["costs"]["configs"].items():
        phases = "  ".join(f"{p} {entry[p]['ratio']:.3f}x" for p in ("active", "dropped") if p in entry)
        share = entry["teacher_share"]
        print(f"{config:16s} {phases}" + (f"  teacher {share['mean']:.3f} of the rest of a step" if share else ""))
    for config, entry in (payload.get("wall") or {}).items():
        w = entry["wall_speedup"]
        seeds = " / ".join(f"{v['wall_speedup']:.2f}" for v in entry["per_seed"].values())
        print(f"{config:16s} wall-clock at these costs {w['mean']:.2f} +- {w['std']:.2f}x ({seeds})")
        if "teacher_pretrain" in entry:
            t = entry["teacher_pretrain"]
            print(f"{'':16s} pooled over seeds: {t['reused']:.2f}x with the teacher reused, {t['counted_once']:.2f}x with "
                  f"its pre-training ({t['seconds']:.0f} s, {t['baseline_steps']:.0f} baseline steps) counted once")


if __name__ == "__main__":
    main()
