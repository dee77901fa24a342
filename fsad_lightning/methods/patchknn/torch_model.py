"""PatchCore-style few-shot kNN as a plain ``nn.Module``.

Features of two mid stages of a CNN are locally averaged (``pool_size`` x ``pool_size``, stride 1),
the deeper map is upsampled to the shallower one's grid and both are concatenated: one descriptor per
patch. The memory bank holds every patch descriptor of the normal shots (with k <= 8 shots the bank is
small, so PatchCore's coreset subsampling is not needed and not applied). A query patch scores its
Euclidean distance to the nearest memory patch; the grid is upsampled to the image, blurred with a
Gaussian (sigma = 4) and the image score is the map's maximum.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fsad_lightning.backbones.cnn import CNNFeaturePyramid
from fsad_lightning.scoring import DEFAULT_CHUNK, min_euclidean_distance, upsample_and_smooth


class PatchKNNModel(nn.Module):
    def __init__(
        self,
        backbone: str = "wide_resnet50_2",
        stages: Sequence[int] = (2, 3),
        weights: str = "timm",
        pool_size: int = 3,
        sigma: float = 4.0,
        chunk_size: int = DEFAULT_CHUNK,
    ) -> None:
        super().__init__()
        self.feature_extractor = CNNFeaturePyramid(backbone, stages, weights)
        self.pool_size = pool_size
        self.sigma = sigma
        self.chunk_size = chunk_size
        self.register_buffer("memory_bank", torch.empty(0), persistent=False)

    def embed(self, images: Tensor) -> Tensor:
        """Patch descriptors ``[B, h, w, C]`` on the grid of the first (shallowest) stage."""
        features = self.feature_extractor(images)
        pad = self.pool_size // 2
        pooled = [F.avg_pool2d(f, self.pool_size, stride=1, padding=pad, count_include_pad=False) for f in features]
        grid = pooled[0].shape[-2:]
        aligned = [p if p.shape[-2:] == grid else F.interpolate(p, size=grid, mode="bilinear", align_corners=False)
                   for p in pooled]
        return torch.cat(aligned, dim=1).permute(0, 2, 3, 1)

    @torch.no_grad()
    def fit(self, images: Tensor) -> None:
        """Memory bank = every patch descriptor of the normal ``images``."""
        embedding = self.embed(images)
        self.memory_bank = embedding.reshape(-1, embedding.shape[-1]).contiguous()

    @torch.no_grad()
    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """Returns image scores ``[B]`` and anomaly maps ``[B, H, W]`` at the input resolution."""
        if self.memory_bank.numel() == 0:
            raise RuntimeError("PatchKNNModel has an empty memory bank: call fit() with normal images first")
        distances = min_euclidean_distance(self.embed(images), self.memory_bank, self.chunk_size)
        maps = upsample_and_smooth(distances, images.shape[-2:], self.sigma)
        return maps.flatten(1).max(dim=1).values, maps
