"""Functional metrics: call them on whole arrays, outside any Lightning loop.

Pixel level (exact, one sweep, see :mod:`fsad_lightning.metrics.curves`):

- :func:`aupro` -- normalised area under the PRO curve up to FPR 0.3 (MVTec AD definition);
- :func:`pixel_metrics` -- pixel AUROC, AUPRO and F1-max from one complete sweep.

Image level (torchmetrics, exact ``thresholds=None``):

- :func:`image_metrics` -- image AUROC, AUPRC (average precision) and F1-max;
- :func:`f1_max` -- best F1 over every threshold.

Anomaly maps and masks may be torch tensors or numpy arrays of shape ``[N, H, W]`` (``[H, W]`` is one
image), or sequences of ``[H_i, W_i]`` arrays of different sizes. Masks are binary: ``0`` normal, ``1``
defect (booleans accepted); other values are an error. Scores are evaluated in float32.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor
from torchmetrics.functional.classification import (
    binary_auroc,
    binary_average_precision,
    binary_precision_recall_curve,
)

from fsad_lightning.metrics.curves import (
    all_finite,
    aupro_from_sweep,
    auroc_from_sweep,
    f1_max_from_sweep,
    largest_scores,
    normal_count_for_fpr,
    region_sizes,
    sweep_sorted_thresholds,
    sweep_thresholds,
    uses_numpy,
)

ArrayLike = Tensor | np.ndarray
MapsLike = ArrayLike | Sequence[ArrayLike]


# ---------------------------------------------------------------------------------------------- inputs
def _as_tensor(array: ArrayLike, name: str) -> Tensor:
    if isinstance(array, Tensor):
        return array.detach()
    if isinstance(array, np.ndarray):
        return torch.from_numpy(array)
    raise ValueError(f"{name} must be a torch tensor or a numpy array, got {type(array).__name__}")


def _as_binary_mask(mask: ArrayLike, name: str) -> np.ndarray:
    """A CPU boolean view or copy of a ``{0, 1}`` / boolean mask; other values are an error."""
    mask = _as_tensor(mask, name).cpu()
    if mask.dtype != torch.bool:
        if mask.numel():
            low, high = torch.aminmax(mask.reshape(-1))
            binary = float(low) >= 0 and float(high) <= 1
            if binary and torch.is_floating_point(mask):
                binary = bool(((mask == 0) | (mask == 1)).all())
            if not binary:
                raise ValueError(f"{name} must be binary (0 normal, 1 defect); found other values")
        mask = mask != 0
    return mask.numpy()


def _check_finite_maps(maps: Tensor, name: str) -> None:
    if not torch.is_floating_point(maps):
        raise ValueError(f"{name} must hold floating point scores, got dtype {maps.dtype}")
    if not all_finite(maps):
        raise ValueError(f"{name} contain {'NaN' if bool(torch.isnan(maps).any()) else 'inf'}")


def _pairs(
    anomaly_maps: MapsLike, masks: MapsLike
) -> tuple[Tensor, np.ndarray] | list[tuple[Tensor, np.ndarray]]:
    """Stacked ``([N, H, W] float32 maps, [N, H, W] bool masks)`` or a list of per-image pairs."""
    if isinstance(anomaly_maps, (Tensor, np.ndarray)):
        maps = _as_tensor(anomaly_maps, "anomaly_maps")
        if maps.ndim == 2:
            maps = maps.unsqueeze(0)
        if maps.ndim != 3:
            raise ValueError(f"anomaly_maps must be [N, H, W], got shape {tuple(maps.shape)}")
        if not isinstance(masks, (Tensor, np.ndarray)):
            raise ValueError("masks must be an array of the same shape as anomaly_maps")
        gt = _as_binary_mask(masks, "masks")
        if gt.ndim == 2:
            gt = gt[None]
        if tuple(gt.shape) != tuple(maps.shape):
            raise ValueError(f"masks have shape {tuple(gt.shape)} but anomaly_maps {tuple(maps.shape)}")
        _check_finite_maps(maps, "anomaly_maps")
        return maps.float(), gt
    if isinstance(masks, (Tensor, np.ndarray)) or len(anomaly_maps) != len(masks):
        raise ValueError("a sequence of anomaly maps needs a sequence of masks of the same length")
    pairs = []
    for i, (amap, mask) in enumerate(zip(anomaly_maps, masks)):
        amap = _as_tensor(amap, f"anomaly_maps[{i}]")
        gt = _as_binary_mask(mask, f"masks[{i}]")
        amap = amap[0] if amap.ndim == 3 and amap.shape[0] == 1 else amap  # [1, H, W] is one image too
        gt = gt[0] if gt.ndim == 3 and gt.shape[0] == 1 else gt
        if amap.ndim != 2 or tuple(amap.shape) != tuple(gt.shape):
            raise ValueError(
                f"anomaly_maps[{i}] has shape {tuple(amap.shape)} and masks[{i}] {tuple(gt.shape)}: "
                "expected two [H, W] arrays of one shape"
            )
        _check_finite_maps(amap, f"anomaly_maps[{i}]")
        pairs.append((amap.float(), gt))
    if not pairs:
        raise ValueError("no anomaly maps given")
    return pairs


def split_pixels(
    anomaly_map: Tensor, mask: np.ndarray, normal: bool = True
) -> tuple[Tensor | None, Tensor, Tensor]:
    """Split one image's (or a stack's) scores into ``(normal, defect, defect region sizes)``.

    ``anomaly_map``: float ``[H, W]`` or ``[N, H, W]`` on any device; ``mask``: bool numpy of the same
    shape. The outputs live on the map's device; region sizes come from :func:`region_sizes`. With
    ``normal=False`` the normal scores are not gathered (``None``).
    """
    sizes = torch.from_numpy(region_sizes(mask)).to(anomaly_map.device)
    if uses_numpy(anomaly_map):  # numpy's boolean indexing is the faster one on CPU
        values = anomaly_map.numpy()
        normal_scores = torch.from_numpy(values[~mask]) if normal else None
        return normal_scores, torch.from_numpy(values[mask]), sizes
    gt = torch.from_numpy(mask).to(anomaly_map.device)
    return (anomaly_map[~gt] if normal else None), anomaly_map[gt], sizes


def _top_normal_scores(maps: Tensor, gt: np.ndarray, k: int) -> Tensor:
    """The ``k`` highest normal scores of a stack (plus ties), ascending, without gathering all normal pixels.

    Defect pixels are set to ``-inf`` in a copy, which :func:`largest_scores` then partitions in place;
    ``k <= num_normal`` so no ``-inf`` is ever selected. CPU: numpy's ``where`` (faster than torch's).
    """
    if uses_numpy(maps):
        candidates = torch.from_numpy(np.where(gt, np.float32(-np.inf), maps.numpy()).reshape(-1))
    else:
        gt_t = torch.from_numpy(gt).to(maps.device)
        candidates = torch.where(gt_t, torch.tensor(float("-inf"), device=maps.device), maps).reshape(-1)
    return largest_scores(candidates, k, overwrite_input=True)


def _sweep(anomaly_maps: MapsLike, masks: MapsLike, max_fpr: float | None):
    data = _pairs(anomaly_maps, masks)
    if isinstance(data, tuple) and max_fpr is not None:
        # AUPRO of a stack: only the normal scores down to FPR = max_fpr are selected (linear time) and
        # sorted; the normal pixels are never gathered
        maps, gt = data
        num_defect = int(np.count_nonzero(gt))
        num_normal = gt.size - num_defect
        if num_normal == 0:
            raise ValueError("the masks mark every pixel as defect: FPR (and so AUPRO) is undefined")
        top = _top_normal_scores(maps, gt, normal_count_for_fpr(num_normal, max_fpr))
        _, defect, sizes = split_pixels(maps, gt, normal=False)
        return sweep_sorted_thresholds(top, num_normal, defect, sizes)
    if isinstance(data, tuple):
        normal, defect, sizes = split_pixels(*data)
    else:
        parts = [split_pixels(amap, gt) for amap, gt in data]
        normal, defect, sizes = (torch.cat([p[j] for p in parts]) for j in range(3))
    return sweep_thresholds(normal, defect, sizes, max_fpr=max_fpr)


# ---------------------------------------------------------------------------------------------- pixel level
def aupro(anomaly_maps: MapsLike, masks: MapsLike, fpr_limit: float = 0.3) -> float:
    """Exact AUPRO: area under the per-region-overlap curve up to ``FPR = fpr_limit``, divided by it.

    MVTec AD definition (see :mod:`fsad_lightning.metrics.curves`): every distinct score is a threshold,
    regions are 8-connected components of each mask, FPR runs over all normal pixels of all images, the
    area is the trapezoidal rule from ``(0, 0)`` with the end point interpolated at ``fpr_limit``.

    Args:
        anomaly_maps: float ``[N, H, W]`` (tensor or numpy), or a sequence of ``[H_i, W_i]`` maps.
        masks: binary ground truth of the same shape(s).
        fpr_limit: upper FPR integration limit in ``(0, 1]``.

    Returns:
        AUPRO in ``[0, 1]``.
    """
    return aupro_from_sweep(_sweep(anomaly_maps, masks, max_fpr=fpr_limit), fpr_limit)


def pixel_metrics(anomaly_maps: MapsLike, masks: MapsLike, fpr_limit: float = 0.3) -> dict[str, float]:
    """Pixel AUROC, AUPRO (up to ``fpr_limit``) and F1-max from one exact sweep over all pixels.

    Same inputs as :func:`aupro`. Returns ``{"pixel_auroc", "pixel_aupro", "pixel_f1_max"}``.
    """
    sweep = _sweep(anomaly_maps, masks, max_fpr=None)
    return {
        "pixel_auroc": auroc_from_sweep(sweep),
        "pixel_aupro": aupro_from_sweep(sweep, fpr_limit),
        "pixel_f1_max": f1_max_from_sweep(sweep),
    }


# ---------------------------------------------------------------------------------------------- image level
def _image_inputs(scores: ArrayLike, labels: ArrayLike) -> tuple[Tensor, Tensor]:
    """Validated 1-D ``(scores, labels)``, with scores replaced by their order-preserving ranks in [0, 1].

    torchmetrics squashes scores outside [0, 1] with a sigmoid, which in float32 turns large scores
    (distances of 20, 30, ...) into ties of 1.0. Dense ranks scaled to [0, 1] keep the exact order and
    every tie, so every threshold-based metric is unchanged.
    """
    scores = _as_tensor(scores, "scores").reshape(-1)
    labels = _as_tensor(labels, "labels").reshape(-1)
    if scores.shape != labels.shape:
        raise ValueError(f"{scores.numel()} scores but {labels.numel()} labels")
    if not torch.is_floating_point(scores):
        scores = scores.double()
    if bool((~torch.isfinite(scores)).any()):
        raise ValueError("image scores contain NaN or inf")
    if bool(((labels != 0) & (labels != 1)).any()):
        raise ValueError("image labels must be 0 (normal) or 1 (anomalous)")
    labels = labels.long()
    num_anomalous = int(labels.sum())
    if num_anomalous in (0, labels.numel()):
        kind = "normal" if num_anomalous == 0 else "anomalous"
        raise ValueError(
            f"the {labels.numel()} evaluated images are only {kind} images: AUROC is undefined "
            "(image metrics need both normal and anomalous test images)"
        )
    distinct, ranks = torch.unique(scores, sorted=True, return_inverse=True)
    scaled = ranks.double() / max(distinct.numel() - 1, 1)
    return scaled, labels


def f1_max(scores: ArrayLike, labels: ArrayLike) -> float:
    """Best F1 over every threshold (each distinct score), ``F1 = 2 P R / (P + R)`` (0 where ``P + R = 0``).

    Uses torchmetrics' exact precision-recall curve (``thresholds=None``).
    """
    scores, labels = _image_inputs(scores, labels)
    return _f1_max_of_ranks(scores, labels)


def _f1_max_of_ranks(scores: Tensor, labels: Tensor) -> float:
    precision, recall, _ = binary_precision_recall_curve(scores, labels, thresholds=None)
    precision, recall = precision.double(), recall.double()
    denominator = precision + recall
    f1 = torch.where(denominator > 0, 2.0 * precision * recall / denominator.clamp_min(1e-300), 0.0)
    return float(f1.max())


def image_metrics(scores: ArrayLike, labels: ArrayLike) -> dict[str, float]:
    """Image AUROC, AUPRC (average precision) and F1-max (torchmetrics, exact).

    Args:
        scores: ``[N]`` anomaly scores, higher = more anomalous (any range).
        labels: ``[N]`` 0 normal / 1 anomalous; both classes must be present.
    """
    scores, labels = _image_inputs(scores, labels)
    return {
        "image_auroc": float(binary_auroc(scores, labels, thresholds=None)),
        "image_auprc": float(binary_average_precision(scores, labels, thresholds=None)),
        "image_f1_max": _f1_max_of_ranks(scores, labels),
    }
