"""One-to-normal personalization (§3.3, eq. 2-3) and the generated images of §3.2 and §3.4.

Every function here drives a :class:`~fsad_lightning.backbones.diffusion.StableDiffusion` through its
public sampling API (``img2img``, ``txt2img``) on precomputed prompt embeddings; none loads a model.

Randomness is per image (:mod:`fsad_lightning.backbones.sampling`): each generated or personalized image
gets its own CPU ``torch.Generator`` seeded from the run seed and a stable key of that image.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from fsad_lightning.backbones.diffusion import StableDiffusion, img2img_timesteps
from fsad_lightning.backbones.sampling import (
    SamplingSettings,
    image_generators,
    img2img_from_references,
    resize_images,
)
from fsad_lightning.cache import image_seed
from fsad_lightning.methods.one_to_normal.scores import select_personalized


def denoising_steps(diffusion: StableDiffusion, settings: SamplingSettings) -> int:
    """How many denoising steps img2img runs at these settings
    (:func:`~fsad_lightning.backbones.diffusion.img2img_timesteps`: 6 for t = 0.3 of 20 steps)."""
    num_train_timesteps = diffusion.scheduler.config.num_train_timesteps
    return len(img2img_timesteps(num_train_timesteps, settings.num_inference_steps, settings.strength))


@torch.no_grad()
def personalize(
    diffusion: StableDiffusion,
    images: Tensor,
    prompt_embeds: Tensor,
    settings: SamplingSettings,
    resolution: int,
    keys: Sequence[int],
    seed: int = 0,
    chunk_size: int = 48,
    ssim_window: int = 11,
) -> tuple[Tensor, Tensor, Tensor]:
    """One-to-normal personalization of a batch of queries (§3.3, eq. 2-3).

    Every query is reconstructed under every normal-state prompt ``c_i`` --
    ``x_hat_i = D_theta(sqrt(a_t) x_q + sqrt(1 - a_t) eps, c_i, t)`` with ``t = strength`` (the first
    denoised timestep is ``round(t * T)``, :meth:`StableDiffusion.img2img`) -- in batches of
    ``chunk_size`` (query, prompt) pairs (guidance runs the UNet on twice as many) whose latents are
    encoded once per query; the reconstruction with the lowest SSIM loss to the query is kept (eq. 2).
    The query is resized to the diffusion ``resolution`` for sampling and the reconstructions back to
    the query's size, where SSIM is measured.

    As ``t -> 0`` the paper's personalized image becomes the query itself; when ``t`` leaves no
    denoising step (``round(strength * T) == 0``) the queries are returned unchanged (no VAE round
    trip), with prompt index 0 and zero losses.

    Args:
        images: queries ``[B, 3, H, W]`` in ``[0, 1]``.
        prompt_embeds: ``[P, L, D]`` embeddings of the normal-state prompts.
        keys: one integer per query (e.g. :func:`path_key`) that, with ``seed``, seeds its noise.

    Returns ``(personalized [B, 3, H, W], prompt_index [B], ssim_losses [B, P])``.
    """
    batch, num_prompts = images.shape[0], prompt_embeds.shape[0]
    if len(keys) != batch:
        raise ValueError(f"need one noise key per query: {batch} queries, {len(keys)} keys")
    if denoising_steps(diffusion, settings) == 0:
        zeros = torch.zeros(batch, num_prompts, device=images.device)
        return images, torch.zeros(batch, dtype=torch.long, device=images.device), zeros
    size = images.shape[-1]
    latents = diffusion.encode_images(resize_images(images, resolution))  # [B, C, h, w], once per query
    pair_query = torch.arange(batch).repeat_interleave(num_prompts)  # (query, prompt) pairs, query-major
    pair_prompt = torch.arange(num_prompts).repeat(batch)
    generators = [
        torch.Generator().manual_seed(image_seed(image_seed(seed, int(keys[q])), int(p)))
        for q, p in zip(pair_query.tolist(), pair_prompt.tolist())
    ]
    outputs = []
    for start in range(0, batch * num_prompts, chunk_size):
        q = pair_query[start : start + chunk_size].to(latents.device)
        p = pair_prompt[start : start + chunk_size].to(prompt_embeds.device)
        reconstructed = diffusion.img2img(
            None,
            prompt_embeds[p],
            strength=settings.strength,
            num_inference_steps=settings.num_inference_steps,
            guidance_scale=settings.guidance_scale,
            generator=generators[start : start + chunk_size],
            latents=latents[q],
        )
        outputs.append(resize_images(reconstructed, size).to(images.device))
    reconstructions = torch.cat(outputs).reshape(batch, num_prompts, *images.shape[1:])
    return select_personalized(images.float(), reconstructions, ssim_window)


@torch.no_grad()
def generate_txt2img(
    diffusion: StableDiffusion,
    prompt_embeds: Tensor,
    indices: Sequence[int],
    settings: SamplingSettings,
    resolution: int,
    seed: int,
) -> Tensor:
    """Images ``[len(indices), 3, resolution, resolution]`` sampled from noise under one prompt
    (``prompt_embeds`` ``[1, L, D]``); image ``i`` is seeded by ``(seed, i)``.

    Used for the DreamBooth class images (§3.2, base model, class prompt) and for the txt2img part of
    the anomaly-free pool (§3.4, customized model, instance prompt).
    """
    return diffusion.txt2img(
        prompt_embeds,
        num_images=len(indices),
        height=resolution,
        width=resolution,
        num_inference_steps=settings.num_inference_steps,
        guidance_scale=settings.guidance_scale,
        generator=image_generators(seed, indices),
    )


@torch.no_grad()
def generate_from_references(
    diffusion: StableDiffusion,
    reference_latents: Tensor,
    prompt_embeds: Tensor,
    indices: Sequence[int],
    settings: SamplingSettings,
    seed: int,
) -> Tensor:
    """The §3.3 process applied to the normal reference images, for the anomaly-free pool (§3.4).

    Image ``i`` is the img2img of reference ``i mod R`` under normal-state prompt ``(i // R) mod P``
    at ``settings.strength``, seeded by ``(seed, i)``. The paper only says the settings align "with the
    distribution of normal reference image instead of the query image"; we read that as the
    personalization prompts at a larger noise ratio (0.5 by default) so the outputs vary around the
    shots instead of copying them, with no SSIM selection (there is no anomaly to remove).
    ``reference_latents`` ``[R, C, h, w]``: the references' VAE latents, encoded once by the caller for
    every chunk of indices. Returns ``[len(indices), 3, H, W]`` at the latents' resolution.
    """
    if reference_latents.shape[0] == 0:
        raise ValueError("generating from references needs at least one reference image")
    return img2img_from_references(diffusion, reference_latents, prompt_embeds, indices, settings, seed)
