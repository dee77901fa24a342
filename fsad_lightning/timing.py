"""Per-stage wall time of a method's forward, for the latency benchmarks."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator

import torch


@contextlib.contextmanager
def timed_stage(timings: dict[str, float] | None, name: str, device: torch.device) -> Iterator[None]:
    """Add the wall time of the block to ``timings[name]``, synchronising CUDA around it; with
    ``timings=None`` the block just runs (the forward pays nothing when not benchmarked)."""
    if timings is None:
        yield
        return
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    yield
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    timings[name] = timings.get(name, 0.0) + time.perf_counter() - start
