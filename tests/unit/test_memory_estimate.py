"""The memory benchmarks' activation count (benchmarks/memory_estimate.py): the same on meta as on the CPU."""

import importlib.util
from pathlib import Path

import torch

_PATH = Path(__file__).resolve().parents[2] / "benchmarks" / "memory_estimate.py"
_SPEC = importlib.util.spec_from_file_location("fsad_memory_estimate", _PATH)
memory_estimate = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(memory_estimate)
LiveTensorBytes, fused_attention = memory_estimate.LiveTensorBytes, memory_estimate.fused_attention


def _attention_step(device: str) -> float:
    """Peak live bytes of an attention forward + backward over 1024 tokens."""
    torch.manual_seed(0)
    with torch.device(device):
        projection = torch.nn.Linear(32, 96)
        tokens = torch.zeros(2, 1024, 32, requires_grad=True)
    with LiveTensorBytes() as counter:
        q, k, v = projection(tokens).view(2, 1024, 3, 4, 8).permute(2, 0, 3, 1, 4)
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        out.float().pow(2).mean().backward()
    return float(counter.peak)


def test_the_meta_count_is_the_cpu_count_with_attention_as_a_fused_kernel():
    with fused_attention():
        cpu, meta = _attention_step("cpu"), _attention_step("meta")
    assert cpu == meta > 0
    attention_matrix = 2 * 4 * 1024 * 1024 * 4  # what a decomposed attention stores, [B, H, T, T] fp32
    assert meta < attention_matrix
    assert _attention_step("meta") > attention_matrix  # PyTorch's own meta attention: its matmuls
