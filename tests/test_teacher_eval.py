"""alignkit.teacher_eval.evaluate_teacher: a teacher scored with the students' own evaluation. The
debug recipe's tiny models; one 2-step run gives weights whose eval loss the run itself logged."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from alignkit.cli import main
from alignkit.core.errors import ConfigError
from alignkit.experiment import load_experiment
from alignkit.teacher_eval import evaluate_teacher

REPO = Path(__file__).resolve().parents[1]
DEBUG = REPO / "configs" / "debug.yaml"


def test_a_teacher_scores_what_the_run_of_the_same_weights_logged(tmp_path: Path) -> None:
    assert main(["train", str(DEBUG), f"output_dir={tmp_path}", "run_name=run", "train.steps=2", "train.eval_every=2",
                 "align.method=none", "--no-progress"]) == 0
    logged = json.loads((tmp_path / "run" / "results.json").read_text())["eval_loss"]
    weights = ["teacher.preset=''", "teacher.kind=hf_causal", "teacher.source=checkpoint",
               f"teacher.name_or_path={tmp_path / 'run' / 'final'}"]
    assert evaluate_teacher(load_experiment(DEBUG, weights))["eval_loss"] == pytest.approx(logged, rel=1e-6)
    # another student shape and seed: the same eval batches, the same score
    other = ["student.options.arch.hidden_size=32", "train.seed=7"]
    assert evaluate_teacher(load_experiment(DEBUG, weights + other))["eval_loss"] == pytest.approx(logged, rel=1e-6)


def test_a_teacher_with_another_tokenizer_is_refused(tmp_path: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.train_from_iterator(["def main(): return 1"] * 10, trainers.WordPieceTrainer(vocab_size=60, special_tokens=["[UNK]", "[EOS]"]))
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="[UNK]", eos_token="[EOS]")
    fast.save_pretrained(tmp_path / "wordpiece")
    cfg = load_experiment(DEBUG, [f"teacher.options.tokenizer={tmp_path / 'wordpiece'}"])
    with pytest.raises(ConfigError, match="tokenizer differs from the student's"):
        evaluate_teacher(cfg)


def test_a_teacher_the_run_would_pretrain_first_is_refused() -> None:
    cfg = load_experiment(REPO / "configs" / "ts" / "japanese_vowels.yaml")
    assert not cfg.teacher.name_or_path  # the TimesNet teacher: trained by the teacher stage
    with pytest.raises(ConfigError, match="pre-trains it first"):
        evaluate_teacher(cfg)
