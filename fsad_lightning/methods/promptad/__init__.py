"""PromptAD (Li et al., CVPR 2024): one-class prompt learning for few-shot anomaly detection."""

from fsad_lightning.methods.promptad.module import PromptADModule
from fsad_lightning.methods.promptad.torch_model import PromptADModel, PromptLearner

__all__ = ["PromptADModel", "PromptADModule", "PromptLearner"]
