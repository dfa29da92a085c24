"""alignkit/compare.py and what uses it: steps and training seconds to a reference's final value
on synthetic run folders (finished and running, either metric direction), ``alignkit compare``
(table, JSON, PNG), a run that talks while it runs (the plan, a line per eval, curves.png, no
``lam=`` without alignment), and ``alignkit demo`` end to end with tiny models."""
from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch
import yaml

from alignkit.cli import main
from alignkit.compare import compare, read_records, run_numbers, seconds_at, steps_to_reach, table
from alignkit.core.config import AlignConfig, TrainConfig
from alignkit.core.engine import build_engine
from alignkit.core.trainer import Trainer
from alignkit.demo import run_demo
from toys import ToyStudent, ToyTask, ToyTeacher


def write_run(folder: Path, evals: list[tuple[int, float]], seed: int = 0, finished: bool = True,
              tokens_per_s: float = 100.0, active_until: int = 0, key: str = "eval_loss") -> Path:
    """A run folder: config.yaml, metrics.jsonl (100 tokens a step), results.json when finished."""
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text(yaml.safe_dump({"task": {"name": "text_pretrain"}, "train": {"seed": seed}}))
    rows = []
    for step in range(1, evals[-1][0] + 1):
        active = step <= active_until
        rows.append({"step": step, "loss": 5.0, "tokens": 100 * step, "teacher_active": active,
                     "tokens_per_s": tokens_per_s / 2 if active else tokens_per_s})
        rows += [{"step": s, key: v} for s, v in evals if s == step]
    text = "".join(json.dumps(r) + "\n" for r in rows)
    (folder / "metrics.jsonl").write_text(text + ("" if finished else '{"step": 99, "lo'))  # a line being written
    if finished:
        (folder / "results.json").write_text("{}")
    return folder


def test_steps_to_reach_either_direction_and_seconds_between_log_lines():
    assert steps_to_reach([(10, 5.0), (20, 3.0)], 4.0) == pytest.approx(15.0)
    assert steps_to_reach([(10, 0.5), (20, 0.9)], 0.7, mode="max") == pytest.approx(15.0)
    assert steps_to_reach([(10, 0.5), (20, 0.6)], 0.7, mode="max") is None
    records = [{"step": 10, "tokens": 1000, "tokens_per_s": 100.0}, {"step": 20, "tokens": 2000, "tokens_per_s": 50.0}]
    assert seconds_at(records, 5) == pytest.approx(5.0)  # half of the first 10 s interval
    assert seconds_at(records, 15) == pytest.approx(20.0)  # 10 s + half of the second 20 s
    assert seconds_at(records, 25) is None


def test_compare_a_finished_baseline_with_a_running_let_run(tmp_path, capsys):
    base = write_run(tmp_path / "baseline", [(10, 5.0), (20, 4.0), (30, 3.0)])
    # teacher on for 10 steps at half speed: it reaches 3.0 half-way between steps 10 and 20
    let = write_run(tmp_path / "let", [(10, 4.0), (20, 2.0)], finished=False, active_until=10)
    slow = write_run(tmp_path / "slow", [(10, 5.5), (20, 4.5)], seed=1)
    result = compare([base, let, slow])
    assert result["metric"] == "eval_loss" and result["mode"] == "min"  # the task's first eval metric
    runs = {r["name"]: r for r in result["runs"]}
    pair = runs["let"]["vs_first"]
    assert pair["steps"] == pytest.approx(15.0) and pair["speedup"] == pytest.approx(2.0)
    assert pair["seconds"] == pytest.approx(20.0 + 5.0)  # 10 steps at 2 s, 5 at 1 s
    assert pair["baseline_seconds"] == pytest.approx(30.0)
    assert runs["let"]["teacher_step_cost"] == pytest.approx(1.0) and runs["let"]["teacher_dropped"] == 10
    assert runs["let"]["teacher_cost_method"] == "on/off"  # records without teacher_s (an older run)
    assert pair["loss_diff"] == pytest.approx(-1.0) and pair["same_seed"]
    assert not runs["let"]["finished"] and runs["let"]["last_step"] == 20
    assert not runs["slow"]["vs_first"]["reached"] and not runs["slow"]["vs_first"]["same_seed"]
    text = table(result)
    assert "not reached (>20)" in text and "(other seed)" in text and "running @ step 20" in text and "+1.00 on/off" in text

    assert main(["compare", str(base), str(let), "--json", "--plot", str(tmp_path / "c.png")]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["runs"][1]["vs_first"]["steps"] == pytest.approx(15.0)
    assert (tmp_path / "c.png").stat().st_size > 0
    assert main(["compare", str(base), str(let)]) == 0  # the table, and the plot next to the first run
    assert "x steps" in capsys.readouterr().out and (base / "compare.png").is_file()


class SlowStudent(ToyStudent):
    """100 ms a forward: a student step of known length (the toy's own compute is a few ms)."""

    def forward(self, batch: dict, layers: list[int], logits: bool = False):
        time.sleep(0.1)
        return super().forward(batch, layers, logits)


class SlowTeacher(ToyTeacher):
    """50 ms a call: half a student step."""

    def run(self, batch: dict, layers: list[int], logits: bool = False):
        time.sleep(0.05)
        return super().run(batch, layers, logits)


@pytest.mark.parametrize("align, last_active", [
    # LET, the teacher dropped after step 5 of 6: the last record (step 6) has it inactive, so its
    # interval, which also holds the release (a gc pass of ~0.1 s here), is left out
    (AlignConfig(stop_step=5, lambda0=0.5, early_layer=2), 4),
    (AlignConfig(method="rkd", kd_weight=0.3), 6),  # logit KD all run (stop_step -1): no step without it
])
def test_a_slow_teachers_cost_is_measured_in_step(tmp_path, align, last_active):
    student = SlowStudent()
    engine = build_engine(align, student, {"default": SlowTeacher()})
    cfg = TrainConfig(steps=6, micro_batch_size=4, grad_accum=2, log_every=2, eval_every=0, save_every=0)
    Trainer(cfg=cfg, student=student, engine=engine, task=ToyTask(), run_dir=tmp_path, device=torch.device("cpu"),
            progress=False).fit()
    run = run_numbers(read_records(tmp_path))
    assert run["teacher_cost_method"] == "in-step" and run["teacher_dropped"] == last_active
    assert run["teacher_step_cost"] == pytest.approx(0.5, rel=0.3)  # 50 ms of teacher per 100 ms of student
    assert run["teacher_fraction"] == pytest.approx(last_active / 6)


def test_compare_a_time_series_metric_where_higher_is_better(tmp_path, capsys):
    base = write_run(tmp_path / "a", [(5, 0.5), (10, 0.7)], key="val_accuracy")
    other = write_run(tmp_path / "b", [(5, 0.6), (10, 0.8)], key="val_accuracy")
    pair = compare([base, other], "val_accuracy", "max")["runs"][1]["vs_first"]
    assert pair["steps"] == pytest.approx(7.5) and pair["loss_diff"] == pytest.approx(0.1)
    assert main(["compare", str(base), str(tmp_path / "missing")]) == 2
    assert "missing: no metrics.jsonl" in capsys.readouterr().err


def test_a_run_says_its_plan_each_eval_and_draws_curves(tmp_path, capsys):
    cfg = TrainConfig(steps=8, micro_batch_size=4, lr=1e-2, eval_every=4)
    Trainer(cfg=cfg, student=ToyStudent(), engine=None, task=ToyTask(), run_dir=tmp_path, device=torch.device("cpu"),
            progress=True).fit()
    out, err = capsys.readouterr()
    assert f"run folder: {tmp_path}" in out and "student: " in out and "8 steps of 4 examples" in out
    assert "48 tokens per step" in out and "for the remaining 3 steps" in out  # steps 2-5 timed
    assert "step 4/8  eval_loss" in out and "step 8/8  eval_loss" in out
    assert "loss=" in err and "lam=" not in err  # no alignment: no weight on the bar
    assert (tmp_path / "curves.png").stat().st_size > 0


TEACHER = """student: {preset: llama-tiny, options: {arch: {hidden_size: 48, num_hidden_layers: 2, num_attention_heads: 4,
                                                     num_key_value_heads: 4, intermediate_size: 96}}}
task: {seq_len: 32, text: {max_train_docs: 20, eval_batches: 1}}
align: {method: none}
train: {steps: 3, micro_batch_size: 2, eval_every: 3, save_every: 3}
"""
LET = """student: {preset: llama-tiny}
teacher: {kind: hf_causal, source: checkpoint}
task: {seq_len: 32, text: {max_train_docs: 20, eval_batches: 1}}
align: {method: let, objective: logsum, lambda0: 3.0, stop_step: 2, early_layer: 2}
train: {steps: 6, micro_batch_size: 2, lr: 3.0e-3, eval_every: 2, save_every: 6}
"""


@pytest.mark.slow
def test_demo_trains_a_teacher_once_then_baseline_and_let_side_by_side_and_compares(tmp_path, capsys):
    (tmp_path / "teacher.yaml").write_text(TEACHER)
    (tmp_path / "let.yaml").write_text(LET)
    out = tmp_path / "demo"
    summary = run_demo(out, ["train.eval_every=2"], tmp_path / "let.yaml", tmp_path / "teacher.yaml", progress=False)
    printed = capsys.readouterr().out
    assert "teacher: pre-training teacher.yaml" in printed and summary["teacher_trained_now"]
    assert "[baseline] step 6/6" in printed and "[let] teacher default: " in printed
    assert "one seed is one sample" in printed and str(out / "compare.png") in printed
    baseline, let = summary["comparison"]["runs"]
    assert (baseline["name"], let["name"]) == ("baseline", "let") and baseline["seed"] == let["seed"]
    assert let["teacher_dropped"] == 2 and baseline["teacher_dropped"] is None
    assert [s for s, _ in let["eval_loss_curve"]] == [2, 4, 6]  # the override wins over the demo's cadence
    assert (out / "compare.png").stat().st_size > 0 and json.loads((out / "demo.json").read_text())["verdict"]
    # a second call reuses the cached teacher and the finished runs
    again = run_demo(out, ["train.eval_every=2"], tmp_path / "let.yaml", tmp_path / "teacher.yaml", progress=False)
    assert "reusing" in capsys.readouterr().out and not again["teacher_trained_now"]
    assert again["comparison"]["runs"][1]["final_eval_loss"] == let["final_eval_loss"]
