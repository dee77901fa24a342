"""DDP synchronisation of metric states that live on the CPU.

The per-pixel states of :class:`~fsad_lightning.metrics.pixel.PixelMetrics` are kept on the CPU (a test
set at ground-truth resolution is hundreds of millions of pixels). torchmetrics gathers states with
``torch.distributed.all_gather``; the NCCL backend only moves CUDA tensors, so
:func:`gather_all_tensors_any_device` sends CPU states through the current GPU when the process group is
NCCL and brings the gathered tensors back. With gloo (CPU DDP) it is torchmetrics' gather unchanged.
Uneven shards (ranks with different numbers of images or pixels) are handled by torchmetrics' padding.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torchmetrics.utilities.distributed import gather_all_tensors


def gather_all_tensors_any_device(result: Tensor, group: Any | None = None) -> list[Tensor]:
    """``all_gather`` a tensor of any length from every rank, wherever the tensor lives.

    Returns one tensor per rank, on ``result``'s device.
    """
    backend = torch.distributed.get_backend(group)
    if backend == "nccl" and result.device.type != "cuda":
        on_gpu = result.to(torch.device("cuda", torch.cuda.current_device()))
        return [tensor.to(result.device) for tensor in gather_all_tensors(on_gpu, group)]
    return gather_all_tensors(result, group)
