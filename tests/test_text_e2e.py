"""Text LET end to end through the CLI: the debug recipe, exact resume, HF-format output,
config errors naming their key, the paper recipes on the meta device and a 2-step run, and
torchrun with 2 CPU processes."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from alignkit.cli import main

REPO = Path(__file__).resolve().parents[1]
DEBUG = str(REPO / "configs" / "debug.yaml")


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def train(tmp: Path, name: str, *overrides: str, config: str = DEBUG, resume: str | None = None) -> int:
    args = ["train", config, f"output_dir={tmp}", f"run_name={name}", *overrides, "--no-progress"]
    return main(args + (["--resume", resume] if resume else []))


def test_debug_recipe_runs_end_to_end_and_loss_falls(tmp_path):
    assert train(tmp_path, "run", "train.steps=16", "train.eval_every=8") == 0
    run_dir = tmp_path / "run"
    rows = metrics(run_dir)
    losses = [r["nll"] for r in rows if "nll" in r]
    assert len(losses) == 16 and sum(losses[-4:]) / 4 < sum(losses[:4]) / 4 - 0.3
    evals = [r["eval_loss"] for r in rows if "eval_loss" in r]
    assert len(evals) == 2 and evals[-1] < evals[0]
    assert rows[0]["lambda"] > 0 and rows[0]["teacher_active"] and not rows[-2]["teacher_active"]
    assert {"loss", "nll", "align_loss", "lr", "tokens_per_s", "peak_mem_mb", "cos/t-1-s2"} <= set(rows[0])
    assert (run_dir / "config.yaml").is_file() and (run_dir / "results.json").is_file()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(run_dir / "final")
    tokenizer = AutoTokenizer.from_pretrained(run_dir / "final")
    ids = tokenizer("def main():", return_tensors="pt").input_ids
    assert model(ids).logits.shape[-1] == 49152


@pytest.mark.slow
def test_resume_reproduces_the_uninterrupted_run(tmp_path):
    keep = ["train.save_every=3", "train.keep_checkpoints=5"]
    assert train(tmp_path, "full", *keep) == 0
    assert train(tmp_path, "cut", *keep) == 0
    cut = tmp_path / "cut"
    for late in ("step_000006", "step_000008"):  # as if the run had died after step 3's checkpoint
        shutil.rmtree(cut / "checkpoints" / late, ignore_errors=True)
    assert train(tmp_path, "cut", *keep, resume=str(cut)) == 0
    strip = lambda rows: [{k: v for k, v in r.items() if k not in ("tokens_per_s", "peak_mem_mb", "teacher_s")} for r in rows]  # noqa: E731
    assert strip(metrics(cut)) == strip(metrics(tmp_path / "full"))


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["align.lamda0=0.3"], "unknown config key 'align.lamda0'"),
        (["align.pairs=[{teacher_layer: -1, student_layer: 9}]"], r"align.pairs.0.student_layer=9"),
        (["align.projection=none"], "align.projection='none'"),
        (["align.stop_step=50"], "align.stop_step=50 is beyond the run"),
        (["teacher.source=gguf", "teacher.name_or_path=/nonexistent/dir"], "/nonexistent/dir"),
        (["student.preset=no-such-model"], "student.preset='no-such-model': no such preset"),
        (["task.text.source=files", "task.text.train_path=/nonexistent.txt"], "task.text.train_path"),
        (["train.steps=0"], "train.steps=0: must be >= 1"),
    ],
)
def test_config_errors_name_the_key(tmp_path, capsys, overrides, message):
    assert train(tmp_path, "bad", *overrides) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert pytest.importorskip("re").search(message, err), err


def test_bad_data_files_give_clear_errors(tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    assert train(tmp_path, "e", "task.text.source=files", f"task.text.train_path={empty}") == 2
    assert str(empty) in capsys.readouterr().err
    short = tmp_path / "short.txt"
    short.write_text("just a few words")
    assert train(tmp_path, "s", "task.text.source=files", f"task.text.train_path={short}", "task.text.eval_fraction=0") == 2
    assert "fewer than one sequence" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.parametrize("recipe, params, lr", [("llama-1.4b_smollm2-135m", 1.41e9, "0.0004"), ("llama-7b_smollm2-1.7b", 6.88e9, "0.0003")])
def test_paper_recipes_build_on_meta_and_run_two_tiny_steps(tmp_path, capsys, recipe, params, lr):
    config = str(REPO / "configs" / "paper" / f"{recipe}.yaml")
    assert main(["check", config, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["student_params"] == pytest.approx(params, rel=0.01)
    assert report["global_batch"] == 2048 and report["processes"] == 8 and report["student_layers"] in (24, 32)
    assert report["global_batch_per_process"] == report["grad_accum"] * (4 if "7b" in recipe else 16)  # paper's micro batches
    assert report["fits_80gb"] and report["setting"] == "fsdp+ckpt"
    tiny = [
        "student.preset=llama-tiny", "teacher.preset=llama-tiny", "teacher.options.arch.num_hidden_layers=2",
        "task.preset=builtin", "task.seq_len=32", "task.text.max_train_docs=40", "task.text.eval_batches=1",
        "train.steps=2", "train.micro_batch_size=2", "train.global_batch_size=4", "train.eval_every=0", "align.stop_step=2",
        "train.precision=bfloat16",
    ]
    assert train(tmp_path, "tiny", *tiny, config=config) == 0
    rows = [r for r in metrics(tmp_path / "tiny") if "loss" in r]
    assert len(rows) == 2 and all(torch.isfinite(torch.tensor(r["loss"])) for r in rows)
    saved = (tmp_path / "tiny" / "config.yaml").read_text()
    assert "grad_accum: 2" in saved  # global batch 4 = micro 2 x accumulation 2 x 1 process
    assert f"lr: {lr}" in saved and "weight_decay: 0.01" in saved and "stop_step: 2" in saved


@pytest.mark.dist
def test_torchrun_two_processes_match_one(tmp_path):
    common = ["train.steps=2", "train.eval_every=0", "train.save_every=0", "align.stop_step=2"]
    assert train(tmp_path, "one", *common, "train.micro_batch_size=4") == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "alignkit", "train", DEBUG, f"output_dir={tmp_path}", "run_name=two", *common,
           "train.micro_batch_size=2", "--no-progress"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    one = [r["loss"] for r in metrics(tmp_path / "one") if "loss" in r]
    two = [r["loss"] for r in metrics(tmp_path / "two") if "loss" in r]
    assert one == pytest.approx(two, rel=1e-4)


def test_teacher_with_a_different_tokenizer_is_aligned_by_character_spans(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    corpus = [p.read_text(errors="replace") for p in sorted((REPO / "alignkit" / "core").glob("*.py"))]
    tokenizer.train_from_iterator(corpus, trainers.WordPieceTrainer(vocab_size=400, special_tokens=["[UNK]", "[PAD]", "[EOS]"]))
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="[UNK]", pad_token="[PAD]", eos_token="[EOS]")
    fast.save_pretrained(tmp_path / "wordpiece")
    overrides = [f"teacher.options.tokenizer={tmp_path / 'wordpiece'}", f"teacher.options.arch.vocab_size={len(fast)}", "train.steps=4"]
    assert train(tmp_path, "mismatch", *overrides, "train.eval_every=0") == 0
    rows = [r for r in metrics(tmp_path / "mismatch") if "cos/t-1-s2" in r]
    assert len(rows) == 4 and all(-1 <= r["cos/t-1-s2"] <= 1 for r in rows)
    # logit KD needs a shared vocabulary: a clear error, not a shape mismatch deep inside
    assert train(tmp_path, "kd", *overrides, "align.method=rkd") == 2


@pytest.mark.parametrize("method", ["rkd", "salt"])
def test_logit_kd_methods_run_on_the_same_engine(tmp_path, method):
    assert train(tmp_path, method, f"align.method={method}", "train.steps=6", "train.eval_every=0") == 0
    rows = [r for r in metrics(tmp_path / method) if "loss" in r]
    kd_on = [r.get("kd_weight", 0.0) > 0 for r in rows]
    assert kd_on == ([True] * 6 if method == "rkd" else [True] * 4 + [False] * 2)  # salt: n_kd = stop_step = 4
    assert all(r["lambda"] == 0 for r in rows)


def test_a_teacher_without_release_is_freed_after_stop_step(tmp_path, monkeypatch):
    import gc
    import weakref

    from alignkit.adapters.hf_causal import HFCausalTeacher
    from alignkit.core import trainer as trainer_module

    monkeypatch.delattr(HFCausalTeacher, "release")  # a custom teacher may have none
    seen = []
    finish = trainer_module.Trainer._finish_step

    def watch(self):
        if not seen:
            seen.append(weakref.ref(self.engine.teachers["default"]))
        finish(self)
        if self.step == 3:  # released after step index 1 (stop_step 2): nothing may hold it now
            gc.collect()
            seen.append(seen[0]() is None)

    monkeypatch.setattr(trainer_module.Trainer, "_finish_step", watch)
    assert train(tmp_path, "free", "train.steps=4", "align.stop_step=2") == 0
    assert seen[1] is True
