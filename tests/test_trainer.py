"""The one trainer loop on a pure-torch toy: loss falls, exact resume, interruption,
teacher release, and 2 gloo processes == 1 process with the same global batch."""
import json
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file

from alignkit.core.callbacks import BestModel
from alignkit.core.config import AlignConfig, ConfigError, TrainConfig
from alignkit.core.distributed import cleanup, init_distributed
from alignkit.core.ema import WeightAverage
from alignkit.core.engine import build_engine
from alignkit.core.trainer import Trainer
from toys import ToyStudent, ToyTask, ToyTeacher


def make(tmp: Path, steps: int = 8, stop: int = 4, micro: int = 4, **train) -> tuple[Trainer, ToyTeacher]:
    student, teacher = ToyStudent(), ToyTeacher()
    engine = build_engine(AlignConfig(stop_step=stop, lambda0=0.5, early_layer=2), student, {"default": teacher})
    cfg = TrainConfig(steps=steps, micro_batch_size=micro, lr=1e-2, **{"eval_every": 0, **train})
    tmp.mkdir(parents=True, exist_ok=True)
    return Trainer(cfg=cfg, student=student, engine=engine, task=ToyTask(), run_dir=tmp, device=torch.device("cpu"),
                   progress=False), teacher


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def train_losses(run_dir: Path) -> list[float]:
    return [r["loss"] for r in records(run_dir) if "loss" in r]


def test_loss_falls_and_teacher_is_released(tmp_path):
    trainer, teacher = make(tmp_path, steps=30, stop=10)
    trainer.fit()
    losses = train_losses(tmp_path)
    assert len(losses) == 30 and losses[-1] < losses[0] - 0.5
    assert teacher.calls == 10 and teacher.released
    rows = records(tmp_path)
    assert rows[9]["lambda"] > 0 and rows[10]["lambda"] == 0 and not rows[10]["teacher_active"]
    assert {"nll", "lr", "tokens_per_s", "peak_mem_mb", "cos/t-1-s2", "grad_norm"} <= set(rows[0])
    assert (tmp_path / "final" / "model.safetensors").is_file()
    assert (tmp_path / "checkpoints" / "step_000030" / "optimizer.pt").is_file()


def test_teacher_seconds_are_logged_while_the_teacher_runs_and_zero_after(tmp_path):
    trainer, _ = make(tmp_path / "let", steps=8, stop=4, grad_accum=2)
    trainer.fit()
    rows = [r for r in records(tmp_path / "let") if "tokens_per_s" in r]
    tokens = [r["tokens"] for r in rows]
    seconds = [(t - previous) / r["tokens_per_s"] for r, t, previous in zip(rows, tokens, [0] + tokens)]
    assert all(0 < r["teacher_s"] < s for r, s in zip(rows[:4], seconds[:4]))  # a part of each step's time
    assert all(r["teacher_s"] == 0.0 and not r["teacher_active"] for r in rows[4:])  # released after step 4
    (tmp_path / "plain").mkdir()
    Trainer(cfg=TrainConfig(steps=2, micro_batch_size=4), student=ToyStudent(), engine=None, task=ToyTask(),
            run_dir=tmp_path / "plain", device=torch.device("cpu"), progress=False).fit()
    assert not any("teacher_s" in r for r in records(tmp_path / "plain"))  # no teacher, nothing to time


# "max" eval loss keeps the step-2 model: the selected weights differ from those at the resume point
@pytest.mark.parametrize("extra", [{}, {"ema_decay": 0.9}, {"eval_every": 2, "select_metric": "eval_loss", "select_mode": "max"}])
def test_resume_reproduces_uninterrupted_run_exactly(tmp_path, extra):
    full, _ = make(tmp_path / "full", save_every=3, grad_accum=2, **extra)
    full.fit()
    part, _ = make(tmp_path / "part", steps=8, save_every=3, grad_accum=2, **extra)
    part.cfg.steps = 5  # stop early (checkpoints at 3 and 5)...
    part.fit()
    (tmp_path / "part" / "checkpoints" / "step_000005").rename(tmp_path / "part" / "gone")  # ...keep step 3 only
    resumed, teacher = make(tmp_path / "part", save_every=3, grad_accum=2, **extra)
    resumed.resume(tmp_path / "part" / "checkpoints" / "step_000003")
    resumed.fit()
    assert train_losses(tmp_path / "part") == train_losses(tmp_path / "full")
    assert teacher.calls == 2  # step index 3 only (stop_step=4), two micro-batches; then released
    a = torch.load(tmp_path / "full" / "checkpoints" / "step_000008" / "optimizer.pt", weights_only=True)
    b = torch.load(tmp_path / "part" / "checkpoints" / "step_000008" / "optimizer.pt", weights_only=True)
    assert torch.equal(a["state"][0]["exp_avg"], b["state"][0]["exp_avg"])
    exported = [load_file(str(tmp_path / run / "final" / "model.safetensors")) for run in ("full", "part")]
    assert all(torch.equal(exported[0][k], exported[1][k]) for k in exported[0])


def test_ema_weights_are_evaluated_and_exported(tmp_path):
    trainer, _ = make(tmp_path, steps=12, ema_decay=0.8)
    initial = trainer.student.state_dict()["head.weight"].clone()
    seen = []
    evaluate = trainer.task.evaluate
    trainer.task.evaluate = lambda student, device: seen.append(student.state_dict()["head.weight"].clone()) or evaluate(student, device)
    trainer.fit()
    ema = trainer.callback(WeightAverage)
    shadow = ema.shadow["head.weight"]
    assert ema.updates == 12 and torch.equal(seen[-1], shadow)  # the final eval saw the average
    assert not torch.equal(shadow, initial)  # the average follows the training
    exported = load_file(str(tmp_path / "final" / "model.safetensors"))
    raw = load_file(str(tmp_path / "checkpoints" / "step_000012" / "state.safetensors"))
    assert torch.equal(exported["head.weight"], shadow)
    assert not torch.equal(raw["student.head.weight"], shadow)  # the checkpoint keeps the trained weights
    with pytest.raises(ValueError, match="ema_decay"):
        make(tmp_path / "bad", ema_decay=1.0)


def test_resume_after_release_releases_the_teacher(tmp_path):
    first, _ = make(tmp_path, steps=6, stop=2, save_every=6)
    first.fit()
    again, teacher = make(tmp_path, steps=8, stop=2)
    again.resume(tmp_path / "checkpoints" / "step_000006")
    again.fit()
    assert teacher.calls == 0 and teacher.released


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _ddp_worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    info = init_distributed("cpu")
    torch.manual_seed(0)
    student, teacher = ToyStudent(), ToyTeacher()
    engine = build_engine(AlignConfig(stop_step=2, early_layer=2, projection="linear"), student, {"default": teacher})
    cfg = TrainConfig(steps=4, micro_batch_size=2, lr=1e-2, eval_every=0)
    Trainer(cfg=cfg, student=student, engine=engine, task=ToyTask(rank=rank, world_size=world), run_dir=Path(out),
            device=torch.device("cpu"), dist=info, progress=False).fit()
    cleanup()


@pytest.mark.dist
def test_two_gloo_processes_match_one_process(tmp_path):
    torch.manual_seed(0)  # the learned projection's init, as in each worker
    student, teacher = ToyStudent(), ToyTeacher()
    engine = build_engine(AlignConfig(stop_step=2, early_layer=2, projection="linear"), student, {"default": teacher})
    cfg = TrainConfig(steps=4, micro_batch_size=4, lr=1e-2, eval_every=0)
    (tmp_path / "one").mkdir()
    Trainer(cfg=cfg, student=student, engine=engine, task=ToyTask(), run_dir=tmp_path / "one", device=torch.device("cpu"),
            progress=False).fit()
    (tmp_path / "two").mkdir()
    mp.spawn(_ddp_worker, args=(2, _free_port(), str(tmp_path / "two")), nprocs=2, join=True)
    one, two = train_losses(tmp_path / "one"), train_losses(tmp_path / "two")
    assert len(two) == 4
    assert one == pytest.approx(two, rel=1e-5)


@pytest.mark.parametrize("tiebreak, expected", [("", 1), ("val_loss", 2)])
def test_best_model_selection_with_tiebreak(tmp_path, tiebreak, expected):
    trainer, _ = make(tmp_path, select_metric="val_accuracy", select_tiebreak=tiebreak)
    weight = next(trainer.student.parameters())
    for marker, (accuracy, loss) in enumerate([(0.5, 0.9), (0.9, 0.4), (0.9, 0.1), (0.8, 0.0)]):
        with torch.no_grad():
            weight.fill_(marker)
        trainer.callback(BestModel).on_eval(trainer, {"val_accuracy": accuracy, "val_loss": loss})
    # the first eval with the top accuracy wins, unless a later equal one has a lower loss
    best = trainer.callback(BestModel).best
    assert best[0][0] == 0.9 and float(next(iter(best[1].values())).flatten()[0]) == expected
    with pytest.raises(ConfigError, match="select_tiebreak"):
        other = make(tmp_path / "x", select_metric="val_accuracy", select_tiebreak="nope")[0]
        other.callback(BestModel).on_eval(other, {"val_accuracy": 1.0})
