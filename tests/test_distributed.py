"""The distributed paths a GPU job takes, checked on CPU with 2 gloo processes: every alignment
method under every ``train.parallel`` gives one process's losses; a run interrupted during an
eval under FSDP resumes exactly; a failure on one rank at any point of a checkpoint or the
export stops every rank with the same one-line error and none hangs; host values never meet
the default group when it is NCCL."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from alignkit.cli import main
from alignkit.core import distributed
from alignkit.core.distributed import DistInfo, agree, all_reduce_mean, min_max_over_ranks

REPO = Path(__file__).resolve().parent.parent
DEBUG = str(REPO / "configs" / "debug.yaml")
# 4 steps of a global batch of 4: 2 x 2 micro-batches on one process, 1 x 2 on each of two
COMMON = ["train.steps=4", "train.eval_every=2", "train.save_every=2", "train.keep_checkpoints=5", "train.grad_accum=2"]
METHODS = {
    "let": ["align.method=let"],
    "rkd": ["align.method=rkd"],
    "salt": ["align.method=salt"],
    "let_kd": ["align.early_layer=null", "align.stop_step=200",  # debug.yaml's preset values off: terms instead
               "align.terms=[{type: feature, early_layer: 2, stop_step: 4}, {type: logit_kd, stop_step: 4}]"],
}


def launch(tmp: Path, runs: list[list[str]], faults: tuple[dict, ...] = (), timeout: int = 600) -> list[list[dict]]:
    """All ``runs`` in one 2-process torchrun; each rank's (exit code, last message) per run."""
    spec = tmp / "spec.json"
    spec.write_text(json.dumps({"runs": runs, "faults": list(faults), "out": str(tmp)}))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(REPO / "tests" / "dist_runs.py"), str(spec)]
    done = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=timeout, cwd=REPO)
    assert done.returncode == 0, done.stderr[-3000:]
    return [json.loads((tmp / f"rank{r}.json").read_text()) for r in (0, 1)]


def train_args(tmp: Path, name: str, *overrides: str) -> list[str]:
    return ["train", DEBUG, f"output_dir={tmp}", f"run_name={name}", *COMMON, *overrides]


def losses(run_dir: Path) -> list[float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r.get("loss", r.get("eval_loss")) for r in rows]


@pytest.mark.dist
def test_every_method_under_every_parallel_setting_matches_one_process(tmp_path):
    for method, overrides in METHODS.items():
        assert main([*train_args(tmp_path, f"{method}-one", *overrides, "train.micro_batch_size=2"), "--no-progress"]) == 0
    runs = [train_args(tmp_path, f"{method}-{parallel}", *overrides, "train.micro_batch_size=1", f"train.parallel={parallel}")
            for method, overrides in METHODS.items() for parallel in ("ddp", "fsdp")]
    for rank in launch(tmp_path, runs):
        assert [r["code"] for r in rank] == [0] * len(runs), rank
    for method in METHODS:
        one = losses(tmp_path / f"{method}-one")
        for parallel in ("ddp", "fsdp"):
            assert losses(tmp_path / f"{method}-{parallel}") == pytest.approx(one, rel=1e-5), (method, parallel)
    first = json.loads((tmp_path / "let_kd-fsdp" / "metrics.jsonl").read_text().splitlines()[0])
    assert [k for k in first if k.endswith("kd") and first[k] > 0], first  # the KD term ran under fsdp


@pytest.mark.dist
def test_interrupted_eval_under_fsdp_resumes_exactly(tmp_path):
    fsdp = ["train.micro_batch_size=1", "train.parallel=fsdp"]
    cut = str(tmp_path / "cut")
    # the second eval (step 4) is interrupted on both ranks: the checkpoint records it as pending,
    # and the resumed run evaluates before any training step through FSDP's root
    evaluate = {"run": 1, "target": "alignkit.core.trainer:Trainer.evaluate", "rank": -1, "call": 2,
                "error": "KeyboardInterrupt"}
    ranks = launch(tmp_path, [train_args(tmp_path, "full", *fsdp, "train.steps=6", "align.stop_step=2"),
                              train_args(tmp_path, "cut", *fsdp, "train.steps=6", "align.stop_step=2"),
                              ["train", "--resume", cut]], faults=(evaluate,))
    for rank in ranks:
        assert [r["code"] for r in rank] == [0, 130, 0], rank
    assert losses(tmp_path / "cut") == losses(tmp_path / "full")


@pytest.mark.dist
def test_a_damaged_newest_fsdp_checkpoint_is_skipped_for_the_previous(tmp_path):
    """A truncated shard of the newest checkpoint fails its checksum on the rank that checks
    it; both ranks skip that checkpoint (naming the file) and resume from the one before."""
    fsdp = ["train.micro_batch_size=1", "train.parallel=fsdp"]
    launch(tmp_path, [train_args(tmp_path, "full", *fsdp), train_args(tmp_path, "cut", *fsdp)])
    shard = sorted((tmp_path / "cut" / "checkpoints" / "step_000004" / "sharded").glob("*.distcp"))[-1]
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    (tmp_path / "cut" / "results.json").unlink()  # as if killed after its last checkpoint
    ranks = launch(tmp_path, [["train", "--resume", str(tmp_path / "cut")]])
    for rank in ranks:
        assert rank[0]["code"] == 0, rank
        assert any("skipping checkpoint step_000004" in w and shard.name in w for w in rank[0]["warnings"]), rank
    assert losses(tmp_path / "cut") == losses(tmp_path / "full")


CHECKPOINT = "alignkit.core.checkpoint"
FAULTS = [  # (where, which rank, which call): each is one run's only fault
    (f"{CHECKPOINT}:staging_dir", 0, 1),
    (f"{CHECKPOINT}:save_rank_state", 1, 2),
    ("torch.distributed.checkpoint.filesystem:_FileSystemWriter.write_data", 1, 1),  # inside DCP's collective
    (f"{CHECKPOINT}:publish", 0, 1),
    ("alignkit.tasks.text_pretrain:TextPretrainTask.export", 0, 1),  # fsdp: the final export
]


@pytest.mark.dist
def test_a_failure_on_one_rank_stops_every_rank_with_one_message(tmp_path):
    runs, faults = [], []
    for index, (target, rank, call) in enumerate(FAULTS):
        runs.append(train_args(tmp_path, f"fault{index}", "train.micro_batch_size=1", "train.parallel=fsdp"))
        faults.append({"run": index, "target": target, "rank": rank, "call": call, "error": "OSError"})
    ranks = launch(tmp_path, runs, faults=tuple(faults), timeout=400)  # a hang fails here
    for index, (target, _, _) in enumerate(FAULTS):
        codes = {rank[index]["code"] for rank in ranks}
        messages = [rank[index]["message"] for rank in ranks]
        assert codes == {2}, (target, ranks)
        assert "injected OSError" in messages[0] and "injected OSError" in messages[1], (target, messages)
        assert messages[0].split(" (on rank")[0] == messages[1].split(" (on rank")[0], (target, messages)
        assert "\n" not in messages[0]


def test_host_values_never_meet_an_nccl_default_group(monkeypatch):
    """NCCL takes CUDA tensors only: the compute plane refuses a host tensor with a message
    that says what to use instead; the control plane takes host values (on its gloo group)."""
    info = DistInfo(rank=0, world_size=2)
    monkeypatch.setattr(distributed.dist, "get_backend", lambda group=None: "nccl")
    with pytest.raises(RuntimeError, match="control plane"):
        all_reduce_mean(torch.tensor([1.0]), info)
    single = DistInfo()
    assert min_max_over_ranks(3, single) == (3, 3) and agree(lambda: 5, single) == 5
