"""AnomalySD (Yan et al.): few-shot multi-class anomaly detection by inpainting with a fine-tuned Stable
Diffusion. See :mod:`fsad_lightning.methods.anomalysd.module`."""

from fsad_lightning.methods.anomalysd.module import InpaintFinetuneModule

__all__ = ["InpaintFinetuneModule"]
