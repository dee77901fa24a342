from fsad_lightning.methods.winclip.module import WinCLIPModule
from fsad_lightning.methods.winclip.torch_model import WinCLIPModel

__all__ = ["WinCLIPModel", "WinCLIPModule"]
