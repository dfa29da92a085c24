"""Time-series LET benchmark (paper App. E / Table 2) on the UEA sets available here.

  python benchmarks/ts_uea.py --jobs 2                          # CPU defaults (~40 min on 2 cores)
  python benchmarks/ts_uea.py --datasets JapaneseVowels --seeds 0,1,2,3,4,5,6,7 --lambda0 1 --jobs 2 --out ts_uea_jv_8seeds
  python benchmarks/ts_uea.py --datasets JapaneseVowels --lambda0 1 --override student.options.pooling=mean --out ts_uea_jv_meanpool
  python benchmarks/ts_uea.py --datasets Heartbeat,PEMS-SF --student qwen2.5-0.5b-ts --keep-layers 0 --device cuda
  python benchmarks/ts_uea.py --init pretrained,random --lambda0 1 --out ts_uea_random_init
  python benchmarks/ts_uea.py --grid ts_levers --init random ...   # a declared grid of columns (below)

For each dataset and seed: test accuracy of aeon's MiniRocket (the classical reference, on the
same padded, normalised series, trained on train+val), the TimesNet teacher (pre-trained by
alignkit, selected on validation), the LLM baseline (fine-tuned without alignment) and LLM + LET
(same budget and hyperparameters; one LET column per ``--lambda0`` value). ``--init random`` adds
the same LLM columns (``rand_*``) for a randomly initialised student of the same architecture
(the backbone's config -- from the GGUF header for the SmolLM2 student -- built with
``source: config``), the student that has not learned yet. Model selection uses
the validation split carved from TRAIN, never the test split. ``--jobs 2`` runs two seeds at once
(one thread each); ``--reuse`` keeps runs already finished in ``--work`` (an interrupted benchmark
continues; it does not check that their settings match). A finished run's weights are deleted
(``--keep-weights`` keeps them: about 0.5 GB a run at 8 blocks). Writes
benchmarks/results/<--out>.{json,md,png} (default ts_uea; an ``--out`` holding a ``/`` is a path
prefix instead, e.g. /tmp/smoke/ts), with every column's mean ± std (sample std) over seeds and
the paired per-seed differences of the contrasts (wins / ties / losses and a verdict per set).

A dataset without a recipe of its own (configs/ts/<snake_case>.yaml) runs BasicMotions' (mean
pooling, the d_model 32 teacher; the JapaneseVowels tuning is specific to it, see
benchmarks/results/ts_study.md), with the dataset swapped in.

Grids (``--grid NAME``: benchmarks/grids/NAME.yaml, or a path) declare the LLM columns instead of
``--lambda0`` / ``--stop-fraction``: ``configs`` (name: [key=value, ...], each one run per
dataset, seed and init; ``{steps}`` is the run's train.steps and ``{eighth}`` the student layer at
about an eighth of its kept depth, :func:`eighth_layer`), ``select`` (a column that picks, per
seed, the configuration with the best validation value of the run's ``train.select_metric`` among
the ones listed: tuning on TRAIN only; the other candidates' test accuracies are kept in the JSON,
never reported as columns) and ``contrasts`` ([A, B]: A minus B, paired by seed; the first gives
each set's verdict).

The levers grid (issue 19, section 5; benchmarks/grids/ts_levers.yaml): baseline, LET with the
text study's levers (logsum, lambda0 3, stop at a third, the layer at about an eighth of the kept
depth: layer 1 of the default 8 blocks), LET as run before (lambda0 1, cosine, stop at half, a
quarter of the depth) and logit KD from the TimesNet teacher (constant weight, whole run; weight
0.3 / 1 x temperature 1 / 2 picked per seed on validation). One student initialisation per
invocation, both into the same --work (the per-seed TimesNet teachers are pre-trained once and
shared):

  python benchmarks/ts_uea.py --grid ts_levers --init random \\
    --datasets JapaneseVowels,BasicMotions,GunPoint,ItalyPowerDemand,ArrowHead --seeds 0,1,2,3,4 \\
    --jobs 2 --reuse --work benchmarks/results/ts_levers_work --out ts_levers_random
  python benchmarks/ts_uea.py --grid ts_levers --init pretrained \\
    --datasets JapaneseVowels,BasicMotions,GunPoint,ItalyPowerDemand,ArrowHead --seeds 0,1,2,3,4 \\
    --jobs 2 --reuse --work benchmarks/results/ts_levers_work --out ts_levers_pretrained

Cost of the levers grid at the default budget (8 of the 30 blocks, 9 epochs, teacher <= 600 steps),
one thread on 2 cores shared with two other training jobs: one seed of GunPoint, its 7 runs, took
17 min 9 s with --init random (its teacher included: 230 steps to early stopping, 68 s) and
17 min 11 s with --init pretrained (teacher reused). One random-init baseline run per set:
JapaneseVowels 145 s (122 steps), BasicMotions 76 s (18), GunPoint 139 s (22), ItalyPowerDemand
51 s (30), ArrowHead 187 s (17): 10 min for the five sets, so 7 runs x 5 seeds ~ 5.8 h per init on
one thread, ~11.6 h for both, plus the 25 teachers (at most ~1 h, paid once); --jobs 2 on two free
cores about halves it. The four KD runs are 4/7 of it: one fixed KD setting would cut an init to
~3.3 h.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch

from common import RESULTS, drop_weights, run_experiment, write_json
from study import expand, load_grid
from study_analysis import GAIN_RULE, gain_verdict, paired_gain

from alignkit.compare import metric_of, spread
from alignkit.experiment import load_experiment
from alignkit.teacher_stage import teacher_cache_dir, teacher_run_config
from alignkit.tasks.uea import UEADataConfig, load_uea

REPO = Path(__file__).resolve().parents[1]
REFERENCES = ("minirocket", "timesnet")
PREFIXES = {"pretrained": "llm", "random": "rand"}  # column prefix of each student initialisation
FALLBACK_RECIPE = "basic_motions"  # the recipe without dataset-specific tuning


def recipe(dataset: str) -> str:
    """The dataset's own recipe, configs/ts/<snake_case>.yaml (JapaneseVowels -> japanese_vowels),
    else BasicMotions' with the dataset swapped in (by the run's task.uea.datasets override)."""
    snake = re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "_", dataset).replace("-", "_").lower()
    path = REPO / "configs" / "ts" / f"{snake}.yaml"
    return str(path if path.is_file() else REPO / "configs" / "ts" / f"{FALLBACK_RECIPE}.yaml")


def lambda_grid(lambdas: list[float], stop_fraction: float) -> dict[str, Any]:
    """The columns without ``--grid``: the baseline and LET at each lambda0 (the recipe's objective
    and layer), stopped at ``stop_fraction`` of the run, each against the baseline."""
    stop = f"align.stop_step={{steps * {stop_fraction!r} // 1 or 1}}"  # max(1, int(steps * fraction))
    lets = {f"let@{lam:g}": ["align.method=let", f"align.lambda0={lam}", stop] for lam in lambdas}
    return {"configs": {"baseline": ["align.method=none"], **lets}, "select": {},
            "contrasts": [[name, "baseline"] for name in lets]}


def read_grid(name: str) -> dict[str, Any]:
    """A grid file (module docstring), its names checked against each other."""
    _, grid = load_grid(name)
    grid.setdefault("select", {})
    picked = {c for candidates in grid["select"].values() for c in candidates}
    if unknown := picked - set(grid["configs"]):
        raise SystemExit(f"grid {name}: select names {sorted(unknown)}, not in its configs")
    known = set(columns(grid))
    if not grid.get("contrasts") or (unknown := {n for pair in grid["contrasts"] for n in pair} - known):
        raise SystemExit(f"grid {name}: contrasts must be [A, B] pairs of its columns {sorted(known)} (unknown: {sorted(unknown or [])})")
    return grid


def columns(grid: dict[str, Any]) -> list[str]:
    """The LLM columns of one initialisation: each configuration no ``select`` picks from, then
    each ``select`` column."""
    picked = {c for candidates in grid["select"].values() for c in candidates}
    return [n for n in grid["configs"] if n not in picked] + list(grid["select"])


def methods(inits: list[str], grid: dict[str, Any]) -> list[str]:
    return [*REFERENCES, *(f"{PREFIXES[init]}_{name}" for init in inits for name in columns(grid))]


def contrast_pairs(inits: list[str], grid: dict[str, Any]) -> list[tuple[str, str]]:
    """Each grid contrast as (A, B) column names, for every initialisation."""
    return [(f"{PREFIXES[init]}_{a}", f"{PREFIXES[init]}_{b}") for init in inits for a, b in grid["contrasts"]]


def eighth_layer(depth: int) -> int:
    """The student layer at about an eighth of its depth (the text study's lever; layer k is the
    output of block k): ``depth / 8`` rounded as the adapter rounds its quarter (Python's round,
    halves to even), at least 1: 4 or 8 blocks -> 1, 12, 16 or 20 -> 2, 24 -> 3, 30 -> 4."""
    return max(1, round(depth / 8))


def student_arch(config: str, overrides: list[str]) -> tuple[Any, Any]:
    """(the student section, its backbone's HF config), read without weights (a GGUF student's
    config from the file's header)."""
    from alignkit.adapters.hf_causal import load_hf_causal_lm

    student = load_experiment(config, [*overrides, "align.method=none"]).student  # the student alone
    return student, load_hf_causal_lm(student, meta=True).config


def student_depth(config: str, overrides: list[str]) -> int:
    """Decoder blocks the student keeps: ``keep_layers``, or all of its backbone's when 0."""
    student, arch = student_arch(config, overrides)
    return student.options.keep_layers or int(arch.num_hidden_layers)


def random_init_overrides(config: str, overrides: list[str]) -> list[str]:
    """Overrides that build the configured student's backbone from its own HF config with random
    weights (``source: config``): same widths, heads, depth and RoPE, nothing learned. Only the
    fields its config class declares: a GGUF header adds others (``unk_token_id``), which
    ``student.options.arch`` refuses."""
    arch = student_arch(config, overrides)[1]
    declared = set(type(arch)().to_dict()) - {"transformers_version", "use_cache", "dtype"}
    fields = {key: value for key, value in arch.to_diff_dict().items() if key in declared}
    return ["student.source=config", *dotlist("student.options.arch", fields)]


def dotlist(prefix: str, fields: dict) -> list[str]:
    """``prefix.key=value`` overrides for a nested dict (values written as YAML/JSON scalars)."""
    out = []
    for key, value in fields.items():
        if isinstance(value, dict):
            out += dotlist(f"{prefix}.{key}", value)
        else:
            out.append(f"{prefix}.{key}={value if isinstance(value, str) else json.dumps(value)}")
    return out


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", default="JapaneseVowels,BasicMotions")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--student", default="smollm2-135m-ts")
    parser.add_argument("--keep-layers", type=int, default=8, help="first N backbone blocks (0 = all)")
    parser.add_argument("--epochs", type=float, default=9.0, help="LLM fine-tuning budget in epochs of the train part")
    parser.add_argument("--micro-batch", type=int, default=16)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--init", default="pretrained",
                        help="LLM student initialisations, comma-separated: pretrained (llm_* columns), random (rand_*)")
    parser.add_argument("--grid", default="", help="declared LLM columns: benchmarks/grids/NAME.yaml or a path "
                        "(module docstring); replaces --lambda0 and --stop-fraction")
    parser.add_argument("--lambda0", default="0.1,1,3", help="LET lambda0 values, one LLM + LET column each")
    parser.add_argument("--stop-fraction", type=float, default=0.5, help="stop_step as a fraction of the steps")
    parser.add_argument("--teacher-steps", type=int, default=600)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--work", default=str(RESULTS / "ts_uea_work"))
    parser.add_argument("--reuse", action="store_true",
                        help="keep finished runs found in --work (results.json) instead of training them again")
    parser.add_argument("--keep-weights", action="store_true",
                        help="keep the checkpoints and exported weights of finished runs (deleted by default: a grid fills the disk)")
    parser.add_argument("--jobs", type=int, default=1, help="seeds run in parallel (one thread each)")
    parser.add_argument("--out", default="ts_uea",
                        help="results name: benchmarks/results/<out>.{json,md,png}; with a '/', a path prefix")
    parser.add_argument("--override", action="append", default=[],
                        help="extra key=value for every LLM run (task.teacher_pretrain.* reaches the teacher); repeatable")
    return parser.parse_args()


def out_base(out: str) -> Path:
    """Where ``--out`` writes: a bare name under benchmarks/results/, anything with a ``/`` as given."""
    return Path(out) if "/" in out else RESULTS / out


def minirocket_accuracy(dataset: str, seed: int) -> float:
    from aeon.classification.convolution_based import MiniRocketClassifier

    splits = load_uea(UEADataConfig(datasets=[dataset], seed=0))
    to_numpy = lambda split: split.x.permute(0, 2, 1).numpy().astype(np.float64)  # noqa: E731  (N, C, T)
    x_train = np.concatenate([to_numpy(splits.train), to_numpy(splits.val)])
    y_train = np.concatenate([splits.train.y.numpy(), splits.val.y.numpy()])
    model = MiniRocketClassifier(random_state=seed).fit(x_train, y_train)
    return float((model.predict(to_numpy(splits.test)) == splits.test.y.numpy()).mean())


def finished_run(args: argparse.Namespace, work: Path, name: str, overrides: list[str], config: str) -> dict[str, Any]:
    """Train (or, with --reuse, find) one run: its test accuracy, its best validation value of
    ``train.select_metric`` (what ``select`` compares) and the seconds it took (None if reused)."""
    finished, seconds = work / name / "results.json", None
    if args.reuse and finished.is_file():
        print(f"== reusing {finished}")
    else:
        started = time.time()
        run_experiment(name, work, overrides, config)
        seconds = time.time() - started
        if not args.keep_weights:
            drop_weights(work / name)
        print(f"== {name}: {seconds:.0f} s")
    results = json.loads(finished.read_text())
    metric, mode = metric_of(work / name)
    return {"test_accuracy": results["test_accuracy"], "select_metric": metric, "select_mode": mode,
            "best_val": results.get(f"best_{metric}"), "seconds": seconds}


def pick(values: dict[str, float | None], mode: str) -> str:
    """The configuration with the best validation value (lowest for mode min); the first listed
    wins a tie."""
    if missing := [name for name, value in values.items() if value is None]:
        raise SystemExit(f"{missing}: no best validation value in results.json (set train.select_metric)")
    return (min if mode == "min" else max)(values, key=values.__getitem__)


def teacher_accuracy(config: str, runs: list[list[str]]) -> float:
    """The TimesNet teacher's test accuracy, from the cache of the first run that has a teacher."""
    for overrides in runs:
        cfg = load_experiment(config, overrides)
        if cfg.align.expanded:
            teacher_dir = teacher_cache_dir(teacher_run_config(cfg, cfg.teacher))
            return json.loads((teacher_dir / "results.json").read_text())["test_accuracy"]
    raise SystemExit("the grid has no configuration with a teacher: no timesnet column")


def seed_scores(args: argparse.Namespace, work: Path, dataset: str, seed: int, steps: int) -> tuple[dict[str, float], dict]:
    """Every column's test accuracy for one dataset and seed, and what was run (per run: test
    accuracy, validation value, seconds; per ``select`` column: the configuration picked). Run
    names: ``<dataset>-[rand-]<configuration>-<seed>`` (``@`` dropped: let@1 -> let1)."""
    scores = {"minirocket": minirocket_accuracy(dataset, seed)}
    detail: dict[str, Any] = {"steps": steps}
    config = recipe(dataset)
    common = [
        f"task.uea.datasets=[{dataset}]", f"student.preset={args.student}",
        f"student.options.keep_layers={args.keep_layers}", f"train.steps={steps}",
        f"train.micro_batch_size={args.micro_batch}", f"train.lr={args.lr}", f"train.seed={seed}",
        f"train.eval_every={max(1, steps // 8)}", "train.save_every=0", "train.keep_checkpoints=1",
        f"train.device={args.device}", f"task.teacher_pretrain.seed={seed}",
        f"task.teacher_pretrain.steps={args.teacher_steps}", f"task.teacher_pretrain.device={args.device}",
        f"output_dir={work}", *args.override,
    ]
    for init in args.inits:
        prefix, tag = PREFIXES[init], "" if init == "pretrained" else "rand-"
        student = common + (random_init_overrides(config, common) if init == "random" else [])
        depth = student_depth(config, student)
        detail[init] = {"depth": depth, "eighth": eighth_layer(depth), "runs": {}, "picked": {}}
        planned = {name: student + [expand(o, steps, eighth=eighth_layer(depth)) for o in overrides]
                   for name, overrides in args.grid_spec["configs"].items()}
        runs = detail[init]["runs"]
        for name, overrides in planned.items():
            print(f"== {dataset} seed {seed}: {init} LLM, {name} ({steps} steps)")  # the teacher stage says when it trains
            runs[name] = finished_run(args, work, f"{dataset}-{tag}{name.replace('@', '')}-{seed}", overrides, config)
        if "timesnet" not in scores:
            scores["timesnet"] = teacher_accuracy(config, list(planned.values()))
        for column in columns(args.grid_spec):
            chosen = args.grid_spec["select"].get(column)
            if chosen:  # picked on validation only; the test accuracy is read after the pick
                best = pick({c: runs[c]["best_val"] for c in chosen}, runs[chosen[0]]["select_mode"])
                detail[init]["picked"][column] = best
                scores[f"{prefix}_{column}"] = runs[best]["test_accuracy"]
            else:
                scores[f"{prefix}_{column}"] = runs[column]["test_accuracy"]
    print(f"== {dataset} seed {seed}: " + json.dumps(scores))
    return scores, detail


def summarize_set(scores: dict[str, list[float]], contrasts: list[tuple[str, str]]) -> dict[str, Any]:
    """One dataset: every column's spread over seeds, and each contrast's paired difference with
    its verdict (study_analysis.GAIN_RULE)."""
    paired = {}
    for a, b in contrasts:
        gain = paired_gain(scores[a], scores[b])
        paired[f"{a} - {b}"] = {**gain, "verdict": gain_verdict(gain)}
    return {"test_accuracy": {m: spread(v) for m, v in scores.items()}, "paired": paired}


def report_lines(sets: dict[str, dict[str, Any]], names: list[str], headline: list[str], seeds: list[int],
                 picked: dict[str, dict[str, list[str]]]) -> list[str]:
    """The markdown report: accuracies, paired differences, the verdict per set on the ``headline``
    contrasts (the grid's first, per initialisation) and where it helps. ``picked``: dataset ->
    column -> the configuration each seed's validation picked."""
    pts = lambda d: f"{100 * d['mean']:+.2f} ± {100 * d['std']:.2f}"  # noqa: E731
    lines = ["| dataset | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for ds, summary in sets.items():
        row = summary["test_accuracy"]
        lines.append(f"| {ds} | " + " | ".join(f"{100 * row[m]['mean']:.1f} ± {100 * row[m]['std']:.1f}" for m in names) + " |")
    lines += ["", f"Test accuracy (%), mean ± std (sample std) over seeds {seeds}.", "",
              "Paired differences, same seed and initialisation (points; one test error is 100 / test size):", "",
              "| dataset | contrast | mean ± std | per seed | wins / ties / losses | verdict |", "|---|---|---|---|---|---|"]
    for ds, summary in sets.items():
        for label, d in summary["paired"].items():
            per_seed = ", ".join(f"{100 * x:+.1f}" for x in d["values"])
            lines.append(f"| {ds} | {label} | {pts(d)} | {per_seed} | {d['wins']} / {d['ties']} / {d['losses']} | {d['verdict']} |")
    lines += ["", f"Verdict rule (the claim: A beats B): {GAIN_RULE}.", ""]
    lines += ["Verdict per set (the first contrast, per initialisation):", ""]
    for ds, summary in sets.items():
        lines.append(f"- {ds}: " + "; ".join(f"{label} {pts(summary['paired'][label])} pts, "
                                             f"{summary['paired'][label]['wins']}/{len(seeds)} seeds win: "
                                             f"{summary['paired'][label]['verdict']}" for label in headline))
    lines.append("")
    for label in headline:
        by_verdict = {v: [ds for ds, s in sets.items() if s["paired"][label]["verdict"] == v]
                      for v in ("holds", "holds weaker", "does not hold")}
        lines.append(f"- {label}: helps (holds) on {', '.join(by_verdict['holds']) or 'none'}; "
                     f"leans ahead (holds weaker) on {', '.join(by_verdict['holds weaker']) or 'none'}; "
                     f"does not help on {', '.join(by_verdict['does not hold']) or 'none'}.")
    if any(picked.values()):
        lines += ["", "Picked on validation (from TRAIN), per seed:", ""]
        lines += [f"- {ds}, {column}: {', '.join(choices)}" for ds, by_column in picked.items() for column, choices in by_column.items()]
    return lines + [""]


def main() -> None:
    args = parse_args()
    args.inits = args.init.split(",")
    if unknown := set(args.inits) - set(PREFIXES):
        raise SystemExit(f"--init: {sorted(unknown)} not in {sorted(PREFIXES)}")
    args.grid_spec = read_grid(args.grid) if args.grid else lambda_grid(
        [float(v) for v in args.lambda0.split(",")], args.stop_fraction)
    names, contrasts = methods(args.inits, args.grid_spec), contrast_pairs(args.inits, args.grid_spec)
    work, out, started = Path(args.work), out_base(args.out), time.time()
    seeds = [int(s) for s in args.seeds.split(",")]
    if args.jobs > 1:  # one thread per job: oversubscribed cores slow every job down
        os.environ["OMP_NUM_THREADS"] = "1"
        torch.set_num_threads(1)
    jobs = []
    for dataset in args.datasets.split(","):
        splits = load_uea(UEADataConfig(datasets=[dataset]))
        steps = max(10, round(args.epochs * len(splits.train) / args.micro_batch))
        jobs += [(dataset, seed, steps) for seed in seeds]
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:  # each job runs its own subprocesses
        done = list(pool.map(lambda job: seed_scores(args, work, *job), jobs))
    table: dict[str, dict[str, list[float]]] = {}
    details: dict[str, dict[int, Any]] = {}
    picked: dict[str, dict[str, list[str]]] = {}
    for (dataset, seed, _), (scores, detail) in zip(jobs, done):  # in seed order, whatever finished first
        for method in names:
            table.setdefault(dataset, {m: [] for m in names})[method].append(scores[method])
        details.setdefault(dataset, {})[seed] = detail
        for init in args.inits:
            for column, config in detail[init]["picked"].items():
                picked.setdefault(dataset, {}).setdefault(f"{PREFIXES[init]}_{column}", []).append(config)

    sets = {ds: summarize_set(scores, contrasts) for ds, scores in table.items()}
    let_vs_baseline = {ds: {a: s["paired"][f"{a} - {b}"] for a, b in contrasts if "_let" in a and b.endswith("_baseline")}
                       for ds, s in sets.items()}  # the key study_report.time_series_rows reads
    write_json(out.parent / f"{out.name}.json", {
        "settings": {k: v for k, v in vars(args).items() if k != "grid_spec"}, "grid": args.grid_spec,
        "wall_clock_s": time.time() - started, "test_accuracy": {ds: s["test_accuracy"] for ds, s in sets.items()},
        "paired": {ds: s["paired"] for ds, s in sets.items()}, "let_minus_baseline": let_vs_baseline, "runs": details})
    headline = [f"{a} - {b}" for a, b in contrast_pairs(args.inits, {"contrasts": args.grid_spec["contrasts"][:1]})]
    markdown = "\n".join(report_lines(sets, names, headline, seeds, picked))
    (out.parent / f"{out.name}.md").write_text(markdown)
    print(markdown)
    plot(sets, names, out.parent / f"{out.name}.png")


def plot(sets: dict[str, dict[str, Any]], names: list[str], path: Path) -> None:
    """Left: test accuracy per dataset and column (mean ± std); right: each contrast's paired
    difference per dataset (mean ± std, a dot per seed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, diff_ax) = plt.subplots(1, 2, figsize=(14, 4.5))
    width = 0.8 / len(names)
    for i, method in enumerate(names):
        means = [100 * s["test_accuracy"][method]["mean"] for s in sets.values()]
        stds = [100 * s["test_accuracy"][method]["std"] for s in sets.values()]
        ax.bar([x + i * width for x in range(len(sets))], means, width, yerr=stds, label=method, capsize=3)
    ax.set_xticks([x + (len(names) - 1) / 2 * width for x in range(len(sets))], list(sets))
    ax.set_ylabel("test accuracy (%)")
    lowest = min(100 * s["test_accuracy"][m]["mean"] for s in sets.values() for m in names)
    ax.set_ylim(max(0, lowest - 10), 100.5)  # zoomed: the methods differ by a few points
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.08), ncol=min(len(names), 5), fontsize=7)
    ax.set_title("UEA classification: LLM student, test accuracy")
    labels = list(next(iter(sets.values()))["paired"])
    width = 0.8 / len(labels)
    for i, label in enumerate(labels):
        xs = [x + i * width for x in range(len(sets))]
        diffs = [s["paired"][label] for s in sets.values()]
        bars = diff_ax.bar(xs, [100 * d["mean"] for d in diffs], width, yerr=[100 * d["std"] for d in diffs],
                           label=label, capsize=3, alpha=0.6)
        for x, d in zip(xs, diffs):
            diff_ax.plot([x] * len(d["values"]), [100 * v for v in d["values"]], "o", markersize=3,
                         color=bars.patches[0].get_facecolor(), alpha=1.0)
    diff_ax.axhline(0, color="black", linewidth=0.8)
    diff_ax.set_xticks([x + (len(labels) - 1) / 2 * width for x in range(len(sets))], list(sets))
    diff_ax.set_ylabel("paired difference (points)")
    diff_ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.08), ncol=2, fontsize=7)
    diff_ax.set_title("A - B, same seed (dots: seeds)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
