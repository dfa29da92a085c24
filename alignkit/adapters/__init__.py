"""Model adapters: each module wraps one family of models behind the core adapter protocol
(``alignkit.core.adapter``) and registers its builders with ``alignkit.core.registry``.

Importing this package registers every adapter whose third-party dependencies are installed;
an adapter whose heavy library is missing is skipped (its ``kind`` stays unregistered, and the
registry names the known kinds). Add a new adapter as one line in the list at the bottom.
"""
from __future__ import annotations

import importlib


def _register(module: str) -> None:
    try:
        importlib.import_module(f"alignkit.adapters.{module}")
    except ModuleNotFoundError as err:
        if err.name and err.name.split(".")[0] == "alignkit":
            raise  # a bug in alignkit itself, not a missing optional dependency


# --- adapters (one per line) ---
_register("hf_causal")  # kind: hf_causal (transformers)
_register("timesnet")  # kind: timesnet (TimesNet student for teacher pretraining, and teacher)
_register("hf_ts")  # kind: hf_ts_classifier (HF decoder as a time-series classifier student)
_register("timm_vision")  # kind: timm_vision (any timm image model: ViT, ResNet, ConvNeXt, ...; needs the [vision] extra)
