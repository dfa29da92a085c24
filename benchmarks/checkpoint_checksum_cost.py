"""What checkpoint checksums cost: the SHA-256 manifest at save time and its verification at
resume, in seconds and as a share of a save and of a load, on one process.

  python benchmarks/checkpoint_checksum_cost.py [--config configs/debug.yaml] [--repeats 5] [key=value ...]

A save is timed whole (its hashing included) and its hashing alone; a resume is timed as the
verification alone and the load that follows it. Writes benchmarks/results/checkpoint_checksum_cost.json.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from alignkit.compare import spread  # noqa: E402
from alignkit.core import checkpoint_integrity as integrity  # noqa: E402
from alignkit.core.checkpoint import rng_snapshot  # noqa: E402
from alignkit.core.distributed import DistInfo, resolve_device  # noqa: E402
from alignkit.core.errors import CheckpointError  # noqa: E402
from alignkit.experiment import load_experiment  # noqa: E402
from alignkit.train import build_trainer  # noqa: E402


SPREADS: dict[str, dict[str, Any]] = {}  # each timing's repeats: mean, std, min, max, values


def timed(name: str, action: Callable[[], Any], repeats: int) -> float:
    """Median seconds of ``repeats`` calls; their spread is kept in SPREADS[name]."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        action()
        times.append(time.perf_counter() - start)
    SPREADS[name] = spread(times)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(REPO / "configs" / "debug.yaml"))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_experiment(args.config, [f"output_dir={tmp}", "run_name=cost", *args.overrides])
        info = DistInfo()
        trainer = build_trainer(cfg, Path(tmp) / "cost", info, resolve_device(cfg.train.device, info), progress=False)
        trainer.step = 1
        save_s = timed("save_s", lambda: trainer.save(trainer.task.state_dict(), rng_snapshot()), args.repeats)
        folder = trainer.checkpointer.path(1)
        hash_s = timed("save_hash_s", lambda: integrity.digests(folder), args.repeats)
        verify_s = timed("verify_s", lambda: integrity.verify(folder), args.repeats)
        load_s = timed("load_s", lambda: trainer.checkpointer.load(folder), args.repeats)  # verification included
        size = sum(entry[0] for entry in integrity.digests(folder).values())
    result = {
        "config": Path(args.config).name, "overrides": args.overrides, "checkpoint_bytes": size,
        "save_s": save_s, "save_hash_s": hash_s, "save_hash_share": hash_s / save_s,
        "load_s": load_s, "load_verify_s": verify_s, "load_verify_share": verify_s / load_s,
        "verify_vs_save": verify_s / save_s, "hash_mb_per_s": size / hash_s / 1e6,
        # one run's checkpoint, timed `repeats` times: the seed fixes the weights; the spread is over repeats
        "seeds": [cfg.train.seed], "repeats": args.repeats, "spread_s": SPREADS,
    }
    out = REPO / "benchmarks" / "results" / "checkpoint_checksum_cost.json"
    out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    try:
        main()
    except CheckpointError as err:
        raise SystemExit(f"checkpoint_checksum_cost: {err}") from None
