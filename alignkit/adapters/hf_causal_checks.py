"""What ``alignkit check`` needs of a Hugging Face causal LM, registered as capabilities of the
``hf_causal`` family: its :class:`~alignkit.core.adapter.ModelShape` for the memory estimate
(works on the meta device), whether its tokenizer loads offline (:func:`hub_tokenizer`), and the
check that every key under ``options.arch`` is a field of the model type's HF config class (HF
keeps an unknown key as a silent extra attribute).
"""
from __future__ import annotations

import difflib
import inspect
import os
from typing import Any

from torch import nn

from alignkit.core.adapter import ModelShape
from alignkit.core.errors import ConfigError

__all__ = ["check_arch", "hub_tokenizer", "memory_shape", "transformer_shape"]


def transformer_shape(model: nn.Module, blocks: nn.ModuleList) -> ModelShape:
    """Shape of a Hugging Face causal LM (works on the meta device)."""
    config = model.config
    hidden = int(config.hidden_size)
    intermediate = int(getattr(config, "intermediate_size", None) or getattr(config, "ffn_dim", None)
                       or getattr(config, "n_inner", None) or 4 * hidden)
    unique = {id(p): p for p in model.parameters()}.values()  # tied embeddings count once
    head = model.get_output_embeddings()
    return ModelShape(
        params=sum(p.numel() for p in unique),
        block_params=sum(p.numel() for p in blocks[0].parameters()) if len(blocks) else 0,
        layers=len(blocks), hidden=hidden, intermediate=intermediate,
        vocab=int(head.weight.shape[0]) if head is not None else int(config.vocab_size),
        largest_param=max((p.numel() for p in unique), default=0),
    )


def memory_shape(adapter: Any) -> ModelShape:
    """The shape of an hf_causal student or teacher (the ``memory_shape`` capability)."""
    from alignkit.adapters.hf_causal import find_blocks

    return transformer_shape(adapter.model, find_blocks(adapter.model).blocks)


def hub_tokenizer(cfg: Any) -> str:
    """The hub id :func:`~alignkit.adapters.hf_causal.load_tokenizer` would download ``cfg``'s
    tokenizer from; "" when it loads without the network (a package, a local path, a GGUF file,
    or none at all: source=config without ``options.tokenizer`` is refused by the loader)."""
    from alignkit.adapters.hf_loading import hf_options

    tokenizer = hf_options(cfg).tokenizer
    if cfg.source == "gguf" and not tokenizer:
        return ""
    spec = tokenizer or ("" if cfg.source == "config" else cfg.name_or_path)
    local = not spec or spec.startswith("pkg:") or os.path.exists(os.path.expanduser(spec))
    return "" if local else spec


def check_arch(options: Any, key: str) -> None:
    """Every key of ``<key>.options.arch`` is a field of its ``model_type``'s config class (the
    ``check_options`` capability): HF keeps an unknown key as an extra attribute of the config,
    which no default config has. Legacy keys the class folds into others (``rope_theta``) pass;
    an unknown ``model_type`` or a bad value is left to the loader's error."""
    arch = dict(getattr(options, "arch", None) or {})
    from transformers import CONFIG_MAPPING

    if arch.get("model_type") not in CONFIG_MAPPING:
        return
    config_class = CONFIG_MAPPING[arch.pop("model_type")]
    try:
        built, default = vars(config_class(**arch)), vars(config_class())
    except Exception:  # noqa: BLE001 -- values are the loader's to judge, with its own message
        return
    known = sorted(set(default) | set(inspect.signature(config_class.__init__).parameters)
                   | set(getattr(config_class, "attribute_map", {})))
    for name in arch:
        if name in built and name not in default:
            near = difflib.get_close_matches(name, known, n=1)
            hint = f"; did you mean {near[0]!r}?" if near else ""
            raise ConfigError(f"{key}.options.arch.{name}: not a field of {config_class.__name__} "
                              f"(model_type={config_class.model_type}){hint}")
