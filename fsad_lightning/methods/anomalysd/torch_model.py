"""AnomalySD (Yan et al., "AnomalySD: Few-Shot Multi-Class Anomaly Detection with Stable Diffusion Model")
as a plain ``nn.Module``: :class:`AnomalySDModel`.

Equation -> code:

- eq. 7-8, the inpainting fine-tune ``L = E ||eps - eps_theta([z_t; z°; m~], t, tau(y))||^2``:
  :meth:`AnomalySDModel.inpainting_loss` (training masks: :func:`~.masks.sample_training_masks` on the
  foreground of :func:`~.masks.foreground_mask`; prompts drawn from ``T_c``).
- eq. 9-10, the decoder fine-tune ``L_D = L_MSE + beta L_LPIPS``: :meth:`AnomalySDModel.decoder_loss`
  with :class:`~fsad_lightning.backbones.perceptual.PerceptualDistance`.
- eq. 11, inpainting from ``z_T~`` with ``T~ = lambda T``:
  :meth:`~fsad_lightning.backbones.diffusion.StableDiffusion.inpaint` with ``strength = lambda`` and the
  query's latents ``z = E(x)`` encoded once (``image_latents``).
- eq. 12-13, ``psi(x)`` and the rotated prototype bank ``P_c``: :meth:`AnomalySDModel.prototype_features`,
  :meth:`AnomalySDModel.build_prototype_banks`.
- eq. 14-15, error map and threshold: :meth:`AnomalySDModel.error_maps`, :func:`~.masks.prototype_masks`.
- eq. 16-17, the LPIPS-style distance map: :meth:`PerceptualDistance.distance_map`.
- eq. 18-21: :func:`accumulate_scale_maps` (eq. 18, chunk by chunk),
  :func:`multiscale_score` (eq. 19, harmonic mean), ``S_pg`` (eq. 20), :func:`fuse_scores` (eq. 21).

Inference batching: every query needs ``sum k^2`` (85 for ``k in {1, 2, 4, 8}``) inpaintings plus one with
its prototype-guided mask. All of them, for every query of the batch, go through the diffusion model in
chunks of ``inpaint_batch_size`` masked images; each reuses its query's encoded latents and reference
AlexNet features, and each draws its noise from its own generator seeded by (seed, query path, mask), so
the scores do not depend on the batch size or the chunking.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fsad_lightning.backbones.cnn import CNNFeaturePyramid
from fsad_lightning.backbones.diffusion import (
    StableDiffusion,
    add_unet_lora,
    cast_frozen_parameters,
    merged_lora,
    noise_prediction_loss,
    resolve_dtype,
    set_gradient_checkpointing,
)
from fsad_lightning.backbones.perceptual import PerceptualDistance
from fsad_lightning.backbones.sampling import resize_images
from fsad_lightning.cache import image_seed
from fsad_lightning.class_names import object_name
from fsad_lightning.methods.anomalysd.masks import (
    THRESHOLD_RULES,
    foreground_mask,
    multiscale_masks,
    prototype_masks,
    sample_training_masks,
)
from fsad_lightning.prompts import ANOMALYSD_SIMPLE_PROMPT, anomalysd_prompts
from fsad_lightning.scoring import (
    DEFAULT_CHUNK,
    full_precision,
    harmonic_mean,
    min_euclidean_distance,
    upsample_and_smooth,
)
from fsad_lightning.timing import timed_stage
from fsad_lightning.validation import require_fractions, require_integers

UNetFineTune = Literal["lora", "full", "none"]
DecoderFineTune = Literal["full", "lora", "none"]
PromptMode = Literal["hierarchical", "simple", "none"]


# ============================================================================ small helpers
def rotate_images(images: Tensor, degrees: float) -> Tensor:
    """Rotate ``[B, 3, H, W]`` images counter-clockwise: exactly (``torch.rot90``) for multiples of 90
    degrees, else with kornia (bilinear, reflection padding)."""
    if float(degrees) % 90 == 0:
        return torch.rot90(images, k=int(float(degrees) // 90) % 4, dims=(2, 3))
    from kornia.geometry.transform import rotate

    angle = torch.full((images.shape[0],), float(degrees), device=images.device, dtype=images.dtype)
    return rotate(images, angle, padding_mode="reflection")


def mask_seed(seed: int, query_key: int, mask_index: int) -> int:
    """The noise seed of one inpainting: :func:`~fsad_lightning.cache.image_seed` of the run seed and a key
    mixing the query (:func:`~fsad_lightning.backbones.sampling.path_key`) and the mask."""
    return image_seed(seed, int(query_key) * 1_009 + int(mask_index))


def resolve_prompts(
    category: str,
    mode: PromptMode = "hierarchical",
    custom: dict[str, Sequence[str]] | None = None,
    class_names: dict[str, str] | None = None,
) -> list[str]:
    """The prompt set ``T_c`` of a category.

    ``mode``: ``"hierarchical"`` (§4.1: ``custom[category]`` when given, else the built-in
    :func:`~fsad_lightning.prompts.anomalysd_prompts`), ``"simple"`` ("A photo of [c].", Table 4) or
    ``"none"`` (the empty prompt, Table 4). ``class_names`` maps a category to its object name ``[c]``.
    """
    if mode not in ("hierarchical", "simple", "none"):
        raise ValueError(f"prompt_mode must be 'hierarchical', 'simple' or 'none', got {mode!r}")
    if mode == "none":
        return [""]
    name = (class_names or {}).get(category)
    if mode == "simple":
        return [ANOMALYSD_SIMPLE_PROMPT.format(object_name(category, class_names))]
    if custom and category in custom:
        prompts = [str(p) for p in custom[category]]
        if not prompts or any(not p.strip() for p in prompts):
            raise ValueError(f"prompts for category {category!r} must be a non-empty list of non-empty strings")
        return prompts
    return anomalysd_prompts(category, class_name=name)


# ============================================================================ score maps (eq. 18-21)
def accumulate_scale_maps(
    scale_maps: Tensor, queries: Tensor, scale_of_mask: Tensor, masked_distances: Tensor
) -> Tensor:
    """Eq. 18, ``S^(k) = sum_{i,j} M^(k)_{i,j} ⊙ D(x, x^(k)_{i,j})``, accumulated in place for a chunk of
    proposals: ``masked_distances[n] = M_n ⊙ D_n`` (``[N, H, W]``) is added to
    ``scale_maps[queries[n], scale_of_mask[n]]`` (``scale_maps``: ``[B, K, H, W]``). Returns ``scale_maps``."""
    return scale_maps.index_put_((queries, scale_of_mask), masked_distances, accumulate=True)


def multiscale_score(scale_maps: Tensor) -> Tensor:
    """Eq. 19: ``S_ms = |K| (sum_k 1 / S^(k))^-1``, the harmonic mean over scales (dim 1 of
    ``[B, K, H, W]``); a zero at any scale gives 0 (:func:`~fsad_lightning.scoring.harmonic_mean`)."""
    return harmonic_mean(list(scale_maps.unbind(1)))


@full_precision
def fuse_scores(s_ms: Tensor | None, s_pg: Tensor | None, alpha: float) -> Tensor:
    """Eq. 21: ``S_map = (1 - alpha) S_ms + alpha S_pg``; a branch that is off leaves the other alone."""
    if s_ms is None and s_pg is None:
        raise ValueError("at least one of the multi-scale and prototype-guided maps is needed")
    if s_pg is None:
        return s_ms
    if s_ms is None:
        return s_pg
    return (1.0 - alpha) * s_ms + alpha * s_pg


@dataclass
class AnomalySDOutput:
    """What :meth:`AnomalySDModel.forward` computes for a batch.

    ``pred_score`` ``[B]`` (max of the smoothed map); ``anomaly_map`` ``[B, H, W]`` at the input size
    (eq. 21, blurred); at the working resolution: ``scale_maps`` ``[B, K, R, R]`` (eq. 18), ``s_ms``
    (eq. 19), ``s_pg`` (eq. 20) ``[B, R, R]`` and ``prototype_mask`` ``[B, 1, R, R]`` (eq. 15), ``None``
    for a branch that is off.
    """

    pred_score: Tensor
    anomaly_map: Tensor
    scale_maps: Tensor | None = None
    s_ms: Tensor | None = None
    s_pg: Tensor | None = None
    prototype_mask: Tensor | None = None


# ============================================================================ the model
class AnomalySDModel(nn.Module):
    """The AnomalySD detector on given backbones (built by
    :class:`~fsad_lightning.methods.anomalysd.module.InpaintFinetuneModule`, which documents every option).

    Args:
        diffusion: the inpainting Stable Diffusion (9-channel UNet), frozen; adapters are added here.
        perceptual: the LPIPS-AlexNet distance (eq. 10, 16-17).
        prototype_encoder: the EfficientNet pyramid of eq. 12 (stages 2 and 3), ``None`` without the
            prototype-guided mask.
        resolution: side at which SD fine-tunes and inpaints, and the maps are computed (512).
        unet_finetune / decoder_finetune: what eq. 8 / eq. 9 train (``"none"``: frozen).
        noise_strength: ``lambda`` of eq. 11; ``noise_strength_per_category`` overrides it per category.
        scales: the grid sizes ``K`` of the multi-scale proposals (empty: no multi-scale branch).
        use_prototype_mask: the prototype-guided branch (eq. 12-15, 20).
    """

    def __init__(
        self,
        diffusion: StableDiffusion,
        perceptual: PerceptualDistance,
        prototype_encoder: CNNFeaturePyramid | None,
        *,
        resolution: int = 512,
        unet_finetune: UNetFineTune = "full",
        lora_rank: int = 8,
        lora_alpha: float = 8.0,
        decoder_finetune: DecoderFineTune = "full",
        decoder_lora_rank: int = 8,
        gradient_checkpointing: bool = False,
        lpips_weight: float = 0.1,
        iou_thresholds: Sequence[float] = (0.0, 0.2, 0.5),
        min_mask_fraction: float = 0.125,
        use_foreground: bool = True,
        prompt_mode: PromptMode = "hierarchical",
        prompts: dict[str, Sequence[str]] | None = None,
        class_names: dict[str, str] | None = None,
        noise_strength: float = 0.4,
        noise_strength_per_category: dict[str, float] | None = None,
        num_inference_steps: int = 50,
        guidance_scale: float = 1.0,
        scales: Sequence[int] = (1, 2, 4, 8),
        inpaint_batch_size: int = 32,
        vae_batch_size: int | None = 8,
        compile_unet: bool = False,
        paste_back: bool = False,
        use_prototype_mask: bool = True,
        threshold_rule: str = "otsu",
        prototype_rotations: Sequence[float] = (0, 90, 180, 270),
        alpha: float = 0.1,
        sigma: float = 4.0,
        seed: int = 0,
        chunk_size: int = DEFAULT_CHUNK,
    ) -> None:
        super().__init__()
        if not diffusion.is_inpainting:
            raise ValueError(
                f"AnomalySD needs an inpainting Stable Diffusion (9-channel UNet); '{diffusion.name_or_path}' "
                "is not one"
            )
        if unet_finetune not in ("lora", "full", "none"):
            raise ValueError(f"unet_finetune must be 'lora', 'full' or 'none', got {unet_finetune!r}")
        if decoder_finetune not in ("full", "lora", "none"):
            raise ValueError(f"decoder_finetune must be 'full', 'lora' or 'none', got {decoder_finetune!r}")
        scale_factor = diffusion.vae_scale_factor
        if resolution % scale_factor or resolution < 32:
            raise ValueError(
                f"resolution must be >= 32 and a multiple of the VAE scale factor {scale_factor}, got {resolution}"
            )
        scales = [int(k) for k in scales]
        if len(set(scales)) != len(scales) or any(k < 1 or k > resolution for k in scales):
            raise ValueError(f"scales must be distinct grid sizes between 1 and the resolution, got {scales}")
        if not scales and not use_prototype_mask:
            raise ValueError("no mask left: give scales or turn the prototype-guided mask on")
        if threshold_rule not in THRESHOLD_RULES:
            raise ValueError(f"threshold_rule must be one of {list(THRESHOLD_RULES)}, got {threshold_rule!r}")
        if use_prototype_mask and prototype_encoder is None:
            raise ValueError("the prototype-guided mask needs a prototype encoder (EfficientNet)")
        strengths = {"noise_strength": noise_strength, **(noise_strength_per_category or {})}
        require_fractions(alpha=alpha, **{f"noise strength {name}": float(value) for name, value in strengths.items()})
        require_integers(num_inference_steps=num_inference_steps, inpaint_batch_size=inpaint_batch_size)
        if lpips_weight < 0:
            raise ValueError(f"lpips_weight must be >= 0, got {lpips_weight}")
        if len(prototype_rotations) == 0:
            raise ValueError("prototype_rotations must list at least one angle (0 = the shot itself)")
        resolve_prompts("probe", prompt_mode)  # validates the mode now

        self.diffusion = diffusion
        self.perceptual = perceptual
        self.prototype_encoder = prototype_encoder
        self.resolution = int(resolution)
        self.unet_finetune = unet_finetune
        self.decoder_finetune = decoder_finetune
        self.lpips_weight = float(lpips_weight)
        self.iou_thresholds = [float(g) for g in iou_thresholds]
        self.min_mask_fraction = float(min_mask_fraction)
        self.use_foreground = bool(use_foreground)
        self.prompt_mode = prompt_mode
        self.custom_prompts = {str(k): list(v) for k, v in (prompts or {}).items()}
        self.class_names = dict(class_names or {})
        self.noise_strength = float(noise_strength)
        self.noise_strength_per_category = {str(k): float(v) for k, v in (noise_strength_per_category or {}).items()}
        self.num_inference_steps = int(num_inference_steps)
        self.guidance_scale = float(guidance_scale)
        self.scales = scales
        self.inpaint_batch_size = int(inpaint_batch_size)
        self.paste_back = bool(paste_back)
        self.use_prototype_mask = bool(use_prototype_mask)
        self.threshold_rule = threshold_rule
        self.prototype_rotations = [float(a) for a in prototype_rotations]
        self.alpha = float(alpha)
        self.sigma = float(sigma)
        self.seed = int(seed)
        self.chunk_size = int(chunk_size)

        # §4.1: the denoising network and the VAE decoder learn; text encoder, VAE encoder, AlexNet and
        # EfficientNet stay frozen. Trainable weights are float32 whatever the frozen weights' dtype.
        unet = diffusion.unet
        if unet_finetune == "lora":
            for param in add_unet_lora(unet, rank=lora_rank, alpha=lora_alpha):
                param.data = param.data.float()
            # conv_in reads the mask and the masked-image latents ([z_t; m; z°]): it learns whole (~26 k
            # weights for SD 1.5), the attention projections through their adapters
            unet.conv_in.float().requires_grad_(True)
        elif unet_finetune == "full":
            unet.float().requires_grad_(True)
        vae = diffusion.vae
        if decoder_finetune == "full":
            vae.float()  # one dtype for the whole VAE: decode_latents casts to it
            vae.decoder.requires_grad_(True)
            vae.post_quant_conv.requires_grad_(True)
        elif decoder_finetune == "lora":
            targets = [
                name
                for name, module in vae.named_modules()
                if (name.startswith("decoder.") or name == "post_quant_conv")
                and isinstance(module, (nn.Conv2d, nn.Linear))
            ]
            for param in add_unet_lora(vae, rank=decoder_lora_rank, alpha=float(decoder_lora_rank), target_modules=targets):
                param.data = param.data.float()
        if gradient_checkpointing:
            if unet_finetune != "none":
                set_gradient_checkpointing(unet, True)
            if decoder_finetune != "none":
                set_gradient_checkpointing(vae, True)

        diffusion.set_vae_batch_size(vae_batch_size)
        if compile_unet:
            diffusion.compile_unet()
        #: the dtype the SD networks compute in (:meth:`set_compute_dtype`); float32 until told otherwise
        self.compute_dtype = torch.float32

        #: per-category prompt embeddings ``[T, L, D]`` of ``T_c`` (derived, never in a checkpoint)
        self.prompt_embeds: dict[str, Tensor] = {}
        #: per-category prototype banks ``P_c`` ``[M, C]`` (eq. 13; derived, never in a checkpoint)
        self.prototype_banks: dict[str, Tensor] = {}

    # ------------------------------------------------------------------ precision
    def set_compute_dtype(self, dtype: str | torch.dtype) -> None:
        """Compute the SD networks in ``dtype``: every frozen weight of the UNet, the VAE and the text
        encoder is cast to it once (so no op re-casts it per call), while learned weights (LoRA adapters,
        ``conv_in``, a fine-tuned UNet or decoder) stay float32 and the networks run under autocast to
        ``dtype`` (:meth:`autocast`). The AlexNet of the distances and the EfficientNet of eq. 12 keep
        their float32 weights: every score and distance is computed in float32."""
        dtype = resolve_dtype(dtype)
        if dtype != self.compute_dtype:
            self.prompt_embeds = {}  # derived from the text encoder: encoded again in the new precision
        for network in (self.diffusion.unet, self.diffusion.vae, self.diffusion.text_encoder):
            cast_frozen_parameters(network, dtype)
        self.compute_dtype = dtype

    def autocast(self) -> contextlib.AbstractContextManager:
        """Autocast to :attr:`compute_dtype` on the diffusion model's device (nothing for float32): the
        frozen low-precision weights and the float32 learned ones then meet in ``compute_dtype``."""
        if self.compute_dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.diffusion.device.type, dtype=self.compute_dtype)

    # ------------------------------------------------------------------ parameters and modes
    def unet_parameters(self) -> list[nn.Parameter]:
        """What eq. 8 optimises: every UNet weight (``full``), or the UNet's LoRA adapters and ``conv_in``
        (``lora``)."""
        return [p for p in self.diffusion.unet.parameters() if p.requires_grad]

    def decoder_parameters(self) -> list[nn.Parameter]:
        """What eq. 9 optimises: the VAE decoder (and ``post_quant_conv``), or its LoRA adapters."""
        return [p for p in self.diffusion.vae.parameters() if p.requires_grad]

    def train(self, mode: bool = True) -> AnomalySDModel:
        """Only the trained parts follow ``mode``; every frozen network stays in eval mode."""
        super().train(False)
        if self.unet_finetune != "none":
            self.diffusion.unet.train(mode)
        if self.decoder_finetune != "none":
            self.diffusion.vae.decoder.train(mode)
        return self

    # ------------------------------------------------------------------ prompts
    def prompts_for(self, category: str) -> list[str]:
        """``T_c`` under the configured prompt mode (see :func:`resolve_prompts`)."""
        return resolve_prompts(category, self.prompt_mode, self.custom_prompts, self.class_names)

    @torch.no_grad()
    def prepare_prompts(self, categories: Sequence[str]) -> None:
        """Encode ``T_c`` of every category not encoded yet (the text encoder is frozen)."""
        for category in dict.fromkeys(str(c) for c in categories):
            if category not in self.prompt_embeds:
                with self.autocast():
                    self.prompt_embeds[category] = self.diffusion.encode_prompt(self.prompts_for(category))

    def _embeds(self, category: str) -> Tensor:
        if category not in self.prompt_embeds:
            raise RuntimeError(f"no prompts encoded for category {category!r}: call prepare_prompts first")
        return self.prompt_embeds[category]

    def condition_embeds(self, categories: Sequence[str]) -> Tensor:
        """§4.2 "Aggregation of Hierarchical Prompts": ``Avg({tau(y) | y in T_c})`` per image, ``[B, L, D]``."""
        return torch.cat([self._embeds(str(c)).mean(dim=0, keepdim=True) for c in categories])

    def sample_prompt_embeds(self, categories: Sequence[str], generator: torch.Generator | None) -> Tensor:
        """§4.1: one prompt ``y`` drawn uniformly from ``T_c`` per image, ``[B, L, D]``."""
        rows = []
        for category in categories:
            embeds = self._embeds(str(category))
            pick = int(torch.randint(0, embeds.shape[0], (1,), generator=generator))
            rows.append(embeds[pick : pick + 1])
        return torch.cat(rows)

    def noise_strength_for(self, category: str) -> float:
        """``lambda`` of eq. 11 for a category (the paper tunes it per category)."""
        return self.noise_strength_per_category.get(str(category), self.noise_strength)

    # ------------------------------------------------------------------ fine-tuning (§4.1)
    def training_masks(self, images: Tensor, generator: torch.Generator | None) -> Tensor:
        """§4.1 training masks: random rectangles with ``IoU(m_r, m_f) > gamma``, ``gamma`` drawn from
        :attr:`iou_thresholds`; ``m_f`` = :func:`~.masks.foreground_mask` (the whole image with
        ``use_foreground=False``)."""
        foreground = foreground_mask(images) if self.use_foreground else torch.ones_like(images[:, :1])
        masks, _ = sample_training_masks(foreground, self.iou_thresholds, generator, self.min_mask_fraction)
        return masks

    def inpainting_loss(
        self, images: Tensor, categories: Sequence[str], generator: torch.Generator | None = None
    ) -> Tensor:
        """Eq. 7-8 on a batch of (augmented) shots ``[B, 3, H, W]`` in ``[0, 1]``: ``z = E(x)`` (a posterior
        sample), ``z° = E((1 - m) ⊙ x)``, ``z_t`` by eq. 7 and the noise-prediction loss on the UNet input
        ``[z_t; m~; z°]`` (the inpainting UNets' own channel order) with a prompt drawn from ``T_c``."""
        diffusion = self.diffusion
        x = resize_images(images.to(diffusion.device), self.resolution, mode="bilinear")
        masks = self.training_masks(x, generator)
        context = self.sample_prompt_embeds(categories, generator)
        with self.autocast():
            with torch.no_grad():
                latents = diffusion.encode_images(x, generator=generator, sample=True)
                condition = diffusion.inpaint_conditioning(x, masks)
            dtype = diffusion.dtype
            return noise_prediction_loss(
                diffusion.unet,
                diffusion.training_scheduler,
                latents.to(dtype),
                context.to(dtype),
                generator=generator,
                extra_unet_channels=condition.to(dtype),
            )

    def decode_for_training(self, latents: Tensor) -> Tensor:
        """``D(z)`` in ``[-1, 1]`` with gradients to the decoder (no clamping)."""
        vae = self.diffusion.vae
        shift = getattr(vae.config, "shift_factor", None) or 0.0
        dtype = vae.post_quant_conv.weight.dtype
        return vae.decode((latents / vae.config.scaling_factor + shift).to(dtype)).sample.float()

    def decoder_loss(self, images: Tensor, generator: torch.Generator | None = None) -> dict[str, Tensor]:
        """Eq. 9-10: ``L_D = ||x - D(E(x))||^2 + beta L_LPIPS(x, D(E(x)))`` with ``beta = lpips_weight``
        (0.1). The encoder is frozen, so ``x^ = D(E(x))`` is the decoder's reconstruction of the shot; the
        MSE is over pixels in ``[-1, 1]`` (the VAE's pixel range). Returns ``loss``, ``mse``, ``lpips``."""
        diffusion = self.diffusion
        x = resize_images(images.to(diffusion.device), self.resolution, mode="bilinear")
        with self.autocast():
            with torch.no_grad():
                latents = diffusion.encode_images(x, generator=generator, sample=True)
            pixels = self.decode_for_training(latents)
        mse = F.mse_loss(pixels, x * 2.0 - 1.0)
        lpips = self.perceptual(pixels / 2.0 + 0.5, x).mean()
        return {"loss": mse + self.lpips_weight * lpips, "mse": mse.detach(), "lpips": lpips.detach()}

    # ------------------------------------------------------------------ prototype-guided mask (eq. 12-15)
    def prototype_features(self, images: Tensor) -> Tensor:
        """Eq. 12: ``psi(x) = [phi^(2)(x); Upsample(phi^(3)(x))]`` as ``[B, h, w, C]`` (bilinear upsampling
        of the stride-16 stage to the stride-8 grid)."""
        if self.prototype_encoder is None:
            raise RuntimeError("the prototype-guided mask is off: there is no prototype encoder")
        stage2, stage3 = self.prototype_encoder(images)[:2]
        stage3 = F.interpolate(stage3.float(), size=stage2.shape[-2:], mode="bilinear", align_corners=False)
        return torch.cat([stage2.float(), stage3], dim=1).permute(0, 2, 3, 1)

    @torch.no_grad()
    def build_prototype_banks(self, images: Tensor, categories: Sequence[str]) -> None:
        """Eq. 13: ``P_c`` = every position of ``psi(Aug(x))`` for the shots ``x`` of category ``c`` and every
        rotation in :attr:`prototype_rotations`; one bank per category."""
        x = resize_images(images.to(self.diffusion.device), self.resolution, mode="bilinear")
        categories = [str(c) for c in categories]
        banks = {}
        for category in dict.fromkeys(categories):
            shots = x[[i for i, c in enumerate(categories) if c == category]]
            rows = []
            for degrees in self.prototype_rotations:
                with self.autocast():  # the precision the queries' features are computed in (forward)
                    features = self.prototype_features(rotate_images(shots, degrees))
                rows.append(features.reshape(-1, features.shape[-1]))
            banks[category] = torch.cat(rows)
        self.prototype_banks = banks

    @torch.no_grad()
    def error_maps(self, images: Tensor, categories: Sequence[str]) -> Tensor:
        """Eq. 14: ``E_{h,w} = min_{f in P_c} ||psi(x)_{h,w} - f||^2`` for images at the working resolution,
        ``[B, h, w]``."""
        features = self.prototype_features(images)
        out = features.new_zeros(features.shape[:3])
        categories = [str(c) for c in categories]
        for category in dict.fromkeys(categories):
            if category not in self.prototype_banks:
                raise RuntimeError(f"no prototype bank for category {category!r}: fit the shots first")
            rows = [i for i, c in enumerate(categories) if c == category]
            distance = min_euclidean_distance(features[rows], self.prototype_banks[category], self.chunk_size)
            out[rows] = distance**2
        return out

    # ------------------------------------------------------------------ inference (§4.2-4.3)
    def inpaintings_per_query(self) -> int:
        """Masked images inpainted per query: ``sum k^2`` plus one prototype-guided mask."""
        return sum(k * k for k in self.scales) + int(self.use_prototype_mask)

    def network_calls_per_query(self, batch_size: int = 1, strength: float | None = None) -> dict[str, float]:
        """Images through each SD network per query in a batch of ``batch_size`` queries at noise strength
        ``strength`` (default :attr:`noise_strength`), for a prototype-guided mask that covers part of the
        image: ``unet_passes`` (inpaintings x denoising steps, x 2 with classifier-free guidance),
        ``vae_encodes`` (``E(x)``, one per mask that leaves part of the query visible, and ``E(grey)`` once
        per batch for the k = 1 mask) and ``vae_decodes`` (one per inpainting)."""
        strength = self.noise_strength if strength is None else float(strength)
        steps = len(self.diffusion.inpaint_timesteps(self.num_inference_steps, strength))
        inpaintings = self.inpaintings_per_query()
        full_masks = int(1 in self.scales)
        return {
            "unet_passes": float(inpaintings * steps * (2 if self.guidance_scale > 1.0 else 1)),
            "vae_encodes": 1.0 + (inpaintings - full_masks) + full_masks / batch_size,
            "vae_decodes": float(inpaintings),
        }

    @torch.no_grad()
    def forward(
        self,
        images: Tensor,
        categories: Sequence[str],
        keys: Sequence[int],
        timings: dict[str, float] | None = None,
    ) -> AnomalySDOutput:
        """Score a batch: images ``[B, 3, H, W]`` in ``[0, 1]``, their categories and per-query noise keys
        (:func:`~fsad_lightning.backbones.sampling.path_key` of the paths). ``timings``, when given, receives
        the seconds of each stage.

        The SD networks run under :meth:`autocast` with every LoRA adapter merged into its base weight
        (:func:`~fsad_lightning.backbones.diffusion.merged_lora`, undone on return)."""
        categories = [str(c) for c in categories]
        if len(categories) != images.shape[0] or len(keys) != images.shape[0]:
            raise ValueError("one category and one key per image are needed")
        self.prepare_prompts(categories)
        with self.autocast(), merged_lora(self.diffusion.unet), merged_lora(self.diffusion.vae):
            return self._score_batch(images, categories, keys, timings)

    def _score_batch(
        self, images: Tensor, categories: list[str], keys: Sequence[int], timings: dict[str, float] | None
    ) -> AnomalySDOutput:
        diffusion = self.diffusion
        device = diffusion.device
        out_size = tuple(images.shape[-2:])
        size = self.resolution
        batch = images.shape[0]

        with timed_stage(timings, "encode", device):
            x = resize_images(images.to(device), size, mode="bilinear")
            latents = diffusion.encode_images(x)  # z = E(x), reused by every mask of the query (eq. 11)
            with torch.autocast(device.type, enabled=False):  # eq. 16 in float32, as for the inpaintings
                reference = self.perceptual.features(x)  # phi(x) of eq. 16, reused likewise
            conditions = self.condition_embeds(categories)
        proposals, scale_index = multiscale_masks(size, size, self.scales)
        proposals, scale_index = proposals.to(device), scale_index.to(device)
        num_proposals = proposals.shape[0]
        prototype = None
        if self.use_prototype_mask:
            with timed_stage(timings, "prototype mask", device):
                prototype = prototype_masks(self.error_maps(x, categories), (size, size), self.threshold_rule)

        # every (query, mask) job; mask index num_proposals = the query's prototype-guided mask
        jobs = [(b, m) for b in range(batch) for m in range(num_proposals)]
        if prototype is not None:
            jobs += [(b, num_proposals) for b in range(batch) if prototype[b].any()]
        # a mask covering the whole image (k = 1) leaves a mid-grey masked image whatever the query: its
        # latents E(grey) are encoded once per batch, every other masked image once per job
        covers_all = [bool((proposals[m] if m < num_proposals else prototype[b]).all()) for b, m in jobs]
        grey = None
        if any(covers_all):
            with timed_stage(timings, "encode", device):
                grey = diffusion.grey_latents(size, size)
        strengths = [self.noise_strength_for(c) for c in categories]
        scale_maps = x.new_zeros(batch, len(self.scales), size, size)
        s_pg = x.new_zeros(batch, size, size) if prototype is not None else None
        for strength in sorted(set(strengths)):  # one inpaint call needs one lambda
            group = [job for job in jobs if strengths[job[0]] == strength]
            for start in range(0, len(group), self.inpaint_batch_size):
                chunk = group[start : start + self.inpaint_batch_size]
                query = torch.tensor([b for b, _ in chunk], device=device)
                masks = torch.stack([proposals[m] if m < num_proposals else prototype[b] for b, m in chunk])
                generators = [torch.Generator().manual_seed(mask_seed(self.seed, keys[b], m)) for b, m in chunk]
                with timed_stage(timings, "masked latents", device):
                    masked_latents = diffusion.masked_image_latents(x[query], masks, grey_latents=grey)
                with timed_stage(timings, "inpainting", device):
                    inpainted = diffusion.inpaint(
                        x[query],
                        masks,
                        conditions[query],
                        num_inference_steps=self.num_inference_steps,
                        strength=strength,
                        guidance_scale=self.guidance_scale,
                        generator=generators,
                        image_latents=latents[query],
                        masked_image_latents=masked_latents,
                        paste_back=self.paste_back,
                    )
                with timed_stage(timings, "distances", device):
                    distance = self.perceptual.distance_map(
                        inpainted, size=(size, size), reference_features=[f[query] for f in reference]
                    )  # eq. 16-17
                    weighted = masks[:, 0].float() * distance
                    is_proposal = torch.tensor([m < num_proposals for _, m in chunk], device=device)
                    mask_index = torch.tensor([min(m, num_proposals - 1) for _, m in chunk], device=device)
                    if is_proposal.any():
                        accumulate_scale_maps(  # eq. 18
                            scale_maps,
                            query[is_proposal],
                            scale_index[mask_index[is_proposal]],
                            weighted[is_proposal],
                        )
                    if not is_proposal.all():
                        s_pg[query[~is_proposal]] = weighted[~is_proposal]  # eq. 20

        with timed_stage(timings, "scoring", device):
            s_ms = multiscale_score(scale_maps) if self.scales else None  # eq. 19
            s_map = fuse_scores(s_ms, s_pg, self.alpha)  # eq. 21
            anomaly_map = upsample_and_smooth(s_map, out_size, self.sigma)
            pred_score = anomaly_map.flatten(1).max(dim=1).values
        return AnomalySDOutput(
            pred_score=pred_score,
            anomaly_map=anomaly_map,
            scale_maps=scale_maps if self.scales else None,
            s_ms=s_ms,
            s_pg=s_pg,
            prototype_mask=prototype,
        )
