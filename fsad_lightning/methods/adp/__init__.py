"""ADP: Anomaly Detection via Personalization (Kwak et al., IEEE Access 2024)."""

from fsad_lightning.methods.adp.module import ADPConceptModule
from fsad_lightning.methods.adp.torch_model import ADPModel, ADPOutput, SelfTuningResult

__all__ = ["ADPConceptModule", "ADPModel", "ADPOutput", "SelfTuningResult"]
