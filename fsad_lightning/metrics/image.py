"""Image-level metrics of a test run as a DDP-synchronised torchmetrics ``Metric``."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

from fsad_lightning.metrics.distributed import gather_all_tensors_any_device
from fsad_lightning.metrics.functional import image_metrics
from fsad_lightning.thresholds import rates_at_threshold


class ImageMetrics(Metric):
    """Image AUROC, AUPRC (average precision) and F1-max over every image a run scores.

    One entry per image in four list states (concatenated across DDP ranks): ``scores`` (the method's
    ``pred_score``), ``labels`` (0/1), ``has_mask`` (a pixel ground truth exists) and ``has_map`` (the
    method returned an anomaly map). All are float32 -- scores are evaluated in float32 -- and kept on the
    CPU, so a rank that saw no batch still gathers tensors of the right dtype.

    :meth:`compute` returns the three metrics (float fractions) and the counts ``num_images``,
    ``num_anomalous``, ``num_with_mask``, ``num_with_map``; when :attr:`decision_threshold` is set,
    also what the decision ``score >= threshold`` gives
    (:func:`~fsad_lightning.thresholds.rates_at_threshold`: precision, recall, F1, false-positive rate).
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("compute_on_cpu", True)
        kwargs.setdefault("dist_sync_fn", gather_all_tensors_any_device)
        super().__init__(**kwargs)
        self.decision_threshold: float | None = None
        for name in ("scores", "labels", "has_mask", "has_map"):
            self.add_state(name, default=[], dist_reduce_fx="cat")

    def update(self, scores: Tensor, labels: Tensor, has_mask: Tensor, has_map: bool) -> None:
        """Record a batch: ``scores`` ``[B]``, ``labels`` ``[B]`` (0/1), ``has_mask`` ``[B]`` bool."""
        scores = scores.detach().reshape(-1).float().cpu()
        n = scores.numel()
        labels = torch.as_tensor(labels).detach().reshape(-1).cpu()
        has_mask = torch.as_tensor(has_mask).detach().reshape(-1).cpu()
        if labels.numel() != n or has_mask.numel() != n:
            raise ValueError(f"{n} scores but {labels.numel()} labels and {has_mask.numel()} has_mask flags")
        if bool(((labels != 0) & (labels != 1)).any()):
            raise ValueError(f"labels must be 0 (normal) or 1 (anomalous), got {labels.tolist()}")
        self.scores.append(scores)
        self.labels.append(labels.float())
        self.has_mask.append(has_mask.float())
        self.has_map.append(torch.full((n,), float(has_map)))

    def compute(self) -> dict[str, float | int]:
        if isinstance(self.scores, list) and not self.scores:  # after a DDP sync states are tensors
            raise ValueError("no image was evaluated: update() was never called before compute()")
        labels = dim_zero_cat(self.labels)
        results: dict[str, float | int] = dict(image_metrics(dim_zero_cat(self.scores), labels))
        results["num_images"] = int(labels.numel())
        results["num_anomalous"] = int(labels.sum())
        results["num_with_mask"] = int(dim_zero_cat(self.has_mask).sum())
        results["num_with_map"] = int(dim_zero_cat(self.has_map).sum())
        if self.decision_threshold is not None:
            results.update(rates_at_threshold(dim_zero_cat(self.scores), labels, self.decision_threshold))
        return results
