"""fsad_lightning: few-shot visual anomaly detection with PyTorch Lightning."""

__version__ = "0.1.0"
