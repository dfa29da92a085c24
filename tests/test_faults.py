"""Fault injection: an interruption at every phase of a step, by signal and by exception, for
1 and 2 processes, must resume to exactly the uninterrupted run; a kill -9 during a save, a
full disk and a read-only folder lose no earlier checkpoint; a second run on a busy folder is
refused."""
import errno
import json
import multiprocessing
import os
import signal
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file

from alignkit.core import checkpoint as ckpt
from alignkit.core.config import AlignConfig, TrainConfig
from alignkit.core.distributed import cleanup, init_distributed
from alignkit.core.engine import build_engine
from alignkit.core.errors import CheckpointError, Interrupted, RunDirError
from alignkit.core.folder_lock import FolderLock
from alignkit.core.trainer import Trainer
from toys import ToyStudent, ToyTask, ToyTeacher

PHASES = ("data", "forward", "backward", "after_step", "eval", "save")
TIMING = ("tokens_per_s", "peak_mem_mb")


def make(run_dir: Path, rank: int = 0, world: int = 1, info=None, micro: int = 4) -> Trainer:
    torch.manual_seed(0)  # the learned projection's init
    student, teacher = ToyStudent(), ToyTeacher()
    engine = build_engine(AlignConfig(stop_step=5, lambda0=0.5, early_layer=2, projection="linear"), student, {"default": teacher})
    cfg = TrainConfig(steps=9, micro_batch_size=micro, grad_accum=2, lr=1e-2, eval_every=2, save_every=3,
                      ema_decay=0.8, select_metric="eval_loss", select_mode="min")
    run_dir.mkdir(parents=True, exist_ok=True)
    kwargs = {"dist": info} if info is not None else {}
    return Trainer(cfg=cfg, student=student, engine=engine, task=ToyTask(rank=rank, world_size=world), run_dir=run_dir,
                   device=torch.device("cpu"), progress=False, **kwargs)


def inject(trainer: Trainer, phase: str, how: str, at_step: int = 4) -> None:
    """Arm one interruption in ``phase`` of the first step (or eval/save) at or after ``at_step``."""
    fired = []

    def fire() -> None:
        if fired or trainer.step < at_step:
            return
        fired.append(phase)
        if how == "exception":
            raise KeyboardInterrupt
        os.kill(os.getpid(), signal.SIGTERM if how == "sigterm" else signal.SIGINT)

    def wrap(owner, name):
        original = getattr(owner, name)

        def wrapped(*args, **kwargs):
            if phase == "after_step":
                out = original(*args, **kwargs)
                fire()
                return out
            fire()
            return original(*args, **kwargs)

        setattr(owner, name, wrapped)

    if phase == "data":
        batches = trainer.task.train_batches
        trainer.task.train_batches = lambda micro: (fire() or batch for batch in batches(micro))
    elif phase == "forward":
        wrap(trainer.student, "forward")
    elif phase == "backward":
        trainer.student.head.weight.register_hook(lambda grad: fire() or grad)
    elif phase == "after_step":
        wrap(trainer.optimizer, "step")
    elif phase == "eval":
        wrap(trainer.task, "evaluate")
    elif phase == "save":
        wrap(trainer.task, "export")


def records(run_dir: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in row.items() if k not in TIMING} for row in rows]


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "final" / "model.safetensors"))


def interrupt_and_resume(run_dir: Path, phase: str, how: str, **kwargs) -> int:
    trainer = make(run_dir, **kwargs)
    inject(trainer, phase, how)
    with pytest.raises(Interrupted) as stopped:
        trainer.fit()
    resumed = make(run_dir, **kwargs)
    assert resumed.resume_latest() is not None
    resumed.fit()
    return stopped.value.exit_code


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("reference")
    make(run_dir).fit()
    return run_dir


@pytest.mark.parametrize("how", ["exception", "sigterm"])
@pytest.mark.parametrize("phase", PHASES)
def test_interruption_in_any_phase_resumes_exactly(tmp_path, reference, phase, how):
    code = interrupt_and_resume(tmp_path, phase, how)
    assert code == (143 if how == "sigterm" else 130)
    assert records(tmp_path) == records(reference)
    ref = final_weights(reference)
    assert all(torch.equal(ref[k], v) for k, v in final_weights(tmp_path).items())


def test_signal_leaves_previous_handlers_in_place(tmp_path):
    before = signal.getsignal(signal.SIGTERM)
    make(tmp_path).fit()
    assert signal.getsignal(signal.SIGTERM) is before


def _fault_worker(rank: int, world: int, port: int, root: str, phase: str, how: str, only_rank: int) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    info = init_distributed("cpu")
    make(Path(root) / "full", rank, world, info, micro=2).fit()
    trainer = make(Path(root) / "cut", rank, world, info, micro=2)
    if only_rank < 0 or rank == only_rank:
        inject(trainer, phase, how)
    try:
        trainer.fit()
        raise AssertionError("not interrupted")
    except Interrupted as stopped:
        (Path(root) / f"code{rank}").write_text(str(stopped.exit_code))
    resumed = make(Path(root) / "cut", rank, world, info, micro=2)
    resumed.resume_latest()
    resumed.fit()
    cleanup()


# a signal to one rank stops both (they agree at the step boundary); an exception is raised
# on both ranks at the same point, as a Ctrl-C in the terminal reaches the whole process group
@pytest.mark.dist
@pytest.mark.parametrize("phase, how, only_rank", [
    ("forward", "sigterm", 1), ("eval", "sigint", 0), ("after_step", "exception", -1), ("save", "exception", -1),
])
def test_two_processes_resume_exactly(tmp_path, phase, how, only_rank):
    from test_trainer import _free_port

    mp.spawn(_fault_worker, args=(2, _free_port(), str(tmp_path), phase, how, only_rank), nprocs=2, join=True)
    assert records(tmp_path / "cut") == records(tmp_path / "full")
    full, cut = final_weights(tmp_path / "full"), final_weights(tmp_path / "cut")
    assert all(torch.equal(full[k], v) for k, v in cut.items())
    expected = {"sigterm": "143", "sigint": "130", "exception": "130"}[how]
    assert [(tmp_path / f"code{r}").read_text() for r in (0, 1)] == [expected, expected]


def _killed_in_save(run_dir: str) -> None:
    trainer = make(Path(run_dir))
    export = trainer.task.export

    def die_in_second_save(student, directory):
        if trainer.step == 6:
            os.kill(os.getpid(), signal.SIGKILL)
        export(student, directory)

    trainer.task.export = die_in_second_save
    trainer.fit()


def test_kill_9_during_save_keeps_the_previous_checkpoint(tmp_path, reference):
    process = multiprocessing.get_context("spawn").Process(target=_killed_in_save, args=(str(tmp_path),))
    process.start()
    process.join(120)
    assert process.exitcode == -signal.SIGKILL
    assert [p.name for p in ckpt.checkpoint_dirs(tmp_path)] == ["step_000003"]
    assert (tmp_path / "checkpoints" / ".tmp_step_000006").is_dir()
    resumed = make(tmp_path)
    with pytest.warns(UserWarning, match="never finished"):
        assert resumed.resume_latest().name == "step_000003"
    assert not (tmp_path / "checkpoints" / ".tmp_step_000006").exists()
    resumed.fit()
    assert records(tmp_path) == records(reference)


@pytest.mark.parametrize("failure", [OSError(errno.ENOSPC, "No space left on device"), RuntimeError("unexpected pos 4096 vs 0"),
                                     PermissionError(errno.EROFS, "Read-only file system")])
def test_failed_checkpoint_write_is_one_clear_error_and_keeps_earlier_ones(tmp_path, monkeypatch, failure):
    trainer = make(tmp_path)
    trainer.cfg.steps = 7
    original = ckpt.save_main_state

    def failing(directory, *args):
        if trainer.step == 6:
            if isinstance(failure, RuntimeError):  # torch's report of a full disk: ask the disk
                monkeypatch.setattr(ckpt.shutil, "disk_usage", lambda _: SimpleNamespace(free=0))
            raise failure
        original(directory, *args)

    monkeypatch.setattr(ckpt, "save_main_state", failing)
    with pytest.raises(CheckpointError) as err:
        trainer.fit()
    message = str(err.value)
    assert "\n" not in message and "earlier checkpoints are kept" in message
    reason = "the folder is not writable" if isinstance(failure, PermissionError) else "no space left on device"
    assert reason in message
    assert [p.name for p in ckpt.checkpoint_dirs(tmp_path)] == ["step_000003"]
    assert not list((tmp_path / "checkpoints").glob(".tmp_*"))


def test_corrupt_newest_checkpoint_falls_back_to_the_previous(tmp_path, reference):
    trainer = make(tmp_path)
    trainer.cfg.steps = 6
    trainer.fit()
    (tmp_path / "checkpoints" / "step_000006" / "state.safetensors").write_bytes(b"\x00garbage")
    with open(tmp_path / "metrics.jsonl", "a") as handle:  # a kill in the middle of a log line
        handle.write('{"step": 7, "lo')
    resumed = make(tmp_path)
    with pytest.warns(UserWarning) as caught:
        assert resumed.resume_latest().name == "step_000003"
    notes = " ".join(str(w.message) for w in caught)
    assert "state.safetensors" in notes and "metrics.jsonl:" in notes
    resumed.fit()
    assert records(tmp_path) == records(reference)


def test_checkpoints_are_ordered_by_step_not_by_name(tmp_path):
    for step in (999_000, 1_000_000, 998_000):
        folder = tmp_path / "checkpoints" / f"step_{step:06d}"
        folder.mkdir(parents=True)
        (folder / "trainer.json").write_text("{}")
    assert ckpt.latest_checkpoint(tmp_path).name == "step_1000000"
    staging = ckpt.staging_dir(tmp_path, 1_001_000)
    (staging / "trainer.json").write_text("{}")
    ckpt.publish(staging, tmp_path, 1_001_000, keep=2)
    assert [p.name for p in ckpt.checkpoint_dirs(tmp_path)] == ["step_1000000", "step_1001000"]


def test_a_busy_folder_is_refused_naming_its_holder(tmp_path):
    with FolderLock(tmp_path):
        with pytest.raises(RunDirError, match=f"in use by pid {os.getpid()}"):
            FolderLock(tmp_path).acquire()
    with FolderLock(tmp_path):  # released: free again (a dead holder's flock is gone too)
        pass


def test_a_one_process_run_never_reads_a_planted_sharded_folder(tmp_path, monkeypatch):
    """DCP's metadata is a pickle: only a run that is itself sharded may read sharded/, and a
    checkpoint's own trainer.json says how it was written."""
    trainer = make(tmp_path)
    trainer.cfg.steps = 3
    trainer.fit()
    checkpoint = ckpt.checkpoint_path(tmp_path, 3)
    (checkpoint / ckpt.SHARDED).mkdir()
    (checkpoint / ckpt.SHARDED / ".metadata").write_bytes(b"not a pickle anyone should load")
    monkeypatch.setattr(ckpt.dcp, "load", lambda *a, **k: pytest.fail("DCP was asked to load"))
    resumed = make(tmp_path)
    assert resumed.resume_latest() == checkpoint and resumed.step == 3
    assert json.loads((checkpoint / "trainer.json").read_text())["sharded"] is False
    record = json.loads((checkpoint / "trainer.json").read_text()) | {"sharded": True}
    (checkpoint / "trainer.json").write_text(json.dumps(record))
    with pytest.raises(CheckpointError, match="written with train.parallel=fsdp"):
        make(tmp_path).resume(checkpoint)
