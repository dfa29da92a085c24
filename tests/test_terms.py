"""Alignment as a list of terms: presets == their terms (same numbers), LET + logit KD on text,
RKD on time series, per-teacher release, the learned projection leaving the optimizer at its
stop (and exact resume around it), plug-in objectives, and errors naming the key the user wrote."""
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from alignkit.core.config import AlignConfig, ConfigError, PairConfig, TermConfig, TrainConfig
from alignkit.core.engine import build_engine, check_align_config
from alignkit.core.objectives import kd
from alignkit.core.registry import OBJECTIVES
from alignkit.core.trainer import Trainer
from toys import ToyStudent, ToyTask, ToyTeacher

REPO = Path(__file__).resolve().parents[1]
PROJECTION_KEY = "engine.terms.0.projections.0.weight"


def batch():
    ids = torch.randint(0, 32, (2, 6), generator=torch.Generator().manual_seed(3))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def fit(run_dir: Path, align: AlignConfig, steps: int = 6, resume: str = "", stop_at: int = 0, **train) -> tuple[Trainer, dict]:
    torch.manual_seed(0)  # a learned projection's initialisation
    student, teachers = ToyStudent(), {"default": ToyTeacher(), "small": ToyTeacher(depth=2, width=4)}
    engine = build_engine(align, student, teachers)
    run_dir.mkdir(parents=True, exist_ok=True)
    cfg = TrainConfig(steps=steps, micro_batch_size=4, lr=1e-2, eval_every=0, **train)
    trainer = Trainer(cfg=cfg, student=student, engine=engine, task=ToyTask(), run_dir=run_dir, device=torch.device("cpu"),
                      progress=False)
    if resume:
        trainer.resume(run_dir / "checkpoints" / resume)
    trainer.cfg.steps = stop_at or steps  # stop early, on the schedules of the full run
    trainer.fit()
    return trainer, teachers


def losses(run_dir: Path) -> list[list]:
    keys = ("loss", "nll", "align_loss", "lambda", "kd", "kd_weight", "grad_norm", "cos/t-1-s2")
    return [[r.get(k) for k in keys] for r in records(run_dir) if "loss" in r]


@pytest.mark.parametrize("preset, term", [
    (AlignConfig(stop_step=3, lambda0=0.5, early_layer=2, projection="linear", objective="logsum", logsum_alpha=3.0),
     TermConfig(stop_step=3, lambda0=0.5, early_layer=2, projection="linear", objective="logsum",
                objective_options={"alpha": 3.0})),
    (AlignConfig(stop_step=3, pairs=[PairConfig(-1, 2), PairConfig(1, 1, 0.5)], schedule="cosine"),
     TermConfig(stop_step=3, pairs=[PairConfig(-1, 2), PairConfig(1, 1, 0.5)], schedule="cosine")),
    (AlignConfig(method="rkd", kd_weight=0.7, kd_temperature=2.0),
     TermConfig(type="logit_kd", lambda0=0.7, temperature=2.0, stop_step=-1)),
    (AlignConfig(method="salt", n_kd=3, stop_step=5), TermConfig(type="logit_kd", stop_step=3)),
])
def test_a_preset_and_its_terms_give_identical_losses(tmp_path, preset, term):
    fit(tmp_path / "preset", preset)
    fit(tmp_path / "terms", AlignConfig(terms=[term]))
    assert losses(tmp_path / "preset") == losses(tmp_path / "terms")
    assert len(losses(tmp_path / "preset")) == 6


def test_two_teachers_are_each_released_when_their_last_term_stops():
    student, teachers = ToyStudent(), {"default": ToyTeacher(), "small": ToyTeacher(depth=2, width=4)}
    cfg = AlignConfig(terms=[
        TermConfig(pairs=[PairConfig(-1, 1)], stop_step=2),
        TermConfig(teacher="small", pairs=[PairConfig(-1, 3)], stop_step=4, schedule="constant"),
        TermConfig(type="logit_kd", stop_step=3),  # the default teacher again: logits in the same pass
    ])
    engine = build_engine(cfg, student, teachers)
    freed, names = [], set()
    for step in range(6):
        out = student(batch(), engine.student_layers(step))
        _, metrics = engine(out, batch(), step)
        names |= set(metrics)
        engine.after_step(step)
        freed.append(sorted(name for name, t in teachers.items() if t.released))
    assert freed == [[], [], ["default"], ["default", "small"], ["default", "small"], ["default", "small"]]
    assert teachers["default"].calls == 3 and teachers["small"].calls == 4  # once per step, features + logits
    assert {"term0/lambda", "term0/cos/t-1-s1", "term1/lambda", "term1/cos/small:t-1-s3", "kd", "kd_weight",
            "align_loss"} <= names and "lambda" not in names
    assert engine.released and engine.student_layers(5) == []


def test_a_custom_teacher_without_release_is_dropped_by_the_engine():
    import gc
    import weakref

    class NoRelease(ToyTeacher):
        release = None  # a custom teacher may have no release()

    student, teacher = ToyStudent(), NoRelease()
    engine = build_engine(AlignConfig(stop_step=2, early_layer=2), student, {"default": teacher})
    ref = weakref.ref(teacher)
    del teacher
    for step in range(3):
        engine(student(batch(), engine.student_layers(step)), batch(), step)
        engine.after_step(step)
    gc.collect()
    assert ref() is None and engine.released


def test_linear_projection_leaves_the_optimizer_at_its_stop_and_resume_is_exact(tmp_path):
    align = AlignConfig(terms=[TermConfig(projection="linear", early_layer=2, lambda0=0.5, stop_step=3)])
    full, _ = fit(tmp_path / "full", align, steps=6, save_every=2, keep_checkpoints=0)
    assert full.engine.retire(0) == [] and not list(full.module.engine.parameters())
    params = sum(len(g["params"]) for g in full.optimizer.param_groups)
    assert params == len(list(full.student.parameters())) and len(full.optimizer.state) == params
    checkpoints = tmp_path / "full" / "checkpoints"
    assert PROJECTION_KEY in load_file(str(checkpoints / "step_000002" / "state.safetensors"))
    assert PROJECTION_KEY not in load_file(str(checkpoints / "step_000004" / "state.safetensors"))
    for cut in ("step_000002", "step_000004"):  # before and after the stop
        run = tmp_path / f"from_{cut}"
        fit(run, align, stop_at=4, save_every=2)
        fit(run, align, resume=cut, save_every=2)
        assert losses(run) == losses(tmp_path / "full")
        final = [load_file(str(r / "final" / "model.safetensors")) for r in (run, tmp_path / "full")]
        assert all(torch.equal(final[0][k], final[1][k]) for k in final[1])


def test_the_readme_plugin_objective_is_usable_by_name_with_its_options(monkeypatch):
    monkeypatch.setattr(OBJECTIVES, "_items", dict(OBJECTIVES._items))  # registered for this test only
    readme = (REPO / "docs" / "alignment-terms.md").read_text()
    exec(readme.split("# my_project/objectives.py")[1].split("\n", 1)[1].split("```")[0], {})
    student, teacher = ToyStudent(width=8), ToyTeacher(width=8)
    term = TermConfig(objective="smooth_l1", objective_options={"beta": 0.5}, early_layer=2, stop_step=5)
    check_align_config(AlignConfig(terms=[term]), total_steps=10)
    engine = build_engine(AlignConfig(terms=[term]), student, {"default": teacher})
    out = student(batch(), engine.student_layers(0))
    loss, _ = engine(out, batch(), 0)
    target = teacher.features(batch(), [-1])[-1]
    expected = 0.1 * torch.nn.functional.smooth_l1_loss(out.features[2].reshape(-1, 8), target.reshape(-1, 8), beta=0.5)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    with pytest.raises(ConfigError, match=r"align.terms.0.objective_options=\{'bta': 0.5\}: .* takes the options beta"):
        check_align_config(AlignConfig(terms=[TermConfig(objective="smooth_l1", objective_options={"bta": 0.5})]), 1000)


@pytest.mark.parametrize("align, message", [
    (AlignConfig(objective="cosin"), r"align.objective='cosin' is not a registered objective; did you mean 'cosine'\? \(known: cca, cosine, logsum, mse"),
    (AlignConfig(terms=[TermConfig(projection="lin")]), r"align.terms.0.projection='lin' .*known: interpolate, linear, none"),
    (AlignConfig(terms=[TermConfig(), TermConfig(type="logit_kd", schedule="exp")]),
     r"align.terms.1.schedule='exp' .*known: constant, cosine, linear_decay, step"),
    (AlignConfig(method="rkd", terms=[TermConfig()]), r"align.terms and align.method='rkd' are both set"),
    (AlignConfig(lambda0=0.3, terms=[TermConfig()]), r"align.terms and align.lambda0=0.3 are both set"),
    (AlignConfig(terms=[TermConfig(type="logit_kd", projection="linear")]),
     r"align.terms.0.projection applies to feature terms only"),
    (AlignConfig(terms=[TermConfig(temperature=2.0)]), r"align.terms.0.temperature applies to logit_kd terms only"),
    (AlignConfig(terms=[TermConfig(stop_step=-1)]), r"align.terms.0.stop_step=-1 \(never stop\) needs schedule 'constant'"),
    (AlignConfig(terms=[TermConfig(type="logit_kd", stop_step=300)]), r"align.terms.0.stop_step=300 is beyond the run"),
    (AlignConfig(method="salt", n_kd=300), r"align.n_kd=300 is beyond the run"),
])
def test_config_errors_name_the_key_and_the_known_names(align, message):
    with pytest.raises(ConfigError, match=message):
        check_align_config(align, total_steps=250)


class PerSample(ToyStudent):
    logits_kind = "per_sample"


class FeaturesOnly(ToyTeacher):
    logits_kind = None


@pytest.mark.parametrize("align, student, teachers, message", [
    (AlignConfig(terms=[TermConfig(projection="none")]), ToyStudent(width=16), {"default": ToyTeacher(width=8)},
     r"align.terms.0.projection='none' but the student's width 16 differs"),
    (AlignConfig(terms=[TermConfig(early_layer=7)]), ToyStudent(depth=4), {"default": ToyTeacher()},
     r"align.terms.0.early_layer=7 is out of range"),
    (AlignConfig(terms=[TermConfig(pairs=[PairConfig(5, 1)])]), ToyStudent(), {"default": ToyTeacher()},
     r"align.terms.0.pairs.0.teacher_layer=5 is out of range"),
    (AlignConfig(pairs=[PairConfig(5, 1)]), ToyStudent(), {"default": ToyTeacher()},
     r"align.pairs.0.teacher_layer=5 is out of range"),
    (AlignConfig(terms=[TermConfig(), TermConfig(teacher="big")]), ToyStudent(), {"default": ToyTeacher()},
     r"align.terms.1.teacher='big' names no configured teacher \(known: default\)"),
    (AlignConfig(terms=[TermConfig(pairs=[PairConfig(-1, 1, teacher="big")])]), ToyStudent(), {"default": ToyTeacher()},
     r"align.terms.0.pairs.0.teacher='big' names no configured teacher"),
    (AlignConfig(method="rkd"), PerSample(), {"default": ToyTeacher()},
     r"align.method='rkd': logit KD needs logits of one kind, but teacher 'default' gives per_token logits and the student per_sample"),
    (AlignConfig(terms=[TermConfig(type="logit_kd")]), ToyStudent(), {"default": FeaturesOnly()},
     r"align.terms.0: logit KD, but teacher 'default' \(FeaturesOnly\) gives no logits"),
    (AlignConfig(), ToyStudent(depth=2), {"default": ToyTeacher()},
     r"align.early_layer is unset and the default early layer 3 .* beyond this 2-layer student: set align.early_layer \(1..2\)"),
    (AlignConfig(method="rkd"), ToyStudent(), {}, r"align.method='rkd' needs a teacher"),
])
def test_build_engine_checks_each_term_against_its_teacher(align, student, teachers, message):
    with pytest.raises(ConfigError, match=message):
        build_engine(align, student, teachers)


@pytest.mark.slow
def test_let_plus_a_short_logit_kd_phase_on_text_end_to_end(tmp_path, monkeypatch):
    from alignkit.adapters.hf_causal import HFCausalTeacher
    from alignkit.cli import main

    recipe = tmp_path / "let_kd.yaml"
    recipe.write_text((REPO / "configs" / "debug.yaml").read_text().replace(
        "align: {stop_step: 4, early_layer: 2}",
        "align:\n  terms:\n    - {type: feature, early_layer: 2, stop_step: 4}\n"
        "    - {type: logit_kd, temperature: 2.0, stop_step: 2}"))
    asked = []
    run = HFCausalTeacher.run
    monkeypatch.setattr(HFCausalTeacher, "run", lambda self, b, layers, logits=False: asked.append(logits) or run(self, b, layers, logits))
    assert main(["train", str(recipe), f"output_dir={tmp_path}", "run_name=r", "train.steps=6", "train.eval_every=0",
                 "--no-progress"]) == 0
    rows = [r for r in records(tmp_path / "r") if "loss" in r]
    assert [r["lambda"] > 0 for r in rows] == [True] * 4 + [False] * 2
    assert [r["kd_weight"] for r in rows] == [1.0, 1.0, 0.0, 0.0, 0.0, 0.0]
    assert all(r["kd"] > 0 for r in rows[:2]) and "kd" not in rows[2]
    assert [r["teacher_active"] for r in rows] == [True] * 4 + [False] * 2
    assert asked == [True, True, False, False]  # one teacher pass per step; logits only while KD runs


@pytest.mark.slow
def test_rkd_on_a_time_series_recipe_runs_end_to_end(tmp_path):
    pytest.importorskip("aeon")
    from alignkit.cli import main
    from test_ts_e2e import RECIPE, TINY

    torch.set_num_threads(1)
    overrides = [*TINY, "task.teacher_pretrain.steps=4", "train.steps=3", "train.eval_every=3", "align.method=rkd"]
    assert main(["train", RECIPE, f"output_dir={tmp_path}", "run_name=rkd", *overrides, "--no-progress"]) == 0
    rows = [r for r in records(tmp_path / "rkd") if "ce" in r]
    assert len(rows) == 3 and all(r["kd_weight"] == 1.0 and r["kd"] > 0 and r["teacher_active"] for r in rows)


def test_time_series_kd_is_over_per_sample_class_logits():
    pytest.importorskip("aeon")
    from alignkit.adapters.timesnet import TimesNetClassifier, TimesNetTeacher

    torch.manual_seed(0)
    student = TimesNetClassifier(num_channels=3, num_classes=4)
    teacher = TimesNetTeacher(TimesNetClassifier(num_channels=3, num_classes=4))
    engine = build_engine(AlignConfig(method="rkd", kd_temperature=2.0), student, {"default": teacher})
    mask = (torch.arange(10)[None] < torch.tensor([[10], [6]])).long()
    ts = {"x": torch.randn(2, 10, 3), "attention_mask": mask, "labels": torch.tensor([0, 3])}
    out = student(ts, [])
    loss, metrics = engine(out, ts, 0)
    _, teacher_logits = teacher.run(ts, [], logits=True)
    assert teacher_logits.shape == (2, 4) and teacher.logits_kind == "per_sample"
    assert loss.item() == pytest.approx(kd(out.logits, teacher_logits, None, 2.0).item(), rel=1e-6)
