"""Downstream evaluation with EleutherAI's lm-evaluation-harness (``pip install -e ".[eval]"``).

  alignkit eval runs/my-run                      # the paper's nine tasks, 1-shot
  alignkit eval runs/my-run/checkpoints/step_000500 --tasks arc_easy,piqa --limit 200
  alignkit eval runs/my-run --tasks my_task --include-path my_tasks/   # your own task YAMLs

Writes ``eval/<tasks>.json`` (lm-eval's results) and ``eval/<tasks>.md`` (a table) next to
the model. The hub datasets need network; tests run the same path on a local task.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from alignkit.core.errors import MissingFile, MissingPackage

# paper Table 1 / OLMo's suite (App. K)
PAPER_TASKS = ("arc_challenge", "arc_easy", "hellaswag", "lambada_openai", "openbookqa", "piqa", "sciq",
               "winogrande", "boolq")


def resolve_model_dir(path: str | Path) -> Path:
    """A run directory -> its ``final/``; a checkpoint -> its ``model/``; else the path itself."""
    path = Path(path)
    for candidate in (path / "final", path / "model", path):
        if (candidate / "config.json").is_file():
            return candidate
    raise MissingFile(f"{path}: no Hugging Face model here (expected a run dir, a checkpoint or a folder with config.json)")


def markdown_table(results: dict[str, Any]) -> str:
    lines = ["| task | metric | value | stderr |", "|---|---|---|---|"]
    for task, metrics in sorted(results.items()):
        for key, value in sorted(metrics.items()):
            if not isinstance(value, (int, float)) or "stderr" in key or key == "alias":
                continue
            name = key.split(",")[0]
            stderr = metrics.get(f"{name}_stderr,{key.split(',')[1]}" if "," in key else f"{name}_stderr")
            err = f"{stderr:.4f}" if isinstance(stderr, (int, float)) else ""
            lines.append(f"| {task} | {name} | {value:.4f} | {err} |")
    return "\n".join(lines) + "\n"


def evaluate(
    model: str | Path,
    tasks: list[str] | None = None,
    num_fewshot: int = 1,
    limit: int | None = None,
    batch_size: str = "auto",
    device: str = "cpu",
    include_path: str | None = None,
    output_dir: str | Path | None = None,
) -> dict[str, Any]:
    try:
        import lm_eval
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise MissingPackage("alignkit eval needs lm-evaluation-harness: pip install -e \".[eval]\"") from None
    model_dir = resolve_model_dir(model)
    tasks = list(tasks or PAPER_TASKS)
    manager = TaskManager(include_path=include_path) if include_path else TaskManager()
    output = lm_eval.simple_evaluate(
        model="hf",
        model_args=f"pretrained={model_dir},dtype=float32",
        tasks=tasks,
        num_fewshot=num_fewshot,
        limit=limit,
        batch_size=batch_size,
        device=device,
        task_manager=manager,
    )
    results = output["results"]
    out = Path(output_dir) if output_dir else model_dir / "eval"
    out.mkdir(parents=True, exist_ok=True)
    stem = "+".join(tasks) if len(tasks) <= 3 else f"{len(tasks)}tasks"
    (out / f"{stem}.json").write_text(json.dumps({"model": str(model_dir), "num_fewshot": num_fewshot, "results": results},
                                                 indent=2, default=str))
    table = markdown_table(results)
    (out / f"{stem}.md").write_text(table)
    print(table)
    return results
