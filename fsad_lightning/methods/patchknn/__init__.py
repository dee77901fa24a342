from fsad_lightning.methods.patchknn.module import PatchKNNModule
from fsad_lightning.methods.patchknn.torch_model import PatchKNNModel

__all__ = ["PatchKNNModel", "PatchKNNModule"]
