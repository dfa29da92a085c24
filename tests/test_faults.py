"""Fault injection: an interruption at every phase of a step, by signal and by exception, for
1 and 2 processes, must resume to exactly the uninterrupted run; a kill -9 during a save, a
full disk and a read-only folder lose no earlier checkpoint; a second run on a busy folder is
refused."""
import errno
import json
import multiprocessing
import os
import sys
import shutil
import signal
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file

from alignkit.core import checkpoint as ckpt
from alignkit.core import checkpoint_integrity as integrity
from alignkit.core.config import AlignConfig, TrainConfig
from alignkit.core.distributed import cleanup, init_distributed
from alignkit.core.engine import build_engine
from alignkit.core.errors import CheckpointError, Interrupted, RunDirError
from alignkit.core.folder_lock import FolderLock
from alignkit.core.trainer import Trainer
from toys import ToyStudent, ToyTask, ToyTeacher

PHASES = ("data", "forward", "backward", "after_step", "eval", "save")
TIMING = ("tokens_per_s", "peak_mem_mb", "teacher_s")


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
    # everything is on disk: skip the interpreter's teardown, where a c10d thread was once seen to
    # abort the process ("terminate called without an active exception") after a finished run
    sys.stdout.flush()
    os._exit(0)


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
    with pytest.warns(UserWarning, match=r"sharded/\.metadata is not in the manifest"):  # a file it never wrote
        assert make(tmp_path).resume_latest() is None
    shutil.rmtree(checkpoint / ckpt.SHARDED)
    resumed = make(tmp_path)
    assert resumed.resume_latest() == checkpoint and resumed.step == 3
    assert json.loads((checkpoint / "trainer.json").read_text())["sharded"] is False
    record = json.loads((checkpoint / "trainer.json").read_text()) | {"sharded": True}
    (checkpoint / "trainer.json").write_text(json.dumps(record))
    integrity.write_manifest(checkpoint, [integrity.digests(checkpoint)])  # the flag, not the checksum, refuses
    with pytest.raises(CheckpointError, match="written with train.parallel=fsdp"):
        make(tmp_path).resume(checkpoint)


# ------------------------------------------------------------------ corruption soak (issue 22)

SOAK_SEED, SOAK_TRIALS = 0, 40


def damage(path: Path, rng) -> str:
    """One random bit flip or truncation of ``path``, chosen by ``rng``."""
    raw = bytearray(path.read_bytes())
    if rng.random() < 0.3:
        keep = rng.randrange(len(raw))
        path.write_bytes(bytes(raw[:keep]))
        return f"{path.name} truncated to {keep} bytes"
    bit = rng.randrange(8 * len(raw))
    raw[bit // 8] ^= 1 << bit % 8
    path.write_bytes(bytes(raw))
    return f"{path.name} bit {bit} flipped"


def soak(trials: int, seed: int, corrupt_and_run, clean) -> dict[str, int]:
    """Each trial damages one file and runs: it must refuse in one line or end equal to ``clean``."""
    import random

    from alignkit.core.errors import AlignkitError

    rng, counts = random.Random(seed), {"refused": 0, "equal": 0}
    for trial in range(trials):
        try:
            what, result = corrupt_and_run(rng, trial)
        except AlignkitError as err:
            assert "\n" not in str(err), str(err)
            counts["refused"] += 1
            continue
        assert result == clean, f"silent divergence (seed {seed}, trial {trial}): {what}"
        counts["equal"] += 1
    return counts


def test_corruption_soak_of_token_shards_refuses_or_trains_on_verified_data(tmp_path):
    import shutil

    from test_prepare import all_batches, prepared

    _, clean_dir = prepared(tmp_path)
    clean = all_batches(clean_dir)
    files = sorted(p.name for p in clean_dir.iterdir())

    def corrupt_and_run(rng, trial):
        folder = tmp_path / f"trial{trial}"
        shutil.copytree(clean_dir, folder)
        what = damage(folder / rng.choice(files), rng)
        return what, all_batches(folder)

    counts = soak(SOAK_TRIALS, SOAK_SEED, corrupt_and_run, clean)
    assert counts["refused"] > SOAK_TRIALS // 2 and counts["refused"] + counts["equal"] == SOAK_TRIALS


def test_corruption_soak_of_the_teacher_cache_falls_back_to_the_teacher(tmp_path):
    import warnings

    from test_teacher_cache import recorded_toy, toy_cache

    inputs, live = recorded_toy(tmp_path)
    folder = next((tmp_path / "cache").iterdir())
    originals = {p: p.read_bytes() for p in folder.iterdir()}
    clean = [[live[b][k].tolist() for k in (1, 2)] for b in range(len(inputs))]

    def corrupt_and_run(rng, trial):
        for extra in set(folder.iterdir()) - set(originals):  # what the last trial recorded again
            extra.unlink()
        for path, raw in originals.items():
            path.write_bytes(raw)
        what = damage(rng.choice(sorted(originals)), rng)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the skipped shard is warned about: tested in test_teacher_cache
            cached = toy_cache(tmp_path, "cpu")
            replayed = [cached.run(batch, [1, 2])[0] for batch in inputs]
            cached.release()
        return what, [[r[k].tolist() for k in (1, 2)] for r in replayed]

    counts = soak(SOAK_TRIALS, SOAK_SEED, corrupt_and_run, clean)
    assert counts["equal"] == SOAK_TRIALS  # the cache never refuses: it runs the teacher instead


@pytest.fixture(scope="module")
def six_steps(tmp_path_factory) -> Path:
    """A run stopped after step 6, with the checkpoints of steps 3 and 6."""
    run_dir = tmp_path_factory.mktemp("six_steps")
    trainer = make(run_dir)
    trainer.cfg.steps = 6
    trainer.fit()
    return run_dir


@pytest.mark.parametrize("seed", range(12))
def test_corruption_soak_never_resumes_from_damaged_checkpoint_files(tmp_path, reference, six_steps, seed):
    """A seeded bit flip or truncation in any file of any checkpoint: the resume falls back
    to an intact checkpoint (warning naming the file) and ends equal to the clean run, or
    refuses with one line: never a silent divergence."""
    import random
    import warnings

    rng = random.Random(seed)
    run_dir = tmp_path / "run"
    shutil.copytree(six_steps, run_dir)
    files = sorted(p for p in (run_dir / "checkpoints").rglob("*") if p.is_file())
    victim = rng.choice(files)
    how = damage(victim, rng)
    resumed = make(run_dir)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            start = resumed.resume_latest()
    except CheckpointError as err:
        assert "\n" not in str(err), how
        return
    damaged_newest = victim.is_relative_to(ckpt.checkpoint_path(run_dir, 6))
    assert start.name == ("step_000003" if damaged_newest else "step_000006"), (victim, how)
    if damaged_newest:
        assert any(victim.name in str(w.message) or "manifest" in str(w.message) for w in caught), (victim, how)
    resumed.fit()
    assert records(run_dir) == records(reference), (victim, how)
    ref = final_weights(reference)
    assert all(torch.equal(ref[k], v) for k, v in final_weights(run_dir).items()), (victim, how)


def test_a_checkpoint_without_its_manifest_is_skipped_unless_written_before_checksums(tmp_path, six_steps):
    shutil.copytree(six_steps, tmp_path / "run")
    run_dir = tmp_path / "run"
    newest, older = ckpt.checkpoint_path(run_dir, 6), ckpt.checkpoint_path(run_dir, 3)
    (newest / integrity.MANIFEST).unlink()  # trainer.json says it had one: damage
    with pytest.warns(UserWarning, match="manifest.json is missing"):
        assert make(run_dir).resume_latest() == older
    (older / integrity.MANIFEST).unlink()  # as written before checksums: loaded, with a warning
    record = {k: v for k, v in json.loads((older / "trainer.json").read_text()).items() if k != "checksums"}
    (older / "trainer.json").write_text(json.dumps(record))
    with pytest.warns(UserWarning, match="before checkpoints had checksums"):
        assert make(run_dir).resume_latest() == older


class _RunsCode:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_dcp_metadata_and_items_are_unpickled_through_allowlists(tmp_path):
    """A real DCP checkpoint loads through the restricted reader and planner; a metadata pickle
    or a non-tensor item that names any other callable is refused before it runs."""
    import pickle

    import torch.distributed.checkpoint as dcp

    model = torch.nn.Linear(3, 2)
    saved = {"model": model.state_dict(), "hyper": {"lr": 0.1, "betas": (0.9, 0.95), "name": "adamw"}}
    dcp.save(saved, checkpoint_id=str(tmp_path / "ok"), no_dist=True)
    target = {"model": {k: torch.zeros_like(v) for k, v in model.state_dict().items()},
              "hyper": {"lr": 0.0, "betas": (), "name": ""}}
    dcp.load(target, storage_reader=integrity.RestrictedReader(tmp_path / "ok"), planner=integrity.RestrictedPlanner(),
             no_dist=True)
    assert torch.equal(target["model"]["weight"], model.weight) and target["hyper"]["betas"] == (0.9, 0.95)
    marker = tmp_path / "code_ran"
    (tmp_path / "ok" / ".metadata").write_bytes(pickle.dumps(_RunsCode(marker)))
    with pytest.raises(BaseException, match="not part of a checkpoint's metadata"):
        dcp.load(target, storage_reader=integrity.RestrictedReader(tmp_path / "ok"), no_dist=True)
    dcp.save({"hyper": {"payload": _RunsCode(marker)}}, checkpoint_id=str(tmp_path / "item"), no_dist=True)
    with pytest.raises(BaseException, match="Weights only load failed"):
        dcp.load({"hyper": {"payload": None}}, storage_reader=integrity.RestrictedReader(tmp_path / "item"),
                 planner=integrity.RestrictedPlanner(), no_dist=True)
    assert not marker.exists()


def test_a_full_disk_during_the_final_export_is_one_line_and_leaves_no_partial_final(tmp_path, monkeypatch):
    trainer = make(tmp_path)
    trainer.cfg.steps = 3
    export = trainer.task.export

    def fills_the_disk(student, directory):
        export(student, directory)  # part of the export is written, then the disk is full
        raise RuntimeError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space '
                           'left on device" })')  # safetensors' SafetensorError, as torch-free text

    monkeypatch.setattr(trainer.task, "export", lambda student, directory: (
        fills_the_disk(student, directory) if directory.name.endswith("final") else export(student, directory)))
    with pytest.raises(CheckpointError) as err:
        trainer.fit()
    assert "\n" not in str(err.value) and "cannot write the final export" in str(err.value)
    assert "no space left on device" in str(err.value)
    assert not (tmp_path / "final").exists() and not (tmp_path / ".tmp_final").exists()
    assert ckpt.latest_checkpoint(tmp_path).name == "step_000003"


def test_torch_short_write_reads_as_a_full_disk(tmp_path):
    """torch's zip writer reports a full disk as a position mismatch, even with space left now."""
    err = ckpt.write_error(RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 9088 vs 8980"), tmp_path)
    assert f"cannot write checkpoint {tmp_path}: no space left on device" in str(err)


def test_ddp_on_one_process_trains_unwrapped_with_a_notice():
    from alignkit.core.distributed import DistInfo
    from alignkit.core.parallel import resolve_parallel

    with pytest.warns(UserWarning, match="train.parallel=ddp on one process: training without DDP"):
        assert resolve_parallel(TrainConfig(parallel="ddp"), DistInfo()) == "none"
    assert resolve_parallel(TrainConfig(parallel="ddp"), DistInfo(rank=0, world_size=2)) == "ddp"


@pytest.mark.parametrize("raised, code", [("launcher", 143), ((143, 143), 143), ((130,), 130), ((143, 1), 1), ((1,), 1)])
def test_the_launcher_exits_128_plus_signal_for_a_stopped_run(monkeypatch, raised, code):
    """torchrun exits 1 for a SIGTERM to itself (SignalException) or to its workers (they save
    and exit 143: ChildFailedError); alignkit.launch keeps the stopped run's code."""
    from torch.distributed.elastic.multiprocessing import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure

    import alignkit.launch

    def torchrun(argv):
        if raised == "launcher":
            raise SignalException("got signal: 15", sigval=signal.SIGTERM)
        failures = {rank: ProcessFailure(local_rank=rank, pid=1, exitcode=exit_code, error_file="")
                    for rank, exit_code in enumerate(raised)}
        raise ChildFailedError("alignkit", failures)

    monkeypatch.setattr(alignkit.launch, "torchrun", torchrun)
    assert alignkit.launch.main(["--nproc_per_node", "2", "-m", "alignkit"]) == code
