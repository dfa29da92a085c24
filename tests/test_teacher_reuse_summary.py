"""benchmarks/teacher_reuse_summary.py: every teacher_reuse study and the control side by side,
each with the step-cost pricing written for it. No training."""
from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from teacher_reuse_summary import plot, rows  # noqa: E402


def study(name: str, grid: str, settings: dict, speedups: list[float], teacher_loss: float | None) -> dict:
    mean = sum(speedups) / len(speedups)
    return {"kind": "alignkit-study", "name": name, "grid": grid,
            "settings": {"corpus": None, "teacher_steps": 300, **settings},
            "teacher_eval_loss": None if teacher_loss is None else {"value": teacher_loss},
            "configs": {"logsum": {"summary": {"speedup": {"mean": mean, "std": 0.1, "values": speedups},
                                               "reached": len(speedups), "seeds": list(range(len(speedups))),
                                               "loss_diff": {"mean": -0.2}}}}}


def test_each_reuse_study_is_a_row_named_by_its_teachers_origin_with_its_own_pricing(tmp_path: Path) -> None:
    folder = tmp_path / "study" / "a"
    folder.mkdir(parents=True)
    studies = {
        "teacher_reuse-small-teacher": study("teacher_reuse-small-teacher", "teacher_reuse", {}, [2.7, 2.8], 5.5),
        "teacher_reuse-small-teacher-from-kjv": study("teacher_reuse-small-teacher-from-kjv", "teacher_reuse",
                                                      {"teacher_corpus_name": "kjv"}, [1.6, 1.7], 10.3),
        "teacher_reuse-small-teacher-from-wikitext2-kjv": study(
            "teacher_reuse-small-teacher-from-wikitext2-kjv", "teacher_reuse",
            {"corpus": ["k/train.txt", "k/eval.txt"], "corpus_name": "kjv", "teacher_corpus_name": "wikitext2"}, [2.1], 8.7),
        "teacher_control": study("teacher_control", "teacher_control", {"teacher": "base"}, [1.0, 1.0], None),
        "lambda0": study("lambda0", "lambda0", {}, [1.5], 5.5),  # another grid: not a row
    }
    for name, payload in studies.items():
        (folder / f"{name}.json").write_text(json.dumps(payload))
    (tmp_path / "step_cost-teacher_reuse-small-teacher-from-kjv.json").write_text(json.dumps({
        "kind": "alignkit-step-cost", "grid": "peers", "study": "x/teacher_reuse-small-teacher-from-kjv.json",
        "wall": {"logsum": {"per_seed": {}, "wall_speedup": {"mean": 1.62, "std": 0.05},
                            "teacher_pretrain": {"counted_once": 1.14, "reused": 1.62}}}}))
    table = {r["study"]: r for r in rows(tmp_path / "study", tmp_path)}
    assert set(table) == set(studies) - {"lambda0"}
    assert table["teacher_reuse-small-teacher"]["teacher"] == "wikitext2, 300 steps (purpose-built)"
    assert table["teacher_reuse-small-teacher-from-kjv"]["teacher"] == "kjv, 300 steps"
    reverse = table["teacher_reuse-small-teacher-from-wikitext2-kjv"]
    assert (reverse["student_corpus"], reverse["teacher"]) == ("kjv", "wikitext2, 300 steps")
    assert table["teacher_control"]["teacher"] == "untrained (control)" and table["teacher_control"]["teacher_eval_loss"] is None
    assert table["teacher_reuse-small-teacher-from-kjv"]["pooled"]["counted_once"] == 1.14
    assert "pooled" not in table["teacher_reuse-small-teacher"]  # no step_cost file priced it
    plot(list(table.values()), tmp_path / "teacher_reuse.png")
    assert (tmp_path / "teacher_reuse.png").stat().st_size > 0
