"""Causal-LM pretraining with LET: packed text -> next-token NLL; eval loss and perplexity.

Its data depends on the teachers: when the main teacher's tokenizer differs from the
student's (the paper's LET-dagger), batches also carry the teacher's own token ids and the
student-to-teacher position index (:mod:`alignkit.tasks.text_data`); logit KD and extra
teachers need a shared tokenizer, which is decided here, before any text is tokenized.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping

import torch
from torch import nn

from alignkit.core.adapter import Batch, DataInfo
from alignkit.core.config import ConfigError, ModelConfig, at_least, checked
from alignkit.core.registry import adapter_spec
from alignkit.core.trainer import to_device
from alignkit.tasks.base import TaskBase, TaskConfig
from alignkit.tasks.text_batches import TextData
from alignkit.tasks.text_data import TextDataConfig, build_text_data
from alignkit.tasks.text_packing import Encoder, teacher_encoder


@dataclass
class TextTaskConfig(TaskConfig):
    """``task`` section of ``text_pretrain``."""

    seq_len: int = checked(256, at_least(2))  # tokens per sequence
    text: TextDataConfig = field(default_factory=TextDataConfig)


def _tokenizer(model: Any, key: str, notes: list[str] | None = None) -> Any:
    """``model``'s tokenizer, as its adapter reads it (the ``tokenizer`` capability). With
    ``notes`` (offline: `alignkit check` never goes online), a tokenizer that only the hub has,
    or of a family that does not say (no ``hub_tokenizer`` capability), is not loaded: None,
    and a note says why."""
    spec = adapter_spec(model, key)
    if spec.tokenizer is None:
        raise ConfigError(f"{key}.kind={model.kind!r} reads no text (its adapter declares no tokenizer): "
                          "pick a text model for task.name=text_pretrain")
    if notes is not None:
        hub_id = spec.hub_tokenizer(model) if spec.hub_tokenizer is not None else None
        if hub_id is None:
            notes.append(f"{key} tokenizer: {key}.kind={model.kind!r} does not say whether it loads offline: "
                         "not loaded (vocabulary and tokenizer match unchecked)")
            return None
        if hub_id:
            notes.append(f"{key} tokenizer {hub_id!r} is on the hub: not loaded offline "
                         "(vocabulary and tokenizer match unchecked)")
            return None
    return spec.tokenizer(model)


class TextPretrainTask(TaskBase):
    loss_name = "nll"

    def _tokenizers(self, teachers: Mapping[str, Any], offline: bool) -> tuple[Any, Any]:
        """(student tokenizer, main teacher tokenizer or None); ``offline``: see :func:`_tokenizer`."""
        notes = self.notes if offline else None
        teacher = teachers.get("default")
        return (_tokenizer(self.context.student, "student", notes),
                None if teacher is None else _tokenizer(teacher, "teacher", notes))

    def _refuse_mismatch(self, student_tokenizer: Any, teacher_tokenizer: Any) -> bool:
        """Whether the tokenizers differ (LET-dagger), refusing what needs them equal."""
        if student_tokenizer is None or teacher_tokenizer is None:
            return False
        differ = teacher_encoder(Encoder(student_tokenizer, "student tokenizer"), teacher_tokenizer) is not None
        if differ and self.context.extra_teachers:
            raise ConfigError("teachers: extra teachers need the student's tokenizer (only `teacher` may differ)")
        kd_origins = self.context.logit_kd_origins
        if differ and kd_origins:
            raise ConfigError(f"{kd_origins[0]} (logit KD) needs teacher and student to share a tokenizer")
        return differ

    def _info(self, tokenizer: Any) -> DataInfo:
        return DataInfo(tokenizer=tokenizer, vocab_size=len(tokenizer) if tokenizer is not None else None,
                        seq_len=self.section.seq_len)

    def describe_data(self, teachers: Mapping[str, Any]) -> DataInfo:
        tokenizer, teacher_tokenizer = self._tokenizers(teachers, offline=True)
        self._refuse_mismatch(tokenizer, teacher_tokenizer)
        return self._info(tokenizer)

    def build_data(self, teachers: Mapping[str, Any]) -> DataInfo:
        self.tokenizer, teacher_tokenizer = self._tokenizers(teachers, offline=False)
        differ = self._refuse_mismatch(self.tokenizer, teacher_tokenizer)
        self.data: TextData = build_text_data(
            self.section.text, self.tokenizer, self.section.seq_len, rank=self.dist.rank,
            world_size=self.dist.world_size, teacher_tokenizer=teacher_tokenizer if differ else None,
        )
        return self._info(self.tokenizer)

    def check_student(self, student: nn.Module, data: DataInfo) -> None:
        model = getattr(student, "model", None)
        embeddings = getattr(model, "get_input_embeddings", lambda: None)()
        if data.vocab_size is not None and embeddings is not None and data.vocab_size > embeddings.num_embeddings:
            raise ConfigError(f"student.options.arch.vocab_size={embeddings.num_embeddings} is smaller than the "
                              f"tokenizer's {data.vocab_size} tokens")
        positions = getattr(getattr(model, "config", None), "max_position_embeddings", None)
        if positions is not None and positions < self.section.seq_len:
            raise ConfigError(f"task.seq_len={self.section.seq_len} exceeds the student's "
                              f"max_position_embeddings={positions}")

    def check_teacher_eval(self, teacher: ModelConfig) -> None:
        """A teacher with another tokenizer is refused: its NLL would be per token of other tokens."""
        if teacher_encoder(Encoder(self.tokenizer, "student tokenizer"), _tokenizer(teacher, "teacher")) is not None:
            raise ConfigError("the teacher's tokenizer differs from the student's: its eval loss would be a mean "
                              "over other tokens than the student's, so the two do not compare")

    def train_batches(self, micro_batch_size: int) -> Iterator[Batch]:
        return self.data.train_batches(micro_batch_size)

    def state_dict(self) -> dict[str, Any]:
        return self.data.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.data.load_state_dict(state)

    def resharded_state(self, states: list[dict[str, Any]]) -> dict[str, Any]:
        return self.data.resharded_state(states)

    def release_teacher(self) -> None:
        self.data.release_teacher()

    def evaluate(self, student: nn.Module, device: torch.device) -> dict[str, float]:
        """Token-weighted mean NLL over the held-out split (sharded over ranks, then summed)."""
        sums = torch.zeros(2, dtype=torch.float64, device=device)
        for batch in self.data.eval_batches(self.context.eval_batch_size):
            batch = to_device(batch, device)
            tokens = (batch["labels"][:, 1:] != -100).sum()
            loss = student(batch, []).loss.double()  # NaN for a padding batch (no labels): counted as 0
            sums += torch.stack([torch.where(tokens > 0, loss * tokens, 0.0), tokens.double()])
        if self.dist.world_size > 1:
            torch.distributed.all_reduce(sums)
        loss = float(sums[0] / sums[1].clamp(min=1))
        return {"eval_loss": loss, "eval_ppl": math.exp(min(loss, 50.0))}

    def export(self, student: nn.Module, directory: Path) -> None:
        student.save_pretrained(directory, tokenizer=self.tokenizer)
