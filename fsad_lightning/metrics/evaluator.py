"""``Evaluator``: what a test run feeds batch by batch and reads once at the end.

Used by :class:`~fsad_lightning.methods.base.FewShotAnomalyModule`::

    evaluator = Evaluator(eval_size=None)
    evaluator.update(output, batch)   # every test batch (AnomalyOutput, batch dict)
    metrics = evaluator.compute()     # synchronised across DDP ranks
    evaluator.reset()

It is an ``nn.Module`` holding torchmetrics ``Metric``s, so Lightning moves it with the module and
torchmetrics gathers the states of every rank in ``compute()`` (the result equals a single-process run
on the same images).

Multi-class runs (one model tested on several categories, e.g. AnomalySD): after
``evaluator.set_categories(["bottle", "cable", ...])`` every image is routed by its batch ``category`` to
that category's own metrics, ``compute()`` returns them under ``per_category`` and the top-level metrics
are their mean over categories (how the multi-class papers report a dataset), marked
``aggregation: "category_mean"``. Pixel states are kept per category only, never twice.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fsad_lightning.metrics.curves import all_finite
from fsad_lightning.metrics.image import ImageMetrics
from fsad_lightning.metrics.pixel import PixelMetrics

if TYPE_CHECKING:
    from fsad_lightning.data.batch import AnomalyOutput

# batch keys of the contract in fsad_lightning/data/batch.py (spelled out so this package stays free of
# the data package's imports)
LABEL = "label"
HAS_MASK = "has_mask"
PATH = "path"
CATEGORY = "category"
MASK = "mask"
GT_MASK = "gt_mask"
CONTENT_BOX = "content_box"

GROUND_TRUTH_RESOLUTION = "ground_truth"
METRIC_NAMES = (
    "image_auroc", "image_auprc", "image_f1_max", "pixel_auroc", "pixel_aupro", "pixel_f1_max",
)
#: what the decision threshold gives (when one is set): averaged over categories like the others
THRESHOLD_METRIC_NAMES = ("threshold_precision", "threshold_recall", "threshold_f1", "threshold_fpr")


def _non_finite_report(values: Tensor, paths: Sequence[str], what: str) -> str | None:
    """``"<what> of <path> contains NaN; ..."`` for every image whose row of ``values`` is not finite."""
    if all_finite(values):
        return None
    rows = values.detach().reshape(values.shape[0], -1)
    has_nan = torch.isnan(rows).any(dim=1).tolist()
    has_inf = torch.isinf(rows).any(dim=1).tolist()
    problems = [
        f"{what} of {path} contains {'NaN' if nan else 'inf'}"
        for path, nan, inf in zip(paths, has_nan, has_inf)
        if nan or inf
    ]
    return "; ".join(problems) if problems else None


class MetricGroup(nn.Module):
    """The image and pixel metrics of one set of images (a whole test split, or one of its categories)."""

    def __init__(self, fpr_limit: float) -> None:
        super().__init__()
        self.image_metrics = ImageMetrics()
        self.pixel_metrics = PixelMetrics(fpr_limit=fpr_limit)

    def update(
        self,
        scores: Tensor,
        labels: Tensor,
        has_mask: Tensor,
        has_map: bool,
        maps: list[Tensor] | None = None,
        masks: list[Tensor] | None = None,
    ) -> None:
        """Record images; ``maps`` / ``masks`` at evaluation resolution feed the pixel metrics when given."""
        self.image_metrics.update(scores, labels, has_mask, has_map=has_map)
        if maps is not None and masks is not None:
            self.pixel_metrics.update(maps, masks)

    def compute(self, decision_threshold: float | None = None) -> dict[str, float | int]:
        self.image_metrics.decision_threshold = decision_threshold
        image = self.image_metrics.compute()
        num_images = image["num_images"]
        results: dict[str, float | int] = {
            "image_auroc": image["image_auroc"],
            "image_auprc": image["image_auprc"],
            "image_f1_max": image["image_f1_max"],
        }
        results.update({k: image[k] for k in ("threshold", *THRESHOLD_METRIC_NAMES) if k in image})
        num_with_map = image["num_with_map"]
        if 0 < num_with_map < num_images:
            raise ValueError(
                f"the method returned anomaly maps for {num_with_map} of {num_images} images: "
                "pixel metrics need a map for every image (or none at all)"
            )
        if num_with_map == num_images and image["num_with_mask"] == num_images:
            results.update(self.pixel_metrics.compute())
        results["num_images"] = num_images
        results["num_anomalous"] = image["num_anomalous"]
        return results

    def reset(self) -> None:
        self.image_metrics.reset()
        self.pixel_metrics.reset()


class Evaluator(nn.Module):
    """Image and pixel metrics of a test run.

    Args:
        eval_size: resolution of the pixel metrics. ``None`` (default) evaluates at ground-truth
            resolution: each anomaly map is upsampled (bilinear) to its own ``gt_mask`` size. An int
            resizes the map (bilinear) and the mask (nearest neighbour, pixel-centre aligned:
            ``"nearest-exact"``) to ``eval_size x eval_size``.
        fpr_limit: upper FPR limit of the AUPRO (MVTec AD: 0.3).

    ``compute()`` returns float fractions ``image_auroc``, ``image_auprc``, ``image_f1_max`` and, when
    every test image has a pixel ground truth (``has_mask``) and the method returned anomaly maps,
    ``pixel_auroc``, ``pixel_aupro``, ``pixel_f1_max``; plus ``eval_resolution`` (``"ground_truth"`` or
    the int), ``num_images`` and ``num_anomalous``. With :attr:`decision_threshold` set (the module's
    label-free threshold) also ``threshold`` and :data:`THRESHOLD_METRIC_NAMES`. With several categories (:meth:`set_categories`) it
    also returns ``per_category`` (category -> those metrics) and the top-level metrics are their mean.
    """

    def __init__(self, eval_size: int | None = None, fpr_limit: float = 0.3) -> None:
        super().__init__()
        if eval_size is not None and (
            isinstance(eval_size, bool) or not isinstance(eval_size, int) or eval_size < 1
        ):
            raise ValueError(
                f"eval_size must be a positive int or None (ground-truth resolution), got {eval_size!r}"
            )
        self.eval_size = eval_size
        self.fpr_limit = fpr_limit
        self.categories: list[str] = []
        self.groups = nn.ModuleList([MetricGroup(fpr_limit)])
        self.decision_threshold: float | None = None

    def set_categories(self, categories: Sequence[str] | None) -> None:
        """Evaluate each of ``categories`` on its own when there are two or more (forgets recorded batches).

        Every DDP rank must pass the same list (the datamodule's ``categories``), so that the per-category
        states are gathered in the same order everywhere.
        """
        names = list(dict.fromkeys(categories or []))
        self.categories = names if len(names) > 1 else []
        self.groups = nn.ModuleList([MetricGroup(self.fpr_limit) for _ in self.categories or [None]])

    # ------------------------------------------------------------------ update
    def update(self, output: AnomalyOutput, batch: dict[str, Any]) -> None:
        """Record one scored batch.

        Args:
            output: ``pred_score`` ``[B]`` and ``anomaly_map`` ``[B, h, w]`` or ``None``.
            batch: the batch contract; uses ``label``, ``has_mask``, ``path`` and the ground truth
                ``gt_mask`` (list of ``[H0, W0]`` at source resolution) or, when absent, ``mask``
                ``[B, 1, H, W]``.

        Raises:
            ValueError: a score or map holds NaN or inf (naming the image paths), or shapes disagree.
        """
        for key in (LABEL, HAS_MASK, PATH):
            if key not in batch:
                raise ValueError(f"the batch has no '{key}' entry (keys: {sorted(batch)})")
        paths = [str(p) for p in batch[PATH]]
        n = len(paths)
        scores = output.pred_score
        if scores.shape != (n,):
            raise ValueError(f"pred_score has shape {tuple(scores.shape)} but the batch has {n} paths")
        problem = _non_finite_report(scores, paths, "anomaly score")
        if problem:
            raise ValueError(problem)
        maps = output.anomaly_map
        if maps is not None:
            if maps.ndim != 3 or maps.shape[0] != n:
                raise ValueError(f"anomaly_map has shape {tuple(maps.shape)}, expected ({n}, H, W)")
            problem = _non_finite_report(maps, paths, "anomaly map")
            if problem:
                raise ValueError(problem)
        has_mask = torch.as_tensor(batch[HAS_MASK]).reshape(-1).bool()
        labels = torch.as_tensor(batch[LABEL]).reshape(-1)
        eval_maps = eval_masks = None
        if maps is not None and bool(has_mask.all()):
            eval_maps, eval_masks = self._at_evaluation_resolution(
                maps, self._ground_truth(batch, n), batch.get(CONTENT_BOX)
            )
        has_map = maps is not None
        if not self.categories:
            self.groups[0].update(scores, labels, has_mask, has_map, eval_maps, eval_masks)
            return
        rows_of = self._rows_by_category(batch, n)
        for group, rows in zip(self.groups, rows_of):
            if not rows:
                continue
            index = torch.tensor(rows)
            group.update(
                scores[index.to(scores.device)],
                labels[index.to(labels.device)],
                has_mask[index.to(has_mask.device)],
                has_map,
                [eval_maps[i] for i in rows] if eval_maps is not None else None,
                [eval_masks[i] for i in rows] if eval_masks is not None else None,
            )

    def _rows_by_category(self, batch: dict[str, Any], n: int) -> list[list[int]]:
        """For each of :attr:`categories` the batch rows of its images; an unknown category is an error."""
        if batch.get(CATEGORY) is None:
            raise ValueError(f"a multi-class test batch needs a '{CATEGORY}' entry (keys: {sorted(batch)})")
        names = [str(c) for c in batch[CATEGORY]]
        if len(names) != n:
            raise ValueError(f"batch['{CATEGORY}'] has {len(names)} entries for {n} images")
        rows: list[list[int]] = [[] for _ in self.categories]
        for i, name in enumerate(names):
            if name not in self.categories:
                raise ValueError(
                    f"image {batch[PATH][i]} has category '{name}', not one of the evaluated {self.categories}"
                )
            rows[self.categories.index(name)].append(i)
        return rows

    def _ground_truth(self, batch: dict[str, Any], n: int) -> list[Tensor]:
        """Per image a boolean ``[H, W]`` CPU mask: ``gt_mask`` (source resolution), else ``mask``."""
        if batch.get(GT_MASK) is not None:
            masks = list(batch[GT_MASK])
            source = GT_MASK
        elif batch.get(MASK) is not None:
            masks = list(batch[MASK])
            source = MASK
        else:
            raise ValueError(
                "the batch has has_mask True but neither 'gt_mask' nor 'mask' to evaluate pixels"
            )
        if len(masks) != n:
            raise ValueError(f"batch['{source}'] has {len(masks)} masks for {n} images")
        out = []
        for i, mask in enumerate(masks):
            mask = torch.as_tensor(np.asarray(mask) if not isinstance(mask, Tensor) else mask).detach().cpu()
            if mask.ndim == 3 and mask.shape[0] == 1:
                mask = mask[0]
            if mask.ndim != 2:
                raise ValueError(f"batch['{source}'][{i}] has shape {tuple(mask.shape)}, expected [H, W]")
            out.append(mask > 0.5 if torch.is_floating_point(mask) else mask > 0)
        return out

    def _at_evaluation_resolution(
        self, maps: Tensor, masks: list[Tensor], content_boxes: Tensor | None = None
    ) -> tuple[list[Tensor], list[Tensor]]:
        """Resize maps (bilinear) and masks (nearest) to the evaluation resolution, image by image; maps of
        padded images (``content_box``, ``resize_mode: pad``) are first cropped to the image content."""
        maps = maps.detach().float()
        if content_boxes is not None:
            boxes = torch.as_tensor(content_boxes).reshape(-1, 4).tolist()
            maps = [m[t : t + h, left : left + w] for m, (t, left, h, w) in zip(maps, boxes)]
        if self.eval_size is not None:
            size = (self.eval_size, self.eval_size)
            maps = [
                m
                if tuple(m.shape) == size
                else F.interpolate(m[None, None], size=size, mode="bilinear", align_corners=False)[0, 0]
                for m in maps
            ]
            masks = [
                mask
                if tuple(mask.shape) == size
                else F.interpolate(mask[None, None].float(), size=size, mode="nearest-exact")[0, 0] > 0.5
                for mask in masks
            ]
            return list(maps), masks
        resized = []
        for anomaly_map, mask in zip(maps, masks):
            if tuple(anomaly_map.shape) != tuple(mask.shape):
                anomaly_map = F.interpolate(
                    anomaly_map[None, None], size=tuple(mask.shape), mode="bilinear", align_corners=False
                )[0, 0]
            resized.append(anomaly_map)
        return resized, masks

    # ------------------------------------------------------------------ compute / reset
    def compute(self) -> dict[str, Any]:
        """All metrics over every image seen since the last :meth:`reset` (on every DDP rank)."""
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        resolution = GROUND_TRUTH_RESOLUTION if self.eval_size is None else self.eval_size
        if not self.categories:
            if not distributed and not self.groups[0].image_metrics.update_called:
                raise ValueError("no image was evaluated: update() was never called before compute()")
            return {**self.groups[0].compute(self.decision_threshold), "eval_resolution": resolution}
        per_category: dict[str, dict[str, Any]] = {}
        for name, group in zip(self.categories, self.groups):
            if not distributed and not group.image_metrics.update_called:
                raise ValueError(f"no image of category '{name}' was evaluated: its test split is empty")
            per_category[name] = group.compute(self.decision_threshold)
        results: dict[str, Any] = {}
        if self.decision_threshold is not None:
            results["threshold"] = float(self.decision_threshold)
        for metric in METRIC_NAMES + THRESHOLD_METRIC_NAMES:
            values = [r[metric] for r in per_category.values() if metric in r]
            if len(values) == len(per_category):
                results[metric] = float(np.mean(values))
        results["aggregation"] = "category_mean"
        results["eval_resolution"] = resolution
        results["num_images"] = sum(r["num_images"] for r in per_category.values())
        results["num_anomalous"] = sum(r["num_anomalous"] for r in per_category.values())
        results["per_category"] = per_category
        return results

    def reset(self) -> None:
        """Forget every recorded batch."""
        for group in self.groups:
            group.reset()

    def extra_repr(self) -> str:
        return f"eval_size={self.eval_size}, fpr_limit={self.fpr_limit}"
