"""Settings and per-image seeding shared by every method that samples from Stable Diffusion.

Randomness is per image: each generated image gets its own CPU ``torch.Generator`` seeded from the run
seed and a stable key of that image (its index in a pool, or :func:`path_key` of a query's path), so a
result never depends on the batch it was computed in, on the device, or on a resume.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor

from fsad_lightning.cache import image_seed

if TYPE_CHECKING:
    from fsad_lightning.backbones.diffusion import StableDiffusion


@dataclass(frozen=True)
class SamplingSettings:
    """How a model samples (img2img / SDEdit, txt2img).

    Attributes:
        strength: noise ratio of img2img (One-to-Normal's t = 0.3, ADP's SDEdit 0.5; 1 for txt2img).
        num_inference_steps: length of the full sampling schedule; img2img starts at timestep
            ``round(strength * T)`` and steps down by its stride ``T // num_inference_steps``
            (:func:`~fsad_lightning.backbones.diffusion.img2img_timesteps`).
        guidance_scale: classifier-free guidance weight (1 turns guidance off).
    """

    strength: float = 0.3
    num_inference_steps: int = 20
    guidance_scale: float = 7.5


def image_generators(seed: int, keys: Sequence[int]) -> list[torch.Generator]:
    """One CPU generator per image, seeded by :func:`~fsad_lightning.cache.image_seed` of ``(seed, key)``."""
    return [torch.Generator().manual_seed(image_seed(seed, int(key))) for key in keys]


def path_key(path: str) -> int:
    """A stable integer key of an image path (CRC-32), the per-query part of its noise seed."""
    return zlib.crc32(str(path).encode("utf-8"))


def resize_images(images: Tensor, size: int, mode: str = "bicubic") -> Tensor:
    """Square-resize ``[B, 3, H, W]`` images in ``[0, 1]`` to float32 (``mode`` interpolation, antialiased,
    clamped back to [0, 1]); images already ``size x size`` are only cast."""
    if tuple(images.shape[-2:]) == (size, size):
        return images.float()
    resized = F.interpolate(images.float(), size=(size, size), mode=mode, align_corners=False, antialias=True)
    return resized.clamp(0.0, 1.0)


@torch.no_grad()
def img2img_from_references(
    diffusion: StableDiffusion,
    reference_latents: Tensor,
    prompt_embeds: Tensor,
    indices: Sequence[int],
    settings: SamplingSettings,
    seed: int,
) -> Tensor:
    """Images ``[len(indices), 3, H, W]`` made by img2img from reference images: image ``i`` starts from
    reference ``i mod R`` (``reference_latents`` ``[R, C, h, w]``, encoded once by the caller) under
    prompt ``(i // R) mod P`` (``prompt_embeds`` ``[P, L, D]``), seeded by ``(seed, i)``, so an image
    depends only on its index. One-to-Normal's pool from the shots and ADP's SDEdit pseudo-anomalies."""
    num_refs, num_prompts = reference_latents.shape[0], prompt_embeds.shape[0]
    if num_refs == 0 or num_prompts == 0:
        raise ValueError("img2img from references needs at least one reference image and one prompt")
    ref_index = torch.tensor([i % num_refs for i in indices], device=reference_latents.device)
    prompt_index = torch.tensor([(i // num_refs) % num_prompts for i in indices], device=prompt_embeds.device)
    return diffusion.img2img(
        None,
        prompt_embeds[prompt_index],
        strength=settings.strength,
        num_inference_steps=settings.num_inference_steps,
        guidance_scale=settings.guidance_scale,
        generator=image_generators(seed, indices),
        latents=reference_latents[ref_index],
    )
