"""Shared scoring math. Every method calls these; none re-implements them.

- :func:`min_cosine_distance` / :func:`min_euclidean_distance`: nearest-neighbour distance of query
  patches to a memory bank (PatchKNN, WinCLIP+, PromptAD's vision memory, One-to-Normal's S_N),
  chunked so memory stays bounded; the Euclidean one can take :class:`SpatialFactor` channel groups (a
  deep stage upsampled onto a finer grid) and then multiplies them at their own, coarser resolution.
- :func:`paired_cosine_distance`: per-position ``1 - cos`` between two aligned grids (One-to-Normal S_P).
- :func:`text_anomaly_probability`: softmax of image features against normal / anomalous text features.
- :func:`harmonic_mean`: harmonic fusion of score maps (WinCLIP, PromptAD eq. 17-18, AnomalySD eq. 19).
- :func:`upsample_and_smooth`: patch grid to image resolution plus Gaussian blur (sigma = 4 by default).

Precision: every function here computes in float32 and returns float32 whatever the caller's autocast
state (:func:`full_precision`). Lightning runs ``test_step`` under autocast for ``bf16-mixed`` /
``16-mixed``; without this, the similarity matmuls and softmaxes would run in bf16 and move scores by
~1e-2. Method code that adds scoring math of its own decorates it with :func:`full_precision` too.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any, NamedTuple, TypeVar

import torch
import torch.nn.functional as F
from kornia.filters import gaussian_blur2d
from torch import Tensor

DEFAULT_CHUNK = 4096

_F = TypeVar("_F", bound=Callable[..., Any])


def _tensor_devices(values: Any) -> set[str]:
    """Device types of the tensors in ``values`` (tensors, or lists / tuples / dicts of them, one level)."""
    found: set[str] = set()
    for value in values:
        if isinstance(value, Tensor):
            found.add(value.device.type)
        elif isinstance(value, (list, tuple)):
            found.update(v.device.type for v in value if isinstance(v, Tensor))
        elif isinstance(value, dict):
            found.update(v.device.type for v in value.values() if isinstance(v, Tensor))
    return found


@contextlib.contextmanager
def autocast_disabled(device_types: set[str] | Sequence[str] = ("cpu",)) -> Iterator[None]:
    """Switch autocast off on ``device_types`` (and on the CPU) for the block."""
    with contextlib.ExitStack() as stack:
        for device_type in sorted({"cpu", *device_types}):
            stack.enter_context(torch.autocast(device_type=device_type, enabled=False))
        yield


def full_precision(fn: _F) -> _F:
    """Decorator: run ``fn`` with autocast off on the devices of its tensor arguments.

    Inside, matmuls and softmaxes follow their inputs' dtype; every scoring function casts its inputs to
    float32, so the result is float32 and equal to the plain fp32 computation, under any trainer precision.
    """

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with autocast_disabled(_tensor_devices((*args, *kwargs.values()))):
            return fn(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


def _check_memory(memory: Tensor, query: Tensor) -> None:
    if memory.ndim != 2 or memory.shape[0] == 0:
        raise ValueError(f"memory bank must be a non-empty [M, C] tensor, got shape {tuple(memory.shape)}")
    if memory.shape[1] != query.shape[-1]:
        raise ValueError(
            f"memory bank has {memory.shape[1]} channels but the query has {query.shape[-1]}"
        )


@full_precision
def min_cosine_distance(query: Tensor, memory: Tensor, chunk_size: int = DEFAULT_CHUNK) -> Tensor:
    """``min_m (1 - cos(q, m))`` for every query vector.

    ``query``: ``[..., C]``; ``memory``: ``[M, C]``. Returns ``[...]``. The query is processed in
    chunks of ``chunk_size`` rows so the similarity matrix never exceeds ``chunk_size x M``.
    """
    _check_memory(memory, query)
    lead = query.shape[:-1]
    flat = F.normalize(query.reshape(-1, query.shape[-1]).float(), dim=-1)
    bank = F.normalize(memory.float(), dim=-1)
    out = torch.empty(flat.shape[0], device=flat.device, dtype=flat.dtype)
    for start in range(0, flat.shape[0], chunk_size):
        sims = flat[start : start + chunk_size] @ bank.T
        out[start : start + chunk_size] = (1.0 - sims.amax(dim=1)).clamp_min(0.0)
    return out.reshape(lead)


MIN_BLOCK = 64


def first_min_index(matrix: Tensor) -> Tensor:
    """``matrix.min(dim=1).indices`` (the first minimum of each row) for ``[N, M]`` with ``M`` a multiple of
    :data:`MIN_BLOCK`, ~4x faster on CPU: the minimum of each block of 64 columns by ``amin`` (vectorised;
    ``min`` with indices is not), the first block holding the row minimum, then the first index inside it."""
    rows, columns = matrix.shape
    blocks = matrix.view(rows, columns // MIN_BLOCK, MIN_BLOCK)
    block = blocks.amin(dim=2).min(dim=1).indices
    inside = blocks[torch.arange(rows, device=matrix.device), block].min(dim=1).indices
    return block * MIN_BLOCK + inside


class SpatialFactor(NamedTuple):
    """A channel group of per-image query descriptors that is a fixed linear spatial map of fewer cells:
    ``query[b, :, columns] == operator @ cells[b]`` (e.g. a deep stage bilinearly upsampled to the patch
    grid and average-pooled: each of the ``N`` patches mixes a few of the stage's ``n`` cells)."""

    columns: slice  #: the group's channels in the descriptor (and in the memory bank)
    cells: Tensor  #: ``[B, n, C_g]`` the group's features on its own grid
    operator: Tensor  #: ``[N, n]`` the spatial map from the group's grid to the patch grid


def factoring_pays(cells: int, channels: int, patches: int) -> bool:
    """Whether a :class:`SpatialFactor` of ``cells`` x ``channels`` costs fewer multiply-adds per memory vector
    (``n C_g + N n``) than the direct product (``N C_g``) for ``patches`` = ``N`` query patches per image;
    never when ``cells >= patches``."""
    return cells * (patches + channels) < patches * channels


@full_precision
def min_euclidean_distance(
    query: Tensor, memory: Tensor, chunk_size: int = DEFAULT_CHUNK, factors: Sequence[SpatialFactor] = ()
) -> Tensor:
    """``min_m ||q - m||_2`` for every query vector (PatchCore's nearest-neighbour score).

    ``query``: ``[..., C]``; ``memory``: ``[M, C]``. Returns ``[...]``, chunked like
    :func:`min_cosine_distance`. The nearest memory vector is found with one matmul per chunk
    (``||m||^2 - 2 q.m``); the returned distance is then computed directly as ``||q - m*||`` for that
    neighbour, so a query equal to a memory vector scores exactly 0 (the expanded form alone carries a
    round-off of ``~1e-7 ||q||^2`` before the square root). The neighbour is the first minimum of each
    row, found by :func:`first_min_index`.

    ``factors`` (for ``query`` of shape ``[B, N, C]``, one row of patches per image): channel groups that
    are linear spatial maps of fewer cells (:class:`SpatialFactor`). Their part of ``q.m`` is computed as
    ``operator @ (cells @ m_g)``, the same sum in another order, which for a stride-32 stage on a stride-8
    grid takes ~1/5 of the multiply-adds. The neighbour is then the same up to float round-off (only a near
    tie can change, by ~1e-6 of the distance), and the returned distance is ``||q - m*||`` as above. Only
    whole images go in a chunk (``chunk_size // N`` of them), so factors are used when ``N <= chunk_size``.
    """
    _check_memory(memory, query)
    lead = query.shape[:-1]
    if factors and (query.ndim != 3 or query.shape[1] > chunk_size):
        factors = ()
    flat = query.reshape(-1, query.shape[-1]).float()
    bank = memory.float()
    # pad the bank to whole blocks of first_min_index with columns that can never be the minimum
    pad = -bank.shape[0] % MIN_BLOCK
    padded = F.pad(bank, (0, 0, 0, pad))
    padded_sq = F.pad((bank * bank).sum(dim=1), (0, pad), value=math.inf)
    direct = torch.ones(bank.shape[1], dtype=torch.bool, device=bank.device)
    for factor in factors:
        direct[factor.columns] = False
    direct_columns = direct.nonzero().squeeze(1)
    query_direct = flat if not factors else flat[:, direct_columns]
    bank_direct_t = (padded if not factors else padded[:, direct_columns]).T
    rows_per_chunk = chunk_size if not factors else (chunk_size // query.shape[1]) * query.shape[1]
    factor_banks_t = [padded[:, factor.columns].T.contiguous() for factor in factors]  # [C_g, M] each
    out = torch.empty(flat.shape[0], device=flat.device, dtype=flat.dtype)
    # one distance buffer for all chunks (a fresh 64 MB matrix per chunk costs page faults on CPU)
    buffer = flat.new_empty(min(rows_per_chunk, flat.shape[0]), padded.shape[0])
    for start in range(0, flat.shape[0], rows_per_chunk):
        rows = flat[start : start + rows_per_chunk]
        with torch.no_grad():  # only the choice of neighbour; the distance below keeps autograd
            expanded = torch.addmm(padded_sq, query_direct[start : start + rows_per_chunk], bank_direct_t,
                                   alpha=-2.0, out=buffer[: rows.shape[0]])
            if factors:
                images = slice(start // query.shape[1], (start + rows.shape[0]) // query.shape[1])
                per_image = expanded.view(-1, query.shape[1], expanded.shape[1])
                for factor, factor_bank_t in zip(factors, factor_banks_t):
                    cells = factor.cells[images].float()
                    products = cells @ factor_bank_t  # [b, n, M]
                    operator = factor.operator.float().expand(cells.shape[0], -1, -1)
                    per_image.baddbmm_(operator, products, alpha=-2.0)
            nearest = first_min_index(expanded)
        out[start : start + rows_per_chunk] = (rows - bank[nearest]).norm(dim=1)
    return out.reshape(lead)


@full_precision
def paired_cosine_distance(query: Tensor, reference: Tensor) -> Tensor:
    """``1 - cos(query_i, reference_i)`` position by position. Shapes ``[..., C]`` -> ``[...]``."""
    if query.shape != reference.shape:
        raise ValueError(f"paired features differ in shape: {tuple(query.shape)} vs {tuple(reference.shape)}")
    return 1.0 - F.cosine_similarity(query.float(), reference.float(), dim=-1)


@full_precision
def text_anomaly_probability(
    image_features: Tensor, text_features: Tensor, temperature: float = 100.0
) -> Tensor:
    """Probability of the anomalous state: ``softmax(temperature * cos(f, [t_normal, t_anomalous]))[1]``.

    ``image_features``: ``[..., C]`` (global embeddings or patch tokens in the joint space);
    ``text_features``: ``[2, C]`` with row 0 the normal and row 1 the anomalous prompt feature.
    Returns ``[...]`` in ``[0, 1]``.
    """
    if text_features.ndim != 2 or text_features.shape[0] != 2:
        raise ValueError(f"text_features must be [2, C] (normal, anomalous), got {tuple(text_features.shape)}")
    image = F.normalize(image_features.float(), dim=-1)
    text = F.normalize(text_features.float(), dim=-1)
    logits = temperature * image @ text.T
    return logits.softmax(dim=-1)[..., 1]


@full_precision
def harmonic_mean(scores: Sequence[Tensor], eps: float = 1e-12) -> Tensor:
    """Element-wise harmonic mean ``n / sum(1 / s_i)`` of non-negative tensors of one shape.

    A zero in any input gives zero (the limit of the harmonic mean), never NaN or inf.
    """
    if len(scores) == 0:
        raise ValueError("harmonic_mean needs at least one tensor")
    stacked = torch.stack([s.float() for s in scores])
    if (stacked < 0).any():
        raise ValueError("harmonic_mean is defined for non-negative scores")
    has_zero = (stacked <= eps).any(dim=0)
    inv_sum = (1.0 / stacked.clamp_min(eps)).sum(dim=0)
    return torch.where(has_zero, torch.zeros_like(inv_sum), len(scores) / inv_sum)


def gaussian_kernel_size(sigma: float) -> int:
    """Odd kernel size covering +-4 sigma, the usual choice for anomaly-map smoothing."""
    return 2 * math.ceil(4.0 * sigma) + 1


@full_precision
def upsample_and_smooth(maps: Tensor, size: int | tuple[int, int], sigma: float = 4.0) -> Tensor:
    """Bilinearly upsample ``[B, h, w]`` score grids to ``size`` and blur them with a Gaussian.

    ``sigma <= 0`` skips the blur. Returns ``[B, H, W]``.
    """
    if maps.ndim != 3:
        raise ValueError(f"expected score grids of shape [B, h, w], got {tuple(maps.shape)}")
    size = (size, size) if isinstance(size, int) else tuple(size)
    out = F.interpolate(maps.float().unsqueeze(1), size=size, mode="bilinear", align_corners=False)
    if sigma > 0:
        k = gaussian_kernel_size(sigma)
        out = gaussian_blur2d(out, (k, k), (sigma, sigma), border_type="reflect")
    return out.squeeze(1)


def patch_grid(tokens: Tensor) -> Tensor:
    """``[B, N, C]`` patch tokens of a square grid to ``[B, C, h, w]``."""
    b, n, c = tokens.shape
    side = math.isqrt(n)
    if side * side != n:
        raise ValueError(f"{n} patch tokens do not form a square grid")
    return tokens.transpose(1, 2).reshape(b, c, side, side)
