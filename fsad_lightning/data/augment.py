"""Few-shot augmentation of the normal shots with kornia (off by default).

With 1-8 shots, a small affine warp and a mild colour jitter multiply the normal views a trainable method
sees. Whatever the augmentation shows is taught as *normal*, so the default changes no orientation: a
mirrored metal nut is MVTec AD's "flip" defect and a rotated transistor its "misplaced" one. Flips and
90-degree rotations are opt-in per config (``augment_options``), for categories whose orientation carries
no meaning (textures, solar cells, left-right symmetric anatomy). Image and mask go through one
``kornia.augmentation.AugmentationSequential(..., data_keys=["input", "mask"])``, so every geometric
transform is applied to both with the same parameters (the mask with nearest-neighbour resampling) and the
colour jitter to the image only. Calls are deterministic under a seed.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

import kornia.augmentation as K
import torch
from torch import Tensor, nn


@dataclass
class AugmentConfig:
    """Augmentation settings: a probability per transform and its magnitude. A probability of 0 disables it.

    The default is photometric jitter plus a small affine jitter; the orientation-changing transforms
    (``hflip``, ``vflip``, ``rot90``) are off unless a config turns them on (see the module docstring).

    Attributes:
        hflip: probability of a horizontal flip (default 0: opt-in).
        vflip: probability of a vertical flip (default 0: opt-in).
        rot90: probability of a rotation by 90, 180 or 270 degrees, chosen uniformly (default 0: opt-in).
        affine: probability of the small affine warp below.
        degrees: largest rotation of the affine warp, in degrees.
        translate: largest shift of the affine warp, as a fraction of the image side.
        scale: largest relative zoom of the affine warp (``0.05`` -> zoom in ``[0.95, 1.05]``).
        color_jitter: probability of the colour jitter below (image only).
        brightness, contrast, saturation: jitter strengths (kornia ``ColorJitter`` factors).
        hue: hue jitter, in ``[0, 0.5]``.
        padding_mode: how the affine warp fills uncovered pixels: ``"reflection"`` (default, keeps the
            normal texture instead of black corners), ``"border"`` or ``"zeros"``.
    """

    hflip: float = 0.0
    vflip: float = 0.0
    rot90: float = 0.0
    affine: float = 0.5
    degrees: float = 10.0
    translate: float = 0.05
    scale: float = 0.05
    color_jitter: float = 0.5
    brightness: float = 0.1
    contrast: float = 0.1
    saturation: float = 0.1
    hue: float = 0.02
    padding_mode: str = "reflection"

    def __post_init__(self) -> None:
        for f in fields(self):
            if f.name != "padding_mode":
                value = getattr(self, f.name)
                if isinstance(value, bool) or not isinstance(value, (int, float)):
                    raise ValueError(f"augmentation setting {f.name} must be a number, got {value!r}")
                setattr(self, f.name, float(value))
        for name in ("hflip", "vflip", "rot90", "affine", "color_jitter"):
            value = getattr(self, name)
            if not 0.0 <= float(value) <= 1.0:
                raise ValueError(f"augmentation probability {name} must be in [0, 1], got {value!r}")
        for name in ("degrees", "translate", "scale", "brightness", "contrast", "saturation", "hue"):
            if float(getattr(self, name)) < 0:
                raise ValueError(f"augmentation magnitude {name} must be >= 0, got {getattr(self, name)!r}")
        if self.translate > 1 or self.scale >= 1 or self.hue > 0.5:
            raise ValueError(
                "augmentation translate must be <= 1, scale < 1 and hue <= 0.5, got "
                f"translate={self.translate}, "
                f"scale={self.scale}, hue={self.hue}"
            )
        if self.padding_mode not in ("reflection", "border", "zeros"):
            raise ValueError(
                "augmentation padding_mode must be 'reflection', 'border' or 'zeros', "
                f"got {self.padding_mode!r}"
            )

    @classmethod
    def from_dict(cls, options: dict[str, Any] | None) -> AugmentConfig:
        """Build from a plain dict (e.g. the datamodule's ``augment_options``); unknown keys are an error."""
        options = dict(options or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise ValueError(f"unknown augment_options key(s) {unknown}; known keys: {sorted(known)}")
        return cls(**options)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class FewShotAugment(nn.Module):
    """Apply the augmentations of an :class:`AugmentConfig` to images and their masks together.

    Example::

        augment = FewShotAugment(AugmentConfig(color_jitter=0.0))
        image, mask = augment(image, mask, seed=3)      # [B, 3, H, W], [B, 1, H, W]
    """

    def __init__(self, config: AugmentConfig | None = None) -> None:
        super().__init__()
        self.config = config or AugmentConfig()
        c = self.config
        transforms: list[nn.Module] = []
        if c.hflip > 0:
            transforms.append(K.RandomHorizontalFlip(p=c.hflip))
        if c.vflip > 0:
            transforms.append(K.RandomVerticalFlip(p=c.vflip))
        if c.rot90 > 0:
            transforms.append(K.RandomRotation90(times=(1, 3), p=c.rot90))
        if c.affine > 0:
            transforms.append(
                K.RandomAffine(
                    degrees=c.degrees,
                    translate=(c.translate, c.translate),
                    scale=(1.0 - c.scale, 1.0 + c.scale),
                    padding_mode=c.padding_mode,
                    p=c.affine,
                )
            )
        if c.color_jitter > 0:
            transforms.append(
                K.ColorJitter(
                    brightness=c.brightness,
                    contrast=c.contrast,
                    saturation=c.saturation,
                    hue=c.hue,
                    p=c.color_jitter,
                )
            )
        self.pipeline = (
            K.AugmentationSequential(*transforms, data_keys=["input", "mask"]) if transforms else None
        )

    def forward(
        self, image: Tensor, mask: Tensor | None = None, seed: int | None = None
    ) -> tuple[Tensor, Tensor]:
        """Augment ``image`` ``[B, 3, H, W]`` (or ``[3, H, W]``) and its ``mask`` ``[B, 1, H, W]`` together.

        With ``seed`` the random parameters are drawn from a CPU generator seeded with it (the global RNG
        is restored afterwards), so the same seed gives the same result; without it the global RNG is
        used. A missing mask is treated as all zeros. Returns ``(image, mask)`` with the input shapes;
        the image is clamped to ``[0, 1]`` and the mask stays binary.
        """
        unbatched = image.ndim == 3
        if unbatched:
            image = image[None]
            mask = None if mask is None else mask[None]
        if image.ndim != 4 or image.shape[1] != 3:
            raise ValueError(
                f"augment expects an image of shape [B, 3, H, W] or [3, H, W], got {tuple(image.shape)}"
            )
        if mask is None:
            mask = torch.zeros_like(image[:, :1])
        if mask.shape[0] != image.shape[0] or mask.shape[-2:] != image.shape[-2:] or mask.shape[1] != 1:
            raise ValueError(
                f"augment expects a mask of shape {[image.shape[0], 1, *image.shape[-2:]]}, "
                f"got {list(mask.shape)}"
            )
        if self.pipeline is not None:
            if seed is None:
                image, mask = self._run(image, mask)
            else:
                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed(int(seed))
                    image, mask = self._run(image, mask)
        image = image.clamp(0.0, 1.0)
        mask = (mask > 0.5).to(image.dtype)
        if unbatched:
            return image[0], mask[0]
        return image, mask

    def _run(self, image: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        out_image, out_mask = self.pipeline(image.float(), mask.float())
        return out_image, out_mask
