"""The frozen teacher's eval loss in the speedup study (issue 19): one number per study, drawn as a
line beside the students' eval curves, so the report can say when a student passes its teacher.

* The small teacher (``--teacher small``): its pre-training run's final ``eval_loss`` (its
  results.json), which that run measured on the students' eval text and batches.
* The recipe's teacher (``--teacher base``, e.g. SmolLM2-135M from the GGUF): measured with the
  students' own evaluation (:func:`alignkit.teacher_eval.evaluate_teacher`) once, and cached in
  OUT/teacher_eval.json under a digest of what determines it (:func:`eval_setting`). A teacher
  whose score would not compare with the students' (another tokenizer) is skipped, the reason saved.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from pathlib import Path
from typing import Any

from common import write_json
from study_runner import Run

CACHE = "teacher_eval.json"


def eval_setting(cfg: Any) -> dict[str, Any]:
    """What the teacher's score depends on in the experiment ``cfg``: the teacher, the task (the
    eval text and how it is cut), the student's tokenizer (it tokenizes the eval batches; its shape
    does not matter), the eval batch size and the precision."""
    from alignkit.chain import task_context

    student = dataclasses.asdict(cfg.student)
    student.get("options", {}).pop("arch", None)
    return {"teacher": dataclasses.asdict(cfg.teacher), "task": dataclasses.asdict(cfg.task), "student": student,
            "eval_batch_size": task_context(cfg).eval_batch_size, "precision": cfg.train.precision}


def _cache(out: Path) -> dict[str, Any]:
    path = out / CACHE
    return json.loads(path.read_text()) if path.is_file() else {}


def measured(base: Path, overrides: list[str], out: Path) -> dict[str, Any]:
    """The recipe's teacher's eval loss under ``overrides`` (``value``: None when skipped), from
    OUT/teacher_eval.json, else measured now (seconds to minutes on a CPU) and saved there."""
    from alignkit.core.errors import AlignkitError
    from alignkit.experiment import load_experiment
    from alignkit.teacher_eval import evaluate_teacher

    cfg = load_experiment(base, overrides)
    setting = eval_setting(cfg)
    digest = hashlib.sha256(json.dumps(setting, sort_keys=True, default=str).encode()).hexdigest()[:12]
    entry = _cache(out).get(digest)
    if entry is None:
        print(f"measuring the teacher's eval loss (cached in {out / CACHE})", flush=True)
        started = time.time()
        try:
            entry = {"eval_loss": evaluate_teacher(cfg)["eval_loss"], "seconds": time.time() - started}
        except AlignkitError as err:
            entry = {"eval_loss": None, "skipped": str(err)}
        write_json(out / CACHE, _cache(out) | {digest: entry | {"setting": setting}})  # re-read: another study may have added one
    where = f"{CACHE} entry {digest}"
    if entry["eval_loss"] is None:
        return {"value": None, "skipped": entry["skipped"], "source": where}
    dtype = setting["teacher"]["dtype"]
    return {"value": entry["eval_loss"], "seconds": entry["seconds"], "dtype": dtype,
            "source": f"measured by alignkit.teacher_eval with the students' evaluation, the teacher in {dtype}; {where}"}


def pretrained(out: Path, pretrain: Run) -> dict[str, Any]:
    """The small teacher's eval loss: its pre-training run's final eval (``value``: None before it finished)."""
    results = out / pretrain.name / "results.json"
    if not results.is_file():
        return {"value": None, "skipped": f"{pretrain.name} has not finished"}
    return {"value": json.loads(results.read_text())["eval_loss"],
            "source": f"{pretrain.name}/results.json: the small teacher's final eval, on the students' eval batches"}
