"""Exact pixel-level curves (ROC, PRO, precision-recall) from one threshold sweep.

Definitions, as in the MVTec AD protocol (Bergmann et al., "The MVTec Anomaly Detection Dataset",
IJCV 2021; the per-region overlap comes from Bergmann et al., "Uninformed Students", CVPR 2020):

- every distinct score ``t`` is a threshold; a pixel is predicted anomalous when its score is ``>= t``
  (equal scores are one threshold);
- ground-truth regions are the 8-connected components of each image's mask, counted over the whole
  test set;
- ``FPR(t)`` = normal pixels with score ``>= t`` / all normal pixels of all images (good images
  included);
- ``TPR(t)`` = defect pixels with score ``>= t`` / all defect pixels;
- ``PRO(t)`` = mean over all regions ``C_k`` of ``|{p in C_k : s_p >= t}| / |C_k|``.

**Region-weight form** (:func:`per_region_overlap`). Each defect pixel carries the weight
``1 / |its region|``; the number of regions is ``R = sum of all weights`` and ``PRO(t) = (1 / R) *
(sum of the weights of defect pixels with score >= t)``. No region ids are needed, so data gathered from
several images (or DDP ranks) simply concatenate. Regions are labelled per image
(:func:`region_sizes`).

**Why the sweep is cheap** (:func:`sweep_sorted_thresholds`). Between two consecutive distinct *defect*
scores TPR and PRO stay constant while FPR grows: the curve there is a horizontal segment and its inner
points need not be listed. The exact curve -- the same polyline as the one through every distinct
threshold -- is described by two points per distinct defect score ``e``::

    A(e) = (FPR(score > e),  PRO(score > e))     the curve just above e
    B(e) = (FPR(score >= e), PRO(score >= e))    the curve at e

joined by a diagonal when normal pixels tie with ``e``, and by horizontal segments from ``B`` of one
defect score to ``A`` of the next. The normal scores are only needed *sorted* (values, no permutation);
``FPR(>= e)`` then is a binary search. The defect pixels -- usually far fewer -- are sorted with their
region sizes. For AUPRO alone only the normal scores down to ``FPR = fpr_limit`` matter
(:func:`largest_scores`), so the rest is never sorted.

On CPU the values-only sorts use numpy's vectorised sort (x86-simd-sort / Highway), which on float32 is
about 10x faster than ``torch.sort`` (that always computes a permutation); on other devices ``torch.sort``
is used. Counts are int64 and weight sums float64, so the result is exact up to float64 rounding.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np
import torch
from scipy import ndimage
from torch import Tensor

#: region sizes are packed next to 32-bit score keys when sorting (see :func:`_sort_with_payload`)
MAX_REGION_SIZE = 2**31 - 1


# ---------------------------------------------------------------------------------------------- regions
def region_sizes(masks: np.ndarray) -> np.ndarray:
    """Size of the 8-connected ground-truth region of every defect pixel.

    Args:
        masks: boolean ``[H, W]`` (one image) or ``[N, H, W]`` (images labelled independently: regions
            never connect across images).

    Returns:
        int64 ``[num_defect_pixels]``, in the order of ``masks[masks]`` (C order); the pixel's weight in
        the PRO is ``1 / size``.
    """
    masks = np.asarray(masks, dtype=bool)
    if masks.ndim == 2:
        structure = np.ones((3, 3), dtype=bool)
    elif masks.ndim == 3:
        # 8-connectivity inside each image, no connection between neighbouring images of the stack
        structure = np.zeros((3, 3, 3), dtype=bool)
        structure[1] = True
    else:
        raise ValueError(f"masks must be [H, W] or [N, H, W], got shape {masks.shape}")
    labels, _ = ndimage.label(masks, structure=structure)
    defect_labels = labels[masks]
    counts = np.bincount(defect_labels)
    return counts[defect_labels].astype(np.int64)


# ---------------------------------------------------------------------------------------------- sorting
#: use numpy's vectorised sort / partition / boolean indexing for CPU tensors (tests switch it off to run
#: the pure-torch path, the one taken on GPUs, on the CPU)
NUMPY_ON_CPU = True


def uses_numpy(tensor: Tensor) -> bool:
    """Whether the numpy fast path applies to ``tensor`` (a CPU tensor while :data:`NUMPY_ON_CPU`)."""
    return NUMPY_ON_CPU and tensor.device.type == "cpu"


def sort_scores(scores: Tensor, overwrite_input: bool = False) -> Tensor:
    """Ascending sort of a 1-D float score tensor, values only (no permutation is computed).

    With ``overwrite_input`` the CPU path sorts ``scores`` in place (saves a copy when the caller owns it).
    """
    scores = scores.reshape(-1)
    if uses_numpy(scores):
        values = scores.numpy()
        if overwrite_input and values.flags.writeable:
            values.sort()
            return scores
        return torch.from_numpy(np.sort(values))
    return torch.sort(scores).values


def normal_count_for_fpr(num_normal: int, max_fpr: float) -> int:
    """How many of the highest normal scores a sweep up to ``FPR = max_fpr`` needs.

    ``k = floor(max_fpr * num_normal) + 1`` (at most ``num_normal``): the ``k``-th highest normal score is
    the first threshold whose FPR exceeds ``max_fpr``, so the curve is known past the limit.
    """
    if not 0.0 < max_fpr <= 1.0:
        raise ValueError(f"the FPR limit must be in (0, 1], got {max_fpr}")
    return min(num_normal, math.floor(max_fpr * num_normal) + 1)


def largest_scores(scores: Tensor, k: int, overwrite_input: bool = False) -> Tensor:
    """The ``k`` largest entries of a 1-D score tensor plus every tie of the ``k``-th largest, ascending.

    CPU: ``numpy.partition`` (linear time) and a sort of the ``k`` kept values only. With
    ``overwrite_input`` the CPU path partitions ``scores`` in place instead of a copy (saves memory when
    the caller owns the tensor).
    """
    scores = scores.reshape(-1)
    n = scores.numel()
    if not 1 <= k <= n:
        raise ValueError(f"k must be in [1, {n}], got {k}")
    pivot = n - k
    if uses_numpy(scores):
        values = scores.numpy()
        if not overwrite_input or not values.flags.writeable:
            values = values.copy()
        values.partition(pivot)
        cut = values[pivot]
        top = values[pivot:]
        top.sort()
        ties_below = int(np.count_nonzero(values[:pivot] == cut))
        if ties_below:
            top = np.concatenate([np.full(ties_below, cut, dtype=values.dtype), top])
        return torch.from_numpy(top)
    ordered = torch.sort(scores).values
    first = torch.searchsorted(ordered, ordered[pivot : pivot + 1], side="left")
    return ordered[int(first) :]


def _float32_sort_keys(scores: np.ndarray) -> np.ndarray:
    """Order-preserving map of float32 scores to int32 keys (``-0.0`` and ``0.0`` share one key)."""
    bits = (scores.astype(np.float32) + np.float32(0.0)).view(np.int32)  # + 0.0 turns -0.0 into 0.0
    return np.where(bits < 0, bits ^ np.int32(0x7FFFFFFF), bits)


def _float32_from_sort_keys(keys: np.ndarray) -> np.ndarray:
    """Inverse of :func:`_float32_sort_keys`."""
    keys = keys.astype(np.int32)
    return np.where(keys < 0, keys ^ np.int32(0x7FFFFFFF), keys).view(np.float32)


def _sort_with_payload(scores: Tensor, payload: Tensor) -> tuple[Tensor, Tensor]:
    """Sort float32 ``scores`` ascending and carry a non-negative integer ``payload`` (< 2^31) along.

    CPU: each pair is packed into one int64 -- the order-preserving 32-bit key of the score in the high
    half, the payload in the low half -- and sorted by value, which is much faster than an argsort.
    """
    if uses_numpy(scores):
        keys = _float32_sort_keys(scores.numpy()).astype(np.int64)
        packed = (keys << 32) | payload.numpy().astype(np.int64)
        packed.sort()
        sorted_scores = _float32_from_sort_keys(packed >> 32)
        sorted_payload = packed & np.int64(0xFFFFFFFF)
        return torch.from_numpy(sorted_scores), torch.from_numpy(sorted_payload)
    sorted_scores, order = torch.sort(scores)
    return sorted_scores, payload.long()[order]


# ---------------------------------------------------------------------------------------------- the sweep
@dataclass(frozen=True)
class ThresholdSweep:
    """Curve statistics at every distinct defect score (see the module docstring).

    Per distinct defect score ``e`` (descending; tensors of length ``L``):

    - ``defect_scores``: ``e`` (float32);
    - ``fp_above`` / ``fp_at_or_above``: normal pixels with score ``> e`` / ``>= e`` (int64);
    - ``tp_at_or_above``: defect pixels with score ``>= e`` (int64); those ``> e`` are the previous entry's;
    - ``weight_at_or_above``: sum of region weights ``1/|region|`` of defect pixels with score ``>= e``
      (float64).

    Totals: ``num_normal``, ``num_defect``, ``num_regions`` (``R``, the sum of all weights, float) and
    ``fp_end``: the normal pixels the sweep covers -- ``num_normal`` for a complete sweep, fewer for one
    limited to the highest FPRs (then only defect scores ``>=`` the lowest kept normal score are listed).
    """

    defect_scores: Tensor
    fp_above: Tensor
    fp_at_or_above: Tensor
    tp_at_or_above: Tensor
    weight_at_or_above: Tensor
    num_normal: int
    num_defect: int
    num_regions: float
    fp_end: int

    @property
    def complete(self) -> bool:
        """Whether the sweep reaches FPR = 1 (needed for AUROC and F1-max)."""
        return self.fp_end == self.num_normal


def all_finite(values: Tensor) -> bool:
    """Whether a floating tensor holds no NaN or inf, in one cheap reduction.

    ``torch.aminmax`` propagates NaN and shows inf at an end, so both ends finite means all finite; it is
    several times faster than ``torch.isfinite(values).all()`` on large CPU tensors.
    """
    if values.numel() == 0:
        return True
    low, high = torch.aminmax(values.detach().reshape(-1))
    return bool(torch.isfinite(low)) and bool(torch.isfinite(high))


def _check_scores(name: str, scores: Tensor) -> Tensor:
    if not torch.is_floating_point(scores):
        raise ValueError(f"{name} must be floating point scores, got dtype {scores.dtype}")
    scores = scores.reshape(-1).float()
    if not all_finite(scores):
        raise ValueError(f"{name} contain NaN or inf")
    return scores


def sweep_sorted_thresholds(
    sorted_normal_scores: Tensor, num_normal: int, defect_scores: Tensor, defect_region_sizes: Tensor
) -> ThresholdSweep:
    """Sweep every distinct threshold, given the normal scores already sorted ascending.

    Args:
        sorted_normal_scores: float32 ascending; either all ``num_normal`` normal scores, or only the
            highest ones including every copy of the lowest kept value (:func:`largest_scores`) -- then
            the sweep stops at that value (``fp_end = len(sorted_normal_scores)``).
        num_normal: the number of normal pixels in the whole set.
        defect_scores: float32 ``[num_defect]``, any order.
        defect_region_sizes: ``[num_defect]`` integers >= 1, the size of each defect pixel's region.
    """
    kept = sorted_normal_scores.numel()
    if kept == 0 or num_normal == 0:
        raise ValueError("there are no normal pixels: FPR (and so AUROC, AUPRO) is undefined")
    if kept > num_normal:
        raise ValueError(f"{kept} sorted normal scores given but num_normal is {num_normal}")
    if defect_scores.numel() == 0:
        raise ValueError("there are no defect pixels (every mask is empty): pixel metrics are undefined")
    if defect_region_sizes.shape != defect_scores.shape:
        raise ValueError(
            f"defect_region_sizes has shape {tuple(defect_region_sizes.shape)}, "
            f"defect_scores {tuple(defect_scores.shape)}"
        )
    device = sorted_normal_scores.device
    sizes = defect_region_sizes.reshape(-1).to(device)
    smallest, largest = torch.aminmax(sizes)
    if float(smallest) < 1 or float(largest) > MAX_REGION_SIZE:
        raise ValueError(f"region sizes must be integers in [1, {MAX_REGION_SIZE}]")
    defect_scores = defect_scores.reshape(-1).float().to(device)
    num_defect = defect_scores.numel()
    num_regions = (1.0 / sizes.double()).sum().item()  # R: every region's weights sum to 1
    if kept < num_normal:
        # a limited sweep ends at the lowest kept normal score: lower defect scores are never thresholds
        listed = defect_scores >= sorted_normal_scores[0]
        defect_scores, sizes = defect_scores[listed], sizes[listed]

    ascending, ascending_sizes = _sort_with_payload(defect_scores, sizes)
    descending = ascending.flip(0)
    weights = 1.0 / ascending_sizes.flip(0).double()  # region weight 1/|C| of each pixel, descending
    values, counts = torch.unique_consecutive(descending, return_counts=True)
    tp_at_or_above = counts.cumsum(0)
    weight_at_or_above = weights.cumsum(0)[tp_at_or_above - 1] if values.numel() else weights[:0]

    below = torch.searchsorted(sorted_normal_scores, values, side="left")  # normal scores < e
    fp_at_or_above = kept - below
    # normal scores equal to e (normal pixels tied with defect pixels) are usually rare: search only those
    tied = (below < kept) & (sorted_normal_scores[below.clamp_max(kept - 1)] == values)
    fp_above = fp_at_or_above.clone()
    if bool(tied.any()):
        fp_above[tied] = kept - torch.searchsorted(sorted_normal_scores, values[tied], side="right")
    return ThresholdSweep(
        defect_scores=values,
        fp_above=fp_above,
        fp_at_or_above=fp_at_or_above,
        tp_at_or_above=tp_at_or_above,
        weight_at_or_above=weight_at_or_above,
        num_normal=int(num_normal),
        num_defect=int(num_defect),
        num_regions=float(num_regions),
        fp_end=int(kept),
    )


def sweep_thresholds(
    normal_scores: Tensor,
    defect_scores: Tensor,
    defect_region_sizes: Tensor,
    max_fpr: float | None = None,
) -> ThresholdSweep:
    """Sweep every distinct threshold over normal and defect pixel scores.

    Args:
        normal_scores: ``[num_normal]`` scores of the normal pixels, any order.
        defect_scores: ``[num_defect]`` scores of the defect pixels, any order.
        defect_region_sizes: ``[num_defect]`` size of each defect pixel's 8-connected region
            (:func:`region_sizes`).
        max_fpr: ``None`` for a complete sweep (AUROC, F1-max, AUPRO); a value in ``(0, 1]`` sorts only
            the normal scores needed up to that FPR (enough for AUPRO).
    """
    normal_scores = _check_scores("normal scores", normal_scores)
    defect_scores = _check_scores("defect scores", defect_scores)
    num_normal = normal_scores.numel()
    if num_normal == 0:
        raise ValueError("there are no normal pixels: FPR (and so AUROC, AUPRO) is undefined")
    if max_fpr is None:
        sorted_normal = sort_scores(normal_scores)
    else:
        sorted_normal = largest_scores(normal_scores, normal_count_for_fpr(num_normal, max_fpr))
    return sweep_sorted_thresholds(sorted_normal, num_normal, defect_scores, defect_region_sizes)


# ---------------------------------------------------------------------------------------------- curves
def _interleave(above: Tensor, at_or_above: Tensor) -> Tensor:
    """``[a0, b0, a1, b1, ...]``: the points A(e) and B(e) of every defect score in curve order."""
    return torch.stack([above, at_or_above], dim=1).reshape(-1)


def _curve(sweep: ThresholdSweep, y_at_or_above: Tensor) -> tuple[Tensor, Tensor]:
    """Polyline ``(FPR, y)`` from ``(0, 0)`` for a curve value ``y(>= e)`` given per defect score ``e``.

    Points: ``(0, 0)``, then ``A(e), B(e)`` for every defect score (``y(> e)`` is the previous score's
    ``y(>= e)``), then the horizontal run to ``FPR = fp_end / num_normal``.
    """
    y_at_or_above = y_at_or_above.double()
    zero = y_at_or_above.new_zeros(1)
    y_above = torch.cat([zero, y_at_or_above[:-1]])
    y_last = y_at_or_above[-1:] if y_at_or_above.numel() else zero
    fp = torch.cat(
        [
            sweep.fp_above.new_zeros(1),
            _interleave(sweep.fp_above, sweep.fp_at_or_above),
            sweep.fp_above.new_full((1,), sweep.fp_end),
        ]
    )
    y = torch.cat([zero, _interleave(y_above, y_at_or_above), y_last])
    return fp.double() / sweep.num_normal, y


def roc_curve(sweep: ThresholdSweep) -> tuple[Tensor, Tensor]:
    """The exact ROC curve as a polyline ``(FPR, TPR)`` from ``(0, 0)`` (float64, non-decreasing FPR)."""
    return _curve(sweep, sweep.tp_at_or_above.double() / sweep.num_defect)


def pro_curve(sweep: ThresholdSweep) -> tuple[Tensor, Tensor]:
    """The exact PRO curve as a polyline ``(FPR, PRO)`` from ``(0, 0)`` (:func:`per_region_overlap`)."""
    return _curve(sweep, per_region_overlap(sweep.weight_at_or_above, sweep.num_regions))


def per_region_overlap(weight_at_or_above: Tensor, num_regions: float) -> Tensor:
    """PRO in region-weight form: ``PRO(t) = (1/R) sum_{p defect, s_p >= t} 1/|C(p)|``.

    Equal to the MVTec definition ``(1/K) sum_k |{p in C_k: s_p >= t}| / |C_k|`` because the pixels of
    region ``C_k`` that pass the threshold contribute ``|{...}| * 1/|C_k|`` and ``R = K``.
    """
    return weight_at_or_above.double() / num_regions


def area_under_curve(x: Tensor, y: Tensor, x_max: float = 1.0) -> float:
    """Trapezoidal area under the polyline ``(x, y)`` from ``x[0]`` to ``x_max``.

    ``x`` must be non-decreasing and reach ``x_max``. The end point at ``x_max`` is interpolated linearly
    between the last point with ``x <= x_max`` and the first with ``x > x_max``.
    """
    if x.ndim != 1 or x.shape != y.shape or x.numel() < 2:
        raise ValueError(f"x and y must be 1-D of one length >= 2, got {tuple(x.shape)} and {tuple(y.shape)}")
    x, y = x.double(), y.double()
    if float(x[-1]) < x_max:
        raise ValueError(f"the curve ends at x = {float(x[-1])}, before the limit {x_max}")
    first_beyond = int(torch.searchsorted(x, x.new_tensor([x_max]), side="right"))
    if first_beyond < x.numel():
        x0, x1 = x[first_beyond - 1], x[first_beyond]
        y0, y1 = y[first_beyond - 1], y[first_beyond]
        y_end = y0 + (y1 - y0) * (x_max - x0) / (x1 - x0)
        x = torch.cat([x[:first_beyond], x.new_tensor([x_max])])
        y = torch.cat([y[:first_beyond], y_end.reshape(1)])
    return float(torch.trapezoid(y, x))


# ---------------------------------------------------------------------------------------------- metrics
def _up_to_fpr(sweep: ThresholdSweep, fpr_limit: float) -> ThresholdSweep:
    """The sweep's defect scores up to (and one past) the first whose point ``A`` lies beyond ``fpr_limit``.

    The dropped entries only describe the curve past the limit; the curve still ends beyond it.
    """
    beyond = int(torch.searchsorted(sweep.fp_above.double(), fpr_limit * sweep.num_normal, side="right"))
    keep = beyond + 2
    if keep >= sweep.defect_scores.numel():
        return sweep
    return replace(
        sweep,
        defect_scores=sweep.defect_scores[:keep],
        fp_above=sweep.fp_above[:keep],
        fp_at_or_above=sweep.fp_at_or_above[:keep],
        tp_at_or_above=sweep.tp_at_or_above[:keep],
        weight_at_or_above=sweep.weight_at_or_above[:keep],
    )


def aupro_from_sweep(sweep: ThresholdSweep, fpr_limit: float = 0.3) -> float:
    """Normalised area under the PRO curve up to ``FPR = fpr_limit``: ``area / fpr_limit`` in [0, 1]."""
    if not 0.0 < fpr_limit <= 1.0:
        raise ValueError(f"the FPR limit must be in (0, 1], got {fpr_limit}")
    fpr, pro = pro_curve(_up_to_fpr(sweep, fpr_limit))
    return area_under_curve(fpr, pro, fpr_limit) / fpr_limit


def auroc_from_sweep(sweep: ThresholdSweep) -> float:
    """Area under the exact pixel ROC curve (ties count one half, as in the Mann-Whitney statistic)."""
    if not sweep.complete:
        raise ValueError("AUROC needs a complete sweep (max_fpr=None)")
    fpr, tpr = roc_curve(sweep)
    return area_under_curve(fpr, tpr, 1.0)


def f1_max_from_sweep(sweep: ThresholdSweep) -> float:
    """Best F1 over all thresholds: ``max_t 2 TP / (2 TP + FP + FN) = max_t 2 TP / (TP + FP + P)``.

    For a fixed TP (between two defect scores) F1 falls as FP grows, so the best threshold of each TP is
    the defect score ``e`` itself: only the points ``B(e)`` are candidates.
    """
    if not sweep.complete:
        raise ValueError("F1-max needs a complete sweep (max_fpr=None)")
    tp = sweep.tp_at_or_above.double()
    f1 = 2.0 * tp / (tp + sweep.fp_at_or_above.double() + sweep.num_defect)
    return float(f1.max()) if f1.numel() else 0.0
