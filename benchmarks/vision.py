"""Image LET benchmark: a timm ViT student trained from scratch on scikit-learn's digits
(offline), without alignment (baseline) and with LET from a small timm CNN teacher
(configs/vision/digits.yaml), seed by seed.

  python benchmarks/vision.py                                    # 3 seeds x 200 steps (~10-15 min on 2 idle cores)
  python benchmarks/vision.py --steps 40 --teacher-steps 150 --out vision_small   # a reduced run

The teacher is pre-trained by the teacher stage in each seed's LET run (``--teacher-steps``;
its cache key includes the data seed, so each seed has its own). For each seed the baseline and
LET share the seeds (initialisation, data order, validation carve-out) and the budget; LET's stop
step is ``--stop-fraction`` of the steps. Reported per seed and as mean/std: test accuracy of the
model selected on validation loss, and the steps each needs to reach the baseline's final
validation loss (speedup = baseline's steps / LET's, benchmarks/common.py).
Writes benchmarks/results/<--out>.json and <--out>.png (validation-loss curves).
"""
from __future__ import annotations

import argparse
import json
import shutil
import time

from common import REPO, RESULTS, eval_curve, plot_curves, run_experiment, speedup, spread, write_json

RECIPE = str(REPO / "configs" / "vision" / "digits.yaml")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--steps", type=int, default=200, help="student steps (the recipe's 200)")
    parser.add_argument("--teacher-steps", type=int, default=400, help="teacher pre-training steps (the recipe's 400)")
    parser.add_argument("--stop-fraction", type=float, default=0.3, help="LET's stop step as a fraction of --steps")
    parser.add_argument("--out", default="vision")
    return parser.parse_args()


def test_accuracy(run: dict) -> float:
    return float(run["results"]["test_accuracy"])


def main() -> None:
    args = parse_args()
    work, started = RESULTS / f"{args.out}_work", time.time()
    shutil.rmtree(work / "teachers", ignore_errors=True)  # teachers of this invocation only
    stop = max(1, round(args.steps * args.stop_fraction))
    rows, curves = [], {}
    for seed in [int(s) for s in args.seeds.split(",")]:
        shared = [f"train.seed={seed}", f"task.data.seed={seed}", f"train.steps={args.steps}",
                  f"train.eval_every={max(1, args.steps // 10)}", f"task.teacher_pretrain.steps={args.teacher_steps}",
                  "--no-progress"]
        baseline = run_experiment(f"baseline-s{seed}", work, [*shared, "align.method=none"], config=RECIPE)
        let = run_experiment(f"let-s{seed}", work, [*shared, f"align.stop_step={stop}"], config=RECIPE)
        base_curve, let_curve = eval_curve(baseline["records"], "val_loss"), eval_curve(let["records"], "val_loss")
        curves.update({f"baseline s{seed}": base_curve, f"LET s{seed}": let_curve})
        rows.append({"seed": seed, "baseline_test_accuracy": test_accuracy(baseline),
                     "let_test_accuracy": test_accuracy(let), **speedup(base_curve, let_curve)})
        print(rows[-1])
    reached = [row["speedup"] for row in rows if row["speedup"] is not None]
    summary = {
        "baseline_test_accuracy": spread([row["baseline_test_accuracy"] for row in rows]),
        "let_test_accuracy": spread([row["let_test_accuracy"] for row in rows]),
        "let_minus_baseline_test_accuracy": spread([row["let_test_accuracy"] - row["baseline_test_accuracy"]
                                                    for row in rows]),
        "speedup": spread(reached) if reached else None,
        "seeds_reaching_baseline_final_val_loss": f"{len(reached)} of {len(rows)}",
    }
    write_json(RESULTS / f"{args.out}.json", {
        "recipe": RECIPE, "steps": args.steps, "stop_step": stop, "teacher_steps": args.teacher_steps,
        "teacher_test_accuracy": [json.loads(path.read_text())["test_accuracy"]
                                  for path in sorted((work / "teachers").glob("*/results.json"))],
        "wall_seconds": round(time.time() - started), "rows": rows, "summary": summary,
    })
    plot_curves(RESULTS / f"{args.out}.png", curves, f"digits: ViT student, baseline vs LET ({args.steps} steps)",
                ylabel="validation loss", vlines={"LET: teacher dropped": stop})


if __name__ == "__main__":
    main()
