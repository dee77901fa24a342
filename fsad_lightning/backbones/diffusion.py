"""Stable Diffusion backbone (diffusers + peft), wrapped once so that every method built on it stays short.

Four methods stand on this module:

- One-to-Normal (Li et al., NeurIPS 2024): DreamBooth fine-tune of SD 1.5 with prior preservation
  (:func:`noise_prediction_loss`, eq. 1, with ``reduction="none"`` to weight instance and class images),
  one-to-normal personalization by img2img at noise ratio ``t = 0.3`` with several prompts
  (:meth:`StableDiffusion.img2img`, eq. 3) and a txt2img pool of anomaly-free images
  (:meth:`StableDiffusion.txt2img`).
- ADP (Kwak et al., IEEE Access 2024): textual inversion of a new token (:func:`add_token`,
  :class:`TrainableTokenEmbedding`) on SD 2.1 and SDEdit pseudo-anomalies (img2img at strength 0.5).
- AnomalySD (Yan et al.): the inpainting SD fine-tuned with the input ``[z_t; m; z_masked]``
  (:meth:`StableDiffusion.inpaint_conditioning` as ``extra_unet_channels`` of
  :func:`noise_prediction_loss`, eq. 8) and many masked inpaintings per query
  (:meth:`StableDiffusion.inpaint`, eq. 11) that reuse the image latents encoded once.

Fine-tuned UNet state is stored as LoRA deltas (:func:`add_unet_lora`, :func:`save_lora`,
:func:`load_lora`), so a per-category checkpoint stays small.

Conventions: images are float ``[B, 3, H, W]`` in ``[0, 1]`` (the batch contract); masks are
``[B, 1, H, W]`` with ``1`` = the region to inpaint; latents are the VAE posterior scaled by
``vae.config.scaling_factor`` (what the UNet sees). Every sampling method runs the explicit
denoising loop with the diffusers components and classifier-free guidance on precomputed prompt
embeddings.
"""

from __future__ import annotations

import inspect
import json
import os
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Literal

import diffusers
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, UNet2DConditionModel
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils.torch_utils import randn_tensor
from peft import LoraConfig
from peft.tuners.lora import LoraLayer
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn
from transformers import CLIPTextModel, CLIPTokenizer

from fsad_lightning.io import atomic_write

try:  # huggingface_hub >= 0.23
    from huggingface_hub.errors import (
        GatedRepoError,
        HFValidationError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )
except ImportError:  # pragma: no cover - older huggingface_hub
    from huggingface_hub.utils import (  # type: ignore[no-redef]
        GatedRepoError,
        HFValidationError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

SDKind = Literal["txt2img", "inpaint"]
Generator = torch.Generator | list[torch.Generator] | None

#: UNet input channels of each kind: 4 latent channels, or latents + mask + masked-image latents
UNET_IN_CHANNELS: dict[str, int] = {"txt2img": 4, "inpaint": 9}
#: the component folders of a diffusers Stable Diffusion repository
COMPONENT_SUBFOLDERS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}
#: attention projections of the UNet that receive LoRA adapters by default
DEFAULT_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
LORA_METADATA_KEY = "fsad_lora_config"


# ============================================================================ loading
def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """``"float32" | "float16" | "bfloat16"`` (or a ``torch.dtype``) to a ``torch.dtype``."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    return DTYPES[dtype]


def cast_frozen_parameters(module: torch.nn.Module, dtype: torch.dtype) -> None:
    """Cast every frozen floating-point parameter of ``module`` to ``dtype`` in place (e.g. a frozen
    backbone to the trainer precision's compute dtype); trainable parameters keep their dtype (fp32)."""
    for param in module.parameters():
        if not param.requires_grad and param.is_floating_point() and param.dtype != dtype:
            param.data = param.data.to(dtype)


def stable_diffusion_ddim_scheduler() -> DDIMScheduler:
    """Stable Diffusion's noise schedule (1,000 steps, scaled-linear betas 0.00085-0.012, epsilon) as DDIM.

    For models built from configs (the tiny twin, full-size random-weight benchmarks); a loaded model
    uses the scheduler config it ships with.
    """
    return DDIMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type="epsilon",
    )


def make_scheduler(name: str, config: dict) -> SchedulerMixin:
    """Build the diffusers scheduler class ``name`` (e.g. ``"DDIMScheduler"``) from a scheduler config.

    The config is the one stored with the model (``scheduler/scheduler_config.json``), so the noise
    schedule (betas, prediction type, timestep offset) stays the model's own. A config without a
    ``clip_sample`` key gets ``clip_sample=False``: the samples are VAE latents, whose range is not
    ``[-1, 1]``, while DDIM / DDPM default to clipping the predicted ``x_0`` there (pixel-space diffusion).
    """
    cls = getattr(diffusers, name, None)
    if not (inspect.isclass(cls) and issubclass(cls, SchedulerMixin)):
        raise ValueError(
            f"scheduler {name!r} is not a diffusers scheduler class; use e.g. 'DDIMScheduler', "
            "'DPMSolverMultistepScheduler', 'EulerDiscreteScheduler', 'PNDMScheduler'"
        )
    config = dict(config)
    if "clip_sample" not in config and "clip_sample" in inspect.signature(cls.__init__).parameters:
        config["clip_sample"] = False
    return cls.from_config(config)


def _is_local_reference(model: str) -> bool:
    """A string names a local folder when it exists or can only be a path (absolute, ``./``, ``~``)."""
    return os.path.exists(model) or model.startswith(("/", "./", "../", "~", ".\\")) or model.count("/") > 1


def _hub_failure_reason(err: BaseException) -> str:
    """One short clause saying why the hub could not provide a model, from the exception chain."""
    seen: BaseException | None = err
    while seen is not None:
        if isinstance(seen, GatedRepoError):
            return "the repository is gated on the Hugging Face hub (accept its license and log in)"
        if isinstance(seen, RepositoryNotFoundError):
            return "no such repository on the Hugging Face hub (or it is private)"
        if isinstance(seen, RevisionNotFoundError):
            return "the requested revision does not exist on the Hugging Face hub"
        if isinstance(seen, (LocalEntryNotFoundError, OfflineModeIsEnabled, ConnectionError)):
            return "it is not in the local Hugging Face cache and the hub is unreachable (offline)"
        if isinstance(seen, HFValidationError):
            return "it is neither an existing local folder nor a valid hub id"
        seen = seen.__cause__ or seen.__context__
    first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return f"loading failed ({first_line})"


def model_not_found_error(model: str, reason: str, config_key: str) -> FileNotFoundError:
    """The one-line error of a model that cannot be loaded: the id, why, and the config key to use."""
    message = (
        f"cannot load Stable Diffusion model '{model}': {reason}; download it or set `{config_key}` "
        "to a local folder saved with diffusers (with model_index.json and unet/, vae/, text_encoder/, "
        "tokenizer/, scheduler/)"
    )
    return FileNotFoundError(" ".join(message.split()))


def _check_local_folder(model: str, config_key: str) -> None:
    folder = Path(model).expanduser()
    if not folder.is_dir():
        raise model_not_found_error(model, "the folder does not exist", config_key)
    if not (folder / "model_index.json").is_file():
        raise model_not_found_error(model, "the folder lacks model_index.json", config_key)
    missing = [name for name in COMPONENT_SUBFOLDERS if not (folder / name).is_dir()]
    if missing:
        raise model_not_found_error(
            model, f"the folder lacks the subfolder(s) {', '.join(missing)}", config_key
        )


def _check_unet_kind(model: str, in_channels: int, kind: str) -> None:
    expected = UNET_IN_CHANNELS[kind]
    if in_channels != expected:
        raise ValueError(
            f"'{model}' has a UNet with {in_channels} input channels but kind={kind!r} expects "
            f"{expected}: use kind='inpaint' for inpainting models and kind='txt2img' otherwise"
        )


def load_stable_diffusion(
    model: str,
    kind: SDKind = "txt2img",
    dtype: str | torch.dtype = "float32",
    scheduler: str | None = None,
    revision: str | None = None,
    variant: str | None = None,
    config_key: str = "model",
) -> StableDiffusion:
    """Load a Stable Diffusion model (hub id or local diffusers folder) as a frozen :class:`StableDiffusion`.

    Args:
        model: a hub id (``"stable-diffusion-v1-5/stable-diffusion-v1-5"``,
            ``"stabilityai/stable-diffusion-2-1"``, ``"stable-diffusion-v1-5/stable-diffusion-inpainting"``,
            ``"stabilityai/stable-diffusion-2-inpainting"``) or a local folder saved with diffusers.
        kind: ``"txt2img"`` expects a 4-channel UNet, ``"inpaint"`` the 9-channel inpainting UNet.
        dtype: weight dtype of every component.
        scheduler: a diffusers scheduler class name to sample with (``"DDIMScheduler"``,
            ``"DPMSolverMultistepScheduler"``, ...), built from the model's own scheduler config;
            ``None`` keeps the model's scheduler class.
        revision, variant: passed to every ``from_pretrained`` (e.g. ``variant="fp16"``).
        config_key: the configuration key the caller exposes for ``model`` (``"model"``,
            ``"pretrained_model"``, ...), named in the error raised when the model cannot be found.

    Each component is loaded with ``from_pretrained(model, subfolder=...)``, so a hub id and a local
    folder go through the same code. A model that cannot be found raises a one-line
    :class:`FileNotFoundError` that names the model, the reason and ``config_key``.
    """
    if kind not in UNET_IN_CHANNELS:
        raise ValueError(f"kind must be one of {sorted(UNET_IN_CHANNELS)}, got {kind!r}")
    torch_dtype = resolve_dtype(dtype)
    if _is_local_reference(model):
        _check_local_folder(model, config_key)
        model = str(Path(model).expanduser())
    common = {"revision": revision}
    weights = {"torch_dtype": torch_dtype, "variant": variant, **common}
    with warnings.catch_warnings():
        # diffusers passes huggingface_hub an argument it deprecates; the warning is not the user's to fix
        warnings.filterwarnings("ignore", message=".*local_dir_use_symlinks.*")
        try:
            # the small UNet config first: a wrong kind fails before any weight is read or downloaded
            unet_config = UNet2DConditionModel.load_config(model, subfolder="unet", **common)
        except (OSError, ValueError) as err:
            raise model_not_found_error(model, _hub_failure_reason(err), config_key) from None
        _check_unet_kind(model, unet_config["in_channels"], kind)
        try:
            text_encoder = CLIPTextModel.from_pretrained(model, subfolder="text_encoder", **weights)
            tokenizer = CLIPTokenizer.from_pretrained(model, subfolder="tokenizer", **common)
            vae = AutoencoderKL.from_pretrained(model, subfolder="vae", **weights)
            unet = UNet2DConditionModel.from_pretrained(model, subfolder="unet", **weights)
            scheduler_config = DDPMScheduler.load_config(model, subfolder="scheduler", **common)
        except (OSError, ValueError) as err:
            raise model_not_found_error(model, _hub_failure_reason(err), config_key) from None

    if tokenizer.vocab_size != text_encoder.config.vocab_size:
        # transformers builds a 2-token CLIP tokenizer instead of failing when the files are missing
        raise ValueError(
            f"the tokenizer of '{model}' has {tokenizer.vocab_size} tokens but its text encoder expects "
            f"{text_encoder.config.vocab_size}: the tokenizer files are missing or belong to another model"
        )
    scheduler_name = scheduler or scheduler_config["_class_name"]
    return StableDiffusion(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        scheduler=make_scheduler(scheduler_name, scheduler_config),
        name_or_path=model,
    )


def img2img_timesteps(num_train_timesteps: int, num_inference_steps: int, strength: float) -> list[int]:
    """The denoising timesteps of img2img at noise ratio ``strength``: an explicit schedule that starts at
    ``round(strength * T)`` (at most ``T - 1``) and steps down by the stride ``T // num_inference_steps``
    of the full ``num_inference_steps`` schedule while it stays above 0 (the last step lands on the clean
    image). ``[]`` when ``round(strength * T) == 0``.

    The first timestep is the paper's noise ratio whatever ``num_inference_steps`` is: SD 1.5's leading
    spacing with ``steps_offset=1`` and diffusers' "last ``int(strength * N)`` steps" start t = 0.3 with
    20 steps at 251, not 300. There are ``ceil(round(s * T) / (T // N))`` steps, ``int(s * N)`` when
    ``s * N`` and ``T / N`` are integers (t = 0.3, 20 steps: 300, 250, ..., 50).
    """
    if num_inference_steps < 1:
        raise ValueError(f"num_inference_steps must be >= 1, got {num_inference_steps}")
    if not 0.0 <= strength <= 1.0:
        raise ValueError(f"strength must be in [0, 1], got {strength}")
    start = min(round(strength * num_train_timesteps), num_train_timesteps - 1)
    stride = max(num_train_timesteps // num_inference_steps, 1)
    return list(range(start, 0, -stride))


# ============================================================================ the model
class StableDiffusion(nn.Module):
    """The Stable Diffusion components with batched, explicit sampling loops.

    Holds ``unet``, ``vae``, ``text_encoder`` (modules), ``tokenizer`` and ``scheduler`` (the
    sampling scheduler) plus ``training_scheduler``, a :class:`~diffusers.DDPMScheduler` built from the
    same config for the training losses (``add_noise`` and ``get_velocity`` on the model's noise
    schedule, whichever sampler is chosen). Every weight is frozen at construction; adapters
    (:func:`add_unet_lora`) and new tokens (:func:`add_token`) add trainable parameters on top.

    ``vae_batch_size`` (:meth:`set_vae_batch_size`, settable at any time): images per VAE encoder /
    decoder pass in :meth:`encode_images` and :meth:`decode_latents` (and so in every sampling method's
    final decode); ``None`` runs the whole batch in one pass. Slicing bounds the VAE's activation memory
    (a 512 px decode holds 0.75 GiB of fp32 activations per image) and gives the same result as one pass.
    """

    def __init__(
        self,
        unet: UNet2DConditionModel,
        vae: AutoencoderKL,
        text_encoder: CLIPTextModel,
        tokenizer: CLIPTokenizer,
        scheduler: SchedulerMixin,
        name_or_path: str = "",
        vae_batch_size: int | None = None,
    ) -> None:
        super().__init__()
        self.unet = unet
        self.vae = vae
        self.text_encoder = text_encoder
        self.tokenizer = tokenizer
        self.scheduler = scheduler
        self.training_scheduler = DDPMScheduler.from_config(scheduler.config)
        self.name_or_path = name_or_path
        self.requires_grad_(False)
        self.eval()
        self._step_accepts_generator = "generator" in inspect.signature(scheduler.step).parameters
        #: images per VAE encode / decode call (``None``: the whole batch at once); see :meth:`set_vae_batch_size`
        self.vae_batch_size: int | None = None
        self.set_vae_batch_size(vae_batch_size)
        # the torch.compile'd UNet of the sampling loops (compile_unet), kept out of the module tree so that
        # state_dict / parameters / .to() see the UNet once
        object.__setattr__(self, "_compiled_unet", None)

    # ------------------------------------------------------------------ properties
    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype

    @property
    def denoiser(self) -> nn.Module:
        """The UNet the sampling loops call: its ``torch.compile``'d form after :meth:`compile_unet`, else
        the UNet itself (training losses always call :attr:`unet`)."""
        return self.unet if self._compiled_unet is None else self._compiled_unet

    def compile_unet(self, enabled: bool = True, **options) -> None:
        """Sample with ``torch.compile(unet, dynamic=False, **options)`` (``enabled=False``: eager again).

        Only the sampling loops use it; the compiled module wraps the same UNet, so weights, adapters and
        device moves are shared. Shapes are static: each batch size compiles once (a chunked run has two,
        the full chunk and the last one), which is much faster to build and to run than one dynamic-shape
        graph. The first call per shape compiles (minutes for SD 1.5).
        """
        compiled = torch.compile(self.unet, **{"dynamic": False, **options}) if enabled else None
        object.__setattr__(self, "_compiled_unet", compiled)

    @property
    def vae_scale_factor(self) -> int:
        """Pixels per latent cell: ``2 ** (number of VAE blocks - 1)`` (8 for SD 1.x / 2.x)."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def latent_channels(self) -> int:
        return int(self.vae.config.latent_channels)

    @property
    def is_inpainting(self) -> bool:
        return self.unet.config.in_channels == UNET_IN_CHANNELS["inpaint"]

    @property
    def prediction_type(self) -> str:
        return self.training_scheduler.config.prediction_type

    @property
    def max_prompt_length(self) -> int:
        """Token length of an encoded prompt: the tokenizer's limit, at most the text encoder's positions."""
        return min(
            int(self.tokenizer.model_max_length), int(self.text_encoder.config.max_position_embeddings)
        )

    # ------------------------------------------------------------------ prompts
    def tokenize(self, texts: Sequence[str]) -> Tensor:
        """Token ids ``[T, L]`` padded (and truncated) to :attr:`max_prompt_length`."""
        if isinstance(texts, str) or len(texts) == 0:
            raise ValueError("texts must be a non-empty list of strings")
        tokens = self.tokenizer(
            list(texts),
            padding="max_length",
            max_length=self.max_prompt_length,
            truncation=True,
            return_tensors="pt",
        )
        return tokens.input_ids.to(self.device)

    def encode_prompt(self, texts: Sequence[str]) -> Tensor:
        """Text-encoder hidden states ``[T, L, D]``, the UNet's cross-attention context ``tau(y)``.

        The last hidden state (after the final layer norm) is used, as Stable Diffusion does. Gradients
        flow when called outside ``torch.no_grad`` (textual inversion).
        """
        input_ids = self.tokenize(texts)
        attention_mask = None
        if getattr(self.text_encoder.config, "use_attention_mask", False):
            attention_mask = (input_ids != self.tokenizer.pad_token_id).long()
        return self.text_encoder(input_ids, attention_mask=attention_mask)[0]

    def encode_prompt_ensemble(self, texts: Sequence[str]) -> Tensor:
        """Mean prompt embedding ``[1, L, D]`` of several prompts (AnomalySD's ``Avg({tau(y)})``)."""
        return average_prompt_embeds(self.encode_prompt(texts))

    def unconditional_embeds(self) -> Tensor:
        """Embedding ``[1, L, D]`` of the empty prompt, the default negative of classifier-free guidance."""
        return self.encode_prompt([""])

    # ------------------------------------------------------------------ VAE
    def _check_images(self, images: Tensor, name: str = "images") -> None:
        if not isinstance(images, Tensor) or images.ndim != 4 or images.shape[1] != 3:
            shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
            raise ValueError(f"{name} must be a float tensor [B, 3, H, W] in [0, 1], got {shape}")
        h, w = images.shape[-2:]
        if h % self.vae_scale_factor or w % self.vae_scale_factor:
            raise ValueError(
                f"{name} size {h}x{w} is not a multiple of the VAE scale factor {self.vae_scale_factor}"
            )
        if images.min() < -1e-3 or images.max() > 1 + 1e-3:
            raise ValueError(
                f"{name} must be in [0, 1], got values in "
                f"[{float(images.min()):.3f}, {float(images.max()):.3f}]"
            )

    def set_vae_batch_size(self, batch_size: int | None) -> None:
        """Encode and decode at most ``batch_size`` images per VAE call (``None``: all at once).

        The VAE's activations at full resolution dominate inference memory (the decoder's last blocks hold
        ``128 x 512 x 512`` values per image several times over), so slicing bounds the peak while the
        batch of UNet passes stays large. Every image is processed on its own by the VAE (group norms are
        per image), so the result does not depend on the slice size.
        """
        if batch_size is not None and (int(batch_size) != batch_size or batch_size < 1):
            raise ValueError(f"vae_batch_size must be a positive integer or None, got {batch_size!r}")
        self.vae_batch_size = None if batch_size is None else int(batch_size)

    def _vae_slices(self, tensor: Tensor) -> tuple[Tensor, ...]:
        return tensor.split(self.vae_batch_size) if self.vae_batch_size else (tensor,)

    def encode_images(self, images: Tensor, generator: Generator = None, sample: bool = False) -> Tensor:
        """Scaled latents ``[B, C, H/f, W/f]`` of images ``[B, 3, H, W]`` in ``[0, 1]``.

        ``(posterior - shift_factor) * scaling_factor`` where the posterior is the mean of the VAE's latent
        distribution, or a sample drawn with ``generator`` when ``sample=True``. The encoder runs in
        slices of :attr:`vae_batch_size` images and in its own weights' dtype (the decoder may be trained
        in float32 while the frozen encoder is in the compute dtype); the sample is drawn once for the
        whole batch.
        """
        self._check_images(images)
        pixels = images.to(device=self.device, dtype=self.vae.encoder.conv_in.weight.dtype) * 2.0 - 1.0
        moments = torch.cat([self.vae.encode(chunk).latent_dist.parameters for chunk in self._vae_slices(pixels)])
        posterior = DiagonalGaussianDistribution(moments)
        latents = posterior.sample(generator=generator) if sample else posterior.mean
        shift = getattr(self.vae.config, "shift_factor", None) or 0.0
        return (latents - shift) * self.vae.config.scaling_factor

    def decode_latents(self, latents: Tensor) -> Tensor:
        """Images ``[B, 3, H, W]`` in ``[0, 1]`` (float32) from scaled latents, decoded in slices of
        :attr:`vae_batch_size` in the decoder's weights' dtype."""
        shift = getattr(self.vae.config, "shift_factor", None) or 0.0
        dtype = self.vae.post_quant_conv.weight.dtype
        latents = latents.to(device=self.device, dtype=dtype) / self.vae.config.scaling_factor + shift
        pixels = torch.cat([self.vae.decode(chunk).sample.float() for chunk in self._vae_slices(latents)])
        return (pixels / 2.0 + 0.5).clamp(0.0, 1.0)

    def grey_latents(self, height: int, width: int) -> Tensor:
        """``E(grey)`` ``[1, C, h, w]``: the latents of a mid-grey image, which is the masked image of a mask
        covering everything whatever the image (:meth:`inpaint_conditioning` fills masked pixels with 0.5)."""
        return self.encode_images(torch.full((1, 3, height, width), 0.5, device=self.device))

    def masked_image_latents(self, images: Tensor, masks: Tensor, grey_latents: Tensor | None = None) -> Tensor:
        """Latents ``[B, C, h, w]`` of the masked images ``(1 - m) x + 0.5 m`` (masks binarised at 0.5).

        An image whose mask covers it whole is mid-grey, the same for every query: it takes ``grey_latents``
        (:meth:`grey_latents`, computed here once when not given) instead of a VAE encode. Pass the
        ``grey_latents`` of a batch to every call on it to encode them once per batch.
        """
        masks = self._binary_masks(masks, images)
        images = images.to(self.device)
        covered = masks.flatten(1).amin(dim=1) > 0.5  # [B] True: the mask covers the whole image
        partial = (~covered).nonzero().flatten()
        out: Tensor | None = None
        if len(partial):
            chosen_masks = masks[partial]
            encoded = self.encode_images(images[partial] * (1.0 - chosen_masks) + 0.5 * chosen_masks)
            out = encoded.new_zeros(masks.shape[0], *encoded.shape[1:])
            out[partial] = encoded
        if covered.any():
            if grey_latents is None:
                grey_latents = self.grey_latents(*images.shape[-2:])
            grey = grey_latents.to(self.device)
            if out is None:
                out = grey.new_zeros(masks.shape[0], *grey.shape[1:])
            out[covered] = grey.to(out.dtype).expand(int(covered.sum()), *grey.shape[1:])
        return out

    def inpaint_conditioning(
        self, images: Tensor, masks: Tensor, masked_image_latents: Tensor | None = None
    ) -> Tensor:
        """The inpainting UNet's extra input ``[B, 1 + C, h, w]``: downsampled mask, masked-image latents.

        AnomalySD writes the input as ``[z_t; z_masked; m]`` (sec. 4.1); the diffusers inpainting UNets
        were trained with ``[z_t; m; z_masked]`` (``StableDiffusionInpaintPipeline``), which is the order
        used here, so pretrained inpainting weights keep working. As there, masks are binarised at 0.5,
        masked pixels are set to 0 in ``[-1, 1]`` space (mid-grey) before encoding, and the mask is
        downsampled to the latent grid with nearest-neighbour interpolation. ``masked_image_latents``
        (``[B, C, h, w]``) skips the VAE encode of the masked images.
        """
        masks = self._binary_masks(masks, images)
        latent_size = (images.shape[-2] // self.vae_scale_factor, images.shape[-1] // self.vae_scale_factor)
        expected = (masks.shape[0], self.latent_channels, *latent_size)
        if masked_image_latents is None:
            masked_image_latents = self.masked_image_latents(images, masks)
        elif tuple(masked_image_latents.shape) != expected:
            raise ValueError(
                f"masked_image_latents must have shape {expected}, got {tuple(masked_image_latents.shape)}"
            )
        latent_masks = F.interpolate(masks, size=latent_size)  # nearest, as diffusers does
        return torch.cat(
            [latent_masks.to(self.dtype), masked_image_latents.to(self.device, self.dtype)], dim=1
        )

    def _binary_masks(self, masks: Tensor, images: Tensor) -> Tensor:
        if masks.ndim != 4 or masks.shape[1] != 1 or masks.shape[-2:] != images.shape[-2:]:
            raise ValueError(
                f"masks must be [B, 1, H, W] at the image size {tuple(images.shape[-2:])}, "
                f"got {tuple(masks.shape)}"
            )
        if images.shape[0] != masks.shape[0]:
            raise ValueError(f"{images.shape[0]} images but {masks.shape[0]} masks")
        return (masks.to(device=self.device, dtype=torch.float32) >= 0.5).float()

    # ------------------------------------------------------------------ sampling
    @torch.no_grad()
    def img2img(
        self,
        images: Tensor | None,
        prompt_embeds: Tensor,
        strength: float,
        num_inference_steps: int = 50,
        guidance_scale: float = 7.5,
        negative_prompt_embeds: Tensor | None = None,
        generator: Generator = None,
        latents: Tensor | None = None,
    ) -> Tensor:
        """SDEdit image-to-image translation; returns images ``[B, 3, H, W]`` in ``[0, 1]``.

        One-to-Normal eq. 3: ``x_hat = D_theta(sqrt(a_t) x_q + sqrt(1 - a_t) eps, c_q, t)``: the image
        latents are noised to the timestep ``round(strength * T)`` (``strength`` = the paper's noise ratio
        ``t``, 0.3; ADP's SDEdit 0.5) and denoised from there by an explicit schedule with the stride of
        the full ``num_inference_steps`` schedule (:func:`img2img_timesteps`): 300, 250, ..., 50 for
        t = 0.3 and 20 steps. ``StableDiffusionImg2ImgPipeline`` instead keeps the last
        ``int(strength * num_inference_steps)`` steps of the scheduler's own spacing, which for SD 1.5's
        leading spacing starts at 251 (t = 0.3, 20 steps) and depends on the step count. When the schedule
        is empty (``round(strength * T) == 0``) no noise is added and the result is
        ``decode(encode(images))``. Takes DDIM (the default of every config) or a scheduler whose
        ``set_timesteps`` accepts ``timesteps`` (DDPM, Euler, DPM-Solver++, Heun).

        Args:
            images: ``[B, 3, H, W]`` in ``[0, 1]``; may be ``None`` when ``latents`` is given.
            prompt_embeds: ``[B or 1, L, D]`` from :meth:`encode_prompt`.
            negative_prompt_embeds: ``[B or 1, L, D]``; defaults to the empty prompt.
            generator: one generator, or one per image, for the noise.
            latents: precomputed image latents ``[B, C, h, w]`` (:meth:`encode_images`), skipping the
                VAE encode (e.g. several prompts on the same queries). The VAE posterior mean is used.
        """
        if not 0.0 <= strength <= 1.0:
            raise ValueError(f"strength must be in [0, 1], got {strength}")
        if latents is None:
            if images is None:
                raise ValueError("img2img needs images or their latents")
            latents = self.encode_images(images)
        latents = latents.to(device=self.device, dtype=self.dtype)
        batch = latents.shape[0]
        timesteps = self._img2img_schedule(num_inference_steps, strength)
        if len(timesteps) == 0:
            return self.decode_latents(latents)
        noise = randn_tensor(latents.shape, generator=generator, device=self.device, dtype=self.dtype)
        start = timesteps[:1].repeat(batch)
        noisy = self.scheduler.add_noise(latents, noise, start)
        denoised = self._denoise(
            noisy, timesteps, prompt_embeds, negative_prompt_embeds, guidance_scale, generator=generator
        )
        return self.decode_latents(denoised)

    @torch.no_grad()
    def inpaint(
        self,
        images: Tensor,
        masks: Tensor,
        prompt_embeds: Tensor,
        num_inference_steps: int = 50,
        strength: float = 1.0,
        guidance_scale: float = 7.5,
        negative_prompt_embeds: Tensor | None = None,
        generator: Generator = None,
        image_latents: Tensor | None = None,
        masked_image_latents: Tensor | None = None,
        paste_back: bool = False,
    ) -> Tensor:
        """Inpaint the masked regions with the 9-channel inpainting UNet; returns ``[B, 3, H, W]`` in [0, 1].

        AnomalySD eq. 11: the denoising starts at ``T~ = strength * T`` from
        ``z_T~ = sqrt(a) z + sqrt(1 - a) eps`` with ``z = E(x)`` (pure noise when ``strength == 1``, as
        in diffusers), and every step feeds ``[z_t; m; z_masked]`` (:meth:`inpaint_conditioning`).

        Args:
            images: ``[B or 1, 3, H, W]`` in ``[0, 1]``; one image is broadcast to all ``B`` masks
                (AnomalySD's many masks per query).
            masks: ``[B, 1, H, W]``, 1 = inpaint.
            prompt_embeds / negative_prompt_embeds: ``[B or 1, L, D]``.
            image_latents: ``[B or 1, C, h, w]`` latents of ``images``, reused across masks and calls;
                only needed when ``strength < 1``.
            masked_image_latents: ``[B, C, h, w]`` latents of the masked images.
            paste_back: replace the unmasked pixels of the output by the input pixels.
        """
        if not self.is_inpainting:
            raise ValueError(
                f"inpaint needs the 9-channel inpainting UNet, '{self.name_or_path}' has "
                f"{self.unet.config.in_channels} input channels: load an inpainting model with kind='inpaint'"
            )
        if not 0.0 <= strength <= 1.0:
            raise ValueError(f"strength must be in [0, 1], got {strength}")
        batch = masks.shape[0]
        timesteps = self.inpaint_timesteps(num_inference_steps, strength)
        if (strength < 1.0 or len(timesteps) == 0) and image_latents is None:
            image_latents = self.encode_images(images)  # before broadcasting: one encode per query
        images = _broadcast_batch(images.to(self.device), batch, "images")
        condition = self.inpaint_conditioning(images, masks, masked_image_latents)
        shape = (batch, self.latent_channels, *condition.shape[-2:])
        if image_latents is not None:
            image_latents = _broadcast_batch(
                image_latents.to(self.device, self.dtype), batch, "image_latents"
            )
        if len(timesteps) == 0:
            denoised = image_latents
        else:
            noise = randn_tensor(shape, generator=generator, device=self.device, dtype=self.dtype)
            if strength == 1.0:
                noisy = noise * self.scheduler.init_noise_sigma
            else:
                noisy = self.scheduler.add_noise(image_latents, noise, timesteps[:1].repeat(batch))
            denoised = self._denoise(
                noisy,
                timesteps,
                prompt_embeds,
                negative_prompt_embeds,
                guidance_scale,
                extra_channels=condition,
                generator=generator,
            )
        output = self.decode_latents(denoised)
        if paste_back:
            keep = self._binary_masks(masks, images)
            output = keep * output + (1.0 - keep) * images.float()
        return output

    @torch.no_grad()
    def txt2img(
        self,
        prompt_embeds: Tensor,
        num_images: int,
        height: int,
        width: int,
        num_inference_steps: int = 50,
        guidance_scale: float = 7.5,
        negative_prompt_embeds: Tensor | None = None,
        generator: Generator = None,
    ) -> Tensor:
        """Sample ``num_images`` images ``[N, 3, height, width]`` in ``[0, 1]`` from pure noise.

        The anomaly-free pool of One-to-Normal (sec. 3.4) and ADP's generations. ``prompt_embeds`` is
        ``[N or 1, L, D]``.
        """
        if num_images < 1:
            raise ValueError(f"num_images must be >= 1, got {num_images}")
        if height % self.vae_scale_factor or width % self.vae_scale_factor:
            raise ValueError(
                f"height and width must be multiples of {self.vae_scale_factor}, got {height}x{width}"
            )
        if self.is_inpainting:
            raise ValueError("txt2img needs a 4-channel UNet; this is an inpainting model (use inpaint)")
        shape = (
            num_images,
            self.latent_channels,
            height // self.vae_scale_factor,
            width // self.vae_scale_factor,
        )
        self.scheduler.set_timesteps(num_inference_steps, device=self.device)
        timesteps = self.scheduler.timesteps
        noise = randn_tensor(shape, generator=generator, device=self.device, dtype=self.dtype)
        latents = noise * self.scheduler.init_noise_sigma
        denoised = self._denoise(
            latents, timesteps, prompt_embeds, negative_prompt_embeds, guidance_scale, generator=generator
        )
        return self.decode_latents(denoised)

    # ------------------------------------------------------------------ the denoising loop
    def _img2img_schedule(self, num_inference_steps: int, strength: float) -> Tensor:
        """Set the sampling scheduler to :func:`img2img_timesteps` and return its timesteps.

        A scheduler whose ``set_timesteps`` takes ``timesteps`` gets them directly. DDIM does not, but its
        step goes from ``t`` to ``t - T // num_inference_steps``, the explicit schedule's stride: it is set
        to the full ``num_inference_steps`` schedule and its timesteps replaced. Any other scheduler (PNDM's
        PLMS warm-up, sigma schedules without custom timesteps) is a clear error.
        """
        scheduler = self.scheduler
        explicit = img2img_timesteps(scheduler.config.num_train_timesteps, num_inference_steps, strength)
        if not explicit:
            return torch.zeros(0, dtype=torch.long, device=self.device)
        if "timesteps" in inspect.signature(scheduler.set_timesteps).parameters:
            scheduler.set_timesteps(timesteps=explicit, device=self.device)
        elif isinstance(scheduler, DDIMScheduler):
            scheduler.set_timesteps(num_inference_steps, device=self.device)
            scheduler.timesteps = torch.tensor(explicit, dtype=torch.long, device=self.device)
        else:
            raise ValueError(
                f"img2img starts at the noise ratio strength * T, which {type(scheduler).__name__} cannot "
                "do: use scheduler DDIMScheduler (or DDPMScheduler, EulerDiscreteScheduler, "
                "DPMSolverMultistepScheduler)"
            )
        if hasattr(scheduler, "set_begin_index"):
            scheduler.set_begin_index(0)
        return scheduler.timesteps

    def inpaint_timesteps(self, num_inference_steps: int, strength: float) -> Tensor:
        """The timesteps :meth:`inpaint` runs: the whole ``num_inference_steps`` schedule from pure noise at
        ``strength == 1``, else the img2img schedule that starts at ``strength * T``
        (:meth:`_img2img_schedule`, the same noise ratio rule as :meth:`img2img`). Sets the scheduler."""
        if num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be >= 1, got {num_inference_steps}")
        if strength < 1.0:
            return self._img2img_schedule(num_inference_steps, strength)
        self.scheduler.set_timesteps(num_inference_steps, device=self.device)
        if hasattr(self.scheduler, "set_begin_index"):
            self.scheduler.set_begin_index(0)
        return self.scheduler.timesteps

    def _denoise(
        self,
        latents: Tensor,
        timesteps: Tensor,
        prompt_embeds: Tensor,
        negative_prompt_embeds: Tensor | None,
        guidance_scale: float,
        extra_channels: Tensor | None = None,
        generator: Generator = None,
    ) -> Tensor:
        """Run the scheduler over ``timesteps`` from ``latents`` with classifier-free guidance.

        ``eps = eps_u + w (eps_c - eps_u)`` (Ho & Salimans) with ``w = guidance_scale``; guidance is
        skipped when ``w <= 1``. ``extra_channels`` (the inpainting conditioning) is concatenated to
        the scaled model input at every step.
        """
        batch = latents.shape[0]
        cond = _broadcast_batch(prompt_embeds.to(self.device, self.dtype), batch, "prompt_embeds")
        guided = guidance_scale > 1.0
        if guided:
            if negative_prompt_embeds is None:
                negative_prompt_embeds = self.unconditional_embeds()
            uncond = _broadcast_batch(
                negative_prompt_embeds.to(self.device, self.dtype), batch, "negative_prompt_embeds"
            )
            if uncond.shape[1:] != cond.shape[1:]:
                raise ValueError(
                    f"negative_prompt_embeds {tuple(uncond.shape)} and prompt_embeds "
                    f"{tuple(cond.shape)} differ"
                )
            context = torch.cat([uncond, cond])
            extra = None if extra_channels is None else torch.cat([extra_channels, extra_channels])
        else:
            context, extra = cond, extra_channels
        step_kwargs = {"generator": generator} if self._step_accepts_generator else {}
        for t in timesteps:
            model_input = torch.cat([latents, latents]) if guided else latents
            model_input = self.scheduler.scale_model_input(model_input, t)
            if extra is not None:
                model_input = torch.cat([model_input, extra], dim=1)
            noise_pred = self.denoiser(model_input, t, encoder_hidden_states=context, return_dict=False)[0]
            if guided:
                noise_uncond, noise_cond = noise_pred.chunk(2)
                noise_pred = noise_uncond + guidance_scale * (noise_cond - noise_uncond)
            latents = self.scheduler.step(noise_pred, t, latents, **step_kwargs, return_dict=False)[0]
        return latents

    # ------------------------------------------------------------------ training
    def noise_prediction_loss(
        self,
        latents: Tensor,
        prompt_embeds: Tensor,
        generator: torch.Generator | None = None,
        extra_unet_channels: Tensor | None = None,
        reduction: Literal["mean", "none"] = "mean",
    ) -> Tensor:
        """:func:`noise_prediction_loss` with this model's UNet and :attr:`training_scheduler`."""
        return noise_prediction_loss(
            self.unet,
            self.training_scheduler,
            latents,
            prompt_embeds,
            generator=generator,
            extra_unet_channels=extra_unet_channels,
            reduction=reduction,
        )

    def add_token(self, token: str = "<fsad-concept>", initializer_token: str = "object") -> int:
        """:func:`add_token` on this model's tokenizer and text encoder."""
        return add_token(self.tokenizer, self.text_encoder, token=token, initializer_token=initializer_token)


# ============================================================================ prompt helpers
def average_prompt_embeds(prompt_embeds: Tensor) -> Tensor:
    """Mean ``[1, L, D]`` of prompt embeddings ``[T, L, D]`` (a prompt ensemble as one condition)."""
    if prompt_embeds.ndim != 3 or prompt_embeds.shape[0] == 0:
        raise ValueError(f"prompt_embeds must be [T, L, D] with T >= 1, got {tuple(prompt_embeds.shape)}")
    return prompt_embeds.mean(dim=0, keepdim=True)


def _broadcast_batch(tensor: Tensor, batch: int, name: str) -> Tensor:
    if tensor.shape[0] == batch:
        return tensor
    if tensor.shape[0] == 1:
        return tensor.expand(batch, *tensor.shape[1:])
    raise ValueError(f"{name} has batch {tensor.shape[0]}; expected 1 or {batch}")


# ============================================================================ training losses
def noise_prediction_loss(
    unet: UNet2DConditionModel,
    scheduler: SchedulerMixin,
    latents: Tensor,
    encoder_hidden_states: Tensor,
    generator: torch.Generator | None = None,
    extra_unet_channels: Tensor | None = None,
    reduction: Literal["mean", "none"] = "mean",
    timesteps: Tensor | None = None,
    noise: Tensor | None = None,
) -> Tensor:
    """The latent diffusion denoising loss ``E_{z, c, eps, t} ||target - f_theta(z_t, t, c)||^2``.

    One-to-Normal eq. 1, AnomalySD eq. 8 (with ``extra_unet_channels`` = :meth:`StableDiffusion.
    inpaint_conditioning`, giving the input ``[z_t; m; z_masked]``) and the textual-inversion objective
    of ADP eq. 1. ``z_t = sqrt(a_t) z + sqrt(1 - a_t) eps`` (AnomalySD eq. 7) with ``t`` uniform over
    the training timesteps and ``eps ~ N(0, I)``.

    The target follows ``scheduler.config.prediction_type``: ``"epsilon"`` -> ``eps`` (SD 1.5,
    the inpainting models), ``"v_prediction"`` -> ``v = sqrt(a_t) eps - sqrt(1 - a_t) z`` (SD 2.1 768),
    ``"sample"`` -> ``z``. One-to-Normal writes eq. 1 as an ``x_0`` regression; the three
    parameterisations differ only by a per-timestep weight, and the model's own is used.

    Args:
        unet: the (possibly LoRA-adapted) UNet.
        scheduler: a scheduler with ``add_noise`` (and ``get_velocity`` for v-prediction), e.g.
            :attr:`StableDiffusion.training_scheduler`.
        latents: scaled clean latents ``z`` ``[B, C, h, w]``.
        encoder_hidden_states: prompt embeddings ``[B or 1, L, D]``.
        generator: draws the timesteps and the noise.
        extra_unet_channels: ``[B, E, h, w]`` concatenated after ``z_t`` (inpainting UNet).
        reduction: ``"mean"`` -> scalar; ``"none"`` -> per-sample loss ``[B]`` (mean over C, h, w), for
            DreamBooth's prior-preservation weighting.
        timesteps, noise: fixed ``[B]`` timesteps / ``[B, C, h, w]`` noise instead of drawing them.
    """
    if reduction not in ("mean", "none"):
        raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")
    if latents.ndim != 4:
        raise ValueError(f"latents must be [B, C, h, w], got {tuple(latents.shape)}")
    batch, device = latents.shape[0], latents.device
    in_channels = latents.shape[1] + (0 if extra_unet_channels is None else extra_unet_channels.shape[1])
    if in_channels != unet.config.in_channels:
        raise ValueError(
            f"the UNet takes {unet.config.in_channels} input channels but latents ({latents.shape[1]}) and "
            f"extra_unet_channels ({in_channels - latents.shape[1]}) give {in_channels}"
        )
    prediction_type = scheduler.config.prediction_type
    if prediction_type not in ("epsilon", "v_prediction", "sample"):
        raise ValueError(f"unsupported prediction_type {prediction_type!r} in the scheduler config")
    if noise is None:
        noise = randn_tensor(latents.shape, generator=generator, device=device, dtype=latents.dtype)
    if timesteps is None:
        timesteps = torch.randint(
            0,
            scheduler.config.num_train_timesteps,
            (batch,),
            generator=generator,
            device=generator.device if generator is not None else device,  # draw where it lives
        ).to(device)
    noisy = scheduler.add_noise(latents, noise, timesteps)
    if prediction_type == "epsilon":
        target = noise
    elif prediction_type == "v_prediction":
        target = scheduler.get_velocity(latents, noise, timesteps)
    else:
        target = latents
    model_input = noisy if extra_unet_channels is None else torch.cat([noisy, extra_unet_channels], dim=1)
    context = _broadcast_batch(encoder_hidden_states, batch, "encoder_hidden_states")
    prediction = unet(model_input, timesteps, encoder_hidden_states=context, return_dict=False)[0]
    per_sample = F.mse_loss(prediction.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
    return per_sample.mean() if reduction == "mean" else per_sample


def set_gradient_checkpointing(unet: nn.Module, enabled: bool) -> None:
    """Turn activation checkpointing of a diffusers model on or off (memory for compute in training)."""
    if enabled:
        unet.enable_gradient_checkpointing()
    else:
        unet.disable_gradient_checkpointing()


# ============================================================================ LoRA (peft)
def add_unet_lora(
    unet: UNet2DConditionModel,
    rank: int = 4,
    alpha: float = 4,
    target_modules: Sequence[str] = DEFAULT_LORA_TARGETS,
    dropout: float = 0.0,
    adapter_name: str = "default",
) -> list[nn.Parameter]:
    """Add a LoRA adapter ``W + (alpha / rank) B A`` to the UNet's attention layers; returns its parameters.

    Uses diffusers' ``unet.add_adapter(LoraConfig(...))``. ``A`` is initialised Gaussian and ``B`` zero,
    so the adapted UNet starts identical to the base; only the adapter's parameters require grad.
    """
    if rank < 1:
        raise ValueError(f"LoRA rank must be >= 1, got {rank}")
    if not target_modules:
        raise ValueError("target_modules must name at least one module (e.g. 'to_q')")
    config = LoraConfig(
        r=rank,
        lora_alpha=alpha,
        lora_dropout=dropout,
        init_lora_weights="gaussian",
        target_modules=list(target_modules),
    )
    unet.add_adapter(config, adapter_name=adapter_name)
    params = [p for name, p in unet.named_parameters() if "lora_" in name and f".{adapter_name}." in name]
    for p in params:
        p.requires_grad_(True)
    return params


def _lora_config(model: nn.Module, adapter_name: str) -> LoraConfig:
    configs = getattr(model, "peft_config", None) or {}
    if adapter_name not in configs:
        raise ValueError(f"the model has no LoRA adapter {adapter_name!r}; add one with add_unet_lora first")
    return configs[adapter_name]


def lora_state_dict(model: nn.Module, adapter_name: str = "default") -> dict[str, Tensor]:
    """The adapter's weights only (peft's ``get_peft_model_state_dict``), keys without the adapter name."""
    _lora_config(model, adapter_name)
    return get_peft_model_state_dict(model, adapter_name=adapter_name)


def save_lora(model: nn.Module, path: str | os.PathLike, adapter_name: str = "default") -> Path:
    """Write only the adapter to a safetensors file, atomically (temporary file + ``os.replace``).

    The LoRA config (rank, alpha, targets, dropout) goes into the file's metadata so :func:`load_lora`
    can add the adapter to a fresh model.
    """
    config = _lora_config(model, adapter_name)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in lora_state_dict(model, adapter_name).items()}
    metadata = {
        LORA_METADATA_KEY: json.dumps(
            {
                "rank": int(config.r),
                "alpha": float(config.lora_alpha),
                "target_modules": sorted(config.target_modules),
                "dropout": float(config.lora_dropout),
            }
        )
    }
    return atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def load_lora(model: nn.Module, path: str | os.PathLike, adapter_name: str = "default") -> None:
    """Load an adapter written by :func:`save_lora`, adding it to the model first when it is absent."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"LoRA file {path} does not exist")
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata() or {}
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    if LORA_METADATA_KEY not in metadata:
        raise ValueError(f"{path} has no '{LORA_METADATA_KEY}' metadata: it was not written by save_lora")
    saved = json.loads(metadata[LORA_METADATA_KEY])
    configs = getattr(model, "peft_config", None) or {}
    if adapter_name not in configs:
        add_unet_lora(
            model,
            rank=saved["rank"],
            alpha=saved["alpha"],
            target_modules=saved["target_modules"],
            dropout=saved["dropout"],
            adapter_name=adapter_name,
        )
    elif int(configs[adapter_name].r) != saved["rank"]:
        raise ValueError(
            f"{path} holds a rank-{saved['rank']} adapter but the model's adapter {adapter_name!r} has rank "
            f"{configs[adapter_name].r}"
        )
    result = set_peft_model_state_dict(model, tensors, adapter_name=adapter_name)
    missing = [k for k in result.missing_keys if "lora_" in k and f".{adapter_name}." in k]
    if result.unexpected_keys or missing:
        raise ValueError(
            f"{path} does not match the model's adapter {adapter_name!r}: "
            f"unexpected {list(result.unexpected_keys)[:3]}, missing {missing[:3]}"
        )


@contextmanager
def merged_lora(model: nn.Module) -> Iterator[int]:
    """Fold every LoRA adapter of ``model`` into its base weight for the duration of the block (inference).

    Inside, each adapted layer computes ``(W + s B A) x`` in one matmul instead of ``W x + s B (A x)``:
    the delta is formed in float32 and stored in the base weight's dtype, and the layer is marked merged
    (peft's ``merged_adapters``), so it runs its base layer only. On exit the original base weight tensors
    are put back untouched -- bit-exact, unlike subtracting the delta again in a low precision -- and the
    adapters are live again, so training and :func:`save_lora` / checkpoints always see the unmerged state.
    Yields the number of merged layers (0 for a model without adapters).
    """
    layers = [
        (layer, adapter)
        for layer in model.modules()
        if isinstance(layer, LoraLayer) and not layer.merged
        for adapter in layer.active_adapters
        if adapter in layer.lora_A
    ]
    saved: list[tuple[LoraLayer, str, nn.Module, Tensor]] = []
    try:
        with torch.no_grad():
            for layer, adapter in layers:
                base = layer.get_base_layer()
                original = base.weight.data
                delta = layer.get_delta_weight(adapter).to(device=original.device, dtype=torch.float32)
                base.weight.data = (original.float() + delta).to(original.dtype)
                layer.merged_adapters.append(adapter)
                saved.append((layer, adapter, base, original))
        yield len(saved)
    finally:
        for layer, adapter, base, original in reversed(saved):
            base.weight.data = original
            layer.merged_adapters.remove(adapter)


# ============================================================================ textual inversion
class TrainableTokenEmbedding(nn.Module):
    """A token embedding whose base matrix is frozen and whose new tokens are a separate parameter.

    ``forward(input_ids)`` looks ids up in the frozen ``base`` :class:`~torch.nn.Embedding` and splices
    in the rows of ``new_embeddings`` (``[K, D]``, trainable) wherever an id is one of ``token_ids``.
    Only ``new_embeddings`` can change under any optimiser (weight decay and Adam moments included),
    so every other weight stays bit-identical: the textual-inversion guarantee of ADP sec. III-C.

    Add every token (:meth:`add_token`) before building the optimiser: each addition replaces the
    ``new_embeddings`` parameter by a larger one.
    """

    def __init__(self, base: nn.Embedding) -> None:
        super().__init__()
        self.base = base
        self.base.requires_grad_(False)
        self.register_buffer("token_ids", torch.zeros(0, dtype=torch.long, device=base.weight.device))
        self.new_embeddings = nn.Parameter(base.weight.new_zeros(0, base.embedding_dim))

    @property
    def embedding_dim(self) -> int:
        return self.base.embedding_dim

    @property
    def num_embeddings(self) -> int:
        """Size of the id space: the base vocabulary or one past the largest new id."""
        largest = int(self.token_ids.max()) + 1 if self.token_ids.numel() else 0
        return max(self.base.num_embeddings, largest)

    def add_token(self, token_id: int, initial_embedding: Tensor) -> None:
        """Register ``token_id`` with a trainable embedding initialised to ``initial_embedding`` ``[D]``."""
        if token_id in self.token_ids.tolist():
            raise ValueError(f"token id {token_id} already has a trainable embedding")
        if initial_embedding.shape != (self.embedding_dim,):
            raise ValueError(
                f"initial_embedding must be [{self.embedding_dim}], got {tuple(initial_embedding.shape)}"
            )
        row = initial_embedding.detach().to(self.new_embeddings).unsqueeze(0)
        self.token_ids = torch.cat([self.token_ids, self.token_ids.new_tensor([token_id])])
        self.new_embeddings = nn.Parameter(torch.cat([self.new_embeddings.detach(), row]))

    def embedding_of(self, token_id: int) -> Tensor:
        """The current (learned) embedding ``[D]`` of a new token."""
        matches = (self.token_ids == token_id).nonzero()
        if matches.numel() == 0:
            raise ValueError(f"token id {token_id} has no trainable embedding")
        return self.new_embeddings[int(matches[0, 0])]

    def forward(self, input_ids: Tensor) -> Tensor:
        vocab = self.base.num_embeddings
        match = input_ids.unsqueeze(-1) == self.token_ids  # [..., K]
        is_new = match.any(dim=-1)
        unknown = (input_ids >= vocab) & ~is_new
        if unknown.any():
            raise ValueError(
                f"token id {int(input_ids[unknown][0])} is outside the vocabulary ({vocab}) "
                "and is no added token"
            )
        embeds = self.base(torch.where(is_new, torch.zeros_like(input_ids), input_ids))
        if self.token_ids.numel() == 0 or not is_new.any():
            return embeds
        spliced = match.to(self.new_embeddings.dtype) @ self.new_embeddings  # [..., D]
        return torch.where(is_new.unsqueeze(-1), spliced.to(embeds.dtype), embeds)


def add_token(
    tokenizer: CLIPTokenizer,
    text_encoder: CLIPTextModel,
    token: str = "<fsad-concept>",
    initializer_token: str = "object",
) -> int:
    """Add a pseudo-word to the tokenizer with a trainable embedding; returns its token id.

    Textual inversion (ADP sec. III-C, IV): the new token's embedding ``v`` starts at the embedding of
    ``initializer_token`` (ADP: ``"object"``) and is the only thing optimised. The text encoder's
    token embedding becomes a :class:`TrainableTokenEmbedding` (installed on the first call), whose
    ``new_embeddings`` parameter holds every added token.
    """
    if token in tokenizer.get_vocab():
        raise ValueError(
            f"token {token!r} is already in the tokenizer's vocabulary; choose a new pseudo-word"
        )
    if token != token.lower():
        raise ValueError(f"token {token!r} must be lower case: the CLIP tokenizer lower-cases prompts")
    init_ids = tokenizer(initializer_token, add_special_tokens=False).input_ids
    if len(init_ids) != 1:
        raise ValueError(
            f"initializer_token {initializer_token!r} must be a single token, "
            f"it encodes to {len(init_ids)} tokens"
        )
    tokenizer.add_tokens([token])
    token_id = int(tokenizer.convert_tokens_to_ids(token))
    if tokenizer(f"a {token}", add_special_tokens=False).input_ids[-1:] != [token_id]:
        raise ValueError(
            f"token {token!r} does not tokenize to a single new id; use a form like '<my-concept>'"
        )
    embeddings = text_encoder.get_input_embeddings()
    if not isinstance(embeddings, TrainableTokenEmbedding):
        embeddings = TrainableTokenEmbedding(embeddings)
        text_encoder.set_input_embeddings(embeddings)
    embeddings.add_token(token_id, embeddings.base.weight[init_ids[0]])
    return token_id
