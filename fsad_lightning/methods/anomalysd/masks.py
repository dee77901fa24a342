"""AnomalySD masks: training rectangles (§4.1), multi-scale proposals (§4.2) and the prototype-guided
mask's threshold (eq. 15).

Masks are float ``[N, 1, H, W]`` with ``1`` = the region to inpaint (the convention of
:meth:`~fsad_lightning.backbones.diffusion.StableDiffusion.inpaint`).

Foreground mask ``m_f`` (§4.1, "Training Mask Design"; the paper does not say how it is obtained). Our
choice, :func:`foreground_mask`, needs no model and works on any category:

1. smooth the image with a small box filter (side / 32 pixels) to suppress noise and fine texture;
2. the background colour is the per-channel median of the border ring (side / 16 pixels wide): industrial
   images put the object on a plain, centred background (MVTec AD, VisA);
3. a pixel is foreground when its RGB distance to that colour exceeds
   ``max(min_contrast, 2 x the 95th percentile of the border's own distances)``;
4. a morphological closing (side / 16) fills small holes;
5. the whole image is foreground when the border is not a plain background (its 95th-percentile distance
   exceeds ``max_background_spread``: a texture such as carpet, or an object filling the frame) or when
   fewer than ``min_foreground`` of the pixels are foreground (a uniform texture).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor


# ============================================================================ multi-scale proposals (§4.2)
def grid_edges(length: int, k: int) -> list[int]:
    """Pixel edges ``[0, ..., length]`` of ``k`` near-equal cells (``round(i * length / k)``); every pixel
    falls in exactly one cell even when ``k`` does not divide ``length``."""
    if k < 1 or k > length:
        raise ValueError(f"a grid of {k} cells does not fit {length} pixels")
    return [round(i * length / k) for i in range(k + 1)]


def multiscale_masks(height: int, width: int, scales: Sequence[int]) -> tuple[Tensor, Tensor]:
    """The proposals ``M^(k)_{i,j}`` of §4.2: for every ``k`` in ``scales``, one mask per cell of the
    ``k x k`` grid, row-major. Returns ``(masks [N, 1, H, W], scale_index [N])`` with
    ``N = sum k^2`` (85 for ``{1, 2, 4, 8}``) and ``scale_index`` the position of the mask's ``k`` in
    ``scales``. The masks of one scale cover the image exactly once."""
    if len(scales) == 0:
        return torch.zeros(0, 1, height, width), torch.zeros(0, dtype=torch.long)
    masks, index = [], []
    for position, k in enumerate(scales):
        rows, cols = grid_edges(height, int(k)), grid_edges(width, int(k))
        for i in range(int(k)):
            for j in range(int(k)):
                mask = torch.zeros(1, height, width)
                mask[:, rows[i] : rows[i + 1], cols[j] : cols[j + 1]] = 1.0
                masks.append(mask)
                index.append(position)
    return torch.stack(masks), torch.tensor(index, dtype=torch.long)


# ============================================================================ training masks (§4.1)
def foreground_mask(
    images: Tensor,
    min_contrast: float = 0.08,
    max_background_spread: float = 0.15,
    min_foreground: float = 0.01,
) -> Tensor:
    """The foreground mask ``m_f`` ``[B, 1, H, W]`` in ``{0, 1}`` of images ``[B, 3, H, W]`` in ``[0, 1]``
    by border-colour contrast (see the module docstring for the steps and the fallbacks)."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be [B, 3, H, W], got {tuple(images.shape)}")
    batch, _, height, width = images.shape
    side = min(height, width)
    x = images.float()
    smooth = max(1, side // 32) | 1  # odd box size
    if smooth > 1:
        x = F.avg_pool2d(F.pad(x, [smooth // 2] * 4, mode="replicate"), smooth, stride=1)
    ring = max(1, side // 16)
    border = torch.ones(height, width, dtype=torch.bool, device=x.device)
    border[ring : height - ring, ring : width - ring] = False
    border_pixels = x[:, :, border]  # [B, 3, P]
    background = border_pixels.median(dim=2).values  # [B, 3]
    distance = (x - background[:, :, None, None]).norm(dim=1)  # [B, H, W]
    spread = torch.quantile(distance[:, border], 0.95, dim=1)  # [B]
    threshold = torch.clamp(2.0 * spread, min=min_contrast)
    foreground = (distance > threshold[:, None, None]).float().unsqueeze(1)
    close = max(1, side // 16) | 1
    if close > 1:  # closing: dilate, then erode (an erosion is a dilation of the complement)
        dilated = F.max_pool2d(foreground, close, stride=1, padding=close // 2)
        foreground = 1.0 - F.max_pool2d(1.0 - dilated, close, stride=1, padding=close // 2)
    whole = (spread > max_background_spread) | (foreground.mean(dim=(1, 2, 3)) < min_foreground)
    return torch.where(whole[:, None, None, None], torch.ones_like(foreground), foreground)


def box_masks(boxes: Tensor, height: int, width: int) -> Tensor:
    """Rectangles ``[N, 4]`` as ``(top, left, bottom, right)`` pixel edges (bottom / right exclusive) to
    masks ``[N, 1, H, W]``."""
    rows = torch.arange(height, device=boxes.device).view(1, height, 1)
    cols = torch.arange(width, device=boxes.device).view(1, 1, width)
    top, left, bottom, right = (boxes[:, i].view(-1, 1, 1) for i in range(4))
    inside = (rows >= top) & (rows < bottom) & (cols >= left) & (cols < right)
    return inside.float().unsqueeze(1)


def box_iou_with_masks(boxes: Tensor, masks: Tensor) -> Tensor:
    """IoU of rectangles ``[B, C, 4]`` with binary masks ``[B, 1, H, W]`` (one mask per row of boxes) ->
    ``[B, C]``, through the masks' summed-area tables (no per-box mask is drawn)."""
    table = F.pad(masks[:, 0].float().cumsum(1).cumsum(2), (1, 0, 1, 0))  # [B, H + 1, W + 1]
    batch = torch.arange(boxes.shape[0], device=boxes.device).view(-1, 1)
    top, left, bottom, right = boxes.unbind(-1)
    inter = table[batch, bottom, right] - table[batch, top, right] - table[batch, bottom, left] + table[batch, top, left]
    area_boxes = ((bottom - top) * (right - left)).float()
    area_masks = table[:, -1, -1].view(-1, 1)
    union = area_boxes + area_masks - inter
    return torch.where(union > 0, inter / union.clamp_min(1e-12), torch.zeros_like(inter))


def bounding_boxes(masks: Tensor) -> Tensor:
    """Bounding boxes ``[B, 4]`` (``top, left, bottom, right``) of binary masks ``[B, 1, H, W]``; the whole
    image for an empty mask."""
    batch, _, height, width = masks.shape
    boxes = torch.tensor([0, 0, height, width], device=masks.device).repeat(batch, 1)
    for b in range(batch):
        rows = masks[b, 0].any(dim=1).nonzero().flatten()
        cols = masks[b, 0].any(dim=0).nonzero().flatten()
        if rows.numel():
            boxes[b] = torch.stack([rows[0], cols[0], rows[-1] + 1, cols[-1] + 1])
    return boxes


def sample_training_masks(
    foreground: Tensor,
    iou_thresholds: Sequence[float] = (0.0, 0.2, 0.5),
    generator: torch.Generator | None = None,
    min_side_fraction: float = 0.125,
    num_candidates: int = 64,
) -> tuple[Tensor, Tensor]:
    """§4.1 training masks ``m in {m_r | IoU(m_r, m_f) > gamma}``, one per image.

    For each image ``gamma`` is drawn uniformly from ``iou_thresholds`` (paper: 0, 0.2, 0.5 with equal
    probability), then ``num_candidates`` random rectangles ``m_r`` (each side uniform in
    ``[min_side_fraction, 1]`` of the image side -- the size range of the inference masks, 1/8 to 1 --,
    the position uniform) are drawn and the first with ``IoU(m_r, m_f) > gamma`` is kept. When none
    qualifies (a high ``gamma`` against a small foreground) the foreground's bounding box is used.
    Everything is drawn on the CPU with ``generator``. Returns ``(masks [B, 1, H, W], gamma [B])``.
    """
    if foreground.ndim != 4 or foreground.shape[1] != 1:
        raise ValueError(f"foreground masks must be [B, 1, H, W], got {tuple(foreground.shape)}")
    if len(iou_thresholds) == 0 or any(not 0.0 <= g < 1.0 for g in iou_thresholds):
        raise ValueError(f"iou_thresholds must be values in [0, 1), got {list(iou_thresholds)}")
    if not 0.0 < min_side_fraction <= 1.0:
        raise ValueError(f"min_side_fraction must be in (0, 1], got {min_side_fraction}")
    batch, _, height, width = foreground.shape
    fg = (foreground.detach().to("cpu") >= 0.5).float()
    choice = torch.randint(0, len(iou_thresholds), (batch,), generator=generator)
    gamma = torch.tensor([float(iou_thresholds[i]) for i in choice.tolist()])
    draws = torch.rand(batch, num_candidates, 4, generator=generator)
    min_h, min_w = max(1, round(min_side_fraction * height)), max(1, round(min_side_fraction * width))
    box_h = (min_h + draws[..., 0] * (height - min_h + 1)).long().clamp(max=height)
    box_w = (min_w + draws[..., 1] * (width - min_w + 1)).long().clamp(max=width)
    top = (draws[..., 2] * (height - box_h + 1)).long().clamp(max=height - box_h)
    left = (draws[..., 3] * (width - box_w + 1)).long().clamp(max=width - box_w)
    boxes = torch.stack([top, left, top + box_h, left + box_w], dim=-1)  # [B, C, 4]
    iou = box_iou_with_masks(boxes, fg)  # [B, C]
    accepted = iou > gamma.view(-1, 1)
    first = torch.where(accepted.any(dim=1), accepted.float().argmax(dim=1), torch.full((batch,), -1))
    fallback = bounding_boxes(fg)
    chosen = torch.stack(
        [boxes[b, first[b]] if first[b] >= 0 else fallback[b] for b in range(batch)]
    )
    return box_masks(chosen, height, width).to(foreground.device), gamma


# ============================================================================ prototype-guided mask (eq. 15)
#: how eq. 15 weighs the two sets' variances: by their sizes (Otsu) or not at all (the literal reading)
THRESHOLD_RULES = ("otsu", "literal")


def variance_split_threshold(values: Tensor, rule: str = "otsu") -> Tensor:
    """Eq. 15: the threshold ``r`` that splits the values of an error map into two sets of least variance.

    The paper writes ``r = argmin_r Var({e >= r}) + Var({e < r})``. Read literally (``rule="literal"``),
    the two variances are unweighted, so a set of one or two values (variance ~0) wins whenever the rest is
    spread: on a heavy-tailed map (exponential values) the mask is the one or two largest cells. ``rule=
    "otsu"`` (default) weighs each variance by its set's size, ``n_lo Var_lo + n_hi Var_hi`` -- the
    within-class variance of Otsu's method, the usual reading of "the summation of variance" of two
    classes --, which masks about a fifth of an exponential map. On a bimodal map both rules split at the
    gap; on a symmetric unimodal (Gaussian) map there is no second mode and both mask about half of it.

    Every split between two consecutive distinct sorted values is tried (both sets non-empty, population
    variances, computed from prefix sums in float64); ``r`` is the midpoint of the best split's two values,
    so ``{e > r}`` is exactly its upper set. A constant map returns its value (``{e > r}`` is empty).
    """
    if rule not in THRESHOLD_RULES:
        raise ValueError(f"threshold rule must be one of {list(THRESHOLD_RULES)}, got {rule!r}")
    flat = values.detach().flatten().double()
    if flat.numel() == 0:
        raise ValueError("variance_split_threshold needs at least one value")
    ordered = flat.sort().values
    n = ordered.numel()
    if n < 2 or ordered[0] == ordered[-1]:
        return ordered[-1].to(values.dtype)
    prefix = ordered.cumsum(0)[:-1]  # sums of the lower sets of sizes 1 .. n - 1
    prefix_sq = (ordered**2).cumsum(0)[:-1]
    lower_n = torch.arange(1, n, dtype=torch.float64, device=flat.device)
    upper_n = n - lower_n
    total, total_sq = ordered.sum(), (ordered**2).sum()
    var_lower = (prefix_sq / lower_n - (prefix / lower_n) ** 2).clamp_min(0)
    var_upper = ((total_sq - prefix_sq) / upper_n - ((total - prefix) / upper_n) ** 2).clamp_min(0)
    if rule == "otsu":
        objective = lower_n * var_lower + upper_n * var_upper
    else:
        objective = var_lower + var_upper
    distinct = ordered[1:] > ordered[:-1]  # a split must separate different values
    objective = torch.where(distinct, objective, torch.full_like(objective, float("inf")))
    split = int(objective.argmin())
    return ((ordered[split] + ordered[split + 1]) / 2).to(values.dtype)


def prototype_masks(error_maps: Tensor, size: tuple[int, int], rule: str = "otsu") -> Tensor:
    """Eq. 15: ``M^(p) = Upsample(1(E > r))`` with ``r`` from :func:`variance_split_threshold` (``rule``)
    per map. ``error_maps``: ``[B, h, w]``; returns ``[B, 1, H, W]`` (nearest-neighbour upsampling)."""
    if error_maps.ndim != 3:
        raise ValueError(f"error maps must be [B, h, w], got {tuple(error_maps.shape)}")
    binary = torch.stack([(e > variance_split_threshold(e, rule)).float() for e in error_maps]).unsqueeze(1)
    return F.interpolate(binary, size=tuple(size), mode="nearest")
