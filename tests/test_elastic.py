"""Elastic resume: a run continued on another number of processes keeps its global batch, reads
the same sequences in the same steps and evaluates the same held-out ones, so its losses match
the uninterrupted run's (2 -> 1 and 1 -> 2 processes, DDP and FSDP, gloo on CPU); what cannot be
continued exactly is refused in one line, and a refused resume writes nothing."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from alignkit.cli import main
from alignkit.core.errors import ConfigError, DataError
from alignkit.experiment import load_experiment
from alignkit.run_folder import resumed_grad_accum
from alignkit.tasks.text_data import build_text_data
from test_distributed import DEBUG, launch, losses
from test_text_data import files_cfg, make_docs, word_tokenizer, write_txt


def step_sequences(datas: list, micro: int, global_batch: int, steps: int) -> list[list[tuple[int, ...]]]:
    """Per optimizer step, the sorted sequences every rank of ``datas`` trains on."""
    streams = [d.train_batches(micro) for d in datas]
    accum = global_batch // (micro * len(datas))
    found = []
    for _ in range(steps):
        rows = [tuple(row.tolist()) for s in streams for _ in range(accum) for row in next(s)["input_ids"]]
        found.append(sorted(rows))
    return found


@pytest.mark.parametrize("before, after", [(2, 1), (1, 2), (2, 4)])
def test_the_stream_continues_at_the_same_global_position_on_another_process_count(tmp_path, before, after):
    tok = word_tokenizer()
    cfg = files_cfg(write_txt(tmp_path / "a.txt", make_docs(73)), eval_fraction=0.0, seed=3)
    build = lambda world: [build_text_data(cfg, tok, seq_len=5, rank=r, world_size=world) for r in range(world)]
    n = build(1)[0].num_train_sequences
    micro, global_batch, cut = 2, 8, 3
    steps = 2 * n // global_batch + 2  # across two epoch ends, where a pass of another count spans two epochs
    uninterrupted = step_sequences(build(before), micro, global_batch, steps)
    first = build(before)
    assert step_sequences(first, micro, global_batch, cut) == uninterrupted[:cut]
    saved = [json.loads(json.dumps(d.state_dict())) for d in first]
    resumed = build(after)
    for data in resumed:
        data.load_state_dict(data.resharded_state(saved))
    assert step_sequences(resumed, micro, global_batch, steps - cut) == uninterrupted[cut:]


def test_the_held_out_set_is_the_first_starts_on_any_process_count(tmp_path):
    tok = word_tokenizer()
    cfg = files_cfg(write_txt(tmp_path / "t.txt", make_docs(30)), eval_path=str(write_txt(tmp_path / "e.txt", make_docs(30))),
                    eval_batches=3)
    one = build_text_data(cfg, tok, seq_len=5)
    state = one.state_dict()
    ranks = [build_text_data(cfg, tok, seq_len=5, rank=r, world_size=2) for r in (0, 1)]
    for data in ranks:
        data.load_state_dict(data.resharded_state([state]))
    batches = [data.eval_batches(2) for data in ranks]
    assert [len(b) for b in batches] == [2, 2]  # 3 micro-batches: rank 1 runs a padding one (FSDP needs equal counts)
    assert (batches[1][-1]["labels"] == -100).all()
    rows = lambda bs: sorted(tuple(r.tolist()) for b in bs for r, lab in zip(b["input_ids"], b["labels"]) if (lab != -100).any())
    assert rows(batches[0] + batches[1]) == rows(one.eval_batches(2))


def test_positions_that_cannot_be_mapped_are_refused(tmp_path):
    tok = word_tokenizer()
    path = write_txt(tmp_path / "a.txt", make_docs(40))
    streamed = build_text_data(files_cfg(path, streaming=True, eval_fraction=0.0), tok, seq_len=5)
    with pytest.raises(DataError, match="position per process"):
        streamed.resharded_state([streamed.state_dict(), streamed.state_dict()])
    data = build_text_data(files_cfg(path, eval_fraction=0.0), tok, seq_len=5)
    with pytest.raises(DataError, match="positions differ"):
        data.resharded_state([{"epoch": 0, "offset": 4}, {"epoch": 0, "offset": 6}])


def fake_run(run_dir: Path, global_batch: int, world_size: int, overrides: list[str]) -> None:
    """A run folder with a config and one checkpoint record, as a run on ``world_size`` processes leaves it."""
    checkpoint = run_dir / "checkpoints" / "step_000004"
    checkpoint.mkdir(parents=True)
    OmegaConf.save(OmegaConf.structured(load_experiment(DEBUG, overrides)), run_dir / "config.yaml")
    (checkpoint / "trainer.json").write_text(json.dumps({"step": 4, "world_size": world_size, "global_batch": global_batch}))


def test_the_accumulation_is_recomputed_from_the_runs_global_batch(tmp_path):
    fake_run(tmp_path, global_batch=8, world_size=2, overrides=["train.micro_batch_size=2", "train.grad_accum=2"])
    resumed = lambda *extra: load_experiment(DEBUG, ["train.micro_batch_size=2", "train.grad_accum=2", *extra])
    assert resumed_grad_accum(resumed(), tmp_path, world_size=1) == 4
    assert resumed_grad_accum(resumed(), tmp_path, world_size=2) == 2
    assert resumed_grad_accum(resumed(), tmp_path, world_size=4) == 1
    with pytest.raises(ConfigError, match="global batch of 8 sequences is not a multiple of .* 2 x 3"):
        resumed_grad_accum(resumed(), tmp_path, world_size=3)
    with pytest.raises(ConfigError, match="train.grad_accum=3 .* is not the run's global batch of 8"):
        resumed_grad_accum(resumed("train.grad_accum=3"), tmp_path, world_size=1)
    (tmp_path / "checkpoints" / "step_000004" / "trainer.json").write_text(json.dumps({"step": 4}))
    for rank in range(2):  # a record from before world_size and global_batch: its rank files say
        (tmp_path / "checkpoints" / "step_000004" / f"rng_rank{rank}.json").write_text("{}")
    assert resumed_grad_accum(resumed(), tmp_path, world_size=1) == 4


def run_args(tmp: Path, name: str, parallel: str, *overrides: str) -> list[str]:
    return ["train", DEBUG, f"output_dir={tmp}", f"run_name={name}", "train.micro_batch_size=2",
            f"train.parallel={parallel}", *overrides]


def cut_at_step_4(run: Path, name: str) -> Path:
    """A copy of ``run`` as if it had died after its step-4 checkpoint."""
    cut = run.with_name(name)
    shutil.copytree(run, cut)
    shutil.rmtree(cut / "checkpoints" / "step_000008")
    shutil.rmtree(cut / "final")
    (cut / "results.json").unlink()
    return cut


def train_rows(run: Path) -> list[tuple]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r.get("tokens")) for r in rows]


@pytest.mark.dist
def test_resumes_on_another_process_count_match_the_uninterrupted_runs(tmp_path):
    # global batch 4 throughout: 2 x 2 micro-batches on one process, 2 x 1 on each of two
    parallels = {"ddp": "auto", "fsdp": "fsdp"}  # auto: none on one process, ddp on two
    for kind, parallel in parallels.items():
        assert main([*run_args(tmp_path, f"one-{kind}", parallel, "train.grad_accum=2"), "--no-progress"]) == 0
        cut_at_step_4(tmp_path / f"one-{kind}", f"up-{kind}")
    # a run of global batch 2 cannot continue on 2 processes of micro batch 2: refused, nothing written
    assert main([*run_args(tmp_path, "odd", "auto", "train.steps=4"), "--no-progress"]) == 0
    odd_files = sorted(p.name for p in (tmp_path / "odd").iterdir())
    runs = [run_args(tmp_path, f"two-{kind}", parallel) for kind, parallel in parallels.items()]
    runs += [["train", "--resume", str(tmp_path / f"up-{kind}")] for kind in parallels]
    runs += [["train", "--resume", str(tmp_path / "odd"), "train.steps=8"]]
    for rank in launch(tmp_path, runs):
        assert [r["code"] for r in rank] == [0, 0, 0, 0, 2], rank
        assert "global batch of 2 sequences is not a multiple" in rank[4]["message"], rank[4]
    assert sorted(p.name for p in (tmp_path / "odd").iterdir()) == odd_files  # no resumes.jsonl
    for kind in parallels:
        cut = cut_at_step_4(tmp_path / f"two-{kind}", f"down-{kind}")
        assert main(["train", "--resume", str(cut), "--no-progress"]) == 0
        for resumed, full in ((f"up-{kind}", f"one-{kind}"), (f"down-{kind}", f"two-{kind}")):
            assert losses(tmp_path / resumed) == pytest.approx(losses(tmp_path / full), rel=1e-5), (resumed, full)
            assert train_rows(tmp_path / resumed) == train_rows(tmp_path / full)  # same tokens per step
        checkpoint = json.loads((tmp_path / f"down-{kind}" / "checkpoints" / "step_000008" / "trainer.json").read_text())
        assert (checkpoint["world_size"], checkpoint["global_batch"]) == (1, 4)
        assert json.loads((tmp_path / f"up-{kind}" / "resumes.jsonl").read_text())["changes"] == {}
