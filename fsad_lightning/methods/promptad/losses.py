"""PromptAD's prompt prototypes and training losses (Li et al., CVPR 2024, §4.2-§4.3), on plain tensors.

Notation of the paper:

- ``z``: a normal visual feature (a global image feature for image-level prompt learning, one local
  patch feature of the VV branch for pixel-level prompt learning); rows of ``visual_features``.
- ``g(s)``: the text feature of prompt ``s``, as the text encoder returns it (not normalised).
- ``w_n``: normal prototype, the mean of the ``N`` normal-prompt features ``g(s)`` (below eq. 12), then
  L2-normalised: the official code averages the unnormalised features and normalises the mean, and every
  use of a prototype in the paper (eq. 12's cosine, eq. 13 and 15's explicit normalisation) is
  scale-free, so ``normalize(mean(g))`` is what enters each loss and the scores (:func:`feature_prototype`).
- ``w_a``: anomaly prototype, likewise over all manual and learnable anomaly-prompt features (eq. 14).
- ``w_m``, ``w_l`` of eq. 15: likewise over the manual / learnable anomaly prompts. (The official code
  averages the *normalised* features there and does not normalise the mean; we follow eq. 15.)
- ``tau``: the temperature. Functions take ``logit_scale = 1 / tau``.

Every function maps to one equation; none keeps state.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def _check_features(name: str, features: Tensor, dim: int | None = None) -> None:
    if features.ndim != 2 or features.shape[0] == 0:
        raise ValueError(f"{name} must be a non-empty [K, C] tensor, got shape {tuple(features.shape)}")
    if dim is not None and features.shape[1] != dim:
        raise ValueError(f"{name} has {features.shape[1]} channels, expected {dim}")


def feature_prototype(features: Tensor) -> Tensor:
    """``[K, C] -> [C]``: the mean of the (unnormalised) features, L2-normalised.

    ``w_n`` below eq. 12, ``w_a`` of eq. 14, ``w_m`` / ``w_l`` of eq. 15. A feature with a larger norm
    weighs more in the mean, as in the official code.
    """
    _check_features("features", features)
    return F.normalize(features.float().mean(dim=0), dim=-1)


def anomaly_prototype(manual_features: Tensor | None, learnable_features: Tensor | None) -> Tensor:
    """Eq. 14: ``w_a``, the mean over all ``N*M`` manual and ``N*L`` learnable anomaly-prompt features.

    Either group may be ``None`` (switched off); each row counts once, so the larger group weighs more,
    exactly as in eq. 14. Normalised, like every prototype (:func:`feature_prototype`).
    """
    groups = [f for f in (manual_features, learnable_features) if f is not None]
    if not groups:
        raise ValueError("the anomaly prototype needs manual or learnable anomaly-prompt features")
    for features in groups:
        _check_features("anomaly prompt features", features, groups[0].shape[1])
    return feature_prototype(torch.cat(groups, dim=0))


def clip_contrastive_loss(
    visual_features: Tensor, normal_prototype: Tensor, anomaly_features: Tensor, logit_scale: float | Tensor
) -> Tensor:
    """Eq. 12: ``L_clip = E_z[-log softmax(<z, [w_n; W]> / tau)[0]]``.

    Args:
        visual_features: ``[B, C]`` normal visual features ``z``.
        normal_prototype: ``[C]`` normal prototype ``w_n`` (see :func:`feature_prototype`).
        anomaly_features: ``[K, C]`` the set ``W`` of all anomaly-prompt features; every one is a separate
            negative (the paper: "each anomaly prompt feature is compared with the visual feature").
        logit_scale: ``1 / tau``.

    ``<., .>`` is the cosine similarity, so ``z``, ``w_n`` and every ``w`` are normalised here. Without
    semantic concatenation (``W`` empty) the softmax has a single entry and the loss is zero, which is the
    degenerate one-class CoOp baseline the paper starts from; pass ``anomaly_features`` with zero rows to
    get it.
    """
    if visual_features.ndim != 2:
        raise ValueError(f"visual_features must be [B, C], got shape {tuple(visual_features.shape)}")
    if normal_prototype.shape != visual_features.shape[1:]:
        raise ValueError(
            f"normal_prototype must be [{visual_features.shape[1]}], "
            f"got shape {tuple(normal_prototype.shape)}"
        )
    if anomaly_features.ndim != 2 or anomaly_features.shape[1] != visual_features.shape[1]:
        raise ValueError(
            f"anomaly_features must be [K, {visual_features.shape[1]}], "
            f"got shape {tuple(anomaly_features.shape)}"
        )
    z = F.normalize(visual_features.float(), dim=-1)
    texts = torch.cat([normal_prototype.float().unsqueeze(0), anomaly_features.float()], dim=0)
    logits = logit_scale * z @ F.normalize(texts, dim=-1).T
    targets = torch.zeros(z.shape[0], dtype=torch.long, device=z.device)
    return F.cross_entropy(logits, targets)


def explicit_anomaly_margin_loss(
    visual_features: Tensor, normal_prototype: Tensor, anomaly_prototype: Tensor, margin: float = 0.0
) -> Tensor:
    """Eq. 13: ``L_ema = E_z[max(0, d(z^, w_n^) - d(z^, w_a^) + margin)]``, ``^`` = L2-normalised.

    ``d`` is the Euclidean distance. The paper fixes ``margin = 0`` (features lie on the unit sphere);
    a positive ``margin`` asks the anomaly prototype to be that much farther than the normal one. The loss
    is zero for every normal feature closer to ``w_n`` than to ``w_a`` and positive otherwise.
    """
    if visual_features.ndim != 2:
        raise ValueError(f"visual_features must be [B, C], got shape {tuple(visual_features.shape)}")
    for name, proto in (("normal_prototype", normal_prototype), ("anomaly_prototype", anomaly_prototype)):
        if proto.shape != visual_features.shape[1:]:
            raise ValueError(f"{name} must be [{visual_features.shape[1]}], got shape {tuple(proto.shape)}")
    z = F.normalize(visual_features.float(), dim=-1)
    to_normal = (z - F.normalize(normal_prototype.float(), dim=-1)).norm(dim=-1)
    to_anomaly = (z - F.normalize(anomaly_prototype.float(), dim=-1)).norm(dim=-1)
    return F.relu(to_normal - to_anomaly + margin).mean()


def alignment_loss(manual_features: Tensor, learnable_features: Tensor, weight: float = 0.001) -> Tensor:
    """Eq. 15: ``L_align = lambda * || w_m^ - w_l^ ||_2^2``.

    ``w_m`` and ``w_l`` are the means of the manual (MAP) and learnable (LAP) anomaly-prompt features,
    ``^`` L2-normalisation (:func:`feature_prototype`); ``weight`` is ``lambda`` (paper default 0.001,
    Fig. 5).
    """
    _check_features("manual_features", manual_features)
    _check_features("learnable_features", learnable_features, manual_features.shape[1])
    manual = feature_prototype(manual_features)
    learnable = feature_prototype(learnable_features)
    return weight * (manual - learnable).pow(2).sum()
