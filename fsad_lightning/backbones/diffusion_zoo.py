"""Named Stable Diffusion models every method loads through one function, :func:`load_diffusion_model`.

Besides a hub id or a local diffusers folder (loaded by
:func:`~fsad_lightning.backbones.diffusion.load_stable_diffusion`), a method's ``diffusion_model`` option
accepts these reserved names, never picked silently:

- ``fsad-tiny-sd`` / ``fsad-tiny-sd-inpaint``: the offline tiny twins of
  :mod:`fsad_lightning.backbones.tiny`, built once into ``<cache>/tiny_models/`` and then loaded through
  the same ``from_pretrained`` code as a hub model (tests and offline demo configs).
- ``fsad-random-sd15`` / ``fsad-random-sd15-inpaint`` / ``fsad-random-sd21`` / ``fsad-random-sd2-inpaint``:
  the full-size architectures of SD 1.5, SD 1.5 inpainting, SD 2.1 (the 512 px base model) and SD 2
  inpainting with random weights, built from their published configs with no download. For latency and
  memory benchmarks only: speed and memory do not depend on the weight values.
"""

from __future__ import annotations

import torch

from fsad_lightning.backbones.diffusion import (
    UNET_IN_CHANNELS,
    SDKind,
    StableDiffusion,
    load_stable_diffusion,
    make_scheduler,
    resolve_dtype,
    stable_diffusion_ddim_scheduler,
)
from fsad_lightning.backbones.tiny import build_tiny_stable_diffusion, tiny_clip_tokenizer

#: tiny twin name -> (kind, seed)
TINY_DIFFUSION_MODELS: dict[str, tuple[SDKind, int]] = {
    "fsad-tiny-sd": ("txt2img", 0),
    "fsad-tiny-sd-inpaint": ("inpaint", 0),
}
#: random full-size architecture name -> (architecture, kind)
RANDOM_DIFFUSION_MODELS: dict[str, tuple[str, SDKind]] = {
    "fsad-random-sd15": ("sd15", "txt2img"),
    "fsad-random-sd15-inpaint": ("sd15", "inpaint"),
    "fsad-random-sd21": ("sd21", "txt2img"),
    "fsad-random-sd2-inpaint": ("sd21", "inpaint"),
}


def random_stable_diffusion(architecture: str, kind: SDKind, dtype: str, scheduler: str | None) -> StableDiffusion:
    """A Stable Diffusion architecture (``"sd15"`` or ``"sd21"``) with random weights.

    - SD 1.5: UNet 320-640-1280-1280, 8 attention heads, 768-wide cross-attention; text encoder CLIP
      ViT-L/14 (12 layers, width 768, quick-GELU).
    - SD 2.1 (base, 512 px): the same UNet channels with 5-10-20-20 heads of 64, linear projections and
      1024-wide cross-attention; text encoder OpenCLIP ViT-H/14 (23 of its 24 layers, as SD 2 uses the
      penultimate one; width 1024, GELU).
    - Both: the 4-block VAE (scale factor 8, 4 latent channels), the CLIP BPE tokenizer rebuilt offline
      and DDIM on SD's scaled-linear schedule; ``kind="inpaint"`` gives the 9-channel inpainting UNet.
    """
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    if kind not in UNET_IN_CHANNELS:
        raise ValueError(f"kind must be one of {sorted(UNET_IN_CHANNELS)}, got {kind!r}")
    if architecture == "sd15":
        unet_options = {"cross_attention_dim": 768, "attention_head_dim": 8}
        text = {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
                "num_attention_heads": 12, "hidden_act": "quick_gelu", "projection_dim": 768}
    elif architecture == "sd21":
        unet_options = {"cross_attention_dim": 1024, "attention_head_dim": (5, 10, 20, 20),
                        "use_linear_projection": True}
        text = {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 23,
                "num_attention_heads": 16, "hidden_act": "gelu", "projection_dim": 512}
    else:
        raise ValueError(f"architecture must be 'sd15' or 'sd21', got {architecture!r}")
    unet = UNet2DConditionModel(sample_size=64, in_channels=UNET_IN_CHANNELS[kind], **unet_options)
    vae = AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(128, 256, 512, 512),
        layers_per_block=2,
        latent_channels=4,
        sample_size=512,
    )
    text_encoder = CLIPTextModel(
        CLIPTextConfig(max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407,
                       pad_token_id=49407, **text)
    )
    schedule = stable_diffusion_ddim_scheduler()
    torch_dtype = resolve_dtype(dtype)
    if torch_dtype != torch.float32:
        unet, vae, text_encoder = unet.to(torch_dtype), vae.to(torch_dtype), text_encoder.to(torch_dtype)
    return StableDiffusion(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tiny_clip_tokenizer(),
        scheduler=make_scheduler(scheduler, schedule.config) if scheduler else schedule,
        name_or_path=f"fsad-random-{architecture}-{kind}",
    )


def load_diffusion_model(
    model: str,
    kind: SDKind = "txt2img",
    dtype: str = "float32",
    scheduler: str | None = None,
    config_key: str = "diffusion_model",
) -> StableDiffusion:
    """Load ``model``: a hub id or diffusers folder, or one of the reserved names of this module.

    A reserved name of the other kind (an inpainting twin where ``kind="txt2img"`` is expected, or the
    reverse) fails with one line naming ``config_key``.
    """
    from fsad_lightning.cache import default_cache_dir

    named = {**TINY_DIFFUSION_MODELS, **{k: (v[1], 0) for k, v in RANDOM_DIFFUSION_MODELS.items()}}
    if model in named and named[model][0] != kind:
        matching = sorted(name for name, (k, _) in named.items() if k == kind)
        raise ValueError(f"{config_key}: '{model}' is a {named[model][0]} model but {kind} is needed; use one of {matching}")
    if model in RANDOM_DIFFUSION_MODELS:
        return random_stable_diffusion(RANDOM_DIFFUSION_MODELS[model][0], kind, dtype, scheduler)
    if model in TINY_DIFFUSION_MODELS:
        tiny_kind, seed = TINY_DIFFUSION_MODELS[model]
        folder = default_cache_dir() / "tiny_models" / f"{model}-{tiny_kind}-{seed}"
        if not (folder / "model_index.json").is_file():
            build_tiny_stable_diffusion(folder, kind=tiny_kind, seed=seed)
        return load_stable_diffusion(str(folder), kind=kind, dtype=dtype, scheduler=scheduler, config_key=config_key)
    return load_stable_diffusion(model, kind=kind, dtype=dtype, scheduler=scheduler, config_key=config_key)
