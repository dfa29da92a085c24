"""TimesNet (Wu et al., ICLR 2023) for time-series classification, as an alignkit student
(for pretraining the teacher) and as a frozen LET teacher.

Architecture (options, defaults in :data:`DEFAULTS`):

* **embedding** -- a 1-D convolution (kernel 3, zero padding, no bias) from the channels to
  ``d_model`` plus a fixed sinusoidal position encoding, dropout;
* ``e_layers`` **TimesBlocks** -- FFT of the (masked) input over time; the ``top_k``
  frequencies by amplitude averaged over batch and channels (DC excluded) give the periods
  ``p = T // f``; for each period the series is zero-padded to a multiple of ``p``, folded to
  2-D ``[B, D, T/p, p]``, passed through Inception (``num_kernels`` 2-D convolutions with
  kernels 1, 3, 5, ... averaged) -> GELU -> Inception, unfolded and cut back to ``T``; the ``k``
  results are summed with per-sample softmax weights of their amplitudes, plus a residual;
* **layer norm** after every block (the original shares one LayerNorm between blocks; here each
  block owns one, applied at the *input* of the next block and as ``self.norm`` after the last,
  so the computation is the original's while layer ``i`` stays a clean block output);
* **head** -- GELU, dropout, *masked mean pooling* over real steps, linear to the classes (the
  original flattens ``[T * d_model]``, which ties the head to one length and lets padding matter).

Layer convention (``alignkit.core.adapter``): ``0`` = embedding output, ``i`` = output of block
``i`` (before the next block's input norm), ``-1`` = after the final layer norm. Features are
per time step ``[B, T, d_model]`` with zeros at padded steps.

Padding, exactly: the batch is first cut to its longest real series ``L`` (features are padded
back with zeros to the input length), padded steps are zeroed before the embedding, before every
FFT, between the two Inception stages and at every block output, and pooling uses real steps
only. Hence, for a fixed batch composition, **any extra trailing padding beyond ``L`` and any
values at padded steps leave every logit and every real-step feature bit-identical**; a series
evaluated alone gives the same prediction whatever it is padded to. What remains
batch-dependent (as in the original TimesNet) is the choice of periods: the top-k frequencies
are averaged over the batch, and the FFT length is ``L``.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path
from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from alignkit.core.config import at_least, between, checked
from alignkit.core.errors import ConfigError, DataError, MissingFile
from alignkit.adapters.common import resolve_path, weight_files
from alignkit.core.adapter import Batch, DataInfo, StudentOutput, resolve_layer
from alignkit.core.registry import register_adapter, typed_options
from alignkit.core.taps import LayerTaps
from alignkit.core.teacher import FrozenTeacher

__all__ = ["DEFAULTS", "TimesBlock", "TimesNetClassifier", "TimesNetTeacher", "save_timesnet",
           "load_timesnet", "build_timesnet_student", "build_timesnet_teacher"]

DEFAULTS: dict[str, Any] = {"d_model": 32, "d_ff": 32, "e_layers": 2, "top_k": 3, "num_kernels": 6,
                            "dropout": 0.1}
_ARCH_KEYS = ("num_channels", "num_classes", *DEFAULTS)
WEIGHTS_NAME, CONFIG_NAME = "model.safetensors", "timesnet.json"


def _positions(length: int, width: int, device: torch.device) -> Tensor:
    """Sinusoidal position encoding [length, width] (Vaswani et al.)."""
    position = torch.arange(length, device=device, dtype=torch.float32)[:, None]
    div = torch.exp(torch.arange(0, width, 2, device=device, dtype=torch.float32) * (-math.log(10000.0) / width))
    table = torch.zeros(length, width, device=device)
    table[:, 0::2] = torch.sin(position * div)
    table[:, 1::2] = torch.cos(position * div)[:, : width // 2]
    return table


class DataEmbedding(nn.Module):
    def __init__(self, num_channels: int, d_model: int, dropout: float) -> None:
        super().__init__()
        self.token = nn.Conv1d(num_channels, d_model, kernel_size=3, padding=1, bias=False)
        nn.init.kaiming_normal_(self.token.weight, mode="fan_in", nonlinearity="leaky_relu")
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        m = mask[..., None].to(x.dtype)
        h = self.token((x * m).transpose(1, 2)).transpose(1, 2)
        h = h + _positions(x.shape[1], h.shape[2], x.device).to(h.dtype)
        return self.dropout(h) * m


class Inception(nn.Module):
    """Parallel 2-D convolutions with kernels 1, 3, ..., 2n-1 ('same' padding), averaged."""

    def __init__(self, in_channels: int, out_channels: int, num_kernels: int) -> None:
        super().__init__()
        self.kernels = nn.ModuleList(
            nn.Conv2d(in_channels, out_channels, kernel_size=2 * i + 1, padding=i) for i in range(num_kernels)
        )
        for conv in self.kernels:
            nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
            nn.init.zeros_(conv.bias)

    def forward(self, x: Tensor) -> Tensor:
        return torch.stack([conv(x) for conv in self.kernels], dim=-1).mean(-1)


class TimesBlock(nn.Module):
    """One TimesBlock; ``forward(x, mask)`` with ``x`` [B, T, D], ``mask`` [B, T] (1 = real)."""

    def __init__(self, d_model: int, d_ff: int, top_k: int, num_kernels: int, input_norm: bool) -> None:
        super().__init__()
        self.top_k = top_k
        self.input_norm = nn.LayerNorm(d_model) if input_norm else nn.Identity()
        self.conv_in = Inception(d_model, d_ff, num_kernels)
        self.conv_out = Inception(d_ff, d_model, num_kernels)

    def periods(self, x: Tensor) -> tuple[list[int], Tensor]:
        """Top-k periods (batch-level) and their per-sample amplitudes [B, k] for masked ``x``."""
        amplitude = torch.fft.rfft(x.float(), dim=1).abs()  # [B, T//2 + 1, D]
        spectrum = amplitude.mean(0).mean(-1)
        spectrum[0] = 0  # no DC: period T would be the whole series
        k = min(self.top_k, spectrum.shape[0] - 1)
        top = torch.topk(spectrum.detach(), k).indices
        length = x.shape[1]
        return [length // int(f) for f in top.tolist()], amplitude.mean(-1)[:, top]

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        b, t, d = x.shape
        m = mask[..., None].to(x.dtype)
        x = self.input_norm(x) * m
        if t < 2 or self.top_k < 1:
            return x
        periods, amplitudes = self.periods(x)
        results = []
        for p in periods:
            rows = -(-t // p)
            pad = rows * p - t
            h = F.pad(x, (0, 0, 0, pad)).reshape(b, rows, p, d).permute(0, 3, 1, 2)
            m2 = F.pad(mask.to(x.dtype), (0, pad)).reshape(b, 1, rows, p)
            h = F.gelu(self.conv_in(h)) * m2  # padded steps must not leak into real ones
            h = self.conv_out(h)
            results.append(h.permute(0, 2, 3, 1).reshape(b, rows * p, d)[:, :t])
        weights = torch.softmax(amplitudes, dim=1).to(x.dtype)  # [B, k]
        mixed = (torch.stack(results, dim=-1) * weights[:, None, None, :]).sum(-1)
        return (mixed + x) * m


class MaskedLayerNorm(nn.LayerNorm):
    """LayerNorm whose output is zero at padded steps: ``forward(x, mask)``."""

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:  # type: ignore[override]
        out = super().forward(x)
        return out if mask is None else out * mask[..., None].to(out.dtype)


def _pad_time(t: Tensor, length: int) -> Tensor:
    return t if t.shape[1] == length else F.pad(t, (0, 0, 0, length - t.shape[1]))


def _masks(batch: Batch, x: Tensor) -> Tensor:
    mask = batch.get("attention_mask") if hasattr(batch, "get") else None
    if mask is None:
        return torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
    return mask.to(x.device).bool()


class TimesNetClassifier(nn.Module):
    """TimesNet with a classification head; a student adapter (``forward(batch, layers)``)."""

    logits_kind = "per_sample"  # what a logit_kd term compares (core/adapter.py LOGITS_KINDS)

    def __init__(self, num_channels: int, num_classes: int, d_model: int = 32, d_ff: int = 32,
                 e_layers: int = 2, top_k: int = 3, num_kernels: int = 6, dropout: float = 0.1,
                 seq_len: int = 0, class_names: Sequence[str] | None = None,
                 datasets: Sequence[str] | None = None) -> None:
        super().__init__()
        if num_channels < 1 or num_classes < 1 or e_layers < 1:
            raise ConfigError(f"TimesNet needs num_channels, num_classes, e_layers >= 1 "
                             f"(got {num_channels}, {num_classes}, {e_layers})")
        self.options: dict[str, Any] = {
            "num_channels": int(num_channels), "num_classes": int(num_classes), "d_model": int(d_model),
            "d_ff": int(d_ff), "e_layers": int(e_layers), "top_k": int(top_k),
            "num_kernels": int(num_kernels), "dropout": float(dropout), "seq_len": int(seq_len),
            "class_names": [str(c) for c in class_names] if class_names is not None else None,
            "datasets": list(datasets) if datasets is not None else None,
        }
        self.num_layers = int(e_layers)
        self.d_model = int(d_model)
        self.num_channels = int(num_channels)
        self.embedding = DataEmbedding(num_channels, d_model, dropout)
        self.blocks = nn.ModuleList(
            TimesBlock(d_model, d_ff, top_k, num_kernels, input_norm=i > 0) for i in range(e_layers)
        )
        self.norm = MaskedLayerNorm(d_model)
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(d_model, num_classes)
        self._taps = LayerTaps(self.blocks, self.norm, root=self)  # hooks registered once

    @classmethod
    def from_options(cls, options: dict[str, Any]) -> "TimesNetClassifier":
        known = {"num_channels", "num_classes", "seq_len", "class_names", "datasets", *DEFAULTS}
        unknown = set(options) - known
        if unknown:
            raise ConfigError(f"unknown TimesNet options {sorted(unknown)} (known: {sorted(known)})")
        missing = {"num_channels", "num_classes"} - {k for k, v in options.items() if v}
        if missing:
            raise ConfigError(f"TimesNet needs options {sorted(missing)} (the task passes them from the data)")
        return cls(**{**DEFAULTS, **options})

    def width(self, layer: int) -> int:
        resolve_layer(layer, self.num_layers)
        return self.d_model

    def save_pretrained(self, directory: str | os.PathLike) -> Path:
        """:func:`save_timesnet` as a method, so a task exports the model in its own format
        without knowing the family (``ts_classify``'s ``final/``)."""
        return save_timesnet(self, directory)

    @property
    def device(self) -> torch.device:
        return self.head.weight.device

    def _inputs(self, batch: Batch) -> tuple[Tensor, Tensor]:
        x = batch["x"].to(self.device, self.head.weight.dtype)
        if x.shape[-1] < self.num_channels:  # datasets with fewer channels: zero channels (as in pretraining)
            x = F.pad(x, (0, self.num_channels - x.shape[-1]))
        elif x.shape[-1] > self.num_channels:
            raise DataError(f"batch has {x.shape[-1]} channels, this TimesNet takes {self.num_channels}")
        return x, _masks(batch, x)

    def encode(self, x: Tensor, mask: Tensor) -> Tensor:
        """Final-layer features [B, L, d_model] of a batch already cut to its longest series."""
        h = self.embedding(x, mask)
        for block in self.blocks:
            h = block(h, mask)
        return self.norm(h, mask)

    def _run(self, batch: Batch, layers: Sequence[int], stop_early: bool) -> tuple[Tensor | None, dict[int, Tensor], Tensor]:
        x, mask = self._inputs(batch)
        full = x.shape[1]
        longest = max(int(mask.sum(1).max()), 1) if mask.numel() else 1
        x, mask = x[:, :longest], mask[:, :longest]

        def forward() -> Tensor:
            h = self.encode(x, mask)
            if stop_early:  # a teacher's features: no head
                return h
            m = mask[..., None].to(h.dtype)
            h = self.dropout(F.gelu(h)) * m
            pooled = h.sum(1) / m.sum(1).clamp(min=1)
            return self.head(pooled)

        logits, captured = self._taps.run(forward, list(layers), stop_early=stop_early)
        features = {layer: _pad_time(t, full) for layer, t in captured.items()}
        return (None if stop_early else logits), features, mask

    def forward(self, batch: Batch, layers: Sequence[int] = (), logits: bool = False) -> StudentOutput:  # type: ignore[override]
        logits, features, _ = self._run(batch, layers, stop_early=False)
        assert logits is not None
        labels = batch.get("labels") if hasattr(batch, "get") else None
        if labels is not None:
            loss = F.cross_entropy(logits.float(), labels.to(logits.device).long())
        else:
            loss = logits.new_zeros(())
        return StudentOutput(loss=loss, features=features, logits=logits)


class TimesNetTeacher(FrozenTeacher):
    """A frozen pretrained TimesNet queried for per-time-step features [B, T, d_model] and
    per-sample class logits [B, C] (logit KD on time series).

    Batches with fewer channels than the teacher was trained on are zero-padded (as the
    multi-dataset loader does)."""

    logits_kind = "per_sample"

    def __init__(self, model: TimesNetClassifier) -> None:
        super().__init__(model)
        self.model: TimesNetClassifier | None
        self.num_layers = model.num_layers
        self.d_model = model.d_model
        self.options = dict(model.options)

    def width(self, layer: int) -> int:
        resolve_layer(layer, self.num_layers)
        return self.d_model

    def _forward(self, model: nn.Module, batch: Batch, layers: list[int], logits: bool) -> tuple[dict[int, Tensor], Tensor | None]:
        # without logits the forward stops after the deepest layer asked for
        out, features, _ = model._run(batch, layers, stop_early=not logits)
        return features, out


# --------------------------------------------------------------------------- save / load


def save_timesnet(model: TimesNetClassifier | TimesNetTeacher, directory: str | os.PathLike) -> Path:
    """Write ``model.safetensors`` and ``timesnet.json`` (all options incl. class names and
    datasets) into ``directory``; returns it."""
    from safetensors.torch import save_file

    if isinstance(model, TimesNetTeacher):
        if model.model is None:
            raise RuntimeError("cannot save a released teacher")
        model = model.model
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(state, str(out / WEIGHTS_NAME), metadata={"format": "pt", "kind": "timesnet"})
    (out / CONFIG_NAME).write_text(json.dumps({"kind": "timesnet", **model.options}, indent=2))
    return out


def load_timesnet(directory: str | os.PathLike, device: str | torch.device = "cpu") -> TimesNetClassifier:
    """Rebuild a :class:`TimesNetClassifier` saved by :func:`save_timesnet`."""
    from safetensors.torch import load_file

    folder = Path(directory)
    config_path, weights_path = folder / CONFIG_NAME, folder / WEIGHTS_NAME
    if not config_path.is_file() or not weights_path.is_file():
        raise MissingFile(
            f"{folder} is not a saved TimesNet (needs {CONFIG_NAME} and {WEIGHTS_NAME}; "
            "write one with alignkit.adapters.timesnet.save_timesnet, e.g. by pretraining the teacher)"
        )
    options = json.loads(config_path.read_text())
    options.pop("kind", None)
    model = TimesNetClassifier.from_options(options)
    model.load_state_dict(load_file(str(weights_path)))
    return model.to(device)


# --------------------------------------------------------------------------- registry


@dataclass
class TimesNetOptions:
    """``options`` of kind ``timesnet`` (student or teacher to pre-train): the architecture;
    channels and classes come from the data unless set (then they must match it)."""

    d_model: int = checked(DEFAULTS["d_model"], at_least(1))
    d_ff: int = checked(DEFAULTS["d_ff"], at_least(1))
    e_layers: int = checked(DEFAULTS["e_layers"], at_least(1))
    top_k: int = checked(DEFAULTS["top_k"], at_least(1))
    num_kernels: int = checked(DEFAULTS["num_kernels"], at_least(1))
    dropout: float = checked(DEFAULTS["dropout"], between(0, 1, high_open=True))
    num_classes: int = checked(0, at_least(0))  # 0 = from the data
    num_channels: int = checked(0, at_least(0))  # 0 = from the data


def build_timesnet_student(cfg: Any, *, device: str | torch.device = "cpu", data: DataInfo = DataInfo()) -> TimesNetClassifier:
    """From ``cfg.options`` (+ ``num_classes``, ``num_channels``, ``seq_len``, ``class_names``,
    ``datasets`` the data reports), or -- with ``source: checkpoint`` and ``name_or_path`` -- a
    saved TimesNet to fine-tune."""
    if cfg.source in ("checkpoint", "pretrained") and cfg.name_or_path:
        return load_timesnet(resolve_path(cfg.name_or_path), device)
    options = dataclasses.asdict(typed_options(cfg, "student").options)
    for key in ("num_classes", "num_channels"):
        value = getattr(data, key)
        if value is not None and options[key] not in (0, value):
            raise ConfigError(f"student.options.{key}={options[key]} but the data has {value}")
        options[key] = value if value is not None else options[key]
    options.update(seq_len=data.seq_len or 0, class_names=list(data.class_names) or None,
                   datasets=list(data.datasets) or None)
    return TimesNetClassifier.from_options(options).to(device)


def build_timesnet_teacher(cfg: Any, *, device: str | torch.device = "cpu", data: DataInfo = DataInfo()) -> TimesNetTeacher:
    """A frozen TimesNet from ``cfg.name_or_path`` (a directory written by :func:`save_timesnet`)."""
    if not cfg.name_or_path:
        raise ConfigError("teacher kind=timesnet needs name_or_path: a directory saved by save_timesnet "
                         "(pretrain one with the ts_classify task and a timesnet student)")
    return TimesNetTeacher(load_timesnet(resolve_path(cfg.name_or_path), device))


register_adapter("timesnet", student=build_timesnet_student, teacher=build_timesnet_teacher, options=TimesNetOptions,
                 weight_files=weight_files, teacher_from_student=TimesNetTeacher)
