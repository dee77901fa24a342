"""PatchCore-style few-shot kNN as a plain ``nn.Module``.

Features of mid stages of a CNN are brought to the grid of the shallowest chosen stage (bilinear) and
concatenated, then locally averaged (``pool_size`` x ``pool_size``, stride 1): one descriptor per patch
(``pool_order="concat_first"``, the default; ``"pool_first"`` pools each stage on its own grid before the
upsampling, as PatchCore's code does). The memory bank holds every patch descriptor of the normal shots
(with k <= 8 shots the bank is small, so PatchCore's coreset subsampling is not needed and not applied),
optionally also of flipped / rotated copies of the shots (``bank_augment``, off by default: only for
categories where orientation carries no meaning). ``stage_weights`` scales each stage's features before
the concatenation (default: all 1). A query patch scores its Euclidean distance to the
nearest memory patch; the grid is upsampled to the image, blurred with a Gaussian (sigma = 4) and the image
score is the map's maximum (over the image content when the batch is padded, ``content_box``).

The search is exact; a stage with far fewer cells than the patch grid (stride 32 on a stride-8 grid: 64
cells for 1,024 patches) enters it factored (:class:`~fsad_lightning.scoring.SpatialFactor`): its share of
the query-memory products is taken on the stage's own cells and mapped to the grid afterwards, the same sum
in another order at about a fifth of the multiply-adds.

Defaults chosen on the development sets (HeadCT, MTD, ELPV at 2 / 4 / 8 shots, seeds 0-2; one setting for
every set, see ``benchmarks/patchknn_tune.py`` and the README table).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fsad_lightning.backbones.cnn import CNNFeaturePyramid
from fsad_lightning.scoring import (
    DEFAULT_CHUNK,
    SpatialFactor,
    factoring_pays,
    min_euclidean_distance,
    upsample_and_smooth,
)

#: the shot transforms ``bank_augment`` may name (the identity is always in the bank)
BANK_TRANSFORMS: dict[str, Callable[[Tensor], Tensor]] = {
    "hflip": lambda x: x.flip(-1),
    "vflip": lambda x: x.flip(-2),
    "rot90": lambda x: x.rot90(1, (-2, -1)),
    "rot180": lambda x: x.rot90(2, (-2, -1)),
    "rot270": lambda x: x.rot90(3, (-2, -1)),
}
POOL_ORDERS = ("concat_first", "pool_first")


def check_bank_augment(bank_augment: Sequence[str]) -> list[str]:
    names = list(bank_augment)
    unknown = [n for n in names if n not in BANK_TRANSFORMS]
    if unknown or len(set(names)) != len(names):
        raise ValueError(
            f"bank_augment must list distinct names of {sorted(BANK_TRANSFORMS)}, got {names!r}"
        )
    return names


def check_stage_weights(stage_weights: Sequence[float] | None, stages: Sequence[int]) -> list[float] | None:
    """``stage_weights`` as floats (one positive number per stage), or ``None`` for all 1."""
    if stage_weights is None:
        return None
    weights = [float(w) for w in stage_weights]
    if len(weights) != len(stages) or not all(w > 0 for w in weights):
        raise ValueError(
            f"stage_weights must hold one positive number per stage ({len(stages)} for stages {list(stages)}), "
            f"got {list(stage_weights)!r}"
        )
    return weights


def content_max(maps: Tensor, content_box: Tensor | None) -> Tensor:
    """Per-map maximum ``[B]``; with ``content_box`` (``[B, 4]`` top, left, height, width) only inside it."""
    if content_box is None:
        return maps.flatten(1).max(dim=1).values
    return torch.stack([m[t : t + h, x : x + w].max() for m, (t, x, h, w) in zip(maps, content_box.tolist())])


class PatchKNNModel(nn.Module):
    def __init__(
        self,
        backbone: str = "wide_resnet50_2",
        stages: Sequence[int] = (2, 3),
        weights: str = "timm",
        pool_size: int = 3,
        sigma: float = 4.0,
        chunk_size: int = DEFAULT_CHUNK,
        pool_order: str = "concat_first",
        bank_augment: Sequence[str] = (),
        normalization: str = "auto",
        stage_weights: Sequence[float] | None = None,
    ) -> None:
        super().__init__()
        if pool_order not in POOL_ORDERS:
            raise ValueError(f"pool_order must be one of {POOL_ORDERS}, got {pool_order!r}")
        self.stage_weights = check_stage_weights(stage_weights, stages)
        self.feature_extractor = CNNFeaturePyramid(backbone, stages, weights, normalization)
        self.pool_size = pool_size
        self.sigma = sigma
        self.chunk_size = chunk_size
        self.pool_order = pool_order
        self.bank_augment = check_bank_augment(bank_augment)
        self.register_buffer("memory_bank", torch.empty(0), persistent=False)
        self._operators: dict[tuple, Tensor] = {}  # spatial operators by shape (see _spatial_operator)

    def _pool(self, x: Tensor) -> Tensor:
        if self.pool_size <= 1:
            return x
        return F.avg_pool2d(x, self.pool_size, stride=1, padding=self.pool_size // 2, count_include_pad=False)

    def _to_grid(self, feature: Tensor, grid: torch.Size) -> Tensor:
        """One stage's map on the patch grid: pooled, then upsampled (``pool_first``), or upsampled, then
        pooled (``concat_first``: pooling the concatenation pools every channel on its own, so it is this
        per stage). A linear map of the stage's cells, the same for every channel."""
        if self.pool_order == "pool_first":
            feature = self._pool(feature)
        if feature.shape[-2:] != grid:
            feature = F.interpolate(feature, size=grid, mode="bilinear", align_corners=False)
        if self.pool_order == "concat_first":
            feature = self._pool(feature)
        return feature

    def _descriptors(self, features: list[Tensor]) -> Tensor:
        grid = features[0].shape[-2:]
        stacked = torch.cat([self._to_grid(f, grid) for f in features], dim=1)
        return stacked.permute(0, 2, 3, 1).contiguous()

    def _stage_features(self, images: Tensor) -> list[Tensor]:
        """The stages' feature maps, each scaled by its ``stage_weights`` entry (its Euclidean share in
        the descriptor distance grows with the square of the weight)."""
        features = self.feature_extractor(images)
        if self.stage_weights is None:
            return features
        return [feature * weight for feature, weight in zip(features, self.stage_weights)]

    def embed(self, images: Tensor) -> Tensor:
        """Patch descriptors ``[B, h, w, C]`` on the grid of the first (shallowest) stage."""
        return self._descriptors(self._stage_features(images))

    def _spatial_operator(self, cells: tuple[int, int], grid: tuple[int, int], device: torch.device) -> Tensor:
        """``[patches, cells]``: :meth:`_to_grid` as a matrix, from a stage grid of ``cells`` to the patch
        ``grid``; made once per shape and device (a batch of one input size reuses it), float32 whatever the
        features' dtype (its weights, 1/25, 3/8, ..., must not be rounded). At most a few are kept."""
        key = (cells, grid, str(device), self.pool_order, self.pool_size)
        if key not in self._operators:
            if len(self._operators) >= 4:
                self._operators.clear()
            count = cells[0] * cells[1]
            basis = torch.eye(count, device=device).view(1, count, *cells)
            self._operators[key] = self._to_grid(basis, grid).reshape(count, -1).T.contiguous()
        return self._operators[key]

    def _spatial_factors(self, features: list[Tensor]) -> list[SpatialFactor]:
        """The stages whose share of the neighbour search is cheaper factored (:class:`SpatialFactor`: a deep
        stage has far fewer cells than the grid it is upsampled to, e.g. 64 for 1,024 patches)."""
        grid = features[0].shape[-2:]
        patches = grid[0] * grid[1]
        factors, offset = [], 0
        for feature in features:
            channels, cells = feature.shape[1], feature.shape[2] * feature.shape[3]
            if factoring_pays(cells, channels, patches):
                factors.append(SpatialFactor(
                    columns=slice(offset, offset + channels),
                    cells=feature.flatten(2).transpose(1, 2),
                    operator=self._spatial_operator(tuple(feature.shape[2:]), tuple(grid), feature.device),
                ))
            offset += channels
        return factors

    @torch.no_grad()
    def fit(self, images: Tensor) -> None:
        """Memory bank = every patch descriptor of the normal ``images`` and of their ``bank_augment``
        transforms (in that order: the shots, then each transform of all shots)."""
        views = [images] + [BANK_TRANSFORMS[name](images) for name in self.bank_augment]
        patches = []
        for view in views:
            embedding = self.embed(view)
            patches.append(embedding.reshape(-1, embedding.shape[-1]))
        self.memory_bank = torch.cat(patches).contiguous()

    @torch.no_grad()
    def forward(self, images: Tensor, content_box: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Returns image scores ``[B]`` and anomaly maps ``[B, H, W]`` at the input resolution.

        ``content_box``: ``[B, 4]`` (top, left, height, width) of the image inside a padded input; the
        image score is then the maximum inside it.
        """
        if self.memory_bank.numel() == 0:
            raise RuntimeError("PatchKNNModel has an empty memory bank: call fit() with normal images first")
        features = self._stage_features(images)
        descriptors = self._descriptors(features)
        batch, height, width, channels = descriptors.shape
        distances = min_euclidean_distance(
            descriptors.view(batch, height * width, channels), self.memory_bank, self.chunk_size,
            factors=self._spatial_factors(features),
        ).view(batch, height, width)
        maps = upsample_and_smooth(distances, images.shape[-2:], self.sigma)
        return content_max(maps, content_box), maps
