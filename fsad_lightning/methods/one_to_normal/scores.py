"""One-to-Normal's equations on plain tensors (paper §3.3 eq. 2-3 selection, §3.4 eq. 4-7).

Every function here takes already-extracted features or images; nothing loads a model. Multi-level
features are a list with one ``[B, h_l, w_l, C_l]`` tensor per feature-extraction block ``l``
(``n = len(levels)``); levels may differ in grid size and width (a CNN pyramid) or not (CLIP blocks).

The distance math itself lives in :mod:`fsad_lightning.scoring` and is only called from here.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from kornia.losses import ssim_loss
from torch import Tensor

from fsad_lightning.scoring import (
    DEFAULT_CHUNK,
    full_precision,
    min_cosine_distance,
    paired_cosine_distance,
    text_anomaly_probability,
    upsample_and_smooth,
)

#: CLIP's logit scale (exp of its learned temperature, clamped to 100 in training); see :func:`text_score`
CLIP_LOGIT_SCALE = 100.0


def _check_levels(levels: Sequence[Tensor], name: str) -> None:
    if len(levels) == 0:
        raise ValueError(f"{name} must hold at least one feature level")
    for index, level in enumerate(levels):
        if level.ndim != 4:
            raise ValueError(
                f"{name}[{index}] must be [B, h, w, C] patch features, got shape {tuple(level.shape)}"
            )


# ==================================================================== §3.3 prompt selection (eq. 2-3)
@full_precision
def ssim_distance(images: Tensor, references: Tensor, window_size: int = 11) -> Tensor:
    """The selection loss ``L`` of eq. 2: the SSIM loss ``(1 - SSIM) / 2`` averaged over each image.

    ``images``, ``references``: ``[..., 3, H, W]`` in ``[0, 1]`` with the same shape. Returns ``[...]``;
    lower means more similar (0 for identical images). The window shrinks to the largest odd size that
    fits an image smaller than ``window_size``.
    """
    if images.shape != references.shape or images.ndim < 4:
        raise ValueError(
            f"SSIM needs two image batches of one shape [..., C, H, W], got {tuple(images.shape)} and "
            f"{tuple(references.shape)}"
        )
    lead = images.shape[:-3]
    flat_a = images.reshape(-1, *images.shape[-3:]).float()
    flat_b = references.reshape(-1, *references.shape[-3:]).float()
    side = min(images.shape[-2:])
    window = min(window_size, side if side % 2 == 1 else side - 1)
    if window < 1:
        raise ValueError(f"images of size {tuple(images.shape[-2:])} are too small for SSIM")
    per_pixel = ssim_loss(flat_a, flat_b, window_size=window, max_val=1.0, reduction="none")
    return per_pixel.flatten(1).mean(dim=1).reshape(lead)


def select_personalized(
    query: Tensor, reconstructions: Tensor, window_size: int = 11
) -> tuple[Tensor, Tensor, Tensor]:
    """Eq. 2-3: keep, for every query, the reconstruction whose prompt minimises the SSIM loss.

    ``query``: ``[B, 3, H, W]``; ``reconstructions``: ``[B, P, 3, H, W]``, the reconstruction of each
    query under each of the ``P`` normal-state prompts (``x_hat_i = D_theta(x_{q,t}, c_i, t)``).
    ``c_q = argmin_i L(x_q, x_hat_i)`` (eq. 2) and the personalized image is the reconstruction under
    ``c_q`` (eq. 3) -- the one already computed, not a second diffusion run.

    Returns ``(personalized [B, 3, H, W], prompt_index [B], losses [B, P])``.
    """
    if reconstructions.ndim != 5 or reconstructions.shape[0] != query.shape[0]:
        raise ValueError(
            f"reconstructions must be [B, P, C, H, W] with B = {query.shape[0]}, "
            f"got {tuple(reconstructions.shape)}"
        )
    if reconstructions.shape[2:] != query.shape[1:]:
        raise ValueError(
            f"reconstructions of shape {tuple(reconstructions.shape[2:])} do not match the queries "
            f"{tuple(query.shape[1:])}"
        )
    expanded = query.unsqueeze(1).expand_as(reconstructions)
    losses = ssim_distance(expanded, reconstructions, window_size)
    index = losses.argmin(dim=1)
    personalized = reconstructions[torch.arange(query.shape[0], device=query.device), index]
    return personalized, index, losses


# ==================================================================== §3.4 triplet contrastive inference
def personalized_distance_grids(
    query_levels: Sequence[Tensor], personalized_levels: Sequence[Tensor]
) -> list[Tensor]:
    """The inner term of eq. 4 per level: ``1 - <F_{q,l}, F_hat_{q,l}>`` on every grid cell.

    Returns one ``[B, h_l, w_l]`` grid per level.
    """
    _check_levels(query_levels, "query_levels")
    _check_levels(personalized_levels, "personalized_levels")
    if len(query_levels) != len(personalized_levels):
        raise ValueError(
            f"query has {len(query_levels)} feature levels but the personalized image "
            f"{len(personalized_levels)}"
        )
    return [paired_cosine_distance(q, p) for q, p in zip(query_levels, personalized_levels)]


def normal_pool_distance_grids(
    query_levels: Sequence[Tensor], memory_levels: Sequence[Tensor], chunk_size: int = DEFAULT_CHUNK
) -> list[Tensor]:
    """The inner term of eq. 5 per level: ``min_{m in M} (1 - <F_{q,l}, m_l>)`` on every grid cell.

    ``memory_levels``: one ``[M_l, C_l]`` bank per level (every patch of every pool image at that
    level). Returns one ``[B, h_l, w_l]`` grid per level.
    """
    _check_levels(query_levels, "query_levels")
    if len(query_levels) != len(memory_levels):
        raise ValueError(
            f"query has {len(query_levels)} feature levels but the memory bank {len(memory_levels)}"
        )
    return [min_cosine_distance(q, m, chunk_size) for q, m in zip(query_levels, memory_levels)]


def level_averaged_max(grids: Sequence[Tensor]) -> Tensor:
    """The outer part shared by eq. 4 and eq. 5: ``(1/n) sum_l max_G grid_l``. Returns ``[B]``."""
    if len(grids) == 0:
        raise ValueError("need at least one score grid")
    return torch.stack([grid.flatten(1).max(dim=1).values for grid in grids]).mean(dim=0)


def personalized_score(query_levels: Sequence[Tensor], personalized_levels: Sequence[Tensor]) -> Tensor:
    """Eq. 4, ``S_P = (1/n) sum_l max_G (1 - <F_{q,l}, F_hat_{q,l}>)``: one-to-one personalized comparison."""
    return level_averaged_max(personalized_distance_grids(query_levels, personalized_levels))


def normal_pool_score(
    query_levels: Sequence[Tensor], memory_levels: Sequence[Tensor], chunk_size: int = DEFAULT_CHUNK
) -> Tensor:
    """Eq. 5, ``S_N = (1/n) sum_l max_G min_{m in M} (1 - <F_{q,l}, m_l>)``: anomaly-free pool comparison."""
    return level_averaged_max(normal_pool_distance_grids(query_levels, memory_levels, chunk_size))


def text_score(
    global_features: Tensor, text_features: Tensor, temperature: float = CLIP_LOGIT_SCALE
) -> Tensor:
    """Eq. 6, ``S_text = softmax(F_q F_text^T)[anomalous]``.

    ``global_features``: ``[B, d]`` global CLIP image embeddings; ``text_features``: ``[2, d]``, the
    averaged normal (row 0) and abnormal (row 1) prompt features. The paper writes the softmax without
    a temperature; we apply CLIP's logit scale (100) to the cosine similarities, as CLIP's zero-shot
    classifier and WinCLIP do -- without it the softmax of two cosines in [-1, 1] stays near 0.5.
    """
    if global_features.ndim != 2:
        raise ValueError(f"global image features must be [B, d], got {tuple(global_features.shape)}")
    return text_anomaly_probability(global_features, text_features, temperature)


@full_precision
def triplet_score(
    s_p: Tensor | None, s_n: Tensor | None, s_text: Tensor | None, alpha: float = 1.0, beta: float = 0.5
) -> Tensor:
    """Eq. 7, ``A = S_P + alpha S_N + beta S_text`` (paper: alpha = 1, beta = 0.5).

    A branch given as ``None`` is switched off (Table 4's ablation rows); at least one must be on.
    """
    terms = [(1.0, s_p), (alpha, s_n), (beta, s_text)]
    active = [weight * score.float() for weight, score in terms if score is not None]
    if not active:
        raise ValueError("all three branches (S_P, S_N, S_text) are switched off: enable at least one")
    return torch.stack(active).sum(dim=0)


def branch_anomaly_map(grids: Sequence[Tensor], size: int | tuple[int, int], sigma: float = 4.0) -> Tensor:
    """Pixel map of one image branch: each level's grid upsampled to ``size`` and blurred, then the
    level average (the pixel-wise counterpart of the ``1/n sum_l`` of eq. 4-5). Returns ``[B, H, W]``."""
    if len(grids) == 0:
        raise ValueError("need at least one score grid")
    return torch.stack([upsample_and_smooth(grid, size, sigma) for grid in grids]).mean(dim=0)


def triplet_anomaly_map(
    personalized_grids: Sequence[Tensor] | None,
    pool_grids: Sequence[Tensor] | None,
    size: int | tuple[int, int],
    alpha: float = 1.0,
    sigma: float = 4.0,
) -> Tensor | None:
    """Anomaly map ``M_P + alpha M_N`` from the S_P and S_N grids (the paper gives no map formula;
    we weight the two image branches as eq. 7 does -- S_text is image-level and has no map).

    Returns ``[B, H, W]``, or ``None`` when both image branches are off.
    """
    maps = []
    if personalized_grids is not None:
        maps.append(branch_anomaly_map(personalized_grids, size, sigma))
    if pool_grids is not None:
        maps.append(alpha * branch_anomaly_map(pool_grids, size, sigma))
    if not maps:
        return None
    return torch.stack(maps).sum(dim=0)
