"""Trainer callbacks and the optimizer / LR schedule from config: a user callback sees every
hook in order with the right step and its checkpoint state round-trips; the loggers
(``train.loggers``: jsonl, tensorboard or the error when it is missing); the optimizer and LR
schedule choices, and errors naming the key for unknown ones."""
import importlib.util
import json
import os
import signal
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from alignkit.core.callbacks import Callback
from alignkit.core.config import ConfigError, TrainConfig
from alignkit.core.errors import Interrupted, MissingPackage
from alignkit.core.optim import build_lr_schedule
from alignkit.core.trainer import Trainer, config_problems
from alignkit.experiment import load_experiment
from alignkit.plugins import load_plugins
from toys import ToyStudent, ToyTask

HAS_TENSORBOARD = importlib.util.find_spec("tensorboard") is not None
HAS_WANDB = importlib.util.find_spec("wandb") is not None


def make(run_dir: Path, callbacks=(), **train) -> Trainer:
    cfg = TrainConfig(**{"steps": 4, "micro_batch_size": 4, "lr": 1e-2, "eval_every": 0, **train})
    run_dir.mkdir(parents=True, exist_ok=True)
    return Trainer(cfg=cfg, student=ToyStudent(), engine=None, task=ToyTask(), run_dir=run_dir,
                   device=torch.device("cpu"), progress=False, callbacks=callbacks)


class Recorder(Callback):
    """Writes down every hook call with the trainer's step, and keeps state in checkpoints."""

    def __init__(self, stop_at: int = 0) -> None:
        self.events: list[tuple] = []
        self.stop_at = stop_at

    def on_fit_start(self, trainer):
        self.events.append(("fit_start", trainer.step))

    def on_step_begin(self, trainer):
        self.events.append(("step_begin", trainer.step))

    def on_step_end(self, trainer, record):
        self.events.append(("step_end", trainer.step, record and (record["step"], "tokens_per_s" in record)))
        if trainer.step == self.stop_at:
            os.kill(os.getpid(), signal.SIGTERM)  # a callback may stop the run: it ends at this step

    @contextmanager
    def eval_weights(self, trainer):
        self.events.append(("eval_weights", trainer.step))
        yield
        self.events.append(("eval_weights_done", trainer.step))

    def on_eval(self, trainer, results):
        self.events.append(("eval", trainer.step, sorted(results)))

    def on_save(self, trainer, directory, state):
        self.events.append(("save", trainer.step, directory.name))
        state["recorder_saves"] = sum(event[0] == "save" for event in self.events)
        (directory / "recorder.txt").write_text(str(trainer.step))

    def on_load(self, trainer, directory, state):
        self.events.append(("load", trainer.step, state["recorder_saves"], (directory / "recorder.txt").read_text()))

    def on_interrupt(self, trainer, checkpoint):
        self.events.append(("interrupt", trainer.step, checkpoint.name))

    def on_fit_end(self, trainer, results):
        self.events.append(("fit_end", trainer.step, sorted(results)))


def test_a_user_callback_sees_every_hook_in_order(tmp_path):
    recorder = Recorder()
    make(tmp_path, [recorder], eval_every=2, save_every=2, log_every=2).fit()
    step = lambda n, logged: [("step_begin", n - 1), ("step_end", n, (n, True) if logged else None)]  # noqa: E731
    boundary = lambda n: [("eval_weights", n), ("eval", n, ["eval_loss"]), ("eval_weights_done", n),  # noqa: E731
                          ("save", n, f".tmp_step_{n:06d}")]
    assert recorder.events == [("fit_start", 0), *step(1, False), *step(2, True), *boundary(2),
                               *step(3, False), *step(4, True), *boundary(4), ("fit_end", 4, ["eval_loss"])]

    resumed = Recorder(stop_at=3)
    trainer = make(tmp_path, [resumed], steps=6, eval_every=2, save_every=2, log_every=2)
    trainer.resume(tmp_path / "checkpoints" / "step_000002")
    with pytest.raises(Interrupted):
        trainer.fit()
    assert resumed.events == [("load", 2, 1, "2"), ("fit_start", 2), *step(3, False),
                              ("save", 3, ".tmp_step_000003"), ("interrupt", 3, "step_000003")]


def test_jsonl_is_the_default_logger_and_unknown_loggers_are_refused(tmp_path):
    make(tmp_path / "default").fit()
    rows = [json.loads(line) for line in (tmp_path / "default" / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [1, 2, 3, 4, 4]  # four steps and the final eval
    make(tmp_path / "none", loggers=[]).fit()
    assert not (tmp_path / "none" / "metrics.jsonl").exists()
    load_plugins()  # registers every built-in logger
    with pytest.raises(ConfigError, match=r"train.loggers='wandbb' is not a registered logger; did you mean 'wandb'\?"):
        make(tmp_path / "bad", loggers=["jsonl", "wandbb"])


@pytest.mark.skipif(HAS_TENSORBOARD, reason="tensorboard is installed (its logger is tested instead)")
def test_tensorboard_without_the_package_is_a_clear_error(tmp_path):
    with pytest.raises(MissingPackage, match="train.loggers names 'tensorboard'.*pip install tensorboard"):
        make(tmp_path, loggers=["jsonl", "tensorboard"])


@pytest.mark.skipif(not HAS_TENSORBOARD, reason="needs the tensorboard package")
def test_tensorboard_logs_train_and_eval_scalars_and_purges_on_resume(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    make(tmp_path, loggers=["jsonl", "tensorboard"], save_every=2).fit()
    again = make(tmp_path, loggers=["jsonl", "tensorboard"], save_every=2)
    again.resume(tmp_path / "checkpoints" / "step_000002")
    again.fit()  # steps 3 and 4 again: their first events are purged, not duplicated
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("train/loss")] == [1, 2, 3, 4]
    assert [e.step for e in events.Scalars("eval/eval_loss")] == [4]
    assert {"train/lr", "train/tokens_per_s", "train/grad_norm"} <= set(events.Tags()["scalars"])


def test_wandb_without_the_package_names_the_extra(tmp_path, monkeypatch):
    load_plugins()
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb now raises ImportError
    with pytest.raises(MissingPackage, match=r"train.loggers names 'wandb'.*pip install 'alignkit\[wandb\]'"):
        make(tmp_path, loggers=["jsonl", "wandb"])


@pytest.mark.skipif(not HAS_WANDB, reason="needs the wandb package (the test extra installs it)")
def test_wandb_offline_run_holds_the_config_the_metrics_and_the_final_table(tmp_path, monkeypatch):
    load_plugins()
    monkeypatch.delenv("WANDB_MODE", raising=False)  # offline is the default: no network, no login
    for name in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(name, str(tmp_path / "home"))
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text("run_name: marker-7f3a\ntrain: {steps: 4}\n")  # what a run folder holds
    results = make(run_dir, loggers=["jsonl", "wandb"], eval_every=2).fit()
    [offline_run] = (run_dir / "wandb").glob("offline-run-*")
    keys = (b"marker-7f3a", b"train/loss", b"train/lr", b"eval/eval_loss")  # protobuf records: keys appear as text
    deadline = time.monotonic() + 30  # wandb >= 0.31 writes from its own process: finish() can return before the last flush
    tables = offline_run / "files" / "media" / "table"
    while time.monotonic() < deadline:
        missing = [k for k in keys if k not in next(offline_run.glob("run-*.wandb")).read_bytes()]
        if not missing and any(tables.glob("final_results_*.table.json")):
            break
        time.sleep(0.2)
    assert not missing
    [table] = tables.glob("final_results_*.table.json")
    rows = json.loads(table.read_text())["data"]
    assert {name: value for name, value in rows} == pytest.approx({k: v for k, v in results.items()})


@pytest.mark.parametrize("name, kind", [("adamw", torch.optim.AdamW), ("adam", torch.optim.Adam), ("sgd", torch.optim.SGD)])
def test_optimizer_from_config(tmp_path, name, kind):
    trainer = make(tmp_path, optimizer=name, betas=(0.8, 0.99), steps=6)
    optimizer = trainer.optimizer
    assert type(optimizer) is kind
    assert [group["weight_decay"] for group in optimizer.param_groups] == [0.01, 0.0]  # none on norms and biases
    assert all(p.ndim == 1 for p in optimizer.param_groups[1]["params"])
    assert optimizer.defaults["momentum" if name == "sgd" else "betas"] == (0.8 if name == "sgd" else (0.8, 0.99))
    before = [p.detach().clone() for p in trainer.params]
    trainer.fit()
    assert all(not torch.equal(a, b) for a, b in zip(before, trainer.params))


def test_lr_schedules_by_hand():
    def lr(name: str, **cfg):
        return build_lr_schedule(TrainConfig(lr=1.0, steps=100, lr_schedule=name, **cfg))  # 10 warmup steps

    for name in ("warmup_cosine", "warmup_linear", "constant"):
        schedule = lr(name)
        assert schedule(0) == pytest.approx(0.1) and schedule(9) == schedule(10) == pytest.approx(1.0)  # warmup
    assert lr("warmup_cosine")(55) == pytest.approx(0.1 + 0.9 * 0.5)
    assert lr("warmup_cosine")(100) == lr("warmup_linear")(100) == pytest.approx(0.1)  # min_lr_ratio
    assert lr("warmup_linear")(28) == pytest.approx(0.1 + 0.9 * 0.8)
    assert lr("constant")(100) == 1.0 and lr("constant", warmup_ratio=0.0)(0) == 1.0


def test_logged_lr_follows_the_configured_schedule_and_unknown_names_are_refused(tmp_path):
    make(tmp_path, lr_schedule="constant", warmup_ratio=0.0).fit()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [row["lr"] for row in rows if "lr" in row] == [1e-2] * 4
    with pytest.raises(ConfigError, match=r"train.optimizer='lion' is not a registered optimizer \(known: adam, adamw, sgd"):
        make(tmp_path, optimizer="lion")
    with pytest.raises(ConfigError, match=r"train.lr_schedule='cosine' is not a registered learning-rate schedule; "
                                          r"did you mean 'warmup_cosine'\? \(known: "
                                          r"constant, warmup_cosine, warmup_linear"):
        make(tmp_path, lr_schedule="cosine")
    bad = TrainConfig(optimizer="lion", lr_schedule="cosine", loggers=["jsonl", "mlflow"])
    assert [p.split("=")[0] for p in config_problems(bad, "task.teacher_pretrain")] == [
        "task.teacher_pretrain.optimizer", "task.teacher_pretrain.lr_schedule", "task.teacher_pretrain.loggers"]
    with pytest.raises(ConfigError, match="task.teacher_pretrain.optimizer='lion'"):  # train and check refuse it at load
        load_experiment(None, ["task.name=ts_classify", "task.teacher_pretrain.optimizer=lion"])
    problems = config_problems(TrainConfig(loggers=["jsonl", "tensorboard"]))
    assert problems == ([] if HAS_TENSORBOARD else ["train.loggers names 'tensorboard', which needs the tensorboard "
                                                    "package (pip install tensorboard)"])
