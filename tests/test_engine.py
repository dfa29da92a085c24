"""The alignment engine: pairing, loss composition, teacher lifecycle, methods, the teachers' timer."""
import pytest
import torch

from alignkit.core.config import AlignConfig, ConfigError, PairConfig
from alignkit.core.engine import build_engine, check_align_config
from alignkit.core.objectives import cosine, kd
from alignkit.core.pairing import strategy_pairs
from alignkit.core.projections import interpolate
from alignkit.core.timing import SectionTimer
from toys import ToyStudent, ToyTeacher


def batch():
    ids = torch.randint(0, 32, (2, 6), generator=torch.Generator().manual_seed(3))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def test_strategies_pick_paper_layers():
    assert [(p.teacher_layer, p.student_layer) for p in strategy_pairs("L2E", 30, 24)] == [(-1, 3)]
    assert strategy_pairs("L2M", 30, 24)[0].student_layer == 12
    assert strategy_pairs("L2L", 30, 24)[0].student_layer == -1
    assert strategy_pairs("M2E", 30, 24)[0].teacher_layer == 15
    assert (strategy_pairs("M2L", 30, 24)[0].teacher_layer, strategy_pairs("M2L", 30, 24)[0].student_layer) == (15, -1)
    with pytest.raises(ValueError, match="align.strategy"):
        strategy_pairs("X2Y", 30, 24)


def test_let_loss_is_lambda_times_cosine_of_interpolated_features():
    student, teacher = ToyStudent(width=16), ToyTeacher(width=8)
    engine = build_engine(AlignConfig(lambda0=0.5, stop_step=10, early_layer=2), student, {"default": teacher})
    b = batch()
    out = student(b, engine.student_layers(4))
    loss, metrics = engine(out, b, step=4)
    t = teacher.features(b, [-1])[-1]
    expected = 0.5 * (10 - 4) / 10 * cosine(interpolate(out.features[2], 8), t)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert metrics["lambda"].item() == pytest.approx(0.3)
    assert metrics["cos/t-1-s2"].item() == pytest.approx(-cosine(interpolate(out.features[2], 8), t).item(), rel=1e-5)


def test_teacher_is_not_called_after_stop_and_is_released():
    student, teacher = ToyStudent(), ToyTeacher()
    engine = build_engine(AlignConfig(stop_step=3), student, {"default": teacher})
    b = batch()
    for step in range(6):
        out = student(b, engine.student_layers(step))
        engine(out, b, step)
        engine.after_step(step)
    assert teacher.calls == 3
    assert teacher.released and teacher.net is None and engine.released
    assert engine.student_layers(5) == []


def test_the_teachers_timer_on_cuda_reads_finished_events_only_and_waits_only_when_read(monkeypatch):
    # a fake stream: ms of work queued and finished; reading an unfinished event fails, as on a GPU
    gpu = {"queued": 0.0, "done": 0.0, "waits": 0}

    class Event:
        def __init__(self, enable_timing: bool) -> None:
            assert enable_timing

        def record(self, stream) -> None:
            self.at = gpu["queued"]

        def query(self) -> bool:
            return self.at <= gpu["done"]

        def synchronize(self) -> None:
            gpu["waits"] += 1
            gpu["done"] = max(gpu["done"], self.at)

        def elapsed_time(self, end: "Event") -> float:
            assert self.query() and end.query(), "read before the GPU got there"
            return end.at - self.at

    monkeypatch.setattr(torch.cuda, "Event", Event)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device: None)
    timer = SectionTimer()
    for _ in range(4):  # micro-batches
        with timer.measure(torch.device("cuda")):
            gpu["queued"] += 40.0  # the teacher's kernels
        gpu["queued"] += 100.0  # the student's
        gpu["done"] = 150.0  # the GPU lags: only the first section has finished
    assert gpu["waits"] == 0  # the step never waits on the timer
    assert timer.read() == pytest.approx(0.16) and gpu["waits"] == 1  # 4 x 40 ms
    assert timer.read() == 0.0


def test_layer_out_of_range_names_the_key():
    student, teacher = ToyStudent(depth=4), ToyTeacher()
    cfg = AlignConfig(pairs=[PairConfig(teacher_layer=-1, student_layer=9)])
    with pytest.raises(ValueError, match=r"align.pairs.0.student_layer=9"):
        build_engine(cfg, student, {"default": teacher})
    cfg = AlignConfig(pairs=[PairConfig(teacher_layer=7, student_layer=1)])
    with pytest.raises(ValueError, match=r"align.pairs.0.teacher_layer=7"):
        build_engine(cfg, student, {"default": teacher})


def test_projection_none_with_different_widths_is_an_error():
    with pytest.raises(ValueError, match="align.projection='none'"):
        build_engine(AlignConfig(projection="none"), ToyStudent(width=16), {"default": ToyTeacher(width=8)})


def test_stop_step_beyond_run_names_the_key():
    with pytest.raises(ConfigError, match="align.stop_step=1500 is beyond the run"):
        check_align_config(AlignConfig(stop_step=1500), total_steps=100)
    with pytest.raises(ConfigError, match="align.n_kd"):
        check_align_config(AlignConfig(method="salt", n_kd=500), total_steps=100)
    check_align_config(AlignConfig(method="rkd", stop_step=10**6), total_steps=100)  # rkd never stops


def test_multiple_pairs_and_teachers():
    student = ToyStudent()
    teachers = {"default": ToyTeacher(), "other": ToyTeacher(depth=2, width=4)}
    cfg = AlignConfig(pairs=[PairConfig(-1, 1, 1.0), PairConfig(1, 3, 0.5, "other")], stop_step=5)
    engine = build_engine(cfg, student, teachers)
    b = batch()
    out = student(b, engine.student_layers(0))
    loss, metrics = engine(out, b, 0)
    assert {"cos/t-1-s1", "cos/other:t1-s3"} <= set(metrics)
    assert loss.requires_grad


def test_salt_switches_kd_off_exactly_at_n_kd():
    student, teacher = ToyStudent(), ToyTeacher()
    engine = build_engine(AlignConfig(method="salt", n_kd=3, stop_step=3), student, {"default": teacher})
    b = batch()
    weights = []
    for step in range(5):
        out = student(b, engine.student_layers(step))
        loss, metrics = engine(out, b, step)
        weights.append(metrics.get("kd_weight", torch.tensor(0.0)).item())
        engine.after_step(step)
    assert weights == [1.0, 1.0, 1.0, 0.0, 0.0]
    assert teacher.calls == 3 and teacher.released


@pytest.mark.parametrize("method", ["rkd", "salt"])
def test_kd_methods_with_zero_weight_equal_plain_training(method):
    student, teacher = ToyStudent(), ToyTeacher()
    engine = build_engine(AlignConfig(method=method, kd_weight=0.0, stop_step=3), student, {"default": teacher})
    b = batch()
    out = student(b, engine.student_layers(0))
    loss, _ = engine(out, b, 0)
    assert loss.item() == 0.0 and teacher.calls == 0 and engine.student_layers(0) == []


def test_rkd_loss_is_kd_of_teacher_logits():
    student, teacher = ToyStudent(), ToyTeacher()
    engine = build_engine(AlignConfig(method="rkd", kd_weight=0.7, kd_temperature=2.0), student, {"default": teacher})
    b = batch()
    out = student(b, [])
    loss, _ = engine(out, b, 0)
    _, teacher_logits = ToyTeacher().run(b, [], logits=True)
    assert loss.item() == pytest.approx(0.7 * kd(out.logits, teacher_logits, None, 2.0).item(), rel=1e-6)


def test_method_none_builds_no_engine():
    assert build_engine(AlignConfig(method="none"), ToyStudent(), {}) is None
