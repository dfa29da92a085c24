"""Shared helpers for the benchmark scripts: run one experiment from overrides, read its
metrics back, drop its weights, compute steps-to-loss speedups, and plot curves.

Benchmarks print and save what they measure (JSON + PNG under benchmarks/results/); they are
scripts, never timed tests.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from alignkit.compare import eval_curve, plot_curves, spread, steps_to_reach  # noqa: F401 (the benchmarks import them from here)

RESULTS = Path(__file__).resolve().parent / "results"
REPO = RESULTS.parent.parent
# folder -> placeholder, so saved JSONs name machine-specific folders portably (e.g. WIKITEXT2_DIR)
PATH_ALIASES: dict[str, str] = {}

# text_let's and the study's small teacher (same tokenizer as llama-small): 5.2M parameters vs
# the student's 25.6M, 22x fewer outside the 49k-token embedding that both carry
SMALL_TEACHER_ARCH = ["student.options.arch.hidden_size=96", "student.options.arch.intermediate_size=256",
                      "student.options.arch.num_hidden_layers=4", "student.options.arch.num_attention_heads=3",
                      "student.options.arch.num_key_value_heads=3"]


def wikitext_overrides(folder: Path) -> list[str]:
    """The wikitext2 task preset on local raw files: ``valid.txt`` to train, ``test.txt`` to evaluate."""
    if not (folder / "valid.txt").is_file() or not (folder / "test.txt").is_file():
        raise SystemExit(f"WikiText-2 files valid.txt / test.txt not found in {folder} (pass --data)")
    PATH_ALIASES[str(folder.resolve())] = "WIKITEXT2_DIR"
    return ["task.preset=wikitext2", "task.text.source=files",
            f"task.text.train_path={folder / 'valid.txt'}", f"task.text.eval_path={folder / 'test.txt'}"]


def run_experiment(name: str, work_dir: Path, overrides: list[str], config: str | None = None) -> dict[str, Any]:
    """Train one run from scratch into work_dir/name in its own process (so peak memory and
    loaded teachers are per run); return its results and metric records."""
    run_dir = work_dir / name
    if run_dir.exists():
        shutil.rmtree(run_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    if config is None:
        config = str(work_dir / "defaults.yaml")
        Path(config).write_text("{}\n")
    command = [sys.executable, "-m", "alignkit", "train", config, f"output_dir={work_dir}", f"run_name={name}", *overrides]
    subprocess.run(command, check=True)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    results = json.loads((run_dir / "results.json").read_text())
    return {"results": results, "records": records, "run_dir": str(run_dir)}


def drop_weights(run_dir: Path) -> None:
    """Delete a finished run's checkpoints and exported weights (its results, config and metrics
    stay): a benchmark of many runs would otherwise fill the disk."""
    for weights in ("checkpoints", "final"):
        shutil.rmtree(run_dir / weights, ignore_errors=True)


def train_summary(records: list[dict[str, Any]], stop_step: int = 0) -> dict[str, float]:
    """Mean tokens/s with and without the teacher, and the peak memory."""
    rows = [r for r in records if "tokens_per_s" in r][1:]  # first step includes warm-up
    with_teacher = [r["tokens_per_s"] for r in rows if r.get("teacher_active")]
    without = [r["tokens_per_s"] for r in rows if not r.get("teacher_active")]
    mean = lambda xs: sum(xs) / len(xs) if xs else None  # noqa: E731
    return {
        "tokens_per_s": mean([r["tokens_per_s"] for r in rows]),
        "tokens_per_s_teacher_active": mean(with_teacher),
        "tokens_per_s_teacher_gone": mean(without),
        "peak_mem_mb": max((r["peak_mem_mb"] for r in rows), default=None),
    }


def speedup(baseline: list[tuple[int, float]], method: list[tuple[int, float]]) -> dict[str, Any]:
    """(steps the baseline needs to reach its final eval loss) / (steps the method needs)."""
    target = baseline[-1][1]
    base_steps = steps_to_reach(baseline, target)
    method_steps = steps_to_reach(method, target)
    return {
        "target_eval_loss": target,
        "baseline_steps": base_steps,
        "method_steps": method_steps,
        "speedup": (base_steps / method_steps) if method_steps else None,
    }


def portable(text: str) -> str:
    """``text`` with the aliased folders named by placeholder and paths in the repo made relative."""
    for folder, alias in sorted(PATH_ALIASES.items(), key=lambda item: -len(item[0])):
        text = text.replace(folder, alias)
    return text.replace(str(REPO) + "/", "").replace(str(REPO), ".")


def save_figure(fig: Any, path: Path) -> None:
    """Lay out, save (110 dpi, the folder made) and close a matplotlib figure."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_json(path: Path, payload: dict[str, Any]) -> None:
    """Save ``payload`` with portable paths (see :func:`portable`)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(portable(json.dumps(payload, indent=2, default=str)))
    print(f"wrote {path}")
