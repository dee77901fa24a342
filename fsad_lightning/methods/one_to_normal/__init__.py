"""One-to-Normal: anomaly personalization for few-shot anomaly detection (Li et al., NeurIPS 2024)."""

from fsad_lightning.methods.one_to_normal.module import DreamBoothNormalModule
from fsad_lightning.methods.one_to_normal.torch_model import OneToNormalModel, TripletOutput

__all__ = ["DreamBoothNormalModule", "OneToNormalModel", "TripletOutput"]
