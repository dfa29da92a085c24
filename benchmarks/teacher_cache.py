"""What the teacher-feature cache (``align.teacher_cache``) saves: wall-clock of a run with the
live teacher against the same run replaying the teacher's outputs, interleaved (live, replay,
live, replay, ...) so that machine load hits both alike, each run in its own process; and the
cache's size per step. The teacher is active for the whole run (``align.stop_step`` = steps),
the case a sweep over alignment settings repeats.

  python benchmarks/teacher_cache.py [--config configs/quickstart.yaml] [--steps 20] [--repeats 3]
      [--set key=value ...]

Writes benchmarks/results/teacher_cache.json and .png.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, run_experiment, spread, train_summary, write_json  # noqa: E402


# timing, not a comparison of methods: the replay's losses equal the live run's by construction (tests pin it)
SPREAD_OVER = "interleaved repeats of one seed: the spread is timing noise"


def timed(name: str, work: Path, overrides: list[str], config: str) -> dict:
    start = time.perf_counter()
    run = run_experiment(name, work, overrides, config)
    return {"wall_s": time.perf_counter() - start, **train_summary(run["records"])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/quickstart.yaml")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0, help="train.seed of every run (a timing benchmark: the spread is over repeats)")
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    parser.add_argument("--work", default="runs/bench_teacher_cache")
    parser.add_argument("--set", nargs="*", default=[], help="extra overrides (e.g. a data path)")
    args = parser.parse_args()
    work = Path(args.work)
    cache = work / "cache"
    base = [f"train.seed={args.seed}", f"train.steps={args.steps}", f"align.stop_step={args.steps}", "train.eval_every=0", "train.save_every=0",
            "--no-progress", *args.set]
    cached = [f"align.teacher_cache={cache}", f"align.teacher_cache_dtype={args.dtype}"]
    record = timed("record", work, base + cached, args.config)  # fills the cache (and warms the file cache)
    live, replay = [], []
    for i in range(args.repeats):
        live.append(timed(f"live{i}", work, base, args.config))
        replay.append(timed(f"replay{i}", work, base + cached, args.config))
    size = sum(p.stat().st_size for p in cache.rglob("shard-*.safetensors"))
    summary = {
        "config": args.config, "steps": args.steps, "repeats": args.repeats, "cache_dtype": args.dtype, "overrides": args.set,
        "seeds": [args.seed], "spread_over": SPREAD_OVER,
        "cache_bytes": size, "cache_bytes_per_step": size / args.steps,
        "record": record,
        "live_wall_s": spread([r["wall_s"] for r in live]),
        "replay_wall_s": spread([r["wall_s"] for r in replay]),
        "live_tokens_per_s": spread([r["tokens_per_s"] for r in live]),
        "replay_tokens_per_s": spread([r["tokens_per_s"] for r in replay]),
    }
    summary["wall_speedup"] = summary["live_wall_s"]["mean"] / summary["replay_wall_s"]["mean"]
    summary["step_speedup"] = summary["replay_tokens_per_s"]["mean"] / summary["live_tokens_per_s"]["mean"]
    for kind in ("wall_s", "tokens_per_s"):
        a, b = summary[f"live_{kind}"], summary[f"replay_{kind}"]
        print(f"{kind}: live {a['mean']:.2f} +- {a['std']:.2f}, replay {b['mean']:.2f} +- {b['std']:.2f}")
    print(f"cache: {size / 2**20:.1f} MiB, {size / args.steps / 2**10:.1f} KiB per step")
    write_json(RESULTS / "teacher_cache.json", summary)
    _plot(summary, RESULTS / "teacher_cache.png")


def _plot(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(8, 3.5))
    for ax, kind, label in ((axes[0], "wall_s", "run wall-clock (s)"), (axes[1], "tokens_per_s", "training tokens/s")):
        stats = [summary[f"live_{kind}"], summary[f"replay_{kind}"]]
        ax.bar(["live teacher", "replayed"], [s["mean"] for s in stats], yerr=[s["std"] for s in stats], capsize=6,
               color=["tab:orange", "tab:blue"])
        ax.set_ylabel(label)
    fig.suptitle(f"teacher cache: {summary['config']}, {summary['steps']} steps, {summary['repeats']} repeats each")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
