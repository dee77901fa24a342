"""Helpers of the memory benchmarks (``one_to_normal_memory.py``, ``adp_memory.py``, ``latency.py``).

Peak memory is estimated without a GPU: parameter bytes are counted exactly, and a stage's activation
memory is the peak of the bytes its ops' outputs keep alive at once (:class:`LiveTensorBytes`), counted
on the CPU or -- with no compute and no memory at all -- on the ``meta`` device, where the full-size
networks can be built from their configs on any machine.
"""

from __future__ import annotations

import contextlib
import time
import weakref
from collections.abc import Iterator

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

GIB = 2**30
MIB = 2**20


class LiveTensorBytes(TorchDispatchMode):
    """Counts the bytes of the tensors that ops create while they are alive; ``peak`` is the largest total.

    Each new storage is counted once (views and in-place results share their input's storage) and freed
    when its first tensor dies. Works on real devices and on ``meta`` (storages are told apart by their
    identity, not their data pointer), so a ``meta`` copy of a network gives its activation memory without
    computing anything. Autograd's saved tensors stay counted until the backward frees them.
    """

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._owners: dict[int, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in tree_flatten(out)[0]:
            if not isinstance(tensor, torch.Tensor):
                continue
            storage = tensor.untyped_storage()
            key, size = storage._cdata, storage.nbytes()
            if size == 0 or key in self._owners:
                continue
            self._owners[key] = size
            self.live += size
            self.peak = max(self.peak, self.live)
            weakref.finalize(tensor, self._free, key)
        return out

    def _free(self, key: int) -> None:
        self.live -= self._owners.pop(key, 0)


@contextlib.contextmanager
def fused_attention() -> Iterator[None]:
    """``F.scaled_dot_product_attention`` as one fused kernel on every device, ``meta`` included.

    On ``meta`` PyTorch decomposes attention into its matmuls and softmax, which stores the ``T x T``
    matrix a GPU's flash / memory-efficient kernel never makes (at 64 x 64 latents, 4096^2 per head); the
    CPU's fused flash kernel has meta shapes for its forward and backward (output + log-sum-exp saved), so
    inside this context every call runs it, and a meta count gives a fused GPU kernel's memory.
    """
    functional = torch.nn.functional
    original = functional.scaled_dot_product_attention

    def fused(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **kwargs):
        if kwargs or query.shape[-1] != value.shape[-1]:
            return original(query, key, value, attn_mask, dropout_p, is_causal, scale=scale, **kwargs)
        if attn_mask is not None and attn_mask.dtype == torch.bool:  # the fused op takes additive masks
            attn_mask = torch.zeros_like(attn_mask, dtype=query.dtype).masked_fill(~attn_mask, float("-inf"))
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            query, key, value, dropout_p, is_causal, attn_mask=attn_mask, scale=scale
        )[0]

    functional.scaled_dot_product_attention = fused
    try:
        yield
    finally:
        functional.scaled_dot_product_attention = original


def measure(fn, *args) -> tuple[float, float]:
    """``(peak activation bytes, seconds)`` of ``fn(*args)`` (outputs dropped before returning)."""
    start = time.perf_counter()
    with LiveTensorBytes() as tracker:
        result = fn(*args)
        del result
    return float(tracker.peak), time.perf_counter() - start


def parameter_bytes(module: torch.nn.Module, dtype_bytes: int | None = None) -> float:
    """Bytes of ``module``'s parameters, in their own dtype or at ``dtype_bytes`` per element."""
    return float(sum(p.numel() * (dtype_bytes or p.element_size()) for p in module.parameters()))
