"""train.parallel=fsdp (FSDP2) with 2 gloo processes on CPU: same losses as one process with the
same global batch, sharded checkpoints that resume exactly (also with a sharded teacher), and a
final/ folder that ``from_pretrained`` opens with the same weights as the one-process run. Also:
the parallel settings' errors, metrics synchronised only on logging steps, and FSDP's
pre-backward hook reaching the student's output dataclass (one process)."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from alignkit.cli import main
from alignkit.core.config import ConfigError, TrainConfig
from alignkit.core.distributed import DistInfo
from alignkit.core.parallel import resolve_parallel
from alignkit.core.trainer import Trainer
from toys import ToyStudent, ToyTask

REPO = Path(__file__).resolve().parents[1]
DEBUG = str(REPO / "configs" / "debug.yaml")
# global batch 4 = 2 sequences x 2 micro-batches on one process = 1 x 2 x 2 processes
COMMON = ["train.steps=4", "train.eval_every=2", "train.save_every=2", "train.keep_checkpoints=5",
          "align.stop_step=4", "train.grad_accum=2"]


def rows(run_dir: Path) -> list[dict]:
    drop = ("tokens_per_s", "peak_mem_mb", "teacher_s")
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k not in drop} for line in lines]


def torchrun(tmp: Path, name: str, *overrides: str, resume: str | None = None) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "alignkit", "train", DEBUG, f"output_dir={tmp}", f"run_name={name}", *COMMON,
           "train.micro_batch_size=1", "train.parallel=fsdp", *overrides, "--no-progress"]
    cmd += ["--resume", resume] if resume else []
    done = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.mark.dist
def test_fsdp_two_processes_match_one_resume_exactly_and_export(tmp_path):
    args = ["train", DEBUG, f"output_dir={tmp_path}", "run_name=one", *COMMON, "train.micro_batch_size=2", "--no-progress"]
    assert main(args) == 0
    # activation checkpointing recomputes the same fp32 values: it must not change the losses
    torchrun(tmp_path, "fsdp", "train.activation_checkpointing=true")
    one, fsdp = rows(tmp_path / "one"), rows(tmp_path / "fsdp")
    assert [r.get("loss", r.get("eval_loss")) for r in fsdp] == pytest.approx(
        [r.get("loss", r.get("eval_loss")) for r in one], rel=1e-5)
    assert [r.get("tokens") for r in fsdp] == [r.get("tokens") for r in one]

    checkpoint = tmp_path / "fsdp" / "checkpoints" / "step_000002"
    assert sorted(p.name for p in (checkpoint / "sharded").glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    assert not (checkpoint / "state.safetensors").exists()

    # as if the run had died after step 2's checkpoint
    cut = tmp_path / "cut"
    shutil.copytree(tmp_path / "fsdp", cut)
    shutil.rmtree(cut / "checkpoints" / "step_000004")
    shutil.rmtree(cut / "final")
    # the resumed run also shards its teacher (steps 3-4 align): the same features, gathered
    torchrun(tmp_path, "cut", "train.activation_checkpointing=true", "teacher.options.shard=true", resume=str(cut))
    assert rows(cut) == fsdp

    from transformers import AutoModelForCausalLM

    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "fsdp" / "final").state_dict()
    reference = AutoModelForCausalLM.from_pretrained(tmp_path / "one" / "final").state_dict()
    assert exported.keys() == reference.keys()
    for key, value in reference.items():
        torch.testing.assert_close(exported[key], value, rtol=1e-4, atol=1e-4, msg=key)  # Adam: rare embedding rows


@pytest.mark.parametrize("settings, world, message", [
    ({"parallel": "zero"}, 1, "train.parallel='zero' is unknown"),
    ({"parallel": "none"}, 2, "train.parallel=none cannot run on 2 processes"),
    ({"parallel": "fsdp", "ema_decay": 0.9}, 2, "train.parallel=fsdp does not support"),
])
def test_parallel_setting_errors_name_the_key(settings, world, message):
    with pytest.raises(ConfigError, match=message):
        resolve_parallel(TrainConfig(**settings), DistInfo(0, world, 0))


def test_auto_is_ddp_for_several_processes_and_nothing_for_one():
    assert resolve_parallel(TrainConfig(), DistInfo(0, 2, 0)) == "ddp"
    assert resolve_parallel(TrainConfig(), DistInfo()) == "none"


def test_metrics_sync_only_on_logging_steps_and_tokens_stay_exact(tmp_path, monkeypatch):
    import alignkit.core.trainer as trainer_module

    syncs = []
    reduce = trainer_module.all_reduce_mean
    monkeypatch.setattr(trainer_module, "all_reduce_mean", lambda values, dist: syncs.append(1) or reduce(values, dist))
    cfg = TrainConfig(steps=8, micro_batch_size=4, grad_accum=2, lr=1e-2, eval_every=0, log_every=3, save_every=4)
    Trainer(cfg=cfg, student=ToyStudent(), engine=None, task=ToyTask(seq_len=12), run_dir=tmp_path,
            device=torch.device("cpu"), progress=False).fit()
    assert len(syncs) == 3 + 2  # logging steps 3, 6, 8 and the checkpoints at 4 and 8, not every step
    logged = [r for r in rows(tmp_path) if "loss" in r]
    assert [r["step"] for r in logged] == [3, 6, 8]  # and the last step
    assert [r["tokens"] for r in logged] == [r["step"] * 4 * 2 * 12 for r in logged]
    assert all(isinstance(r["grad_norm"], float) and isinstance(r["loss"], float) for r in logged)
    saved = json.loads((tmp_path / "checkpoints" / "step_000004" / "trainer.json").read_text())
    assert saved["tokens"] == 4 * 4 * 2 * 12  # a checkpoint between logging steps counts every token


def test_block_settings_need_a_student_with_blocks(tmp_path):
    cfg = TrainConfig(steps=1, activation_checkpointing=True)
    with pytest.raises(ConfigError, match="train.activation_checkpointing: ToyStudent exposes no transformer blocks"):
        Trainer(cfg=cfg, student=ToyStudent(), engine=None, task=ToyTask(), run_dir=tmp_path, device=torch.device("cpu"),
                progress=False)


class StepModule(torch.nn.Module):
    """The trainer's step module in small: the FSDP root, with the student a unit below it."""

    def __init__(self) -> None:
        super().__init__()
        self.student = ToyStudent()

    def forward(self, batch: dict) -> torch.Tensor:
        out = self.student(batch, [2])
        return out.loss + out.features[2].square().mean()


def test_fsdp_finds_the_student_output_dataclass_for_its_pre_backward_hook():
    # The student's weights are resharded after its forward; FSDP2 gathers them again for backward
    # from a hook on the grad-requiring tensors of the student's output, a StudentOutput dataclass.
    # Without the hook, backward runs on freed weights: no, or wrong, gradients.
    from torch.distributed.fsdp import fully_shard

    from alignkit.core.parallel import ensure_process_group

    reference, sharded = StepModule(), StepModule()  # same seeded weights
    batch = {"input_ids": torch.randint(0, 32, (2, 8), generator=torch.Generator().manual_seed(0))}
    reference(batch).backward()
    created = not torch.distributed.is_initialized()
    ensure_process_group(torch.device("cpu"))  # a one-process gloo group
    try:
        for block in sharded.student.blocks:
            fully_shard(block)
        fully_shard(sharded.student)
        fully_shard(sharded)
        sharded(batch).backward()
        for (name, expected), (_, param) in zip(reference.named_parameters(), sharded.named_parameters()):
            assert param.grad is not None, name
            torch.testing.assert_close(param.grad.full_tensor(), expected.grad, msg=name)
    finally:
        if created:
            torch.distributed.destroy_process_group()
