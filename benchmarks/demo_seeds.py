"""The main job over seeds: ``alignkit demo`` (teacher cached after the first seed, baseline and
LET side by side) once per seed, then the spread of what it reports.

  python benchmarks/demo_seeds.py                 # seeds 0,1,2 into runs/demo-s<seed> (~30 min on 2 idle cores)
  python benchmarks/demo_seeds.py --seeds 0 --out-root /tmp/demo

Each seed's folder keeps the demo's own ``demo.json`` and ``compare.png``; a seed whose
``demo.json`` exists is read, not rerun. Writes benchmarks/results/demo_seeds.json (per seed:
speedup in steps, in training seconds with the teacher's forward, the final eval-loss difference,
the demo's wall time; their mean, std, min and max) and demo_seeds.png (every seed's eval curves).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from common import RESULTS, spread, write_json

from alignkit.compare import plot_curves, pooled_speedup


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--out-root", default="runs", help="each seed's demo goes to OUT_ROOT/demo-s<seed>")
    parser.add_argument("--out", default="demo_seeds", help="name of the JSON and PNG under benchmarks/results/")
    return parser.parse_args()


def run_seed(seed: int, folder: Path) -> tuple[dict, float | None]:
    """The demo's summary for one seed and its wall time (None when it was read, not run)."""
    if (folder / "demo.json").is_file():
        return json.loads((folder / "demo.json").read_text()), None
    started = time.time()
    command = [sys.executable, "-m", "alignkit", "demo", "--out", str(folder), f"train.seed={seed}"]
    if subprocess.run(command).returncode:
        raise SystemExit(f"demo for seed {seed} failed (see above); rerun to continue it")
    return json.loads((folder / "demo.json").read_text()), time.time() - started


def main() -> None:
    args = parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    per_seed, curves = {}, {}
    for seed in seeds:
        summary, wall = run_seed(seed, Path(args.out_root) / f"demo-s{seed}")
        base, let = summary["comparison"]["runs"]
        pair = let["vs_first"]
        per_seed[seed] = {"speedup": pair["speedup"], "reached": pair["reached"],
                          "time_speedup": pair["seconds_speedup"] if pair["reached"] else None,
                          "baseline_seconds": pair["baseline_seconds"], "let_seconds": pair["seconds"],
                          "loss_diff": pair["loss_diff"], "teacher_trained_now": summary["teacher_trained_now"],
                          "teacher_train_seconds": summary["teacher_train_seconds"], "demo_wall_seconds": wall}
        curves[f"baseline s{seed}"] = base["eval_loss_curve"]
        curves[f"LET s{seed}"] = let["eval_loss_curve"]
        print(f"seed {seed}: {json.dumps(per_seed[seed])}")
    figures = {key: spread([s[key] for s in per_seed.values() if s[key] is not None])
               for key in ("speedup", "time_speedup", "loss_diff")
               if any(s[key] is not None for s in per_seed.values())}
    reached = [s for s in per_seed.values() if s["reached"]]
    teacher_s = max(s["teacher_train_seconds"] for s in per_seed.values())  # one teacher serves every seed
    if reached:  # training seconds over the seeds, the one teacher's pre-training counted once
        figures["time_speedup_teacher_counted_once"] = pooled_speedup(
            [s["baseline_seconds"] for s in reached], [s["let_seconds"] for s in reached], teacher_s)
    payload = {"kind": "alignkit-demo-seeds", "seeds": seeds, "per_seed": per_seed, "summary": figures,
               "reached": len(reached), "teacher_train_seconds": teacher_s}
    write_json(RESULTS / f"{args.out}.json", payload)
    plot_curves(RESULTS / f"{args.out}.png", curves, f"alignkit demo, seeds {args.seeds}: eval loss by step")
    for key, value in figures.items():
        if isinstance(value, dict):
            print(f"{key}: {value['mean']:.3f} +- {value['std']:.3f} (min {value['min']:.3f}, max {value['max']:.3f})")
        else:
            print(f"{key}: {value:.3f}")


if __name__ == "__main__":
    main()
