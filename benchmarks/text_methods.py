"""Every method of the paper's tables on one engine, trainer, data, seed and student:
none, rkd, salt, let-cosine, let-logsum, let-cca, the six layer strategies, and lambda0 sweeps.

  python benchmarks/text_methods.py --data WIKITEXT2_DIR  # CPU defaults (short runs, ~45 min on 1 core)
  python benchmarks/text_methods.py --data WIKITEXT2_DIR --device cuda --steps 3000 --stop-step 1000 --student llama-1.4b \
      --precision bfloat16                          # closer to paper scale (see README)

Data, student and teacher as benchmarks/text_let.py (WikiText-2, llama-small, SmolLM2-135M GGUF).
Writes benchmarks/results/text_methods.json (final eval loss, steps-to-baseline-loss speedup,
tokens/s, peak memory per run) and PNGs: eval loss per method, cosine similarity over steps per
lambda0 (the paper's Figures 4 and 6).
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

from common import RESULTS, eval_curve, plot_curves, run_experiment, speedup, train_summary, wikitext_overrides, write_json

STRATEGIES = ("L2E", "L2M", "L2L", "M2E", "M2M", "M2L")
LAMBDAS = (0.01, 0.1, 0.3, 1.0, 3.0)


def runs(stop: int) -> dict[str, list[str]]:
    plan = {"none": ["align.method=none"], "rkd": ["align.method=rkd"], "salt": ["align.method=salt"]}
    for objective in ("cosine", "logsum", "cca"):
        plan[f"let-{objective}"] = ["align.method=let", f"align.objective={objective}"]
    for strategy in STRATEGIES[1:]:  # L2E is let-cosine
        plan[f"let-{strategy}"] = ["align.method=let", f"align.strategy={strategy}"]
    for lam in LAMBDAS:
        if lam != 0.1:  # 0.1 is let-cosine
            plan[f"let-lambda{lam}"] = ["align.method=let", f"align.lambda0={lam}"]
    return plan


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--student", default="llama-small")
    parser.add_argument("--teacher", default="smollm2-135m-gguf")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--stop-step", type=int, default=20)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--precision", default="float32")
    parser.add_argument("--only", default="", help="comma-separated run names (default: all)")
    parser.add_argument("--data", required=True, help="folder with WikiText-2's valid.txt and test.txt")
    parser.add_argument("--work", default=str(RESULTS / "text_methods_work"))
    parser.add_argument("--seed", type=int, default=0, help="train.seed (one seed: no spread; see README)")
    args = parser.parse_args()
    data, work, started = Path(args.data), Path(args.work), time.time()
    common = [
        f"student.preset={args.student}", f"teacher.preset={args.teacher}",
        *wikitext_overrides(data), f"task.seq_len={args.seq_len}", "task.text.eval_batches=8",
        f"train.steps={args.steps}", f"train.micro_batch_size={args.micro_batch}", f"train.lr={args.lr}",
        f"train.eval_every={max(1, args.steps // 10)}", "train.save_every=0", "train.keep_checkpoints=1",
        f"train.device={args.device}", f"train.precision={args.precision}", f"train.seed={args.seed}",
        f"align.stop_step={args.stop_step}",
    ]
    plan = runs(args.stop_step)
    if args.only:
        plan = {k: v for k, v in plan.items() if k in args.only.split(",")}
    records = {}
    for name, overrides in plan.items():
        print(f"== {name}")
        records[name] = run_experiment(name, work, common + overrides)["records"]
    table = {}
    baseline = eval_curve(records["none"]) if "none" in records else None
    for name, rows in records.items():
        curve = eval_curve(rows)
        entry = {"final_eval_loss": curve[-1][1], "eval_loss_curve": curve, **train_summary(rows)}
        if baseline and name != "none":
            entry.update(speedup(baseline, curve))
        table[name] = entry
    write_json(RESULTS / "text_methods.json", {"seeds": [args.seed], "spread": "one seed: no spread (run it per seed and compare)",
                                               "settings": vars(args), "wall_clock_s": time.time() - started, "runs": table})
    methods = [n for n in ("none", "rkd", "salt", "let-cosine", "let-logsum", "let-cca") if n in table]
    plot_curves(RESULTS / "text_methods_loss.png", {n: table[n]["eval_loss_curve"] for n in methods},
                "eval loss per method", vlines={"stop_step (teacher dropped)": args.stop_step})
    plot_curves(RESULTS / "text_methods_strategies.png",
                {n: table[n]["eval_loss_curve"] for n in ["let-cosine", *[f"let-{s}" for s in STRATEGIES[1:]]] if n in table},
                "eval loss per layer strategy (let-cosine = L2E)", vlines={"stop_step (teacher dropped)": args.stop_step})
    cosines = {}
    for lam in LAMBDAS:
        name = "let-cosine" if lam == 0.1 else f"let-lambda{lam}"
        if name in records:
            key = next((k for k in records[name][0] if k.startswith("cos/")), None)
            cosines[f"lambda0={lam}"] = [(r["step"], r[key]) for r in records[name] if key and key in r]
    plot_curves(RESULTS / "text_methods_cosine.png", cosines, "cosine similarity (student layer 3, teacher final)",
                ylabel="cosine similarity")
    print(f"{'run':16s} {'final eval':>10s} {'speedup':>8s} {'tok/s':>7s} {'peak MB':>8s}")
    for name, entry in table.items():
        sp = entry.get("speedup")
        print(f"{name:16s} {entry['final_eval_loss']:10.4f} {sp if sp is None else round(sp, 3)!s:>8s} "
              f"{entry['tokens_per_s']:7.0f} {entry['peak_mem_mb']:8.0f}")


if __name__ == "__main__":
    main()
