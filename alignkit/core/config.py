"""Typed config schema (dataclasses). YAML (omegaconf) only sets values; see load_config."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

@dataclass
class ModelConfig:
    """One model (student or teacher). ``preset`` names a YAML in adapters/ whose values are
    merged under the fields set here."""

    preset: str = ""
    kind: str = "hf_causal"  # registry key: hf_causal | timesnet | hf_ts_classifier | (yours)
    source: str = "config"  # config (random init from `arch`) | pretrained (hub id or dir) | gguf | checkpoint
    name_or_path: str = ""  # hub id, local dir, "pkg:<python package>" (dir of an installed package), or run dir
    gguf_file: str = ""  # GGUF file name inside name_or_path (source=gguf)
    arch: dict[str, Any] = field(default_factory=dict)  # HF config fields (model_type, hidden_size, ...) for source=config
    tokenizer: str = ""  # where the tokenizer comes from; "" = same as the model
    final_layer: str = "post_norm"  # what layer -1 means: post_norm (HF hidden_states[-1]) | pre_norm
    dtype: str = "float32"  # float32 | bfloat16 | float16 (teacher weights)
    trust_remote_code: bool = False
    options: dict[str, Any] = field(default_factory=dict)  # adapter-specific settings
