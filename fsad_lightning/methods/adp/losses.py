"""The equations of ADP (Kwak et al., IEEE Access 2024) as plain tensor functions.

Every function maps to one equation of the paper; the model (:mod:`.torch_model`) only gathers features
and calls them. Features are CLIP embeddings ``[..., D]``; they are L2-normalised here, so callers may
pass raw or normalised vectors.

- :func:`normal_state_probability`: eq. 1 for the two-way label set ``C(c) = {S_n(c), S_a(c)}``.
- :func:`normal_alignment_loss`: the CLIP guidance term of eq. 3 (as a loss to minimise).
- :func:`repel_loss`: the hinge term of eq. 4, weighted ``L : K`` against eq. 3's attraction.
- :func:`importance_weight`: eq. 5. :func:`weighted_prototypes`: eq. 6.
- eq. 7 is :func:`fsad_lightning.scoring.text_anomaly_probability` on the prototypes ``[p_n, p_a]``.
- :func:`reference_associated_score`: eq. 10 (eq. 8-9 are WinCLIP+'s reference association,
  :meth:`fsad_lightning.methods.winclip.torch_model.WinCLIPModel.few_shot_map`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from fsad_lightning.scoring import full_precision


@full_precision
def normal_state_probability(
    image_features: Tensor, normal_text: Tensor, anomalous_text: Tensor, temperature: float
) -> Tensor:
    """Eq. 1 with ``C(c) = {S_n(c), S_a(c)}``: ``P_CLIP(S_n(c) | x)``.

    ``exp(sim(f(x), g_n) / tau) / (exp(sim(f(x), g_n) / tau) + exp(sim(f(x), g_a) / tau))`` with the cosine
    similarity and ``1 / tau = temperature``.

    Args:
        image_features: ``[..., D]`` image embeddings ``f(x)``.
        normal_text / anomalous_text: ``[..., D]`` (broadcast against ``image_features``) text features of
            the normal and anomalous state prompts: one template's ``g(T(S(c)))`` (concept learning) or
            the template ensemble ``G(S(c))`` (self-tuning).
        temperature: ``1 / tau`` (CLIP's logit scale).
    Returns:
        ``[...]`` probabilities in ``[0, 1]``; differentiable in every input.
    """
    image = F.normalize(image_features.float(), dim=-1)
    normal = (image * F.normalize(normal_text.float(), dim=-1)).sum(dim=-1)
    anomalous = (image * F.normalize(anomalous_text.float(), dim=-1)).sum(dim=-1)
    logits = temperature * torch.stack([normal, anomalous], dim=-1)
    return logits.softmax(dim=-1)[..., 0]


def normal_alignment_loss(normal_probability: Tensor, alpha: float) -> Tensor:
    """Eq. 3's CLIP guidance as a loss: ``-alpha * mean_i P_CLIP(S_n(c) | x_i)`` over the shots' views.

    Eq. 3 maximises ``log p(x | T(S_n(c))) + alpha * P_CLIP(S_n(c) | x)``; the reconstruction part is the
    diffusion loss, this is the rest with the sign flipped and the sum over shots taken as a batch mean.
    """
    return -float(alpha) * normal_probability.mean()


def repel_loss(
    normal_probability: Tensor, margin: float, alpha: float, num_pseudo_anomalies: int, num_shots: int
) -> Tensor:
    """Eq. 4's repel term as a loss: ``alpha * (L / K) * mean_j (P_CLIP(S_n(c) | x~_j) - gamma)^+``.

    Pseudo-anomalies ``x~_j`` are pushed away from the normal state prompt only while CLIP still finds them
    normal with probability above the margin ``gamma`` (0.8); below it the term and its gradient are zero.

    Eq. 4 sums this hinge over the ``L`` pseudo-anomalies while eq. 3's terms (the diffusion loss and the
    attraction ``alpha * P_CLIP(S_n(c) | x_i)``) are summed over the ``K`` shots. The attraction and the
    diffusion loss are batch means over the shots, i.e. the objective divided by ``K``; the same division
    leaves the repel sum as ``(L / K)`` times its mean over the pseudo-anomalies drawn for the step, so the
    two CLIP terms keep the paper's ``L : K`` weighting whatever the batch sizes.

    Args:
        normal_probability: ``[B']`` ``P_CLIP(S_n(c) | x~_j)`` of the pseudo-anomalies drawn for the step.
        margin: ``gamma``. alpha: eq. 4's ``alpha``.
        num_pseudo_anomalies, num_shots: ``L`` and ``K`` of eq. 4 (the sizes of the two sets).
    """
    if num_pseudo_anomalies < 1 or num_shots < 1:
        raise ValueError(
            f"eq. 4 needs at least one pseudo-anomaly and one shot, got L={num_pseudo_anomalies}, K={num_shots}"
        )
    hinge = torch.relu(normal_probability - float(margin)).mean()
    return float(alpha) * (float(num_pseudo_anomalies) / float(num_shots)) * hinge


@full_precision
def importance_weight(shot_normal_probability: Tensor, pseudo_anomalous_probability: Tensor) -> Tensor:
    """Eq. 5: ``w(c) = mean_i P(S_n(c) | x_i) + mean_j P(S_a(c) | x~_j)``, a scalar in ``[0, 2]``.

    ``shot_normal_probability``: ``[K]`` on the normal shots; ``pseudo_anomalous_probability``: ``[L']`` on
    the self-tuning pseudo-anomalies (``1 - P(S_n(c) | x~_j)`` for the two-way softmax).
    """
    if shot_normal_probability.numel() == 0 or pseudo_anomalous_probability.numel() == 0:
        raise ValueError("importance weights need at least one shot and one pseudo-anomaly")
    return shot_normal_probability.float().mean() + pseudo_anomalous_probability.float().mean()


@full_precision
def weighted_prototypes(weights: Tensor, normal_features: Tensor, anomalous_features: Tensor) -> Tensor:
    """Eq. 6: the classification prototypes ``[p_n, p_a]`` as a ``[2, D]`` tensor.

    ``p_s = (1 / |T|) sum_T sum_c w(c) g(T(S_s(c))) / sum_c w(c)``.

    Args:
        weights: ``[C]`` importance weights ``w(c)`` of the concepts (eq. 5).
        normal_features / anomalous_features: ``[C, |T|, D]`` text features ``g(T(S_n(c)))`` and
            ``g(T(S_a(c)))`` of every concept and template.
    """
    if normal_features.shape != anomalous_features.shape or normal_features.ndim != 3:
        raise ValueError(
            f"normal and anomalous features must both be [C, T, D], got {tuple(normal_features.shape)} and "
            f"{tuple(anomalous_features.shape)}"
        )
    if weights.shape != normal_features.shape[:1]:
        raise ValueError(
            f"need one weight per concept: {tuple(weights.shape)} for {normal_features.shape[0]}"
        )
    total = weights.float().sum()
    if not total > 0:
        raise ValueError(f"the importance weights sum to {float(total)}; eq. 6 needs a positive sum")
    mix = weights.float().view(-1, 1, 1) / total
    prototypes = [
        (mix * features.float()).sum(dim=0).mean(dim=0) for features in (normal_features, anomalous_features)
    ]
    return torch.stack(prototypes)


def reference_associated_score(concept_score: Tensor, vision_map: Tensor) -> Tensor:
    """Eq. 10: ``ADP_ad(x) = (ADP(x) + max_ij M^W_ij) / 2``.

    ``concept_score``: ``[B]`` eq. 7 anomaly probabilities; ``vision_map``: ``[B, h, w]`` eq. 9 map.
    """
    return 0.5 * (concept_score + vision_map.flatten(1).amax(dim=1))
