"""Data at scale: `alignkit prepare` throughput (tokens/s) with 1 and 2 worker processes, and
peak memory (sampled PSS of the whole process tree) of prepare, of training from a streamed
source and of training from the same text tokenized in memory. Every measurement is repeated
once per ``--seeds`` entry (default 0,1,2; the training runs' ``train.seed``), the settings
interleaved round by round, and reported as mean, std, min and max with the values.

The corpus is WikiText-2 (``valid.txt`` + ``test.txt``; give its folder) repeated ``--repeat``
times as a Pile-format ``.jsonl.zst``; the tokenizer is SmolLM2's (the paper recipes'), saved
once as a folder. Training runs the debug recipe (tiny random student and teacher) for a few
steps: its memory is the process plus the data path.

    python benchmarks/data_scale.py --data WIKITEXT2_DIR --repeat 20

Results: ``benchmarks/results/data_scale.{json,png}``.

``--checksum-cost`` measures instead what verifying prepared token shards costs (issue 22): the
BLAKE2b hash rate on the shard files; ``alignkit prepare`` tokens/s with and without hashing the
shards it writes (1 worker, 1 tokenizer thread; "without" swaps in a hasher that does nothing);
and debug-recipe training from the prepared shards with and without verifying them (tokens/s of
the logged steps after the first, and the wall time of the whole run, which includes building
the data and so the hashing of the shards the first batches and the vocabulary probe read).
The settings alternate within each of ``--repeats`` rounds, in one process; ratios are
with/without of the means. Results: ``benchmarks/results/checksum_cost.json``.

    python benchmarks/data_scale.py --data WIKITEXT2_DIR --checksum-cost --repeat 4
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
from common import PATH_ALIASES, RESULTS, spread, write_json  # noqa: E402

DEBUG = str(REPO / "configs" / "debug.yaml")


def write_corpus(data: Path, repeat: int, path: Path) -> int:
    import zstandard

    docs = []
    for name in ("valid.txt", "test.txt"):
        text = (data / name).read_text(encoding="utf-8")
        docs += [d.strip() for d in text.split("\n \n") if d.strip()]
    lines = [json.dumps({"text": d, "meta": {"pile_set_name": "Wikipedia (en)"}}) for d in docs]
    with open(path, "wb") as raw, zstandard.ZstdCompressor().stream_writer(raw) as out:
        for _ in range(repeat):
            out.write(("\n".join(lines) + "\n").encode())
    return sum(len(d) for d in docs) * repeat


def run_sampled(command: list[str], env: dict[str, str] | None = None) -> tuple[float, float, str]:
    """Run ``command``; return (wall seconds, peak memory in MB, stdout). Memory: the sum of the
    proportional set size (PSS) of it and its children, so pages a forked worker shares with its
    parent count once."""
    import psutil

    start = time.perf_counter()
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, cwd=REPO, env={**os.environ, **(env or {})})
    peak = 0.0
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        parent = psutil.Process(proc.pid)
        while not done.is_set():
            try:
                rss = sum(p.memory_full_info().pss for p in [parent, *parent.children(recursive=True)])
                peak = max(peak, rss / 2**20)
            except psutil.Error:
                pass
            time.sleep(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    out, _ = proc.communicate()
    done.set()
    sampler.join()
    if proc.returncode:
        raise SystemExit(f"failed: {' '.join(command)}")
    return time.perf_counter() - start, peak, out


def child_prepare(corpus: str, tokenizer: str, out: str, workers: int) -> None:
    """In a fresh process: prepare, timing only the tokenization (not imports or loading)."""
    from transformers import AutoTokenizer

    from alignkit.tasks.text_data import TextDataConfig
    from alignkit.tasks.token_shards import prepare

    tok = AutoTokenizer.from_pretrained(tokenizer)
    start = time.perf_counter()
    manifest = prepare(TextDataConfig(source="files", train_path=corpus), tok, out, workers=workers, progress=False)
    seconds = time.perf_counter() - start
    tokens = sum(s["tokens"] for s in manifest["splits"].values())
    print(json.dumps({"seconds": seconds, "tokens": tokens}))


class _NoHash:
    """A hasher that hashes nothing: prepare's cost without checksums."""

    def update(self, data: object) -> None:
        pass

    def hexdigest(self) -> str:
        return ""


def checksum_cost(corpus: Path, work: Path, repeats: int, steps: int) -> dict:
    import contextlib
    import statistics

    from alignkit.adapters.hf_causal import load_tokenizer
    from alignkit.cli import main as alignkit_main
    from alignkit.experiment import load_experiment
    from alignkit.tasks import token_manifest
    from alignkit.tasks.text_data import TextDataConfig
    from alignkit.tasks.token_shards import prepare

    os.environ["RAYON_NUM_THREADS"] = "1"  # set before the tokenizer's first use: one tokenizer thread
    tokenizer = load_tokenizer(load_experiment(DEBUG, []).student)
    cfg = TextDataConfig(source="files", train_path=str(corpus), eval_fraction=0.01)
    real_hasher, real_verify = token_manifest.new_hasher, token_manifest.VerifiedShard._verified
    rows: dict[str, list[float]] = {}

    @contextlib.contextmanager
    def checks(on: bool):
        token_manifest.new_hasher = real_hasher if on else _NoHash
        token_manifest.VerifiedShard._verified = real_verify if on else (lambda self: self._mapped)
        try:
            yield
        finally:
            token_manifest.new_hasher, token_manifest.VerifiedShard._verified = real_hasher, real_verify

    shards = work / "shards"
    for r in range(repeats):
        for on in ((True, False) if r % 2 == 0 else (False, True)):
            out = work / f"prepare-{on}"
            shutil.rmtree(out, ignore_errors=True)
            with checks(on):
                start = time.perf_counter()
                manifest = prepare(cfg, tokenizer, out, shard_tokens=1 << 18, progress=False)
                seconds = time.perf_counter() - start
            tokens = sum(s["tokens"] for s in manifest["splits"].values())
            rows.setdefault(f"prepare_tokens_per_s/{on}", []).append(tokens / seconds)
            print(f"round {r}: prepare, hashing={on}: {tokens / seconds:,.0f} tokens/s", flush=True)
        if r == 0:
            shutil.copytree(work / "prepare-True", shards)
            files = sorted(shards.glob("*_0*.npy"))
            size = sum(f.stat().st_size for f in files)
        start = time.perf_counter()
        for f in files:
            token_manifest.file_checksum(f)
        rows.setdefault("hash_mb_per_s", []).append(size / 2**20 / (time.perf_counter() - start))
        for on in ((False, True) if r % 2 == 0 else (True, False)):
            name = f"train-{on}-{r}"
            overrides = ["task.text.source=tokens", f"task.text.train_path={shards}", f"output_dir={work / 'runs'}",
                         f"run_name={name}", f"train.steps={steps}", "train.eval_every=0", "train.save_every=0",
                         "train.log_every=5", "--no-progress"]
            with checks(on):
                start = time.perf_counter()
                assert alignkit_main(["train", DEBUG, *overrides]) == 0
                wall = time.perf_counter() - start
            records = [json.loads(line) for line in (work / "runs" / name / "metrics.jsonl").read_text().splitlines()]
            speeds = [x["tokens_per_s"] for x in records if "tokens_per_s" in x][1:]  # the first includes warm-up
            rows.setdefault(f"train_tokens_per_s/{on}", []).append(statistics.fmean(speeds))
            rows.setdefault(f"train_wall_s/{on}", []).append(wall)
            print(f"round {r}: train {steps} steps, verify={on}: {statistics.fmean(speeds):,.0f} tokens/s, {wall:.1f} s", flush=True)
    figures = {key: spread(values) for key, values in rows.items()}
    ratio = lambda key: figures[f"{key}/True"]["mean"] / figures[f"{key}/False"]["mean"]  # noqa: E731
    return {"corpus": {"source": "WikiText-2 valid+test", "path": str(corpus.name), "prepared_tokens": tokens,
                       "shards": len(files), "shard_mb": size / 2**20 / len(files)},
            "repeats": repeats, "train_steps": steps, "figures": figures,
            "ratios": {"prepare_tokens_per_s": ratio("prepare_tokens_per_s"), "train_tokens_per_s": ratio("train_tokens_per_s"),
                       "train_wall_s": ratio("train_wall_s")},
            "targets": {"prepare_tokens_per_s": 0.97, "train_tokens_per_s": 0.99}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", help="WikiText-2 raw folder (valid.txt, test.txt); required")
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--seeds", default="0,1,2",
                        help="one round of every measurement per seed (train.seed of the training runs); rounds interleave the settings")
    parser.add_argument("--checksum-cost", action="store_true", help="measure the shard checksums' cost instead (see above)")
    parser.add_argument("--repeats", type=int, default=3, help="--checksum-cost: rounds")
    parser.add_argument("--child-prepare", nargs=4, metavar=("CORPUS", "TOKENIZER", "OUT", "WORKERS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child_prepare:
        corpus, tokenizer, out, workers = args.child_prepare
        child_prepare(corpus, tokenizer, out, int(workers))
        return
    if not args.data:
        parser.error("the following arguments are required: --data")
    from alignkit.adapters.hf_causal import load_tokenizer
    from alignkit.experiment import load_experiment

    work = Path(tempfile.mkdtemp(prefix="data_scale_"))
    corpus = work / "wikitext.jsonl.zst"
    chars = write_corpus(Path(args.data), args.repeat, corpus)
    if args.checksum_cost:
        PATH_ALIASES[str(Path(args.data).resolve())] = "WIKITEXT2_DIR"
        results = checksum_cost(corpus, work, args.repeats, args.steps)
        write_json(RESULTS / "checksum_cost.json", {**results, "repeat": args.repeat, "chars": chars,
                   # the training runs use the debug recipe's seed; each figure's spread is over the rounds
                   "seeds": [0], "spread_over": f"{args.repeats} interleaved rounds (figures: mean, std, min, max, values)"})
        print(json.dumps(results["ratios"], indent=2))
        shutil.rmtree(work)
        return
    load_tokenizer(load_experiment(DEBUG, []).student).save_pretrained(work / "smollm2")
    seeds = [int(x) for x in args.seeds.split(",")]
    rounds: dict[str, list[dict]] = {}
    # workers=1 encodes in-process, where the Rust tokenizer itself may use every core; "1 thread"
    # pins it to one, the cost of one worker process
    prepares = (("1_worker_1_thread", 1, {"RAYON_NUM_THREADS": "1"}), ("1_worker", 1, {}), ("2_workers", 2, {}))
    common = [f"task.text.train_path={corpus}", "task.text.source=files", f"student.options.tokenizer={work / 'smollm2'}",
              f"teacher.options.tokenizer={work / 'smollm2'}", f"output_dir={work / 'runs'}", f"train.steps={args.steps}",
              "train.eval_every=0", "task.text.max_train_docs=0"]
    trains = (("in_memory", ["task.text.streaming=false"]), ("streaming", ["task.text.streaming=true"]),
              ("prepared_tokens", ["task.text.source=tokens", f"task.text.train_path={work / '2_workers'}"]))
    for seed in seeds:
        for name, workers, env in prepares:
            out = work / name
            if out.exists():
                shutil.rmtree(out)
            cmd = [sys.executable, __file__, "--child-prepare", str(corpus), str(work / "smollm2"), str(out), str(workers)]
            wall, peak, printed = run_sampled(cmd, env)
            timing = json.loads(printed.strip().splitlines()[-1])
            row = {**timing, "tokens_per_s": timing["tokens"] / timing["seconds"], "wall_s": wall, "peak_pss_mb": peak}
            rounds.setdefault(f"prepare {name}", []).append(row)
            print(f"seed {seed}, prepare {name}: {row['tokens_per_s']:,.0f} tokens/s, peak PSS {peak:.0f} MB", flush=True)
        for mode, overrides in trains:
            cmd = [sys.executable, "-m", "alignkit", "train", DEBUG, *common, *overrides, f"train.seed={seed}",
                   f"run_name={mode}-{seed}", "--no-progress"]
            wall, peak, _ = run_sampled(cmd)
            rounds.setdefault(f"train {mode}", []).append({"wall_s": wall, "peak_pss_mb": peak})
            print(f"seed {seed}, train {args.steps} steps, {mode}: {wall:.1f} s, peak PSS {peak:.0f} MB", flush=True)
    results = {"corpus": {"source": "WikiText-2 valid+test", "repeat": args.repeat, "chars": chars,
                          "zst_mb": corpus.stat().st_size / 2**20},
               "seeds": seeds,
               "figures": {name: {key: spread([row[key] for row in rows]) for key in rows[0]} for name, rows in rounds.items()}}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "data_scale.json").write_text(json.dumps(results, indent=2) + "\n")
    plot(results)


def plot(results: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def bars(ax, rows: dict, key: str, horizontal: bool) -> None:
        means = [rows[n][key]["mean"] for n in rows]
        error = [[m - rows[n][key]["min"] for m, n in zip(means, rows)], [rows[n][key]["max"] - m for m, n in zip(means, rows)]]
        (ax.barh(list(rows), means, xerr=error, capsize=3) if horizontal else
         ax.bar(list(rows), means, yerr=error, capsize=3))

    figures = results["figures"]
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    bars(a, {n[len("prepare "):]: v for n, v in figures.items() if n.startswith("prepare")}, "tokens_per_s", False)
    a.set_title("alignkit prepare: tokens/s")
    bars(b, figures, "peak_pss_mb", True)
    b.set_title("peak memory (PSS, MB, process tree)")
    fig.suptitle(f"mean over seeds {results['seeds']}; bars: min-max")
    fig.tight_layout()
    fig.savefig(RESULTS / "data_scale.png", dpi=120)


if __name__ == "__main__":
    main()
