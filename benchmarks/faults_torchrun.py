"""Torchrun fault soak (``python benchmarks/faults.py --torchrun``): kill or stop one rank of a
``torchrun`` training run at random moments and resume it on 1 and 2 processes alternately; each
finished run is compared with an uninterrupted 2-process run.

  python benchmarks/faults.py --torchrun --kills 3 --out-dir /tmp/soak

Each process is a ``torchrun --nproc_per_node N`` launch (gloo on CPU); N alternates 2, 1, 2, ...
after every kill. A kill lands on one worker (a random rank): SIGKILL (the agent then tears the
others down) or SIGTERM (the ranks agree to stop, save and exit). Kill moments are drawn as in
:mod:`faults` (fractional steps of the run, sorted). The run keeps its global batch
(``train.global_batch_size``) on either count, so it computes the same training in another
summation order: step, tokens and ``teacher_active`` of every metric record must be equal, the
float values within ``--rtol`` (the losses of 1 and 2 processes differ in the last bits), and
the final weights within ``--atol``. The largest differences are reported, and those of a clean
1-process run against the reference, the floor any process change costs (its eval metrics
differ by design: a run's held-out set follows the process count of its first start).

Writes benchmarks/results/faults_torchrun.json (kills, resumes, process counts, mismatches: the
target is zero).
"""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from safetensors.torch import load_file

from common import RESULTS, write_json
from faults import REPO, UNCOMPARED, WAIT_S, checkpoint_step, progress, reach, records, wait

OVERRIDES = ["train.steps=12", "train.save_every=2", "train.eval_every=4", "train.micro_batch_size=2",
             "train.global_batch_size=4"]
SIGNALS = {"SIGKILL": 0.6, "SIGTERM": 0.4}  # drawing weights
EXACT = ("step", "tokens", "teacher_active")  # counters: equal on any process count


def launch(nproc: int, args: list[str], log: Path) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           "-m", "alignkit", "train", *args, "--no-progress"]
    with open(log, "w") as handle:
        return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=handle, stderr=subprocess.STDOUT)


def workers(agent: subprocess.Popen) -> list[int]:
    """The worker processes of a torchrun agent (its children)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # a process that just ended
            continue
        if int(fields[1]) == agent.pid:
            found.append(int(stat.parent.name))
    return sorted(found)


def run_to_end(nproc: int, args: list[str], log: Path) -> None:
    proc = launch(nproc, args, log)
    if proc.wait() != 0:
        sys.exit(f"an uninterrupted run failed (exit {proc.returncode}); see {log}")


def differences(reference: Path, run_dir: Path) -> dict[str, Any]:
    """Largest relative difference of the metric records' floats, records whose counters differ,
    and the largest absolute difference of the final weights."""
    strip = lambda rows: [{k: v for k, v in r.items() if k not in UNCOMPARED} for r in rows]  # noqa: E731
    ref_m, got_m = strip(records(reference)), strip(records(run_dir))
    counters_differ = len(ref_m) != len(got_m) or any(
        {k: a.get(k) for k in EXACT} != {k: b.get(k) for k in EXACT} or a.keys() != b.keys() for a, b in zip(ref_m, got_m))
    rel = {part: max((abs(a[k] - b[k]) / max(abs(a[k]), 1e-12) for a, b in zip(ref_m, got_m) for k in a
                      if k not in EXACT and k.startswith("eval_") == (part == "eval") and isinstance(a[k], float)
                      and isinstance(b.get(k), float)), default=0.0) for part in ("train", "eval")}
    ref_w, got_w = (load_file(str(d / "final" / "model.safetensors")) for d in (reference, run_dir))
    weights = max((float((ref_w[k].double() - got_w[k].double()).abs().max()) for k in ref_w.keys() & got_w.keys()),
                  default=0.0)
    return {"records": [len(ref_m), len(got_m)], "counters_differ": counters_differ,
            "max_rel_train_metric_diff": rel["train"], "max_rel_eval_metric_diff": rel["eval"],
            "max_abs_weight_diff": weights, "tensors_missing": len(ref_w.keys() ^ got_w.keys())}


def soak(ref: dict[str, Any], config: str, out: Path, overrides: list[str], kills: int,
         rng: random.Random) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Kill one rank ``kills`` times in all, alternating the process count; (processes, runs)."""
    lives: list[dict[str, Any]] = []
    runs: list[dict[str, Any]] = []
    done = 0
    while done < kills:
        name = f"soak-{len(runs)}"
        run_dir = out / "soak" / name
        targets = sorted(rng.uniform(0, ref["steps"]) for _ in range(kills - done))
        run: dict[str, Any] = {"run_name": name, "kills": 0, "resumes": 0, "errors": []}
        runs.append(run)
        args, nproc = [config, f"output_dir={out / 'soak'}", f"run_name={name}", *overrides], 2
        while True:
            from_step = checkpoint_step(run_dir)
            log = out / f"{name}-{len(lives):03d}.log"
            launched_ns = time.time_ns()
            proc = launch(nproc, args, log)
            life: dict[str, Any] = {"run_name": name, "processes": nproc, "from_step": from_step}
            lives.append(life)
            if done < kills and targets and reach(proc, ("step", targets.pop(0)), ref, run_dir, from_step, launched_ns):
                ranks = workers(proc)
                if ranks:
                    sig = rng.choices(list(SIGNALS), weights=list(SIGNALS.values()))[0]
                    step, phase = progress(run_dir, from_step, launched_ns, ref["eval_every"])
                    victim = rng.choice(ranks)
                    life.update(signal=sig, worker=ranks.index(victim), step_at_kill=step, phase=phase)
                    os.kill(victim, getattr(signal, sig))
            code = wait(proc, WAIT_S)
            if code is None:  # a stop that never came: recorded, then forced
                run["errors"].append(f"{log.name}: no exit {WAIT_S} s after {life.get('signal')}")
                proc.kill()
                code = proc.wait()
            life.update(exit_code=code, resume_from_step=checkpoint_step(run_dir))
            if "signal" in life:
                run["kills"] += 1
                done += 1
                print(f"{name}: {life['signal']} to one of {nproc} ranks at step {life['step_at_kill']} "
                      f"({life['phase']}), exit {code}, resumes from {life['resume_from_step']}", flush=True)
            elif code != 0:
                run["errors"].append(f"{log.name}: exit {code} without a kill")
                return lives, runs
            if code == 0:
                break
            args, nproc = ["--resume", str(run_dir)], 3 - nproc  # the other process count
            run["resumes"] += 1
        run["comparison"] = differences(ref["run_dir"], run_dir)
    return lives, runs


def main(config: str, kills: int, seed: int, out: Path, overrides: list[str], rtol: float, atol: float) -> int:
    """The soak; returns the number of mismatching runs (0 is the target)."""
    rng = random.Random(seed)
    overrides = overrides or OVERRIDES
    began = start = time.perf_counter()
    run_to_end(2, [config, f"output_dir={out / 'reference'}", "run_name=reference", *overrides], out / "reference.log")
    reference = out / "reference" / "reference"
    ref = {"run_dir": reference, "train_s": time.perf_counter() - start, "steps": records(reference)[-1]["step"],
           "eval_every": next((int(o.split("=")[1]) for o in overrides if o.startswith("train.eval_every=")), 0)}
    run_to_end(1, [config, f"output_dir={out / 'reference'}", "run_name=one-process", *overrides], out / "one.log")
    floor = differences(reference, out / "reference" / "one-process")
    lives, runs = soak(ref, config, out, overrides, kills, rng)
    metrics = ("max_rel_train_metric_diff", "max_rel_eval_metric_diff", "max_abs_weight_diff")
    bad = lambda c: (c["counters_differ"] or c["tensors_missing"] or max(c[metrics[0]], c[metrics[1]]) > rtol  # noqa: E731
                     or c[metrics[2]] > atol)
    mismatches = sum(bad(r["comparison"]) for r in runs if "comparison" in r) + sum(bool(r["errors"]) for r in runs)
    killed = [life for life in lives if "signal" in life]
    summary = {
        "kills": len(killed), "resumes": sum(r["resumes"] for r in runs), "soak_runs": len(runs),
        "mismatches": mismatches, "rtol": rtol, "atol": atol,
        "kills_by_signal": {s: sum(life["signal"] == s for life in killed) for s in SIGNALS},
        "processes_by_count": {n: sum(life["processes"] == n for life in lives) for n in (1, 2)},
        **{key: max((r["comparison"][key] for r in runs if "comparison" in r), default=0.0) for key in metrics},
        "one_process_run_vs_reference": floor,
        "wall_s": round(time.perf_counter() - began, 1),
    }
    write_json(RESULTS / "faults_torchrun.json", {"summary": summary, "config": config, "overrides": overrides,
                                                  "seed": seed, "runs": runs, "processes": lives})
    print(json.dumps(summary, indent=2))
    return mismatches


if __name__ == "__main__":
    sys.exit("run it as: python benchmarks/faults.py --torchrun [...]")
