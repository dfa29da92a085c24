"""benchmarks/step_cost.py's pure parts: step times per phase from a run's records, and a study's
steps priced at those times."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from step_cost import step_times, summarize, wall_speedups  # noqa: E402


def records(seconds: list[float], drop_after: int | None) -> list[dict]:
    """One train record per step of 100 tokens, the teacher active up to ``drop_after``."""
    return [{"step": i + 1, "tokens": 100 * (i + 1), "tokens_per_s": 100 / s,
             "teacher_active": drop_after is not None and i + 1 <= drop_after} for i, s in enumerate(seconds)]


def test_step_times_split_by_phase_and_skip_the_warm_up_step():
    phases = step_times(records([9.0, 2.0, 2.0, 1.0, 1.0], drop_after=3))
    assert phases == {"active": pytest.approx([2.0, 2.0]), "dropped": pytest.approx([1.0, 1.0])}


def test_a_study_is_priced_at_each_phase_cost():
    runs = {"baseline": [{"phases": step_times(records([5.0, 1.0, 1.0, 1.0], None)), "teacher_share": None}],
            "let": [{"phases": step_times(records([5.0, 2.0, 2.0, 1.0], drop_after=3)), "teacher_share": 0.5}]}
    costs = summarize(runs)
    assert costs["configs"]["let"]["active"]["ratio"] == pytest.approx(2.0)
    study = {"configs": {"let": {"per_seed": {"0": {"steps": 50.0, "reached": True, "baseline_steps": 150.0}}}},
             "runs": {"let-s0": {"teacher_dropped": 30, "last_step": 150}}}
    wall = wall_speedups(costs, study)["let"]["per_seed"]["0"]
    # 30 steps at twice the baseline's step time, 20 at its time: 80 baseline steps of time for 150
    assert wall["steps_speedup"] == pytest.approx(3.0)
    assert wall["wall_speedup"] == pytest.approx(150 / 80)
    assert "teacher_pretrain" not in wall_speedups(costs, study)["let"]  # no teacher pre-trained by the study
    study["teacher_pretrain"] = {"train_seconds": 30.0}  # 30 baseline steps at the baseline's 1 s a step
    teacher = wall_speedups(costs, study)["let"]["teacher_pretrain"]
    assert teacher["reused"] == pytest.approx(150 / 80) and teacher["counted_once"] == pytest.approx(150 / 110)


def test_earlier_costs_are_read_with_how_they_were_measured_but_not_their_pricing(tmp_path):
    from step_cost import measured_costs

    earlier = tmp_path / "step_cost-peers.json"
    earlier.write_text('{"kind": "alignkit-step-cost", "grid": "peers", "steps": 12, "costs": {"configs": {}}, "wall": {}}')
    kept = measured_costs(str(earlier))
    assert kept["costs"] == {"configs": {}} and kept["costs_from"] == str(earlier) and kept["grid"] == "peers"
    assert "wall" not in kept  # the earlier study's pricing is not carried over
    (tmp_path / "study.json").write_text('{"kind": "alignkit-study", "grid": "peers"}')
    with pytest.raises(SystemExit, match="is not a step_cost JSON"):
        measured_costs(str(tmp_path / "study.json"))
    with pytest.raises(SystemExit, match="cannot read"):
        measured_costs(str(tmp_path / "missing.json"))


SHARED = ["task.preset=wikitext2", "task.text.train_path=WIKITEXT2_DIR/valid.txt", "teacher.preset=''",
          "teacher.kind=hf_causal", "teacher.source=checkpoint", "teacher.name_or_path=STUDY/small_teacher-s0/final"]
RECIPE = ["align.method=let", "align.objective=logsum", "align.lambda0=3.0"]


def reuse_study(recipe: list[str], student: list[str] = ()) -> dict:
    """A teacher_reuse study JSON's keys that pricing reads: another corpus and another teacher's
    weights than the costs were measured with, which a step's cost does not depend on."""
    own = ["train.steps=150", "train.seed=0", "task.text.train_path=KJV_DIR/train.txt", *student]
    return {"name": "teacher_reuse-small-teacher-from-kjv", "seeds": [0], "settings": {"steps": 150},
            "configs": {"logsum": {"baseline": "baseline"}},
            "run_overrides": {"baseline-s0": own + ["align.method=none"],
                              "logsum-s0": own + recipe + ["teacher.preset=''", "teacher.kind=hf_causal",
                                                           "teacher.source=checkpoint", "teacher.name_or_path=KJV/final"]}}


def test_another_grids_costs_price_a_configuration_with_the_same_settings_only():
    from step_cost import pricing_map

    payload = {"grid": "peers", "overrides": SHARED,
               "costs": {"configs": {name: {} for name in ("baseline", "let_recipe", "rkd_w0.3_t1")}}}
    study = reuse_study(RECIPE + ["align.stop_step=50"])  # peers' let_recipe at 150 steps stops at 50
    with pytest.raises(SystemExit, match="name one with --as"):
        pricing_map(payload, study, [])
    assert pricing_map(payload, study, ["logsum=let_recipe"]) == {"logsum": "let_recipe"}
    with pytest.raises(SystemExit, match=r"align.method: let vs rkd"):
        pricing_map(payload, study, ["logsum=rkd_w0.3_t1"])
    with pytest.raises(SystemExit, match=r"align.objective: cosine vs logsum"):
        pricing_map(payload, reuse_study(RECIPE + ["align.objective=cosine"]), ["logsum=let_recipe"])
    # where the teacher drops moves no step's cost: each phase is priced up to the run's own drop
    assert pricing_map(payload, reuse_study(RECIPE + ["align.stop_step=100"]), ["logsum=let_recipe"]) == {"logsum": "let_recipe"}
    with pytest.raises(SystemExit, match=r"baseline cannot be priced .*hidden_size: 1024 vs \(unset\)"):
        pricing_map(payload, reuse_study(RECIPE + ["align.stop_step=50"], ["student.options.arch.hidden_size=1024"]),
                    ["logsum=let_recipe"])
    with pytest.raises(SystemExit, match="--as logsum=kd"):
        pricing_map(payload, study, ["logsum=kd"])


def test_the_study_report_shows_each_study_priced_by_its_own_step_cost_file(tmp_path):
    from study_report import step_cost_lines, step_costs_by_study

    def priced(grid: str, study: str, seeds: list[float]) -> dict:
        per_seed = {str(i): {"wall_speedup": w} for i, w in enumerate(seeds)}
        return {"kind": "alignkit-step-cost", "grid": grid, "study": f"results/study/x/{study}.json",
                "priced_as": {"logsum": "let_recipe"}, "wall": {"logsum": {
                    "per_seed": per_seed, "wall_speedup": {"mean": sum(seeds) / len(seeds), "std": 0.14},
                    "teacher_pretrain": {"seconds": 243.0, "baseline_steps": 100.6, "reused": 2.59, "counted_once": 1.7}}}}

    (tmp_path / "step_cost-peers.json").write_text(json.dumps(priced("peers", "peers-small-teacher", [2.5, 2.7])))
    (tmp_path / "step_cost-peers-before-fix.json").write_text(json.dumps(priced("peers", "peers-small-teacher", [9.0])))
    (tmp_path / "step_cost-teacher_reuse-kjv.json").write_text(json.dumps(priced("peers", "teacher_reuse-kjv", [1.6])))
    found = step_costs_by_study(tmp_path)
    assert {study: name for study, (name, _) in found.items()} == {
        "peers-small-teacher": "step_cost-peers.json", "teacher_reuse-kjv": "step_cost-teacher_reuse-kjv.json"}
    lines = "\n".join(step_cost_lines(found["peers-small-teacher"]))
    assert "| logsum | peers's let_recipe | 2.50 / 2.70 | 2.60 ± 0.14x | 2.59x | 1.70x (243 s = 101 baseline steps) |" in lines
    assert step_cost_lines(None) == []
