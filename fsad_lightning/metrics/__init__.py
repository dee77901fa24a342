"""Evaluation metrics: image AUROC / AUPRC / F1-max; pixel AUROC / AUPRO@0.3 (exact) / F1-max.

- :class:`Evaluator` -- what a test run feeds (``update(output, batch)``) and reads (``compute()``),
  DDP-synchronised; pixel metrics at ground-truth resolution by default.
- :class:`ImageMetrics`, :class:`PixelMetrics` -- its two torchmetrics ``Metric``s.
- :func:`aupro`, :func:`pixel_metrics`, :func:`image_metrics`, :func:`f1_max` -- functional forms.
- :mod:`fsad_lightning.metrics.curves` -- the exact threshold sweep behind every pixel metric.
"""

from fsad_lightning.metrics.curves import (
    ThresholdSweep,
    area_under_curve,
    aupro_from_sweep,
    auroc_from_sweep,
    f1_max_from_sweep,
    pro_curve,
    region_sizes,
    roc_curve,
    sweep_thresholds,
)
from fsad_lightning.metrics.evaluator import Evaluator
from fsad_lightning.metrics.functional import aupro, f1_max, image_metrics, pixel_metrics
from fsad_lightning.metrics.image import ImageMetrics
from fsad_lightning.metrics.pixel import PixelMetrics

__all__ = [
    "Evaluator",
    "ImageMetrics",
    "PixelMetrics",
    "ThresholdSweep",
    "area_under_curve",
    "aupro",
    "aupro_from_sweep",
    "auroc_from_sweep",
    "f1_max",
    "f1_max_from_sweep",
    "image_metrics",
    "pixel_metrics",
    "pro_curve",
    "region_sizes",
    "roc_curve",
    "sweep_thresholds",
]
