"""Tiny pure-torch student, teacher and task for testing the core engine and trainer without
any model library (the HF and time-series tests cover the real adapters)."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

import torch
from safetensors.torch import save_model
from torch import nn

from alignkit.core.adapter import StudentOutput
from alignkit.core.taps import LayerTaps


class ToyNet(nn.Module):
    """Embedding + residual MLP blocks + norm + head over integer tokens."""

    def __init__(self, vocab: int = 32, width: int = 16, depth: int = 4, seed: int = 0) -> None:
        super().__init__()
        generator_state = torch.get_rng_state()
        torch.manual_seed(seed)
        self.embed = nn.Embedding(vocab, width)
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(width, width), nn.Tanh()) for _ in range(depth))
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab)
        torch.set_rng_state(generator_state)
        self.num_layers, self.hidden = depth, width
        self.block_calls = 0
        self.taps = LayerTaps(self.blocks, self.norm, root=self)

    def width(self, layer: int) -> int:
        return self.hidden

    def run(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.embed(ids)
        for block in self.blocks:
            self.block_calls += 1
            h = h + block(h)
        return self.head(self.norm(h))


class ToyStudent(ToyNet):
    def forward(self, batch: dict, layers: list[int], logits: bool = False) -> StudentOutput:
        logits, feats = self.taps.run(lambda: self.run(batch["input_ids"]), layers)
        loss = nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), batch["input_ids"][:, 1:].reshape(-1))
        return StudentOutput(loss=loss, features=feats, logits=logits)


class ToyTeacher:
    """A custom teacher written against the protocol only (no FrozenTeacher base)."""

    logits_kind = "per_token"

    def __init__(self, depth: int = 3, width: int = 8) -> None:
        self.net = ToyNet(width=width, depth=depth, seed=1).eval()
        self.num_layers = depth
        self.calls = 0
        self.released = False

    def width(self, layer: int) -> int:
        return self.net.hidden

    def run(self, batch: dict, layers: list[int], logits: bool = False) -> tuple[dict, torch.Tensor | None]:
        if self.released:
            raise RuntimeError("teacher released")
        self.calls += 1
        with torch.no_grad():
            out, feats = self.net.taps.run(lambda: self.net.run(batch["input_ids"]), layers, stop_early=not logits)
        return feats, out if logits else None

    def features(self, batch: dict, layers: list[int]) -> dict:
        return self.run(batch, layers)[0]

    def release(self) -> None:
        self.released = True
        self.net = None


class ToyTask:
    """Sequences of a repeating pattern (learnable), an exact-resume data position, eval NLL."""

    loss_name = "nll"

    def __init__(self, vocab: int = 32, seq_len: int = 12, rank: int = 0, world_size: int = 1) -> None:
        gen = torch.Generator().manual_seed(0)
        starts = torch.randint(0, vocab, (256,), generator=gen)
        self.data = (starts[:, None] + torch.arange(seq_len)[None, :] * 3) % vocab
        self.position, self.rank, self.world_size = 0, rank, world_size

    def train_batches(self, micro_batch_size: int) -> Iterator[dict]:
        while True:
            # global batch of micro*world sequences; this rank takes its slice
            start = (self.position * self.world_size + self.rank) * micro_batch_size
            idx = torch.arange(start, start + micro_batch_size) % len(self.data)
            self.position += 1
            ids = self.data[idx]
            yield {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

    def state_dict(self) -> dict[str, Any]:
        return {"position": self.position}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.position = state["position"]

    def evaluate(self, student: nn.Module, device: torch.device) -> dict[str, float]:
        ids = self.data[:32]
        return {"eval_loss": float(student({"input_ids": ids, "attention_mask": torch.ones_like(ids)}, []).loss)}

    def export(self, student: nn.Module, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        save_model(student, str(directory / "model.safetensors"))
