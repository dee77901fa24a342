"""LPIPS-style perceptual distance on AlexNet (Zhang et al., CVPR 2018), in one place.

AnomalySD uses it twice: as the LPIPS term of the decoder fine-tuning loss (eq. 10) and as the
per-position distance between a query and its inpainting (eq. 16-17). Both are

    D^(l)_{h,w}(x, y) = sum_c w^(l)_c ([phi^(l)(x)]_{h,w,c} - [phi^(l)(y)]_{h,w,c})^2

where ``phi^(l)`` are the AlexNet ``relu1``..``relu5`` activations unit-normalised along channels and
``w^(l) >= 0`` the LPIPS linear weights (a 1x1 convolution on the squared difference, as LPIPS computes
it; the papers write it as ``||w ⊙ (phi(x) - phi(y))||^2``). The loss (eq. 10) averages each layer over
positions and sums the layers; the map (eq. 17) upsamples each layer bilinearly and sums them.

``weights`` says where the weights come from; nothing falls back silently:

- ``"lpips"`` (default): AlexNet's ImageNet weights from torchvision (``AlexNet_Weights.IMAGENET1K_V1``,
  read from the torch hub cache, downloaded when missing and online) plus the LPIPS v0.1 linear weights
  that ship inside the ``lpips`` PyPI package (read from its folder, the package is not imported);
- a local file (``.safetensors`` / ``.pth``) holding this module's state dict, written once by
  :meth:`PerceptualDistance.save_weights` on a machine that has the real weights (the offline route);
- ``"random"``: random AlexNet and unit linear weights, for tests and latency benchmarks only.

A missing source raises :class:`~fsad_lightning.backbones.cnn.WeightsUnavailableError` with one line
that says what to do. Images are ``[B, 3, H, W]`` in ``[0, 1]``; at least 32 px a side (AlexNet's
pooling needs it).
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor, nn

from fsad_lightning.backbones.cnn import WeightsUnavailableError, load_state_dict_exactly
from fsad_lightning.io import atomic_write
from fsad_lightning.scoring import full_precision

#: (first, last + 1) index into ``torchvision.models.alexnet().features`` of each LPIPS layer relu1..relu5
ALEXNET_SLICES: tuple[tuple[int, int], ...] = ((0, 2), (2, 5), (5, 8), (8, 10), (10, 12))
#: channels of relu1..relu5
ALEXNET_CHANNELS: tuple[int, ...] = (64, 192, 384, 256, 256)
#: LPIPS' input scaling layer: ``(x - shift) / scale`` on images in [-1, 1]
LPIPS_SHIFT = (-0.030, -0.088, -0.188)
LPIPS_SCALE = (0.458, 0.448, 0.450)
#: the LPIPS v0.1 AlexNet linear weights inside the ``lpips`` package
LPIPS_LINEAR_FILE = ("weights", "v0.1", "alex.pth")
MIN_IMAGE_SIDE = 32


def _lpips_linear_weights() -> list[Tensor]:
    """The five LPIPS v0.1 AlexNet linear weight vectors ``[C_l]`` from the installed ``lpips`` package."""
    spec = importlib.util.find_spec("lpips")
    if spec is None or not spec.submodule_search_locations:
        raise WeightsUnavailableError(
            "perceptual weights 'lpips' need the LPIPS linear weights of the `lpips` package: pip install lpips"
        )
    path = Path(next(iter(spec.submodule_search_locations))).joinpath(*LPIPS_LINEAR_FILE)
    if not path.is_file():
        raise WeightsUnavailableError(f"the installed lpips package lacks {path}: reinstall it (pip install lpips)")
    state = torch.load(path, map_location="cpu", weights_only=True)
    return [state[f"lin{i}.model.1.weight"].flatten().float() for i in range(len(ALEXNET_CHANNELS))]


def _torchvision_alexnet_features() -> dict[str, Tensor]:
    """AlexNet's ImageNet ``features.*`` weights from torchvision (hub cache, or a download when online)."""
    weights = torchvision.models.AlexNet_Weights.IMAGENET1K_V1
    try:
        state = weights.get_state_dict(progress=False)
    except Exception as err:  # noqa: BLE001 -- any download / cache failure becomes one clear line
        checkpoints = Path(torch.hub.get_dir()) / "checkpoints"
        raise WeightsUnavailableError(
            f"cannot load torchvision's AlexNet ImageNet weights for the LPIPS distance ({type(err).__name__}): "
            f"put {Path(weights.url).name} into {checkpoints}, or set the perceptual weights to a file "
            "written by PerceptualDistance.save_weights"
        ) from err
    return {key[len("features."):]: value for key, value in state.items() if key.startswith("features.")}


class PerceptualDistance(nn.Module):
    """Frozen LPIPS-AlexNet distance: :meth:`layer_distances` (eq. 16), :meth:`distance_map` (eq. 17) and
    :meth:`forward`, the LPIPS loss (eq. 10). See the module docstring for ``weights``."""

    def __init__(self, weights: str = "lpips") -> None:
        super().__init__()
        features = torchvision.models.alexnet(weights=None).features
        for module in features:
            if isinstance(module, nn.ReLU):
                module.inplace = False  # activations are kept for the next layer and for the distance
        self.slices = nn.ModuleList(nn.Sequential(*features[a:b]) for a, b in ALEXNET_SLICES)
        for index, channels in enumerate(ALEXNET_CHANNELS):
            self.register_buffer(f"linear{index}", torch.ones(channels))
        self.register_buffer("shift", torch.tensor(LPIPS_SHIFT).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor(LPIPS_SCALE).view(1, 3, 1, 1), persistent=False)
        self.weights = weights
        self._load(weights)
        self.requires_grad_(False)
        self.eval()

    # ------------------------------------------------------------------ weights
    def _load(self, weights: str) -> None:
        if weights == "random":
            return
        if weights == "lpips":
            linear = _lpips_linear_weights()
            features = _torchvision_alexnet_features()
            state = {}
            for index, (first, last) in enumerate(ALEXNET_SLICES):
                for key, value in features.items():
                    layer, _, leaf = key.partition(".")
                    if first <= int(layer) < last:
                        state[f"slices.{index}.{int(layer) - first}.{leaf}"] = value
                state[f"linear{index}"] = linear[index]
            load_state_dict_exactly(self, state, "torchvision AlexNet + lpips")
            return
        if not os.path.isfile(weights):
            raise WeightsUnavailableError(
                f"perceptual weights {weights!r}: no such file (expected 'lpips', 'random' or a file written "
                "by PerceptualDistance.save_weights)"
            )
        if weights.endswith(".safetensors"):
            from safetensors.torch import load_file

            state = load_file(weights)
        else:
            state = torch.load(weights, map_location="cpu", weights_only=True)
        load_state_dict_exactly(self, state, weights)

    def save_weights(self, path: str | os.PathLike) -> Path:
        """Write the weights (AlexNet + linear layers) to a safetensors file, atomically: the offline copy
        that ``weights=<path>`` loads."""
        from safetensors.torch import save_file

        tensors = {key: value.detach().cpu().contiguous() for key, value in self.state_dict().items()}
        return atomic_write(path, lambda tmp: save_file(tensors, tmp))

    @property
    def linear_weights(self) -> list[Tensor]:
        """``w^(l)``, one ``[C_l]`` vector per layer."""
        return [getattr(self, f"linear{index}") for index in range(len(ALEXNET_CHANNELS))]

    def train(self, mode: bool = True) -> PerceptualDistance:
        super().train(False)  # frozen: always in eval mode
        return self

    # ------------------------------------------------------------------ the distance
    def features(self, images: Tensor) -> list[Tensor]:
        """``phi^(l)(x)``: the relu1..relu5 activations ``[B, C_l, h_l, w_l]``, unit-normalised along
        channels, of images ``[B, 3, H, W]`` in ``[0, 1]``."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be [B, 3, H, W] in [0, 1], got {tuple(images.shape)}")
        if min(images.shape[-2:]) < MIN_IMAGE_SIDE:
            raise ValueError(f"the LPIPS distance needs images of at least {MIN_IMAGE_SIDE} px a side")
        weight = self.slices[0][0].weight
        h = ((images.to(weight.dtype) * 2.0 - 1.0) - self.shift.to(weight.dtype)) / self.scale.to(weight.dtype)
        out = []
        for block in self.slices:
            h = block(h)
            norm = torch.sqrt((h.float() ** 2).sum(dim=1, keepdim=True))
            out.append(h.float() / (norm + 1e-10))
        return out

    @full_precision
    def layer_distances(self, features_x: Sequence[Tensor], features_y: Sequence[Tensor]) -> list[Tensor]:
        """Eq. 16: ``D^(l)_{h,w} = sum_c w^(l)_c (phi^(l)(x) - phi^(l)(y))^2``, one ``[B, h_l, w_l]`` per layer.

        ``features_x`` may have batch 1 (one reference broadcast against many images)."""
        distances = []
        for fx, fy, weight in zip(features_x, features_y, self.linear_weights):
            squared = (fx - fy) ** 2
            distances.append((squared * weight.view(1, -1, 1, 1).float()).sum(dim=1))
        return distances

    @full_precision
    def distance_map(
        self,
        images: Tensor,
        references: Tensor | None = None,
        size: tuple[int, int] | None = None,
        reference_features: Sequence[Tensor] | None = None,
    ) -> Tensor:
        """Eq. 17: ``D(x, y) = sum_l Upsample(D^(l)(x, y))`` as ``[B, H, W]`` (bilinear, at ``size``, default
        the images' size). Pass ``reference_features`` (:meth:`features` of the references) to reuse them."""
        if reference_features is None:
            if references is None:
                raise ValueError("distance_map needs the reference images or their features")
            reference_features = self.features(references)
        size = tuple(images.shape[-2:]) if size is None else tuple(size)
        total = None
        for layer in self.layer_distances(reference_features, self.features(images)):
            up = F.interpolate(layer.unsqueeze(1), size=size, mode="bilinear", align_corners=False).squeeze(1)
            total = up if total is None else total + up
        return total

    def forward(self, images: Tensor, references: Tensor) -> Tensor:
        """Eq. 10: the LPIPS loss ``sum_l mean_{h,w} D^(l)`` per image, ``[B]`` (differentiable in the
        images; the network itself is frozen)."""
        layers = self.layer_distances(self.features(references), self.features(images))
        return sum(layer.mean(dim=(1, 2)) for layer in layers)
