"""The MFU arithmetic of the GPU benchmarks (benchmarks/flops.py): the FLOP formula and the peak
looked up from the card's name; benchmarks/gpu_check.py's CPU dry run: every part gets a status."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

from flops import mfu, peak_bf16_flops, train_flops_per_token  # noqa: E402
from gpu_check import TIMEOUT_S  # noqa: E402


def test_flops_per_token_adds_causal_attention_to_6n() -> None:
    # the paper's 1.4B student: 24 layers, width 2048, seq 1280; 1.31e9 parameters outside the embedding
    n, layers, width, seq = 1_310_000_000, 24, 2048, 1280
    attention = 12 * layers * width * seq  # QK^T and AV, forward + backward, no mask
    assert train_flops_per_token(n, layers, width, seq, causal=False) == 6 * n + attention
    assert train_flops_per_token(n, layers, width, seq) == 6 * n + attention / 2
    assert train_flops_per_token(n, layers, width, 2 * seq) - train_flops_per_token(n, layers, width, seq) == attention / 2
    assert mfu(1000.0, 1e9, 1e13) == pytest.approx(0.1)
    assert mfu(1000.0, 1e9, None) is None


@pytest.mark.parametrize("name, card, peak", [
    ("NVIDIA H100 80GB HBM3", "H100 SXM", 989.4e12),
    ("NVIDIA H100 PCIe", "H100 PCIe", 756.5e12),
    ("NVIDIA H100 NVL", "H100 NVL", 835.5e12),
    ("NVIDIA H200", "H200 SXM", 989.4e12),
    ("NVIDIA H200 NVL", "H200 NVL", 835.5e12),
    ("NVIDIA GH200 480GB", "GH200 (H100-class GPU)", 989.4e12),
    ("NVIDIA A100-SXM4-80GB", "A100 SXM", 312e12),
    ("NVIDIA A100 80GB PCIe", "A100 PCIe", 312e12),
])
def test_peak_is_read_from_the_exact_card(name: str, card: str, peak: float) -> None:
    assert peak_bf16_flops(name) == (peak, card)


@pytest.mark.parametrize("name", ["NVIDIA H100", "NVIDIA GeForce RTX 4090", "Tesla V100-SXM2-16GB", "NVIDIA A100"])
def test_an_unknown_or_ambiguous_card_gets_no_peak_and_says_why(name: str) -> None:
    peak, reason = peak_bf16_flops(name)
    assert peak is None and name in reason and "MFU not reported" in reason


def gpu_check(tmp_path: Path, *args: str) -> dict:
    out = tmp_path / "gpu_check.json"
    command = [sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), "--device", "cpu", "--work", str(tmp_path / "work"),
               "--out", str(out), *args]
    done = subprocess.run(command, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.mark.slow
def test_dry_run_on_cpu_reports_every_part(tmp_path: Path) -> None:
    report = gpu_check(tmp_path, "--parts", "tests,let")
    parts = report["parts"]
    assert list(parts) == list(TIMEOUT_S)
    assert parts["tests"]["status"] == "ok" and parts["tests"]["passed"] == parts["tests"]["tests"] > 0
    let = parts["let"]
    assert let["status"] == "ok", let.get("output_tail")
    assert let["tokens_per_s"] > 0 and let["estimated_peak_gb"] > 0 and let["peak_memory_gb"] > 0
    assert let["estimate_setting"] == "fsdp" and let["mfu"] is None  # no GPU peak on a CPU
    assert let["flops_per_token"] == train_flops_per_token(let["non_embedding_params"], let["layers"], let["width"], 32)
    assert all(parts[name] == {"status": "skipped", "reason": "not in --parts"}
               for name in ("baseline", "baseline_compiled", "let_compiled"))
    assert report["compile_speedup"] == {"baseline": None, "let": None}
    assert report["card"]["torch"] and report["flop_formula"].startswith("flops/token = 6*N")


def test_parts_beyond_the_budget_are_skipped(tmp_path: Path) -> None:
    parts = gpu_check(tmp_path, "--budget", "0")["parts"]
    assert {name: part["status"] for name, part in parts.items()} == {name: "skipped" for name in TIMEOUT_S}
    assert "budget left" in parts["let"]["reason"]
