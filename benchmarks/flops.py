"""Model FLOP utilisation (MFU) for the GPU benchmarks (scale.py, gpu_check.py): the training FLOPs
of a decoder-only transformer per token, and each GPU's dense bf16 peak, looked up by its name.

Training FLOPs per token (forward + backward = 3x forward), PaLM's appendix B count:
``6 N + 12 L d S / 2`` -- N the parameters outside the input embedding (every matmul weight: 2 FLOPs
per weight forward, 4 backward), and attention's scores and weighted values (``QK^T`` and ``AV``:
``2 x 2 d S`` per layer forward, so ``12 L d S`` forward + backward) halved because a causal mask
leaves half of the ``S x S`` products. The teacher's FLOPs are not counted (MFU of the student).
"""
from __future__ import annotations

from typing import Any

FLOP_FORMULA = "flops/token = 6*N + 12*L*d*S/2 (N: non-embedding params, L layers, d width, S sequence; causal: attention halved)"

# dense bf16 tensor-core FLOP/s per GPU (NVIDIA datasheets, without sparsity). Each entry: the
# substrings torch.cuda.get_device_name() must all contain; the first match wins, so the more
# specific names come first (GH200 contains "H200"). A name that matches none gets no MFU: a
# wrong peak would be worse than none (H100 PCIe is 24% below H100 SXM).
PEAK_BF16_FLOPS: tuple[tuple[tuple[str, ...], str, float], ...] = (
    (("GH200",), "GH200 (H100-class GPU)", 989.4e12),
    (("H200", "NVL"), "H200 NVL", 835.5e12),
    (("H200",), "H200 SXM", 989.4e12),
    (("H100", "NVL"), "H100 NVL", 835.5e12),
    (("H100", "PCIE"), "H100 PCIe", 756.5e12),
    (("H100", "SXM"), "H100 SXM", 989.4e12),
    (("H100", "HBM3"), "H100 SXM", 989.4e12),  # the SXM part reports "NVIDIA H100 80GB HBM3"
    (("A100", "SXM"), "A100 SXM", 312e12),
    (("A100", "PCIE"), "A100 PCIe", 312e12),
    (("L40S",), "L40S", 362.1e12),
    (("B200",), "B200", 2250e12),
)


def student_shape(student: Any) -> dict[str, int]:
    """What the FLOP count needs of a Hugging Face causal-LM student (alignkit's adapter)."""
    params = sum(p.numel() for p in student.parameters())
    return {"params": params, "non_embedding_params": params - student.model.get_input_embeddings().weight.numel(),
            "layers": student.num_layers, "width": student.width(-1)}


def train_flops_per_token(non_embedding_params: int, layers: int, width: int, seq_len: int, causal: bool = True) -> float:
    """Forward + backward FLOPs of one trained token (see the module docstring)."""
    attention = 12 * layers * width * seq_len
    return 6 * non_embedding_params + (attention / 2 if causal else attention)


def peak_bf16_flops(device_name: str) -> tuple[float | None, str]:
    """(dense bf16 FLOP/s, the card it was read as), or (None, why not) for a card not in the table."""
    name = device_name.upper()
    for needed, card, flops in PEAK_BF16_FLOPS:
        if all(part in name for part in needed):
            return flops, card
    return None, f"no bf16 peak known for {device_name!r}: MFU not reported"


def mfu(tokens_per_s: float, flops_per_token: float, peak: float | None) -> float | None:
    """Achieved / peak FLOP/s; None without a peak."""
    return tokens_per_s * flops_per_token / peak if peak else None
