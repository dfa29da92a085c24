"""Causal-LM pretraining with LET: packed text -> next-token NLL; eval loss and perplexity."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from alignkit.adapters.hf_causal import load_tokenizer
from alignkit.core.adapter import Batch, TeacherAdapter
from alignkit.core.config import ConfigError
from alignkit.core.registry import build_student
from alignkit.core.trainer import to_device
from alignkit.tasks.base import TaskBase
from alignkit.tasks.text_data import TextData, build_text_data


class TextPretrainTask(TaskBase):
    loss_name = "nll"

    def build_student(self) -> nn.Module:
        self.tokenizer = load_tokenizer(self.cfg.student)
        student = build_student(self.cfg.student, device=self.device)
        vocab = student.model.get_input_embeddings().num_embeddings
        if len(self.tokenizer) > vocab:
            raise ConfigError(
                f"student.options.arch.vocab_size={vocab} is smaller than the tokenizer's {len(self.tokenizer)} tokens"
            )
        self.student = student
        return student

    def build_teachers(self) -> dict[str, TeacherAdapter]:
        teachers = super().build_teachers()
        self.teacher_tokenizer = load_tokenizer(self.cfg.teacher)
        return teachers

    def build_data(self) -> None:
        # text_data decides whether the tokenizers differ (LET-dagger: positions matched by
        # character spans) and then adds the teacher's own token ids to every batch
        self.data: TextData = build_text_data(
            self.cfg.task.text,
            self.tokenizer,
            self.cfg.task.seq_len,
            rank=self.dist.rank,
            world_size=self.dist.world_size,
            teacher_tokenizer=getattr(self, "teacher_tokenizer", None),
        )
        if self.data.aligns_teacher:
            if self.cfg.teachers:
                raise ConfigError("teachers: extra teachers need the student's tokenizer (only `teacher` may differ)")
            if self.cfg.align.method in ("rkd", "salt"):
                raise ConfigError(f"align.method={self.cfg.align.method} (logit KD) needs teacher and student to share a tokenizer")

    def train_batches(self, micro_batch_size: int) -> Iterator[Batch]:
        return self.data.train_batches(micro_batch_size)

    def state_dict(self) -> dict[str, Any]:
        return self.data.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.data.load_state_dict(state)

    def release_teacher(self) -> None:
        self.data.release_teacher()

    def evaluate(self, student: nn.Module, device: torch.device) -> dict[str, float]:
        """Token-weighted mean NLL over the held-out split (sharded over ranks, then summed)."""
        sums = torch.zeros(2, dtype=torch.float64, device=device)
        for batch in self.data.eval_batches(self.cfg.train.micro_batch_size):
            batch = to_device(batch, device)
            tokens = (batch["labels"][:, 1:] != -100).sum()
            sums += torch.stack([student(batch, []).loss.double() * tokens, tokens.double()])
        if self.dist.world_size > 1:
            torch.distributed.all_reduce(sums)
        loss = float(sums[0] / sums[1].clamp(min=1))
        return {"eval_loss": loss, "eval_ppl": math.exp(min(loss, 50.0))}

    def export(self, student: nn.Module, directory: Path) -> None:
        student.save_pretrained(directory, tokenizer=self.tokenizer)
