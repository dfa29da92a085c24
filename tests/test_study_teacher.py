"""The frozen teacher's eval loss in the speedup study (benchmarks/study_teacher.py, study.py's
analysis, study_report.py's table): measured once per setting and cached, read from the small
teacher's run, and each run's crossing of it from finished run folders. No training."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from study import plan  # noqa: E402
from study_results import analyse  # noqa: E402
from study_report import grid_table, plot_study  # noqa: E402
from study_runner import Run  # noqa: E402
from study_teacher import CACHE, measured, pretrained  # noqa: E402

from alignkit.core.errors import ConfigError  # noqa: E402

DEBUG = Path(__file__).resolve().parents[1] / "configs" / "debug.yaml"


def test_the_recipes_teacher_is_measured_once_per_setting_and_a_refusal_is_kept(tmp_path: Path, monkeypatch) -> None:
    import alignkit.teacher_eval

    calls = []

    def fake(cfg):
        calls.append(cfg)
        if cfg.task.seq_len == 8:
            raise ConfigError("the teacher's tokenizer differs")
        return {"eval_loss": 4.0 + cfg.task.seq_len / 100}

    monkeypatch.setattr(alignkit.teacher_eval, "evaluate_teacher", fake)
    first = measured(DEBUG, [], tmp_path)
    assert first["value"] == pytest.approx(4.32) and "alignkit.teacher_eval" in first["source"]
    # the student's shape and the seed do not change the teacher's score: the cached entry answers
    assert measured(DEBUG, ["student.options.arch.hidden_size=32", "train.seed=3"], tmp_path)["value"] == pytest.approx(4.32)
    assert len(calls) == 1
    assert measured(DEBUG, ["task.seq_len=16"], tmp_path)["value"] == pytest.approx(4.16)  # other eval batches: measured
    skipped = measured(DEBUG, ["task.seq_len=8"], tmp_path)
    assert skipped["value"] is None and "tokenizer differs" in skipped["skipped"]
    assert measured(DEBUG, ["task.seq_len=8"], tmp_path) == skipped and len(calls) == 3
    assert len(json.loads((tmp_path / CACHE).read_text())) == 3


def _finish(folder: Path, curve: list[tuple[int, float]]) -> None:
    """A finished run folder: train records every step (100 tokens/s) and the eval curve."""
    folder.mkdir(parents=True)
    rows = []
    for step in range(1, curve[-1][0] + 1):
        rows.append({"step": step, "tokens": 100 * step, "tokens_per_s": 100.0})
        rows += [{"step": s, "eval_loss": v} for s, v in curve if s == step]
    (folder / "metrics.jsonl").write_text("\n".join(map(json.dumps, rows)))
    (folder / "results.json").write_text(json.dumps({"eval_loss": curve[-1][1]}))


def test_crossings_of_the_small_teachers_loss_from_run_folders_and_their_table(tmp_path: Path) -> None:
    teacher = ["teacher.source=checkpoint", "teacher.name_or_path=T"]
    grid = {"configs": {"let": ["align.method=let"], "own": ["align.method=let", "teacher.preset=llama-small"],
                        "other_eval": ["align.method=let", "task.seq_len=64"]}}
    runs, baseline_of = plan(grid, [0, 1], 30, ["task.preset=wikitext2"], [], teacher)
    pretrain = Run("small_teacher-s0", "small_teacher", 0, [])
    curves = {"small_teacher-s0": [(10, 5.5), (20, 5.2), (30, 5.0)],
              "baseline-s0": [(10, 6.0), (20, 5.4), (30, 5.1)], "baseline-s1": [(10, 6.0), (20, 5.5), (30, 4.9)],
              "let-s0": [(10, 5.6), (20, 4.9), (30, 4.95)],  # passes at 20, 0.5 ahead then, 0.15 at the end
              "own-s0": [(10, 4.0), (20, 3.9), (30, 3.8)], "other_eval-s0": [(10, 4.0), (20, 3.9), (30, 3.8)]}
    for name, curve in curves.items():
        _finish(tmp_path / name, curve)
    line = pretrained(tmp_path, pretrain)
    assert line["value"] == 5.0 and "small_teacher-s0/results.json" in line["source"]
    result = analyse(runs, baseline_of, tmp_path, pretrain, line, ["task.preset=wikitext2"] + teacher)
    crossings = result["teacher_crossings"]
    assert set(crossings) == {"baseline", "let"}  # own teacher, or other eval batches: not on this teacher's line
    assert crossings["baseline"][0]["step"] is None and crossings["baseline"][1]["step"] == 30
    assert crossings["let"][0]["step"] == 20 and crossings["let"][0]["lead"]["course"] == "shrinks"
    payload = json.loads(json.dumps({"name": "g", "grid": "g", "seeds": [0, 1], "runs_failed": [], "settings": {
        "steps": 30, "base": "b.yaml", "teacher": "small", "teacher_steps": 300}, **result}))  # as saved: seeds as strings
    table = "\n".join(grid_table(payload))
    assert "Teacher (frozen) eval loss: **5.000**" in table
    assert "Grid `g`, corpus wikitext2, seeds [0, 1]" in table
    payload["settings"] |= {"corpus": ["a.txt", "b.txt"], "corpus_name": "kjv", "only": "let,own"}
    assert "Grid `g`, corpus kjv, only let, own, seeds" in "\n".join(grid_table(payload))
    assert "| baseline | never (+0.100) / 30 |" in table
    assert "| let | 20 / - | -0.500 / - | -0.150 / - | -0.500 / - | shrinks / - |" in table
    assert "Not compared with this teacher (a teacher or eval batches of their own, or no finished run): own, other_eval." in table
    plot_study(tmp_path / "g.png", payload)
    assert (tmp_path / "g.png").stat().st_size > 0
    assert pretrained(tmp_path, Run("late-s0", "late", 0, []))["value"] is None  # its pre-training has not finished


def test_a_course_claim_from_run_folders_gives_its_verdict_and_table(tmp_path: Path) -> None:
    from study_report import _measured
    from study_results import claims

    grid = {"configs": {"long": ["align.method=let"]},
            "claims": [{"claim": "the lead holds", "kind": "course", "config": "long"}]}
    runs, baseline_of = plan(grid, [0, 1], 80, ["task.preset=wikitext2"], [], [])
    base = [(10, 8.0), (20, 6.0), (30, 5.0), (40, 4.5), (50, 4.2), (60, 4.0), (70, 3.9), (80, 3.8)]
    ahead = [(step - 10, loss) for step, loss in base[1:]] + [(80, 3.75)]  # 10 steps ahead: 2x at a quarter, 1.14x at the end
    curves = {"baseline-s0": base, "baseline-s1": base, "long-s0": ahead, "long-s1": ahead}
    for name, curve in curves.items():
        _finish(tmp_path / name, curve)
    result = analyse(runs, baseline_of, tmp_path)
    course = result["configs"]["long"]["summary"]["course"]
    assert [course[f]["mean"] for f in ("0.25", "0.5", "0.75", "1")] == pytest.approx([2.0, 4 / 3, 1.2, 8 / 7])
    result["claims"] = claims(grid, result)
    assert result["claims"][0]["verdict"] == "shrinks"
    payload = json.loads(json.dumps({"name": "g", "grid": "g", "seeds": [0, 1], "runs_failed": [],
                                     "settings": {"steps": 80, "base": "b.yaml", "teacher": "base"}, **result}))
    table = "\n".join(grid_table(payload))
    assert "| 0.25 | 20 | 2.00 ± 0.00x | 2.00 / 2.00 |" in table and "; shrinks." in table
    assert _measured(payload, payload["claims"][0]).startswith("2.00 ± 0.00x at 0.25 -> 1.33 ± 0.00x at 0.5")
    plot_study(tmp_path / "g.png", payload)  # with its speedup-over-the-run panel
    assert (tmp_path / "g.png").stat().st_size > 0


def test_the_teacher_line_is_measured_only_when_a_configuration_uses_the_studys_teacher() -> None:
    from study import load_grid
    from study_results import any_on_teacher_line

    shared = ["task.preset=wikitext2", "task.text.eval_path=WIKITEXT2_DIR/test.txt"]
    small = ["teacher.preset=''", "teacher.kind=hf_causal", "teacher.source=checkpoint", "teacher.name_or_path=T/final"]
    _, control = load_grid("teacher_control")  # its untrained teacher is its own: the recipe's would be measured for nothing
    runs, baseline_of = plan(control, [0], 150, shared, [], [])
    assert not any_on_teacher_line(runs, baseline_of, shared)
    _, reuse = load_grid("teacher_reuse")
    runs, baseline_of = plan(reuse, [0], 150, shared, [], small)
    assert any_on_teacher_line(runs, baseline_of, shared + small)
    assert not any_on_teacher_line(runs, baseline_of, shared + small[:3] + ["teacher.name_or_path=OTHER/final"])
