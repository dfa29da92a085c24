"""Fault soak: kill a real training run at random moments, resume it, and check that it ends
exactly where an uninterrupted run ends.

  python benchmarks/faults.py                          # 20 kills, configs/debug.yaml (4-9 min on 2 busy cores)
  python benchmarks/faults.py --kills 50 --seed 1 --out-dir /tmp/soak
  python benchmarks/faults.py --torchrun --kills 3   # one rank killed, resumes on 1 and 2 processes (faults_torchrun)

First one uninterrupted run (the reference) is timed: its start-up (process start to the first
logged step) and its training time. Then the soak run is started and killed ``--kills`` times.
Kill moments are points of the run drawn uniformly over its steps and sorted, so the kills walk
through the whole run: a process is killed once it has logged the point's step (at least its
first step) plus the point's fraction of the reference's mean step interval, which lands kills
in training, eval and checkpoint writes alike, whatever the machine's load. A share of the kills
(``--startup-share``) instead lands at a random time within the reference's start-up (import,
model build, resume). The signal is SIGKILL (most), SIGTERM or SIGINT; after each kill
``alignkit train --resume`` continues the run; after the last kill the run finishes. If a run
ends before all its kills landed, a new soak run takes the remaining ones. Each finished soak
run is compared with the reference: every tensor of ``final/model.safetensors`` (exact
equality), every ``metrics.jsonl`` record (without ``tokens_per_s`` / ``peak_mem_mb``) and
``results.json``; a resume of the finished run must say so, exit 0 and change nothing.

Writes benchmarks/results/faults.json (kills, resumes, mismatches: the target is zero; per kill
its time, signal, exit code, inferred phase, whether a ``.tmp_step_*`` checkpoint write was under
way, and the step the resume started from) and faults.png (each process's span of the run,
ended by its kill).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file
from tqdm import tqdm

from common import RESULTS, write_json

REPO = Path(__file__).resolve().parents[1]
OVERRIDES = ["train.steps=40", "train.save_every=2", "train.eval_every=10", "train.log_every=1"]
SIGNALS = {"SIGKILL": 0.7, "SIGTERM": 0.15, "SIGINT": 0.15}  # drawing weights
UNCOMPARED = ("tokens_per_s", "peak_mem_mb")  # timings differ between runs
POLL_S = 0.05
WAIT_S = 300  # longest wait for a process to finish (a graceful stop, the final stretch)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/debug.yaml")
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0, help="seeds the kill times and signals (not the run)")
    parser.add_argument("--startup-share", type=float, default=0.1,
                        help="share of kills aimed at the start-up of a process (import, build, resume)")
    parser.add_argument("--out-dir", default=None, help="run folders and logs (default: a temp folder, removed "
                        "when every run matched)")
    parser.add_argument("--torchrun", action="store_true", help="the torchrun soak instead: one rank killed, "
                        "resumes on 1 and 2 processes alternately (see faults_torchrun.py)")
    parser.add_argument("--rtol", type=float, default=1e-4, help="--torchrun: metric tolerance against the reference")
    parser.add_argument("--atol", type=float, default=1e-3, help="--torchrun: final weight tolerance")
    parser.add_argument("overrides", nargs="*", default=None, help=f"key=value for both runs (default: {' '.join(OVERRIDES)}; "
                        "--torchrun: see faults_torchrun.py)")
    return parser.parse_args()


def launch(args: list[str], log: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    with open(log, "w") as handle:
        return subprocess.Popen([sys.executable, "-m", "alignkit", "train", *args, "--no-progress"], cwd=REPO,
                                env=env, stdout=handle, stderr=subprocess.STDOUT)


def records(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / "metrics.jsonl"
    out = []
    for line in path.read_text(errors="replace").splitlines() if path.is_file() else []:
        try:
            out.append(json.loads(line))
        except ValueError:  # a line being written right now
            pass
    return out


def written_since(path: Path, since_ns: int) -> bool:
    try:
        return path.stat().st_mtime_ns >= since_ns
    except FileNotFoundError:
        return False


def checkpoint_step(run_dir: Path) -> int:
    """The step a resume starts from: the newest finished checkpoint (0 = none)."""
    found = [int(p.name[5:]) for p in (run_dir / "checkpoints").glob("step_*") if (p / "trainer.json").is_file()]
    return max(found, default=0)


def staging(run_dir: Path, since_ns: int) -> bool:
    """A checkpoint write under way (a leftover of an earlier process does not count)."""
    return any(written_since(p, since_ns) for p in (run_dir / "checkpoints").glob(".tmp_step_*"))


def progress(run_dir: Path, from_step: int, since_ns: int, eval_every: int) -> tuple[int, str]:
    """(step reached, phase) of the process started at ``since_ns``, guessed from its files:
    lines of earlier processes past the checkpoint stay in metrics.jsonl until it truncates them."""
    rows = records(run_dir) if written_since(run_dir / "metrics.jsonl", since_ns) else []
    step = max((r["step"] for r in rows), default=from_step)
    if staging(run_dir, since_ns):
        return step, "save"
    if step <= from_step:
        return from_step, "startup"
    if eval_every and step % eval_every == 0 and not any(r["step"] == step and "eval_loss" in r for r in rows):
        return step, "eval"
    return step, "train"


def reference_run(config: str, out: Path, overrides: list[str]) -> dict[str, Any]:
    """One uninterrupted run, timed: start-up = process start to the first logged step."""
    run_dir = out / "reference" / "reference"
    proc = launch([config, f"output_dir={out / 'reference'}", "run_name=reference", *overrides], out / "reference.log")
    start, first = time.perf_counter(), None
    while proc.poll() is None:
        if first is None and records(run_dir):
            first = time.perf_counter() - start
        time.sleep(POLL_S)
    total = time.perf_counter() - start
    if proc.returncode != 0 or first is None:
        sys.exit(f"the reference run failed (exit {proc.returncode}); see {out / 'reference.log'}")
    train = OmegaConf.load(run_dir / "config.yaml").train
    return {"run_dir": run_dir, "startup_s": first, "train_s": total - first, "total_s": total,
            "steps": train.steps, "eval_every": train.eval_every}


def compare(reference: Path, run_dir: Path) -> dict[str, Any]:
    """Exact comparison of final weights, metric records and results."""
    ref_w, got_w = (load_file(str(d / "final" / "model.safetensors")) for d in (reference, run_dir))
    differing = sorted(k for k in ref_w.keys() & got_w.keys() if not torch.equal(ref_w[k], got_w[k]))
    max_diff = max((float((ref_w[k].double() - got_w[k].double()).abs().max()) for k in differing), default=0.0)
    strip = lambda rows: [{k: v for k, v in r.items() if k not in UNCOMPARED} for r in rows]  # noqa: E731
    ref_m, got_m = strip(records(reference)), strip(records(run_dir))
    first_bad = next((i for i, (a, b) in enumerate(zip(ref_m, got_m)) if a != b), None)
    results = [{k: v for k, v in json.loads((d / "results.json").read_text()).items() if k != "run_dir"}
               for d in (reference, run_dir)]
    report = {
        "tensors": len(ref_w),
        "tensors_differing": len(differing) + len(ref_w.keys() ^ got_w.keys()),
        "max_abs_diff": max_diff,
        "metric_records": [len(ref_m), len(got_m)],
        "first_differing_record": None if first_bad is None else {"reference": ref_m[first_bad], "soak": got_m[first_bad]},
        "results_equal": results[0] == results[1],
    }
    report["match"] = (report["tensors_differing"] == 0 and ref_m == got_m and report["results_equal"])
    return report


def wait(proc: subprocess.Popen, timeout: float) -> int | None:
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        return None


def reach(proc: subprocess.Popen, moment: tuple[str, float], ref: dict[str, Any], run_dir: Path, from_step: int,
          launched_ns: int) -> bool:
    """Wait for the kill moment: ("startup", seconds after launch) or ("step", a fractional step
    of the run: its fraction is slept after the process logged that step, in the reference's
    mean step interval). True if the process still runs then."""
    kind, value = moment
    if kind == "startup":
        return wait(proc, value) is None
    step = max(math.floor(value), from_step + 1)  # a moment the resumed run has passed: its first step
    while progress(run_dir, from_step, launched_ns, 0)[0] < step:
        if proc.poll() is not None:
            return False
        time.sleep(POLL_S)
    return wait(proc, (value % 1) * ref["train_s"] / ref["steps"]) is None


def soak(ref: dict[str, Any], config: str, out: Path, overrides: list[str], kills: int, startup_share: float,
         rng: random.Random) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Kill soak runs ``kills`` times in all; return (one record per process, one per soak run)."""
    lives, runs, bar = [], [], tqdm(total=kills, desc="kills", dynamic_ncols=True)
    while bar.n < kills:
        name = f"soak-{len(runs)}"
        run_dir = out / "soak" / name
        targets = sorted(rng.uniform(0, ref["steps"]) for _ in range(kills - bar.n))
        run: dict[str, Any] = {"run_name": name, "kills": 0, "resumes": 0, "errors": []}
        runs.append(run)
        args = [config, f"output_dir={out / 'soak'}", f"run_name={name}", *overrides]
        while True:
            from_step = checkpoint_step(run_dir)
            log = out / f"{name}-{len(lives):03d}.log"
            launched_ns = time.time_ns()
            proc = launch(args, log)
            start = time.perf_counter()
            life: dict[str, Any] = {"run_name": name, "from_step": from_step}
            lives.append(life)
            if bar.n < kills and targets:
                aimed = rng.random() < startup_share
                moment = ("startup", rng.uniform(0, ref["startup_s"])) if aimed else ("step", targets.pop(0))
                if reach(proc, moment, ref, run_dir, from_step, launched_ns):
                    sig = rng.choices(list(SIGNALS), weights=list(SIGNALS.values()))[0]
                    step, where = progress(run_dir, from_step, launched_ns, ref["eval_every"])
                    life.update(aimed_at=[moment[0], round(moment[1], 3)], kill_s=round(time.perf_counter() - start, 3),
                                signal=sig, step_at_kill=step, phase=where, during_save=where == "save")
                    proc.send_signal(getattr(signal, sig))
            code = wait(proc, WAIT_S)
            if code is None:  # a graceful stop that never came: recorded, then forced
                run["errors"].append(f"{log.name}: no exit {WAIT_S} s after {life.get('signal')}")
                proc.kill()
                code = proc.wait()
            life.update(exit_code=code, life_s=round(time.perf_counter() - start, 3),
                        resume_from_step=checkpoint_step(run_dir))
            if "signal" in life:
                run["kills"] += 1
                life["lost_steps"] = max(0, life["step_at_kill"] - life["resume_from_step"])
                bar.update(1)
                bar.set_postfix(step=life["resume_from_step"], sig=life["signal"])
            elif code != 0:  # an exit nobody asked for
                run["errors"].append(f"{log.name}: exit {code} without a kill")
                return lives, runs
            if code == 0:
                break
            args = ["--resume", str(run_dir)]
            run["resumes"] += 1
        if not (run_dir / "results.json").is_file():
            run["errors"].append("exit 0 without results.json")
            continue
        run["comparison"] = compare(ref["run_dir"], run_dir)
        run["finished_resume_ok"] = finished_resume_ok(run_dir, out / f"{name}-finished.log")
    bar.close()
    return lives, runs


def finished_resume_ok(run_dir: Path, log: Path) -> bool:
    """Resuming a finished run says so, exits 0 and changes nothing."""
    before = {p: p.stat().st_mtime_ns for p in (run_dir / "results.json", run_dir / "final" / "model.safetensors")}
    code = launch(["--resume", str(run_dir)], log).wait(WAIT_S)
    unchanged = all(p.stat().st_mtime_ns == t for p, t in before.items())
    return code == 0 and unchanged and "finished" in log.read_text()


def plot(path: Path, lives: list[dict[str, Any]], steps: int, eval_every: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    colours = {"SIGKILL": "tab:red", "SIGTERM": "tab:blue", "SIGINT": "tab:green", None: "grey"}
    fig, ax = plt.subplots(figsize=(8, 0.28 * len(lives) + 1.8))
    for y, life in enumerate(lives):
        end = life.get("step_at_kill", steps)
        colour = colours[life.get("signal")]
        ax.plot([life["from_step"], end], [y, y], color=colour, linewidth=2, alpha=0.6)
        if "signal" in life:
            ax.scatter(end, y, color=colour, marker="s" if life["during_save"] else "o", s=40, zorder=3,
                       edgecolors="black" if life["during_save"] else colour)
            ax.annotate(f"{life['phase']}, exit {life['exit_code']}", (end, y), xytext=(5, -3),
                        textcoords="offset points", fontsize=6)
    for step in range(eval_every, steps + 1, eval_every or steps + 1):
        ax.axvline(step, color="grey", linestyle=":", linewidth=0.8)
    handles = [Line2D([], [], color=c, marker="o", linestyle="-", label=s) for s, c in colours.items() if s]
    handles += [Line2D([], [], color="grey", label="last process (finishes)"),
                Line2D([], [], color="black", marker="s", linestyle="", label="kill during a checkpoint write"),
                Line2D([], [], color="grey", linestyle=":", label="eval")]
    ax.legend(handles=handles, fontsize=7, loc="upper right")
    ax.set_xlabel("step (each bar: one process, from the checkpoint it resumed to the step logged at its kill)")
    ax.set_ylabel("process")
    ax.yaxis.get_major_locator().set_params(integer=True)
    ax.invert_yaxis()
    ax.set_xlim(0, steps + 8)
    ax.set_title(f"Fault soak: {sum('signal' in l for l in lives)} kills")  # noqa: E741
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    args = parse_args()
    # children inherit an ignored SIGINT (a shell's background job has one), and a Python that
    # starts with it ignored never raises KeyboardInterrupt: restore the default for them
    signal.signal(signal.SIGINT, signal.default_int_handler)
    rng = random.Random(args.seed)
    out = Path(args.out_dir or tempfile.mkdtemp(prefix="alignkit-faults-"))
    out.mkdir(parents=True, exist_ok=True)
    if args.torchrun:
        import faults_torchrun

        sys.exit(1 if faults_torchrun.main(args.config, args.kills, args.seed, out, args.overrides or [],
                                           args.rtol, args.atol) else 0)
    args.overrides = args.overrides or OVERRIDES
    began = time.perf_counter()
    ref = reference_run(args.config, out, args.overrides)
    print(f"reference: start-up {ref['startup_s']:.1f} s, training {ref['train_s']:.1f} s, {ref['steps']} steps")
    lives, runs = soak(ref, args.config, out, args.overrides, args.kills, args.startup_share, rng)
    compared = [r for r in runs if "comparison" in r]
    mismatches = sum(not r["comparison"]["match"] for r in compared) + sum(bool(r["errors"]) for r in runs)
    killed = [life for life in lives if "signal" in life]
    by_signal = {s: sum(life.get("signal") == s for life in killed) for s in SIGNALS}
    summary = {
        "kills": len(killed), "resumes": sum(r["resumes"] for r in runs), "soak_runs": len(runs),
        "runs_compared": len(compared), "mismatches": mismatches,
        "kills_by_signal": by_signal,
        "kills_by_phase": {p: sum(life["phase"] == p for life in killed) for p in ("startup", "train", "eval", "save")},
        "kills_during_save": sum(life["during_save"] for life in killed),
        "kills_ignored": sum(life["exit_code"] == 0 for life in killed),  # the process finished anyway
        "graceful_stops_that_lost_steps": sum(life["signal"] != "SIGKILL" and life["lost_steps"] > 0 for life in killed),
        "wall_s": round(time.perf_counter() - began, 1),
    }
    payload = {"summary": summary, "config": args.config, "overrides": args.overrides, "seed": args.seed,
               "reference": {k: round(v, 3) if isinstance(v, float) else v for k, v in ref.items()},
               "runs": runs, "processes": lives}
    write_json(RESULTS / "faults.json", payload)
    plot(RESULTS / "faults.png", lives, ref["steps"], ref["eval_every"])
    print(json.dumps(summary, indent=2))
    for run in runs:
        print(f"{run['run_name']}: {run['kills']} kills, {run['resumes']} resumes, "
              f"{'match' if run.get('comparison', {}).get('match') else 'MISMATCH'}, errors: {run['errors'] or 'none'}")
    if mismatches:
        print(f"run folders and logs kept in {out}")
    elif args.out_dir is None:
        shutil.rmtree(out)
    sys.exit(1 if mismatches else 0)


if __name__ == "__main__":
    main()
