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


#: how image ``i`` of a set made from ``R`` references and ``P`` prompts picks its prompt: ``"blocks"``
#: ``(i // R) mod P`` (every reference under prompt 0, then under prompt 1, ...), ``"rotate"``
#: ``(i mod R + i // R) mod P`` (consecutive images and each reference's successive images change prompt)
PROMPT_ORDERS = ("blocks", "rotate")


def reference_prompt_pairs(
    indices: Sequence[int], num_refs: int, num_prompts: int, prompt_order: str = "blocks"
) -> tuple[list[int], list[int]]:
    """``(reference, prompt)`` index lists of images ``indices`` of a set from ``num_refs`` references and
    ``num_prompts`` prompts: image ``i`` edits reference ``i mod R``; its prompt follows ``prompt_order``
    (:data:`PROMPT_ORDERS`).

    Either way the references share the set equally (counts differ by at most one). ``"rotate"``: every
    reference goes through the prompts in turn (its images' prompt counts differ by at most one), and with
    two prompts (ADP) so does the whole set, for any ``N`` and ``R``; ``"blocks"`` gives the first prompt
    ``min(N, R)`` images (16 of 20 at R = 16, P = 2).
    """
    if num_refs < 1 or num_prompts < 1:
        raise ValueError("img2img from references needs at least one reference image and one prompt")
    if prompt_order not in PROMPT_ORDERS:
        raise ValueError(f"prompt_order must be one of {PROMPT_ORDERS}, got {prompt_order!r}")
    references = [int(i) % num_refs for i in indices]
    if prompt_order == "blocks":
        prompts = [(int(i) // num_refs) % num_prompts for i in indices]
    else:
        prompts = [(int(i) % num_refs + int(i) // num_refs) % num_prompts for i in indices]
    return references, prompts


@torch.no_grad()
def img2img_from_references(
    diffusion: StableDiffusion,
    reference_latents: Tensor,
    prompt_embeds: Tensor,
    indices: Sequence[int],
    settings: SamplingSettings,
    seed: int,
    prompt_order: str = "blocks",
) -> Tensor:
    """Images ``[len(indices), 3, H, W]`` made by img2img from reference images: image ``i`` starts from
    reference ``i mod R`` (``reference_latents`` ``[R, C, h, w]``, encoded once by the caller) under
    the prompt :func:`reference_prompt_pairs` assigns it by ``prompt_order`` (``prompt_embeds``
    ``[P, L, D]``), seeded by ``(seed, i)``, so an image depends only on its index. One-to-Normal's pool
    from the shots (``blocks``) and ADP's SDEdit pseudo-anomalies (``rotate``)."""
    num_refs, num_prompts = reference_latents.shape[0], prompt_embeds.shape[0]
    refs, prompts = reference_prompt_pairs(indices, num_refs, num_prompts, prompt_order)
    ref_index = torch.tensor(refs, dtype=torch.long, device=reference_latents.device)
    prompt_index = torch.tensor(prompts, dtype=torch.long, device=prompt_embeds.device)
    return diffusion.img2img(
        None,
        prompt_embeds[prompt_index],
        strength=settings.strength,
        num_inference_steps=settings.num_inference_steps,
        guidance_scale=settings.guidance_scale,
        generator=image_generators(seed, indices),
        latents=reference_latents[ref_index],
    )
