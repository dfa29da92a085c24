"""The main job: does LET pay here? (``alignkit demo [--out DIR] [key=value ...]``)

Three ``alignkit train`` runs on the embedded offline corpus (``task.preset=builtin``), then
:func:`alignkit.compare.compare` on two of them:

1. the small teacher (``configs/small_scale/teacher.yaml``), pre-trained once and cached in
   ``<out>/../teachers/small-<hash of its resolved config>`` (reused when it finished);
2. a baseline (the LET recipe with ``align.method=none``) and the LET student
   (``configs/small_scale/let.yaml``, the recipe the study found best for short runs of small
   students) with the same seed and data order, as two processes side by side with one thread
   each, so machine load favours neither;
3. the verdict: steps and training seconds LET needed to reach the baseline's final eval loss
   (the teacher's forward counted; its pre-training shown separately and counted once when it
   was trained now), the final eval-loss difference, ``<out>/compare.png`` and ``<out>/demo.json``.

Evals are sparser than in the recipes (see STUDENT_CADENCE) to fit 15 minutes on 2 cores.
``key=value`` overrides apply to the baseline and the LET run; rerunning continues or reuses
the run folders (``alignkit train --resume``).
"""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import IO, Any

from alignkit.compare import compare, plot_comparison, read_records, table, train_time
from alignkit.core.config import to_yaml
from alignkit.core.errors import RunDirError
from alignkit.experiment import REPO_ROOT, load_experiment

TEACHER_RECIPE = REPO_ROOT / "configs" / "small_scale" / "teacher.yaml"
LET_RECIPE = REPO_ROOT / "configs" / "small_scale" / "let.yaml"
OFFLINE_DATA = ["task.preset=builtin"]  # the embedded corpus: no download
# to fit 15 minutes on 2 cores: an eval (8 batches) cost the student 6 steps (15 CPU s vs 2.5 s
# a step, 1 thread), so evals were a third of a run at every 10 steps; 4 batches every 15
# steps make them a seventh. The teacher needs only its final eval.
STUDENT_CADENCE = ["task.text.eval_batches=4", "train.eval_every=15"]
TEACHER_CADENCE = ["task.text.eval_batches=4", "train.eval_every=100"]
MULTI_SEED = "benchmarks/results/study.md"


def teacher_folder(recipe: Path, overrides: list[str], out: Path) -> Path:
    """The teacher's cache folder, named by what it computes (its resolved config)."""
    cfg = load_experiment(recipe, overrides)
    cfg.run_name, cfg.output_dir = "", ""
    digest = hashlib.sha256(to_yaml(cfg).encode()).hexdigest()[:10]
    return out.resolve().parent / "teachers" / f"small-{digest}"


def train_command(recipe: Path, folder: Path, overrides: list[str]) -> list[str]:
    """``alignkit train`` into ``folder``: a new run, or ``--resume`` of what is there."""
    command = [sys.executable, "-m", "alignkit", "train", str(recipe), *overrides, f"output_dir={folder.parent}",
               f"run_name={folder.name}"]
    return command + (["--resume", str(folder)] if (folder / "config.yaml").is_file() else [])


def _echo(stream: IO[str], prefix: str, log: Path) -> None:
    with open(log, "a") as handle:
        for line in stream:
            handle.write(line)
            print(f"[{prefix}] {line}", end="", flush=True)


def side_by_side(runs: dict[str, list[str]], out: Path) -> None:
    """Run the commands at once, one thread each, their output prefixed with their name."""
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    started = {name: subprocess.Popen(command + ["--no-progress"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True, env=env) for name, command in runs.items()}
    echoes = [threading.Thread(target=_echo, args=(p.stdout, name, out / f"{name}.log")) for name, p in started.items()]
    for echo in echoes:
        echo.start()
    codes = {name: process.wait() for name, process in started.items()}
    for echo in echoes:
        echo.join()
    failed = [f"{name} (exit {code}, {out / f'{name}.log'})" for name, code in codes.items() if code]
    if failed:
        raise RunDirError(f"the demo's {', '.join(failed)} failed; rerun the same command to continue")


def pretrain_teacher(recipe: Path, overrides: list[str], out: Path, progress: bool) -> tuple[Path, bool]:
    """The small teacher's folder, and whether it was trained now (False: from the cache)."""
    folder = teacher_folder(recipe, overrides, out)
    cached = (folder / "results.json").is_file()
    if cached:
        print(f"teacher: reusing {folder} (pre-trained earlier)")
        return folder, False
    print(f"teacher: pre-training {recipe.name} into {folder} (cached for later demos)", flush=True)
    command = train_command(recipe, folder, overrides) + ([] if progress else ["--no-progress"])
    if subprocess.run(command).returncode:
        raise RunDirError(f"the teacher's pre-training in {folder} failed (see above); rerun the same command to continue")
    return folder, True


def verdict(result: dict[str, Any], teacher_s: float, trained_now: bool) -> list[str]:
    """The demo's conclusion in words (``result``: baseline first, then LET)."""
    base, let = result["runs"]
    pair = let["vs_first"]
    target = pair["target_eval_loss"]
    lines = [f"verdict (one seed is one sample; the multi-seed figures are in {MULTI_SEED}):"]
    if pair["reached"]:
        lines.append(f"  steps: LET reached the baseline's final eval loss {target:.4f} at step {pair['steps']:.1f}; "
                     f"the baseline needed {pair['baseline_steps']:.0f}: {pair['speedup']:.2f}x fewer steps")
        time_let, time_base = pair["seconds"], pair["baseline_seconds"]
        lines.append(f"  time (training steps, the teacher's forward included): LET {time_let:.0f} s, baseline "
                     f"{time_base:.0f} s: {time_base / time_let:.2f}x")
        how = "trained now, counted once" if trained_now else "cached, so not counted this time; trained once before"
        total = time_let + (teacher_s if trained_now else 0.0)
        lines.append(f"  with the teacher's pre-training ({teacher_s:.0f} s, {how}): LET {total:.0f} s vs "
                     f"{time_base:.0f} s: {time_base / total:.2f}x")
    else:
        lines.append(f"  steps: LET did not reach the baseline's final eval loss {target:.4f} by its last step "
                     f"{let['last_step']} (speedup at most {pair['speedup']:.2f}x)")
    lines.append(f"  final eval loss: LET {let['final_eval_loss']:.4f}, baseline {base['final_eval_loss']:.4f} "
                 f"({pair['loss_diff']:+.4f}{', same seed' if pair['same_seed'] else ', different seeds'})")
    return lines


def run_demo(out: Path, overrides: list[str], recipe: Path = LET_RECIPE, teacher_recipe: Path = TEACHER_RECIPE,
             progress: bool = True) -> dict[str, Any]:
    """Teacher, baseline and LET run, then the comparison (see the module docstring)."""
    out.mkdir(parents=True, exist_ok=True)
    teacher, trained_now = pretrain_teacher(teacher_recipe, OFFLINE_DATA + TEACHER_CADENCE, out, progress)
    use_teacher = ["teacher.preset=''", "teacher.kind=hf_causal", "teacher.source=checkpoint",
                   f"teacher.name_or_path={teacher / 'final'}"]
    let = OFFLINE_DATA + STUDENT_CADENCE + use_teacher + list(overrides)
    load_experiment(recipe, let)  # a bad key stops here, before two processes start
    print(f"baseline and LET side by side in {out} (one thread each; logs: {out}/baseline.log, {out}/let.log)", flush=True)
    side_by_side({"baseline": train_command(recipe, out / "baseline", let + ["align.method=none"]),
                  "let": train_command(recipe, out / "let", let)}, out)
    result = compare([out / "baseline", out / "let"], "eval_loss", "min")
    teacher_s = train_time(read_records(teacher))[1]
    plot_comparison(out / "compare.png", result)
    words = verdict(result, teacher_s, trained_now) + [f"  plot: {out / 'compare.png'}"]
    print("\n".join([table(result), "", *words]))
    summary = {"comparison": result, "teacher": str(teacher), "teacher_train_seconds": teacher_s,
               "teacher_trained_now": trained_now, "verdict": words}
    (out / "demo.json").write_text(json.dumps(summary, indent=2))
    return summary
