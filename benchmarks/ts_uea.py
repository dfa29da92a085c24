"""Time-series LET benchmark (paper App. E / Table 2) on the UEA sets available here.

  python benchmarks/ts_uea.py --jobs 2                          # CPU defaults (~40 min on 2 cores)
  python benchmarks/ts_uea.py --datasets JapaneseVowels --seeds 0,1,2,3,4,5,6,7 --lambda0 1 --jobs 2 --out ts_uea_jv_8seeds
  python benchmarks/ts_uea.py --datasets JapaneseVowels --lambda0 1 --override student.options.pooling=mean --out ts_uea_jv_meanpool
  python benchmarks/ts_uea.py --datasets Heartbeat,PEMS-SF --student qwen2.5-0.5b-ts --keep-layers 0 --device cuda
  python benchmarks/ts_uea.py --init pretrained,random --lambda0 1 --out ts_uea_random_init

For each dataset and seed: test accuracy of aeon's MiniRocket (the classical reference, on the
same padded, normalised series, trained on train+val), the TimesNet teacher (pre-trained by
alignkit, selected on validation), the LLM baseline (fine-tuned without alignment) and LLM + LET
(same budget and hyperparameters; one LET column per ``--lambda0`` value). ``--init random`` adds
the same LLM columns (``rand_*``) for a randomly initialised student of the same architecture
(the backbone's config -- from the GGUF header for the SmolLM2 student -- built with
``source: config``), the student that has not learned yet. Model selection uses
the validation split carved from TRAIN, never the test split. ``--jobs 2`` runs two seeds at once
(one thread each); ``--reuse`` keeps runs already finished in ``--work`` (an interrupted benchmark
continues; it does not check that their settings match). Writes
benchmarks/results/<--out>.{json,md,png} (default ts_uea), with the per-seed LET-minus-baseline
differences.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from common import RESULTS, run_experiment, write_json

from alignkit.experiment import load_experiment
from alignkit.teacher_stage import teacher_cache_dir, teacher_run_config
from alignkit.tasks.uea import UEADataConfig, load_uea

REPO = Path(__file__).resolve().parents[1]
REFERENCES = ("minirocket", "timesnet")
PREFIXES = {"pretrained": "llm", "random": "rand"}  # column prefix of each student initialisation


def recipe(dataset: str) -> str:
    """The dataset's own recipe, configs/ts/<snake_case>.yaml (JapaneseVowels -> japanese_vowels),
    else the JapaneseVowels one with the dataset swapped in."""
    snake = re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "_", dataset).replace("-", "_").lower()
    path = REPO / "configs" / "ts" / f"{snake}.yaml"
    return str(path if path.is_file() else REPO / "configs" / "ts" / "japanese_vowels.yaml")


def methods(inits: list[str], lambdas: list[float]) -> list[str]:
    llm = [name for init in inits for name in (f"{PREFIXES[init]}_baseline",
                                               *(f"{PREFIXES[init]}_let@{lam:g}" for lam in lambdas))]
    return [*REFERENCES, *llm]


def random_init_overrides(config: str, overrides: list[str]) -> list[str]:
    """Overrides that build the configured student's backbone from its own HF config with random
    weights (``source: config``): same widths, heads, depth and RoPE, nothing learned. The config
    is read without weights (a GGUF student's from the file's header)."""
    from alignkit.adapters.hf_causal import load_hf_causal_lm

    student = load_experiment(config, [*overrides, "align.method=none"]).student  # the student alone
    arch = load_hf_causal_lm(student, meta=True).config.to_diff_dict()
    skip = {"transformers_version", "use_cache", "dtype"}
    fields = {key: value for key, value in arch.items() if not key.startswith("_") and key not in skip}
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
    parser.add_argument("--lambda0", default="0.1,1,3", help="LET lambda0 values, one LLM + LET column each")
    parser.add_argument("--stop-fraction", type=float, default=0.5, help="stop_step as a fraction of the steps")
    parser.add_argument("--teacher-steps", type=int, default=600)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--work", default=str(RESULTS / "ts_uea_work"))
    parser.add_argument("--reuse", action="store_true",
                        help="keep finished runs found in --work (results.json) instead of training them again")
    parser.add_argument("--jobs", type=int, default=1, help="seeds run in parallel (one thread each)")
    parser.add_argument("--out", default="ts_uea", help="results name: benchmarks/results/<out>.{json,md,png}")
    parser.add_argument("--override", action="append", default=[],
                        help="extra key=value for both LLM runs (task.teacher_pretrain.* reaches the teacher); repeatable")
    return parser.parse_args()


def minirocket_accuracy(dataset: str, seed: int) -> float:
    from aeon.classification.convolution_based import MiniRocketClassifier

    splits = load_uea(UEADataConfig(datasets=[dataset], seed=0))
    to_numpy = lambda split: split.x.permute(0, 2, 1).numpy().astype(np.float64)  # noqa: E731  (N, C, T)
    x_train = np.concatenate([to_numpy(splits.train), to_numpy(splits.val)])
    y_train = np.concatenate([splits.train.y.numpy(), splits.val.y.numpy()])
    model = MiniRocketClassifier(random_state=seed).fit(x_train, y_train)
    return float((model.predict(to_numpy(splits.test)) == splits.test.y.numpy()).mean())


def test_accuracy(args: argparse.Namespace, work: Path, name: str, overrides: list[str], config: str) -> float:
    finished = work / name / "results.json"
    if args.reuse and finished.is_file():
        print(f"== reusing {finished}")
    else:
        run_experiment(name, work, overrides, config)
    return json.loads(finished.read_text())["test_accuracy"]


def seed_scores(args: argparse.Namespace, work: Path, dataset: str, seed: int, steps: int) -> dict[str, float]:
    """Every method's test accuracy for one dataset and seed (LET first: it pre-trains, or
    reuses, this seed's TimesNet teacher, whose own test accuracy is read from its cache).
    Run names: ``<dataset>-[rand-](let<lambda0>|baseline)-<seed>``."""
    scores = {"minirocket": minirocket_accuracy(dataset, seed)}
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
        for lam in args.lambdas:
            let = student + ["align.method=let", f"align.lambda0={lam}",
                             f"align.stop_step={max(1, int(steps * args.stop_fraction))}"]
            print(f"== {dataset} seed {seed}: {init} LLM + LET, lambda0 {lam:g} ({steps} steps; the first pre-trains the teacher)")
            scores[f"{prefix}_let@{lam:g}"] = test_accuracy(args, work, f"{dataset}-{tag}let{lam:g}-{seed}", let, config)
        if "timesnet" not in scores:
            let_cfg = load_experiment(config, let)
            teacher_dir = teacher_cache_dir(teacher_run_config(let_cfg, let_cfg.teacher))
            scores["timesnet"] = json.loads((teacher_dir / "results.json").read_text())["test_accuracy"]
        print(f"== {dataset} seed {seed}: {init} LLM baseline")
        scores[f"{prefix}_baseline"] = test_accuracy(args, work, f"{dataset}-{tag}baseline-{seed}",
                                                     student + ["align.method=none"], config)
    print(f"== {dataset} seed {seed}: " + json.dumps(scores))
    return scores


def main() -> None:
    args = parse_args()
    args.lambdas = [float(v) for v in args.lambda0.split(",")]
    args.inits = args.init.split(",")
    if unknown := set(args.inits) - set(PREFIXES):
        raise SystemExit(f"--init: {sorted(unknown)} not in {sorted(PREFIXES)}")
    names = methods(args.inits, args.lambdas)
    work, started = Path(args.work), time.time()
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
    for (dataset, _, _), scores in zip(jobs, done):  # in seed order, whatever finished first
        for method in names:
            table.setdefault(dataset, {m: [] for m in names})[method].append(scores[method])

    summary = {
        ds: {m: {"mean": statistics.mean(v), "std": statistics.pstdev(v), "runs": v} for m, v in scores.items()}
        for ds, scores in table.items()
    }
    paired = {ds: paired_vs_baseline(scores, names) for ds, scores in table.items()}
    write_json(RESULTS / f"{args.out}.json", {"settings": vars(args), "wall_clock_s": time.time() - started,
                                               "test_accuracy": summary, "let_minus_baseline": paired})
    lines = ["| dataset | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for ds, row in summary.items():
        cells = [f"{100 * row[m]['mean']:.1f} ± {100 * row[m]['std']:.1f}" for m in names]
        lines.append(f"| {ds} | " + " | ".join(cells) + " |")
    lines += ["", f"Test accuracy (%), mean ± std over seeds {seeds}.", "",
              "LET minus baseline, same seed and initialisation (points: mean ± std; per seed; wins / ties / losses):", ""]
    for ds, row in paired.items():
        lines += [f"- {ds}, {m}: {100 * d['mean']:+.2f} ± {100 * d['std']:.2f} (per seed "
                  + ", ".join(f"{100 * x:+.1f}" for x in d["diffs"]) + f"; {d['wins']} / {d['ties']} / {d['losses']})"
                  for m, d in row.items()]
    markdown = "\n".join(lines) + "\n"
    (RESULTS / f"{args.out}.md").write_text(markdown)
    print(markdown)
    plot(summary, names, RESULTS / f"{args.out}.png")


def paired_vs_baseline(scores: dict[str, list[float]], names: list[str]) -> dict[str, dict]:
    """Per-seed LET minus baseline (same initialisation) for each LET column: the two runs of a seed
    share the data order, the initialisation and the teacher, so the paired difference is less
    noisy than the means'."""
    out = {}
    for method in (m for m in names if "_let@" in m):
        baseline = scores[method.split("_let@")[0] + "_baseline"]
        diffs = [let - base for let, base in zip(scores[method], baseline)]
        out[method] = {"mean": statistics.mean(diffs), "std": statistics.pstdev(diffs), "diffs": diffs,
                       "wins": sum(d > 0 for d in diffs),
                       "ties": sum(d == 0 for d in diffs), "losses": sum(d < 0 for d in diffs)}
    return out


def plot(summary: dict, names: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    width = 0.8 / len(names)
    for i, method in enumerate(names):
        means = [100 * summary[ds][method]["mean"] for ds in summary]
        stds = [100 * summary[ds][method]["std"] for ds in summary]
        ax.bar([x + i * width for x in range(len(summary))], means, width, yerr=stds, label=method, capsize=3)
    ax.set_xticks([x + (len(names) - 1) / 2 * width for x in range(len(summary))], list(summary))
    ax.set_ylabel("test accuracy (%)")
    lowest = min(100 * summary[ds][m]["mean"] for ds in summary for m in names)
    ax.set_ylim(max(0, lowest - 10), 100.5)  # zoomed: the methods differ by a few points
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.08), ncol=len(names), fontsize=8)
    ax.set_title("UEA classification: LLM student with and without LET")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
