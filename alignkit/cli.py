"""Command line: ``alignkit train|check|prepare|pretrain-teacher|eval`` (also ``python -m alignkit``).

  alignkit train configs/quickstart.yaml                  # run a recipe
  alignkit train configs/quickstart.yaml train.steps=50   # override any key
  alignkit train --resume runs/quickstart-2026... [train.steps=2000]  # exact resume
  alignkit check configs/paper/llama-1.4b_smollm2-135m.yaml  # the build chain on meta, offline
  alignkit prepare configs/quickstart.yaml --out data/tok    # token shards for source=tokens
  alignkit pretrain-teacher configs/ts/japanese_vowels.yaml  # only the TimesNet teacher stage
  alignkit eval runs/quickstart-2026...                      # lm-eval, paper's nine tasks, 1-shot

Plug-ins register adapters, tasks, objectives, projections and schedules when imported
(:mod:`alignkit.core.registry`): list their modules in ``$ALIGNKIT_PLUGINS`` (comma-separated),
pass ``--plugin module``, or install a package with an ``alignkit.plugins`` entry point.
Problems with configs, data, run folders and checkpoints are printed as one line naming the
key or file (exit code 2); ``--debug`` (or ALIGNKIT_DEBUG=1) shows the traceback. A run
stopped by SIGINT/SIGTERM saves a checkpoint and exits with 130/143.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Sequence

from omegaconf import OmegaConf

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
                       seq_len=cfg.task.seq_len, shard_tokens=args.shard_tokens, progress=not args.no_progress)
    print(json.dumps(manifest["splits"], indent=2))
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from alignkit.evaluate import evaluate

    tasks = args.tasks.split(",") if args.tasks else None
    evaluate(args.model, tasks, args.num_fewshot, args.limit, args.batch_size, args.device, args.include_path, args.output)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="alignkit", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--plugin", action="append", default=[], help="plug-in module to import (it registers adapters, tasks, objectives, ...)")
    parser.add_argument("--debug", action="store_true", help="show the traceback of user errors")
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="train a student (with LET or another method)")
    train.add_argument("config", nargs="?", help="recipe YAML (see configs/); optional with --resume")
    train.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.steps=10")
    train.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its latest checkpoint")
    train.add_argument("--no-progress", action="store_true", help="no progress bar")
    train.set_defaults(func=_cmd_train)
    check = sub.add_parser("check", help="validate a recipe and build its models on the meta device")
    check.add_argument("config")
    check.add_argument("overrides", nargs="*")
    check.add_argument("--print-config", action="store_true", help="print the resolved config")
    check.add_argument("--json", action="store_true", help="print the report as JSON (stdout) for scripts")
    check.set_defaults(func=_cmd_check)
    prep = sub.add_parser("prepare", help="tokenize the recipe's text source into token shards (task.text.source=tokens)")
    prep.add_argument("config")
    prep.add_argument("overrides", nargs="*")
    prep.add_argument("--out", required=True, help="output folder; rerun with the same settings to continue")
    prep.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 1), help="tokenizer processes")
    prep.add_argument("--shard-tokens", type=int, default=1 << 25, help="tokens per shard (bounds memory)")
    prep.add_argument("--no-progress", action="store_true")
    prep.set_defaults(func=_cmd_prepare)
    stage = sub.add_parser("pretrain-teacher", help="pre-train (or find in the cache) the recipe's TimesNet teacher")
    stage.add_argument("config")
    stage.add_argument("overrides", nargs="*")
    stage.add_argument("--no-progress", action="store_true", help="no progress bar")
    stage.set_defaults(func=_cmd_pretrain_teacher)
    ev = sub.add_parser("eval", help="downstream evaluation with lm-evaluation-harness (paper's nine tasks, 1-shot)")
    ev.add_argument("model", help="run dir, checkpoint dir, or HF model folder")
    ev.add_argument("--tasks", default="", help="comma-separated lm-eval tasks (default: the paper's nine)")
    ev.add_argument("--num-fewshot", type=int, default=1)
    ev.add_argument("--limit", type=int, default=None, help="documents per task (quick looks)")
    ev.add_argument("--batch-size", default="auto")
    ev.add_argument("--device", default="cpu")
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
