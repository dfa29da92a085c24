"""benchmarks/step_cost.py's pure parts: step times per phase from a run's records, and a study's
steps priced at those times."""
from __future__ import annotations

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


def test_earlier_costs_are_reused_only_for_their_own_grid(tmp_path):
    from step_cost import measured_costs

    earlier = tmp_path / "step_cost-peers.json"
    earlier.write_text('{"kind": "alignkit-step-cost", "grid": "peers", "steps": 12, "costs": {"configs": {}}, "wall": {}}')
    kept = measured_costs(str(earlier), "peers")
    assert kept["costs"] == {"configs": {}} and kept["costs_from"] == str(earlier)
    assert "wall" not in kept  # the earlier study's pricing is not carried over
    with pytest.raises(SystemExit, match="not a step_cost JSON of grid 'lambda0'"):
        measured_costs(str(earlier), "lambda0")
    with pytest.raises(SystemExit, match="cannot read"):
        measured_costs(str(tmp_path / "missing.json"), "peers")
