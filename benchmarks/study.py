"""The speedup study (issue 12): a declared grid of configurations against the baseline, over
seeds, each run an ``alignkit train`` process; then steps and wall-clock speedups, paired loss
differences and verdicts.

  python benchmarks/study.py lambda0 --data WIKITEXT2_DIR --jobs 2            # benchmarks/grids/lambda0.yaml
  python benchmarks/study.py stop_step objective layer --data WIKITEXT2_DIR --jobs 2  # one queue, one JSON each
  python benchmarks/study.py budget --data WIKITEXT2_DIR --seeds 0,1,2 --resume
  python benchmarks/study.py lambda0 --data WIKITEXT2_DIR --teacher small      # a pre-trained 5x smaller teacher
  python benchmarks/study.py teacher_reuse --data WIKITEXT2_DIR --teacher small --teacher-corpus KJV_DIR/train.txt --teacher-corpus-name kjv
  python benchmarks/study.py teacher_reuse --data WIKITEXT2_DIR --teacher small --teacher-steps 100  # an under-trained teacher
  python benchmarks/study.py scale_trend --data WIKITEXT2_DIR --teacher small --steps 150 --only s7m,s26m
  python benchmarks/study.py lambda0 --corpus TRAIN.txt EVAL.txt --only lam0.1 # confirm on another corpus
  python benchmarks/study.py peers_tune --data WIKITEXT2_DIR --holdout 0.1 --seeds 0   # tune on held-out train text
  python benchmarks/study.py stop_step --base configs/debug.yaml --steps 8 --dry-run

A grid (benchmarks/grids/NAME.yaml, or a path) declares ``configs`` (name: [key=value, ...]),
``common`` overrides for all of them (items may be lists, for YAML aliases), and the paper
``claims`` it tests (kind speedup, best, larger_than or trend: see study_analysis.VERDICT_RULE). Values may hold
``{expr}`` in ``steps`` (the run's train.steps), e.g. ``align.stop_step={steps//3}``. Each
configuration's baseline is the base recipe with ``align.method=none`` plus the
configuration's keys outside align.* and teacher.* (run length, student), so configurations
that change those get their own baseline. All grids of one corpus and teacher share a run folder
(benchmarks/results/study/CORPUS[-small-teacher]), so a baseline runs once for all of them, and a
configuration that repeats another's exact settings (a grid's default) reuses that run, also one
finished in a sibling study folder (baselines never use the teacher, so studies that differ only in
it share them).

``--teacher small`` first pre-trains a 5.2M teacher (run OUT/small_teacher-s0) on the student's
train file; ``--teacher-corpus FILE [FILE ...] --teacher-corpus-name NAME`` pre-trains it on other
text instead (several files: read together and shuffled into one stream) and ``--teacher-steps N``
for other than 300 steps; both then name the folder and the run (CORPUS-small-teacher-from-NAME-Nsteps,
small_teacher-NAME-Nsteps-s0), so different teachers never share one. The report prices that
pre-training: the time speedup over seeds with it counted once, and as zero (a reused teacher).

Runs are ordered seed by seed, each baseline next to its configurations, the order reversed on
every other seed, so machine load drifts into neither side. A run folder holding results.json
and study_run.json with the same base recipe and overrides is reused; an unfinished one is
continued with ``--resume`` (alignkit's exact resume). Weights are deleted after each finished
run (``--keep-weights`` keeps them). Writes OUT/NAME.json per grid (settings, per-run numbers,
paired figures per seed, summaries, verdicts, the frozen teacher's eval loss (study_teacher) and when
each run passes it), OUT/NAME.png, and regenerates the report
(benchmarks/results/study.md by default) from every study JSON next to OUT.
"""
from __future__ import annotations

import argparse
import os
import re
import time
from pathlib import Path
from typing import Any

import yaml

from common import PATH_ALIASES, REPO, RESULTS, SMALL_TEACHER_ARCH, wikitext_overrides, write_json
from study_analysis import TIME_SOURCE, VERDICT_RULE
from study_report import plot_study, trend_words, write_report
from study_results import analyse, any_on_teacher_line, claims, override_key
from study_runner import Run, Runner, run_queue
from study_teacher import measured, pretrained

HERE = Path(__file__).resolve().parent
BASELINE_ONLY_PREFIXES = ("align.", "teacher.", "teachers.")  # keys a baseline does not take over
DEFAULT_TEACHER_STEPS = 300  # the small teacher's pre-training steps that its folder names leave unsaid


def load_grid(name: str) -> tuple[str, dict[str, Any]]:
    path = Path(name) if name.endswith((".yaml", ".yml")) else HERE / "grids" / f"{name}.yaml"
    if not path.is_file():
        available = ", ".join(sorted(p.stem for p in (HERE / "grids").glob("*.yaml")))
        raise SystemExit(f"grid {name!r}: no file {path} (available: {available})")
    grid = yaml.safe_load(path.read_text()) or {}
    if not isinstance(grid.get("configs"), dict) or not grid["configs"]:
        raise SystemExit(f"{path}: needs a 'configs' mapping of name: [key=value, ...]")
    # an item may itself be a list (a YAML alias for overrides that several configurations share)
    flat = lambda items: [o for item in items for o in (item if isinstance(item, list) else [item])]  # noqa: E731
    grid["configs"] = {name: flat(items) for name, items in grid["configs"].items()}
    comments = path.read_text().splitlines()  # the leading comment block describes the grid
    grid["description"] = " ".join(line.lstrip("# ") for line in comments[:next(
        (i for i, line in enumerate(comments) if not line.startswith("#")), len(comments))])
    return path.stem, grid


def expand(override: str, steps: int, **values: int) -> str:
    """``align.stop_step={steps//3}`` -> ``align.stop_step=100`` for a 300-step run (also inside a
    YAML value: ``align.terms=[{..., stop_step: {steps//10}}]``); ``values`` names more numbers an
    expression may use (ts_uea.py's ``{eighth}``)."""
    key, _, value = override.partition("=")
    names = {"steps": steps, **values}
    value = re.sub(r"\{([^{}]*\b(?:%s)\b[^{}]*)\}" % "|".join(map(re.escape, names)),  # noqa: S307 below: a local grid file
                   lambda m: str(int(eval(m.group(1), {"__builtins__": {}}, names))), value)
    return f"{key}={value}"


def merged(*groups: list[str]) -> list[str]:
    """Overrides with later groups winning per key, in first-seen key order."""
    out: dict[str, str] = {}
    for group in groups:
        for item in group:
            out[override_key(item)] = item
    return list(out.values())


def run_steps(overrides: list[str], default: int) -> int:
    given = [o.split("=", 1)[1] for o in overrides if override_key(o) == "train.steps"]
    return int(given[-1]) if given else default


def plan(grid: dict[str, Any], seeds: list[int], steps: int, shared: list[str], only: list[str],
         teacher: list[str]) -> tuple[list[Run], dict[str, str]]:
    """Every run in launch order, and each configuration's baseline name (``teacher``: overrides
    for the configurations only). Baselines are named over the whole grid, so ``--only`` never
    gives a run the name (and folder) of another configuration's baseline."""
    configs = {n: list(grid.get("common", [])) + list(o) + teacher for n, o in grid["configs"].items()}
    baselines: dict[tuple[str, ...], str] = {}
    baseline_of: dict[str, str] = {}
    for name, overrides in configs.items():
        own = tuple(o for o in overrides if not override_key(o).startswith(BASELINE_ONLY_PREFIXES))
        baseline_of[name] = baselines.setdefault(own, "baseline" if not baselines else f"baseline@{name}")
    configs = {n: o for n, o in configs.items() if not only or n in only}  # plan_grids checks the names
    baseline_of = {n: b for n, b in baseline_of.items() if n in configs}
    groups = [(b, list(own), [n for n in configs if baseline_of[n] == b]) for own, b in baselines.items()
              if b in baseline_of.values()]
    runs = []
    for index, seed in enumerate(seeds):
        order = []
        for baseline, own, members in groups:
            order.append(_run(baseline, seed, steps, shared, list(own) + ["align.method=none"]))
            order += [_run(n, seed, steps, shared, configs[n]) for n in members]
        runs += order if index % 2 == 0 else order[::-1]
    return runs, baseline_of


def _run(config: str, seed: int, steps: int, shared: list[str], overrides: list[str]) -> Run:
    n = run_steps(overrides, steps)
    defaults = [f"train.steps={n}", f"train.eval_every={max(1, n // 15)}", f"train.seed={seed}"]
    return Run(f"{config}-s{seed}", config, seed, merged(defaults, shared, [expand(o, n) for o in overrides]))


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("grids", nargs="+", metavar="GRID",
                        help="grid names in benchmarks/grids/ (lambda0, stop_step, ...) or YAML paths; several share one queue")
    parser.add_argument("--base", default=str(HERE / "study_base.yaml"), help="base recipe (default: benchmarks/study_base.yaml)")
    parser.add_argument("--data", help="WikiText-2 folder (valid.txt to train, test.txt to evaluate)")
    parser.add_argument("--corpus", nargs=2, metavar=("TRAIN", "EVAL"), help="another corpus: train and eval text files")
    parser.add_argument("--corpus-name", default="corpus", help="tag for --corpus in the study name (e.g. kjv)")
    parser.add_argument("--holdout", type=float, default=0.0, metavar="FRACTION",
                        help="tuning mode: train on the first 1-FRACTION of the train file and evaluate on its last "
                             "FRACTION (the eval file is never read), so settings are chosen without the test set")
    parser.add_argument("--teacher", default="base", choices=("base", "small"),
                        help="base: the recipe's teacher; small: pre-train text_let's 5x smaller teacher first (once per --out)")
    parser.add_argument("--teacher-steps", type=int, default=DEFAULT_TEACHER_STEPS, help="steps to pre-train the small teacher")
    parser.add_argument("--teacher-corpus", nargs="+", metavar="TRAIN",
                        help="text files the small teacher pre-trains on instead of the student's train file; several "
                             "are mixed (read together, their packed sequences shuffled into one stream, so each weighs "
                             "by its size); needs --teacher-corpus-name")
    parser.add_argument("--teacher-corpus-name", metavar="NAME",
                        help="tag for --teacher-corpus in the folder and study names (e.g. kjv, or kjv+wikitext2 for a mix)")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--steps", type=int, default=300, help="train.steps (a configuration may set its own)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override for every run (repeatable)")
    parser.add_argument("--only", default="", help="comma-separated configuration names")
    parser.add_argument("--jobs", type=int, default=1, help="runs at a time (each gets cores / jobs threads)")
    parser.add_argument("--resume", action="store_true", help="continue unfinished run folders")
    parser.add_argument("--keep-weights", action="store_true", help="keep checkpoints and final weights of finished runs")
    parser.add_argument("--out", help="run folders and one GRID.json per grid (default benchmarks/results/study/"
                                      "CORPUS[-small-teacher[-from-NAME][-Nsteps]], see teacher_names)")
    parser.add_argument("--report", default=str(RESULTS / "study.md"), help="markdown report, rebuilt from every study JSON next to --out")
    parser.add_argument("--analyse", action="store_true", help="rebuild the JSONs, plots and report from the runs finished so far; start none")
    parser.add_argument("--dry-run", action="store_true", help="print the run list, check each run's config, and stop")
    return parser.parse_args()


def split_holdout(train: Path, fraction: float, folder: Path) -> tuple[Path, Path]:
    """Cut ``train`` at the line boundary nearest 1 - ``fraction`` of its bytes into
    folder/train.txt and folder/heldout.txt (rewritten only when they differ)."""
    if not 0.0 < fraction < 0.5:
        raise SystemExit(f"--holdout {fraction}: give a fraction in (0, 0.5)")
    data = train.read_bytes()
    cut = data.find(b"\n", int(len(data) * (1.0 - fraction)))
    if cut < 0 or cut + 1 >= len(data):
        raise SystemExit(f"--holdout: {train} has no line break after {1.0 - fraction:.0%} of its bytes to cut at")
    folder.mkdir(parents=True, exist_ok=True)
    parts = folder / "train.txt", folder / "heldout.txt"
    for path, part in zip(parts, (data[:cut + 1], data[cut + 1:])):
        if not path.is_file() or path.read_bytes() != part:
            path.write_bytes(part)
    return parts


def corpus_alias(name: str) -> str:
    """The placeholder saved JSONs write for a --corpus file's folder: ``kjv`` -> ``KJV_DIR``."""
    return re.sub(r"[^A-Za-z0-9]+", "_", name).upper() + "_DIR"


def data_overrides(args: argparse.Namespace, out: Path) -> tuple[list[str], str]:
    """The data overrides and the study-name suffix they imply."""
    if args.data and args.corpus:
        raise SystemExit("pass --data or --corpus, not both")
    if args.holdout:
        if not (args.data or args.corpus):
            raise SystemExit("--holdout needs --data or --corpus (its train file is split)")
        source = Path(args.corpus[0]) if args.corpus else Path(args.data) / "valid.txt"
        if not source.is_file():
            raise SystemExit(f"--holdout: train file not found: {source}")
        PATH_ALIASES[str(source.resolve().parent)] = corpus_alias(args.corpus_name) if args.corpus else "WIKITEXT2_DIR"
        train, heldout = split_holdout(source.resolve(), args.holdout, out / "holdout")
        return ["task.text.source=files", f"task.text.train_path={train}", f"task.text.eval_path={heldout}"], "-holdout"
    if args.corpus:
        for path in args.corpus:
            if not Path(path).is_file():
                raise SystemExit(f"--corpus: file not found: {path}")
        train, evaluate = (str(Path(p).resolve()) for p in args.corpus)
        for path in (train, evaluate):  # saved JSONs name the corpus's folder, not this machine's path
            PATH_ALIASES.setdefault(str(Path(path).parent), corpus_alias(args.corpus_name))
        return ["task.text.source=files", f"task.text.train_path={train}", f"task.text.eval_path={evaluate}"], f"-{args.corpus_name}"
    if args.data:
        return wikitext_overrides(Path(args.data).resolve()), ""
    if Path(args.base).resolve() == (HERE / "study_base.yaml").resolve():
        raise SystemExit("the study's base recipe reads WikiText-2 from files: pass --data WIKITEXT2_DIR (or --corpus TRAIN EVAL)")
    return [], ""


def check_configs(base: Path, runs: list[Run]) -> None:
    """Print each run and load its config (no models): a bad key or value stops here, naming the run."""
    from alignkit.core.errors import AlignkitError
    from alignkit.experiment import load_experiment

    bad = 0
    for run in runs:
        print(f"{run.name:28s} {' '.join(run.overrides)}")
        try:
            load_experiment(base, run.overrides)
        except AlignkitError as err:
            print(f"  config error: {err}")
            bad += 1
    if bad:
        raise SystemExit(f"{bad} run(s) have config errors")


def teacher_names(args: argparse.Namespace) -> tuple[str, str]:
    """The small teacher's part of the study's folder and JSON names, and its pre-training run's
    configuration name: ``-small-teacher`` and ``small_teacher`` for the default one (the student's
    train file, DEFAULT_TEACHER_STEPS steps: the names studies had before --teacher-corpus), else
    what sets it apart, e.g. ``-small-teacher-from-kjv-100steps`` and ``small_teacher-kjv-100steps``,
    so differently trained teachers never share a folder or a run; empty for the recipe's teacher."""
    if args.teacher_corpus_name and not args.teacher_corpus:
        raise SystemExit("--teacher-corpus-name names a --teacher-corpus: pass the files too")
    if args.teacher != "small":
        if args.teacher_corpus:
            raise SystemExit("--teacher-corpus is for the small teacher: add --teacher small")
        return "", ""
    if args.teacher_corpus and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9.+_-]*", args.teacher_corpus_name or ""):
        raise SystemExit("--teacher-corpus needs --teacher-corpus-name NAME (letters, digits, '.', '+', '_', '-'), e.g. kjv")
    corpus = f"-{args.teacher_corpus_name}" if args.teacher_corpus else ""
    steps = f"-{args.teacher_steps}steps" if args.teacher_steps != DEFAULT_TEACHER_STEPS else ""
    return f"-small-teacher{corpus.replace('-', '-from-', 1)}{steps}", f"small_teacher{corpus}{steps}"


def teacher_corpus(files: list[str], name: str, out: Path) -> str:
    """The small teacher's ``task.text.train_path``: the file, or for several the folder
    OUT/teacher_corpus-NAME of links to them (the files source reads a folder's files together)."""
    paths = [Path(f).resolve() for f in files]
    for path in paths:
        if not path.is_file():
            raise SystemExit(f"--teacher-corpus: file not found: {path}")
        PATH_ALIASES.setdefault(str(path.parent), "TEACHER_CORPUS_DIR")  # saved JSONs name it portably
    if len(paths) == 1:
        return str(paths[0])
    folder, links = out / f"teacher_corpus-{name}", {f"{i}-{p.name}": p for i, p in enumerate(paths)}
    if folder.exists() and {link.name: link.resolve() for link in folder.iterdir()} != links:
        raise SystemExit(f"{folder} links other files than --teacher-corpus: delete it or choose another --teacher-corpus-name")
    folder.mkdir(parents=True, exist_ok=True)
    for link, path in links.items():
        if not (folder / link).is_symlink():
            (folder / link).symlink_to(path)
    return str(folder)


def small_teacher(out: Path, shared: list[str], steps: int, name: str = "small_teacher",
                  corpus: str | None = None) -> tuple[Run, list[str]]:
    """The small teacher's pre-training run (OUT/NAME-s0), on ``corpus`` (a train_path) instead of
    the student's train file when given, and the overrides that use it."""
    own = ["task.text.source=files", f"task.text.train_path={corpus}"] if corpus else []
    teacher = _run(name, 0, steps, shared, SMALL_TEACHER_ARCH + ["align.method=none"] + own)
    return teacher, ["teacher.preset=''", "teacher.kind=hf_causal", "teacher.source=checkpoint",
                     f"teacher.name_or_path={out / teacher.name / 'final'}"]


def plan_grids(args: argparse.Namespace, seeds: list[int], shared: list[str],
               teacher: list[str]) -> list[tuple[str, dict, list[Run], dict]]:
    """Each grid's runs; a run name two grids use must mean the same run (baselines do)."""
    planned, seen = [], {}
    for grid_arg in args.grids:
        grid_name, grid = load_grid(grid_arg)
        only = [n for n in args.only.split(",") if n and n in grid["configs"]] if args.only else []
        if args.only and not only:
            continue
        runs, baseline_of = plan(grid, seeds, args.steps, shared, only, teacher)
        for run in runs:
            other = seen.setdefault(run.name, (grid_name, run.overrides))
            if other[1] != run.overrides:
                raise SystemExit(f"grids {other[0]} and {grid_name} both name a run {run.name} with different settings: "
                                 f"rename one configuration")
        planned.append((grid_name, grid, runs, baseline_of))
    unknown = {n for n in args.only.split(",") if n} - {c for _, grid, _, _ in planned for c in grid["configs"]}
    if unknown or (args.only and not planned):
        raise SystemExit(f"--only: no configuration {', '.join(sorted(unknown)) or args.only} in {', '.join(args.grids)}")
    return planned


def main() -> None:
    args = parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    small, teacher_run = teacher_names(args)
    corpus = (args.corpus_name if args.corpus else "wikitext2") + ("-holdout" if args.holdout else "")
    out = Path(args.out or RESULTS / "study" / (corpus + small)).resolve()  # shared by every grid: baselines run once
    data, suffix = data_overrides(args, out)
    checkout = next((p for p in out.parents if (p / "benchmarks" / "grids").is_dir()), None)
    if checkout is not None and checkout != REPO:  # results written into another checkout (run from a worktree)
        PATH_ALIASES[str(checkout)] = "."
    tag = small + suffix
    base = Path(args.base).resolve()
    if not base.is_file():
        raise SystemExit(f"--base: file not found: {base}")
    runner = Runner(base, out, args.resume, args.keep_weights, max(1, (os.cpu_count() or 1) // max(1, args.jobs)))
    shared = data + list(args.set)
    pretrain, teacher = None, []
    if args.teacher == "small":
        own = teacher_corpus(args.teacher_corpus, args.teacher_corpus_name, out) if args.teacher_corpus else None
        pretrain, teacher = small_teacher(out, shared, args.teacher_steps, teacher_run, own)
    planned = plan_grids(args, seeds, shared, teacher)
    queue = list({run.name: run for _, _, runs, _ in planned for run in runs}.values())  # grid order, each run once
    if args.dry_run:
        print(f"study folder: {out}")
        check_configs(base, ([pretrain] if pretrain else []) + queue)
        return
    if args.analyse:  # e.g. while another study.py works through the queue
        done = {r.name: True for r in queue if (out / r.name / "results.json").is_file()}  # the rest: pending
        return finish(planned, tag, out, args, base, shared, teacher, seeds, time.time(), done, pretrain)
    unfinished = [r.name for r in queue if runner.state(r) == "unfinished"]  # also stops on foreign folders
    if unfinished and not args.resume:
        raise SystemExit(f"unfinished run folders in {out}: {', '.join(unfinished)} (pass --resume to continue them, or delete them)")
    started = time.time()
    if pretrain and not runner(pretrain, keep_weights=True):
        raise SystemExit("the small teacher's pre-training failed (see its study.log)")
    done = run_queue(runner, queue, args.jobs)
    finish(planned, tag, out, args, base, shared, teacher, seeds, started, done, pretrain)
    failed = [name for name, good in done.items() if not good]
    if failed:
        raise SystemExit(f"{len(failed)} run(s) failed: {', '.join(failed)}")


def finish(planned: list[tuple[str, dict, list[Run], dict]], tag: str, out: Path, args: argparse.Namespace, base: Path,
           shared: list[str], teacher: list[str], seeds: list[int], started: float, done: dict[str, bool],
           pretrain: Run | None) -> None:
    """Every grid's JSON and plot, then the report; ``teacher``: the overrides that set the
    configurations' teacher (none for the recipe's), whose eval loss is measured once for all grids
    (not at all when every configuration brings a teacher of its own)."""
    line = None
    if any(any_on_teacher_line(runs, baseline_of, shared + teacher) for _, _, runs, baseline_of in planned):
        line = pretrained(out, pretrain) if pretrain is not None else measured(base, shared + teacher, out)
    for grid_name, grid, runs, baseline_of in planned:
        report(grid_name + tag, grid_name, grid, runs, baseline_of, out, args, base, shared, teacher, seeds, started, done,
               pretrain, line)
    write_report(Path(args.report), out.parent)


def report(name: str, grid_name: str, grid: dict[str, Any], runs: list[Run], baseline_of: dict[str, str], out: Path,
           args: argparse.Namespace, base: Path, shared: list[str], teacher: list[str], seeds: list[int], started: float,
           done: dict[str, bool], pretrain: Run | None, line: dict[str, Any] | None) -> None:
    """One grid's JSON and plot, and its summary lines."""
    result = analyse(runs, baseline_of, out, pretrain, line, shared + teacher)
    settings = {k: v for k, v in vars(args).items() if k not in ("grids", "report")} | {"grid": grid_name, "base": str(base),
                                                                       "shared_overrides": shared}
    payload = {"kind": "alignkit-study", "name": name, "grid": grid_name, "description": grid.get("description", ""),
               "settings": settings, "seeds": seeds,
               "wall_clock_s": time.time() - started, "time_source": TIME_SOURCE, "verdict_rule": VERDICT_RULE,
               "runs_failed": [r.name for r in runs if r.name in done and not done[r.name]],
               "runs_pending": [r.name for r in runs if r.name not in done],
               "run_overrides": {r.name: r.overrides for r in runs}, **result, "claims": claims(grid, result)}
    write_json(out / f"{name}.json", payload)
    plot_study(out / f"{name}.png", payload)
    for config, entry in payload["configs"].items():
        s = entry["summary"]
        fmt = lambda f: "-" if not s.get(f) else f"{s[f]['mean']:.3f} +- {s[f]['std']:.3f}"  # noqa: E731
        priced = entry.get("teacher_priced")
        cost = f"  time with the teacher's pre-training {priced['counted_once']:.2f}x, reused {priced['reused']:.2f}x" if priced else ""
        print(f"{name}: {config:16s} speedup {fmt('speedup')} (reached {s['reached']}/{len(s['seeds'])})  "
              f"wall {fmt('wall_speedup')}  loss diff {fmt('loss_diff')}{cost}  -> {entry['verdict']}")
    for claim in payload["claims"]:
        if claim.get("kind") == "trend":
            print(f"{name}: {trend_words(claim)}")


if __name__ == "__main__":
    main()
