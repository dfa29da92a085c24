"""Layer -1 on every causal-LM family that transformers offers: for each one that a generic tiny
config can build, alignkit's post-norm layer -1 equals the model's own
``output_hidden_states[-1]``, or building the adapter raises a one-line error naming the model
class -- never a silently wrong final layer (Phi's ``final_layernorm`` once was one).

Families a generic config cannot build (multimodal composites, encoder-decoders, extra
packages, family-specific size rules) are skipped with the reason; each family has a time cap."""
from __future__ import annotations

import signal
from contextlib import contextmanager
from typing import Iterator

import pytest
import torch

transformers = pytest.importorskip("transformers")

from transformers import AutoModelForCausalLM  # noqa: E402
from transformers.models.auto.configuration_auto import CONFIG_MAPPING  # noqa: E402
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES  # noqa: E402

from alignkit.adapters import hf_causal  # noqa: E402
from alignkit.adapters.hf_causal import HFCausalStudent  # noqa: E402
from alignkit.core.config import ConfigError  # noqa: E402

pytestmark = pytest.mark.slow

# Set on a family's config when it has the field (under this or an aliased name).
TINY = dict(
    hidden_size=32, d_model=32, n_embd=32, num_hidden_layers=2, n_layer=2, num_layers=2,
    num_attention_heads=4, n_head=4, num_key_value_heads=2, head_dim=8, intermediate_size=64,
    ffn_dim=64, moe_intermediate_size=32, num_experts=4, num_local_experts=4, n_routed_experts=4,
    num_experts_per_tok=2, vocab_size=128, vocab_size_per_layer_input=128, max_position_embeddings=64,
    n_positions=64, rotary_dim=8, pad_token_id=0, bos_token_id=1, eos_token_id=2,
)
# Families whose final norm alignkit knows: these must build and match (never skip or raise).
MUST_MATCH = {"llama", "opt", "gpt_neox", "gpt2", "phi", "gemma", "bloom", "falcon", "mpt", "mamba"}
# CPU seconds per family (a profiling timer counts CPU time, so a busy machine does not skip more);
# on one thread most tiny families import, build and run in under 0.3 s
CAP_S = 1.0


def skip(family: str, reason: str) -> None:
    (pytest.fail if family in MUST_MATCH else pytest.skip)(f"{family}: {reason}")


class _OverCap(BaseException):  # not caught by the `except Exception` skips below
    pass


@contextmanager
def cpu_cap(seconds: float) -> Iterator[None]:
    def expire(*_: object) -> None:
        raise _OverCap

    previous = signal.signal(signal.SIGPROF, expire)
    signal.setitimer(signal.ITIMER_PROF, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_PROF, 0)
        signal.signal(signal.SIGPROF, previous)


def tiny_model(family: str) -> torch.nn.Module:
    """The family's causal LM with TINY sizes, random weights, eval mode; skips what can't be built."""
    config_class = CONFIG_MAPPING[family]
    # MPT's and DBRX's attn_config/ffn_config are parts of one model; other sub-configs are
    # whole sub-models (vision, audio, text towers) that a flat tiny config leaves full size
    if set(getattr(config_class, "sub_configs", {})) - {"attn_config", "ffn_config"}:
        skip(family, "composite config (multimodal / several sub-models)")
    try:
        default = config_class()
        if getattr(default, "is_encoder_decoder", False):
            skip(family, "encoder-decoder")
        known = set(default.to_dict()) | set(getattr(config_class, "attribute_map", {}))
        config = config_class(**{key: value for key, value in TINY.items() if key in known})
        torch.manual_seed(0)
        return AutoModelForCausalLM.from_config(config).eval()
    except ImportError as err:
        skip(family, f"needs an extra package: {err}".splitlines()[0][:80])
    except Exception as err:  # family-specific rules (layer_types, mamba sizes, is_decoder, ...)
        skip(family, f"generic tiny config rejected: {type(err).__name__}")


def reference_final(family: str, model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """The model's own hidden_states[-1]; skips families whose forward needs more than a tiny config."""
    try:
        with torch.no_grad():
            return model(input_ids=ids, output_hidden_states=True, use_cache=False).hidden_states[-1]
    except Exception as err:  # e.g. MLA/rotary dims or MoE top-k that TINY doesn't fit
        skip(family, f"forward fails with a generic tiny config: {type(err).__name__}")


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """One intra-op thread (tiny ops: a second thread only spins, doubling the CPU time), and a
    warm-up build so transformers' shared modeling imports don't count against the first cap."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    tiny_model("llama")
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("family", sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES))
def test_final_layer_is_hf_hidden_states_or_clear_error(family: str) -> None:
    ids = torch.randint(3, 128, (2, 6), generator=torch.Generator().manual_seed(0))
    cap = CAP_S * (5 if family in MUST_MATCH else 1)  # these must not skip: more room
    try:
        with cpu_cap(cap):
            model = tiny_model(family)
            reference = reference_final(family, model, ids)
            try:
                student = HFCausalStudent(model)
            except ValueError as err:  # ConfigError included
                message = str(err)
                assert family not in MUST_MATCH, message
                assert type(model).__name__ in message and "\n" not in message
                return
            with torch.no_grad():
                ours = student({"input_ids": ids}, [-1]).features[-1]
    except _OverCap:
        skip(family, f"over the {cap:.0f} CPU-second cap")
    torch.testing.assert_close(ours, reference)


def test_missed_final_norm_fails_at_build(monkeypatch: pytest.MonkeyPatch) -> None:
    """A final norm find_blocks does not know is caught by the build-time check, naming the model;
    pre_norm (layer -1 = last block output) still builds."""
    model = tiny_model("llama")
    monkeypatch.setattr(hf_causal, "FINAL_NAMES", ("final_layernorm",))
    with pytest.raises(ConfigError, match="LlamaForCausalLM.*FINAL_NAMES.*final_layer: pre_norm"):
        HFCausalStudent(model)
    assert HFCausalStudent(model, final_layer="pre_norm")._parts.final_norm is None
