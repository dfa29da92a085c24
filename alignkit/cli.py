"""Command line: alignkit train|check|prepare|pretrain-teacher|demo|compare|eval (also python -m alignkit).

  alignkit train configs/quickstart.yaml                  # run a recipe
  alignkit train configs/quickstart.yaml train.steps=50   # override any key
  alignkit train --resume runs/quickstart-2026... [train.steps=2000]  # exact resume
  alignkit check configs/paper/llama-1.4b_smollm2-135m.yaml  # the build chain on meta, offline
  alignkit prepare configs/quickstart.yaml --out data/tok    # token shards for source=tokens
  alignkit pretrain-teacher configs/ts/japanese_vowels.yaml  # only the TimesNet teacher stage
  alignkit eval runs/quickstart-2026...                      # lm-eval, paper's nine tasks, 1-shot
  alignkit demo                                              # the main job: baseline vs LET, compared
  alignkit compare runs/demo/baseline runs/demo/let [--json] # any runs against the first

Plug-ins register adapters, tasks, objectives, projections, schedules and loggers when imported
(alignkit/core/registry.py): pass --plugin MODULE or --plugin path/to/plugin.py, list them in
$ALIGNKIT_PLUGINS (comma-separated), or install a package with an alignkit.plugins entry point.
Problems with configs, data, run folders and checkpoints are printed as one line naming the
key or file (exit code 2); --debug (or ALIGNKIT_DEBUG=1) shows the traceback. A run
stopped by SIGINT/SIGTERM saves a checkpoint and exits with 130/143.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any, Sequence

from omegaconf import OmegaConf

from alignkit import __version__
from alignkit.core.errors import AlignkitError, ConfigError, Interrupted


def _cmd_train(args: argparse.Namespace) -> int:
    from alignkit.experiment import load_experiment
    from alignkit.run_folder import resume_config
    from alignkit.train import run

    config, overrides = args.config, list(args.overrides)
    if config and "=" in config and not Path(config).is_file():  # `train --resume DIR key=value`
        config, overrides = None, [config] + overrides
    if config is None and not args.resume:
        raise ConfigError("alignkit train needs a CONFIG (or --resume RUN_DIR)")
    cfg = load_experiment(config, overrides) if config else resume_config(Path(args.resume), overrides)
    results = run(cfg, config, resume=args.resume, progress=not args.no_progress)
    if results:
        print(json.dumps(results, indent=2, default=str))
    return 0


def _cmd_check(args: argparse.Namespace) -> int:
    from alignkit.check import check_experiment, memory_table, report_text
    from alignkit.experiment import load_experiment

    cfg = load_experiment(args.config, args.overrides)
    if args.print_config:
        print(OmegaConf.to_yaml(OmegaConf.structured(cfg)))
    report = check_experiment(cfg)
    if not args.json:
        print(report_text(report))
        return 0
    print(json.dumps(report, indent=2))  # stdout stays JSON for scripts; the rest for people
    for note in report["notes"]:
        print(f"note: {note}", file=sys.stderr)
    print(memory_table(report), file=sys.stderr)
    return 0


def _cmd_pretrain_teacher(args: argparse.Namespace) -> int:
    from alignkit.chain import needs_pretraining, teacher_configs
    from alignkit.core.distributed import DistInfo, resolve_device
    from alignkit.experiment import load_experiment
    from alignkit.teacher_stage import pretrain_teacher

    cfg = load_experiment(args.config, args.overrides)
    pending = {name: model for name, model in teacher_configs(cfg).items() if needs_pretraining(model)}
    if not pending:
        print("nothing to pre-train: every teacher of this recipe has weights (name_or_path)", file=sys.stderr)
        return 0
    device = resolve_device(cfg.train.device, DistInfo())
    for model in pending.values():
        try:
            print(pretrain_teacher(cfg, model, device=device, progress=not args.no_progress))
        except Interrupted as err:
            raise Interrupted(f"teacher pre-training {err}; rerun the same command to continue", err.exit_code - 128) from None
    return 0


def _cmd_prepare(args: argparse.Namespace) -> int:
    from alignkit.adapters.hf_causal import load_tokenizer
    from alignkit.chain import teacher_configs
    from alignkit.experiment import load_experiment
    from alignkit.tasks.token_shards import prepare

    cfg = load_experiment(args.config, args.overrides)
    if not hasattr(cfg.task, "text"):
        raise ConfigError(f"alignkit prepare tokenizes text: task.name={cfg.task.name} has no task.text section")
    teacher = load_tokenizer(cfg.teacher) if teacher_configs(cfg) else None
    name = lambda m: m.options.tokenizer or m.name_or_path  # noqa: E731
    manifest = prepare(cfg.task.text, load_tokenizer(cfg.student), args.out, workers=args.workers,
                       tokenizer_name=name(cfg.student), teacher_tokenizer=teacher, teacher_name=name(cfg.teacher),
                       seq_len=cfg.task.seq_len, shard_tokens=args.shard_tokens, progress=not args.no_progress,
                       allow_truncated=args.allow_truncated)
    print(json.dumps(manifest["splits"], indent=2))
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from alignkit.evaluate import evaluate

    tasks = args.tasks.split(",") if args.tasks else None
    evaluate(args.model, tasks, args.num_fewshot, args.limit, args.batch_size, args.device, args.include_path, args.output)
    return 0


def _cmd_compare(args: argparse.Namespace) -> int:
    from alignkit.compare import compare, plot_comparison, table

    result = compare([Path(run) for run in args.runs], args.metric, args.mode)
    plot = Path(args.plot) if args.plot else Path(args.runs[0]) / "compare.png"
    plot_comparison(plot, result)
    print(json.dumps(result, indent=2) if args.json else f"{table(result)}\nplot: {plot}")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from alignkit.demo import LET_RECIPE, TEACHER_RECIPE, run_demo

    run_demo(Path(args.out), list(args.overrides), Path(args.recipe or LET_RECIPE), Path(args.teacher_recipe or TEACHER_RECIPE),
             progress=not args.no_progress)
    return 0


def _recipe_arguments(parser: argparse.ArgumentParser, progress: bool = True, resumable: bool = False) -> None:
    """The arguments every recipe command takes: CONFIG, key=value overrides, --no-progress."""
    if resumable:
        parser.add_argument("config", nargs="?", help="recipe YAML (see configs/); optional with --resume")
    else:
        parser.add_argument("config", help="recipe YAML (see configs/)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides of the recipe, e.g. train.steps=10")
    if progress:
        parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def _command(commands: Any, name: str, summary: str) -> argparse.ArgumentParser:
    """A subcommand whose summary is both its line in ``alignkit --help`` and its own description."""
    return commands.add_parser(name, help=summary, description=summary)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="alignkit", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"alignkit {__version__}")
    parser.add_argument("--plugin", action="append", default=[], metavar="MODULE_OR_FILE",
                        help="plug-in to import: a module name or a path/to/plugin.py (repeatable)")
    parser.add_argument("--debug", action="store_true", help="show the traceback of user errors")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    train = _command(sub, "train", "train a student (with LET or another method)")
    _recipe_arguments(train, resumable=True)
    train.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its latest checkpoint")
    train.set_defaults(func=_cmd_train)
    check = _command(sub, "check", "validate a recipe and build its models on the meta device")
    _recipe_arguments(check, progress=False)
    check.add_argument("--print-config", action="store_true", help="print the resolved config")
    check.add_argument("--json", action="store_true", help="print the report as JSON (stdout) for scripts")
    check.set_defaults(func=_cmd_check)
    prep = _command(sub, "prepare", "tokenize the recipe's text source into token shards (task.text.source=tokens)")
    _recipe_arguments(prep)
    prep.add_argument("--out", required=True, help="output folder; rerun with the same settings to continue")
    prep.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 1),
                      help="tokenizer processes (default: CPU cores - 1)")
    prep.add_argument("--shard-tokens", type=int, default=1 << 25, help="tokens per shard (bounds memory; default 2^25)")
    prep.add_argument("--allow-truncated", action="store_true",
                      help="keep the documents before the cut of a truncated .zst (warned, recorded in manifest.json)")
    prep.set_defaults(func=_cmd_prepare)
    stage = _command(sub, "pretrain-teacher", "pre-train (or find in the cache) the recipe's TimesNet teacher")
    _recipe_arguments(stage)
    stage.set_defaults(func=_cmd_pretrain_teacher)
    demo = _command(sub, "demo", "the main job: pre-train a small teacher, train a baseline and LET side by side, compare")
    demo.add_argument("overrides", nargs="*", help="key=value overrides for the baseline and the LET run")
    demo.add_argument("--out", default="runs/demo", help="folder of the two runs, compare.png and demo.json (default runs/demo)")
    demo.add_argument("--recipe", help="the LET recipe (default configs/small_scale/let.yaml; the baseline is it without LET)")
    demo.add_argument("--teacher-recipe", help="the teacher's pre-training recipe (default configs/small_scale/teacher.yaml)")
    demo.add_argument("--no-progress", action="store_true", help="no progress bar for the teacher's pre-training")
    demo.set_defaults(func=_cmd_demo)
    cmp = _command(sub, "compare", "compare runs (finished or running) against the first: steps and time to its final metric")
    cmp.add_argument("runs", nargs="+", metavar="RUN", help="run folders; the first is the reference (e.g. the baseline)")
    cmp.add_argument("--metric", help="eval metric (default: the first run's train.select_metric, else its task's first)")
    cmp.add_argument("--mode", choices=("min", "max"), help="whether lower or higher --metric is better (default min)")
    cmp.add_argument("--plot", help="PNG of the eval curves (default: FIRST_RUN/compare.png)")
    cmp.add_argument("--json", action="store_true", help="print the comparison as JSON (for scripts)")
    cmp.set_defaults(func=_cmd_compare)
    ev = _command(sub, "eval", "downstream evaluation with lm-evaluation-harness (paper's nine tasks, 1-shot)")
    ev.add_argument("model", help="run dir, checkpoint dir, or HF model folder")
    ev.add_argument("--tasks", default="", help="comma-separated lm-eval tasks (default: the paper's nine)")
    ev.add_argument("--num-fewshot", type=int, default=1, help="examples shown before each question (default 1)")
    ev.add_argument("--limit", type=int, default=None, help="documents per task (quick looks)")
    ev.add_argument("--batch-size", default="auto", help="sequences per forward, or auto (default)")
    ev.add_argument("--device", default="cpu", help="torch device, e.g. cpu (default) or cuda")
    ev.add_argument("--include-path", default=None, help="folder with your own lm-eval task YAMLs")
    ev.add_argument("--output", default=None, help="output folder (default: MODEL/eval)")
    ev.set_defaults(func=_cmd_eval)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:  # key=value after an option (`CONFIG --resume DIR a=b`): argparse leaves them over
        if not hasattr(args, "overrides") or not all("=" in item and not item.startswith("-") for item in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides += extra
    debug = args.debug or bool(os.environ.get("ALIGNKIT_DEBUG"))
    try:
        from alignkit.plugins import load_plugins  # imports torch: not for --help

        load_plugins(args.plugin)
        return args.func(args)
    except AlignkitError as err:  # a problem the user can fix; anything else is a bug: traceback
        if debug:
            raise
        print(f"alignkit: {'stopped' if isinstance(err, Interrupted) else 'error'}: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print("alignkit: interrupted; what was saved before is kept (rerun or --resume to continue)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
