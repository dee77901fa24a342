"""One-to-Normal (Li et al., NeurIPS 2024) as a plain ``nn.Module``.

Three parts, each a method of :class:`OneToNormalModel`:

1. **Anomaly-free customized model** (§3.2, eq. 1): Stable Diffusion fine-tuned DreamBooth-style on the
   augmented shots paired with "a photo of normal [o]", plus the class-specific prior-preservation
   term on images the *base* model generated for "a photo of [o]" (:meth:`dreambooth_loss`). The UNet
   gets LoRA adapters by default (``finetune="lora"``) or is trained whole (``"full"``); the VAE and
   text encoder stay frozen, as in DreamBooth's LoRA recipe.
2. **One-to-normal personalization** (§3.3, eq. 2-3): :meth:`personalize`, see
   :func:`~fsad_lightning.methods.one_to_normal.personalize.personalize`.
3. **Triplet contrastive inference** (§3.4, eq. 4-7): :meth:`extract` gives multi-level patch features
   (CLIP blocks or a CNN pyramid) and the global CLIP embedding, :meth:`score` combines S_P (query vs.
   its personalized image), S_N (query vs. the memory bank M of the anomaly-free pool) and S_text
   (query vs. WinCLIP's normal / abnormal prompt features), and builds the anomaly map.

Backbones are built by the caller (:mod:`fsad_lightning.methods.one_to_normal.module`) and passed in,
so the same model runs the real SD 1.5 + CLIP ViT-L/14 and the offline tiny twins.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor, nn

from fsad_lightning.backbones.clip import CLIPBackbone
from fsad_lightning.backbones.cnn import CNNFeaturePyramid
from fsad_lightning.backbones.diffusion import StableDiffusion, add_unet_lora, set_gradient_checkpointing
from fsad_lightning.backbones.sampling import SamplingSettings, resize_images
from fsad_lightning.class_names import object_name
from fsad_lightning.methods.one_to_normal.personalize import personalize
from fsad_lightning.methods.one_to_normal.scores import (
    CLIP_LOGIT_SCALE,
    level_averaged_max,
    normal_pool_distance_grids,
    personalized_distance_grids,
    text_score,
    triplet_anomaly_map,
    triplet_score,
)
from fsad_lightning.prompts import (
    ONE_TO_NORMAL_CLASS_PROMPT,
    ONE_TO_NORMAL_INSTANCE_PROMPT,
    WINCLIP_ANOMALOUS_STATES,
    WINCLIP_NORMAL_STATES,
    WINCLIP_TEMPLATES,
    one_to_normal_prompts,
)
from fsad_lightning.scoring import DEFAULT_CHUNK
from fsad_lightning.timing import timed_stage

FineTune = Literal["lora", "full"]
PromptStrategy = Literal["refined", "instance", "none"]


@dataclass
class TripletOutput:
    """Everything :meth:`OneToNormalModel.score` computes for a batch (``None`` for a switched-off branch).

    ``pred_score``: ``[B]`` eq. 7; ``anomaly_map``: ``[B, H, W]`` or ``None`` when both image branches
    are off; ``s_p``, ``s_n``, ``s_text``: ``[B]`` eq. 4, 5, 6; ``personalized``: ``[B, 3, H, W]``
    personalized images and ``prompt_index``: ``[B]`` the prompt eq. 2 chose (when S_P is on).
    """

    pred_score: Tensor
    anomaly_map: Tensor | None
    s_p: Tensor | None = None
    s_n: Tensor | None = None
    s_text: Tensor | None = None
    personalized: Tensor | None = None
    prompt_index: Tensor | None = None


@dataclass
class ImageFeatures:
    """``levels``: one ``[B, h_l, w_l, C_l]`` patch-feature grid per block; ``global_embedding``: ``[B, D]``
    CLIP image embedding (``None`` when the text branch is off)."""

    levels: list[Tensor]
    global_embedding: Tensor | None = None


@dataclass
class PromptState:
    """Per-category prompt embeddings and text features (derived, rebuilt for each category)."""

    class_name: str = ""
    instance_embeds: Tensor | None = None
    class_embeds: Tensor | None = None
    personalization_embeds: Tensor | None = None
    personalization_prompts: list[str] = field(default_factory=list)
    text_features: Tensor | None = None


class OneToNormalModel(nn.Module):
    """The One-to-Normal detector on given backbones.

    Args:
        diffusion: the Stable Diffusion to customize (frozen; adapters are added here).
        clip: CLIP backbone for S_text and, with ``image_encoder="clip"``, for the patch features;
            ``None`` when neither needs it.
        cnn: CNN pyramid for the patch features with ``image_encoder="cnn"``.
        image_encoder: ``"clip"`` or ``"cnn"``: which backbone yields the multi-level features of eq. 4-5.
        clip_layers: CLIP blocks whose patch tokens are the levels (0-based, negative from the end).
        finetune: ``"lora"`` (adapters on the UNet attention projections) or ``"full"`` (every UNet weight).
        lora_rank, lora_alpha: LoRA size and scale.
        gradient_checkpointing: trade UNet activation memory for compute in training.
        resolution: the side at which Stable Diffusion trains, personalizes and generates.
        personalization: sampling settings of eq. 3 (``strength`` = the paper's ``t`` = 0.3).
        num_prompts: normal-state prompts tried per query (paper: 3; Appendix A.1 studies 1/3/5/10).
        prompt_strategy: ``"refined"`` (Appendix A.1 prompts), ``"instance"`` (the fine-tuning prompt
            only) or ``"none"`` (the empty prompt: personalization without text, Table 5's "w/o text").
        use_personalized, use_pool, use_text: the three branches of eq. 7 (Table 4's switches).
        alpha, beta: eq. 7 weights (paper: 1 and 0.5).
        temperature: logit scale of eq. 6's softmax.
        sigma: Gaussian blur of the anomaly map.
        seed: seed of the personalization noise.
        personalization_batch_size: (query, prompt) pairs per img2img call of eq. 3 (guidance runs the
            UNet on twice as many; bounds its activation memory).
        chunk_size: query patches per nearest-neighbour chunk (bounds memory).
        class_name: object name in the prompts instead of the category's.
    """

    def __init__(
        self,
        diffusion: StableDiffusion,
        clip: CLIPBackbone | None,
        cnn: CNNFeaturePyramid | None,
        *,
        image_encoder: Literal["clip", "cnn"],
        clip_layers: Sequence[int],
        finetune: FineTune,
        lora_rank: int,
        lora_alpha: float,
        gradient_checkpointing: bool,
        resolution: int,
        personalization: SamplingSettings,
        num_prompts: int,
        prompt_strategy: PromptStrategy,
        use_personalized: bool,
        use_pool: bool,
        use_text: bool,
        alpha: float,
        beta: float,
        temperature: float = CLIP_LOGIT_SCALE,
        sigma: float = 4.0,
        seed: int = 0,
        personalization_batch_size: int = 48,
        chunk_size: int = DEFAULT_CHUNK,
        class_name: str | None = None,
    ) -> None:
        super().__init__()
        if image_encoder not in ("clip", "cnn"):
            raise ValueError(f"image_encoder must be 'clip' or 'cnn', got {image_encoder!r}")
        if finetune not in ("lora", "full"):
            raise ValueError(f"finetune must be 'lora' or 'full', got {finetune!r}")
        if prompt_strategy not in ("refined", "instance", "none"):
            raise ValueError(
                f"prompt_strategy must be 'refined', 'instance' or 'none', got {prompt_strategy!r}"
            )
        if not (use_personalized or use_pool or use_text):
            raise ValueError(
                "use_personalized, use_pool and use_text are all false: enable at least one branch"
            )
        if image_encoder == "clip" and clip is None:
            raise ValueError("image_encoder='clip' needs a CLIP backbone")
        if image_encoder == "cnn" and cnn is None:
            raise ValueError("image_encoder='cnn' needs a CNN backbone")
        if use_text and clip is None:
            raise ValueError("the text branch (use_text) needs a CLIP backbone")
        if image_encoder == "clip" and len(clip_layers) == 0:
            raise ValueError("clip_layers must name at least one CLIP block")
        scale = diffusion.vae_scale_factor
        if resolution < scale or resolution % scale:
            raise ValueError(
                f"resolution must be a positive multiple of the VAE scale factor {scale}, got {resolution}"
            )
        self.diffusion = diffusion
        self.clip = clip
        self.cnn = cnn
        self.image_encoder = image_encoder
        self.clip_layers = [int(layer) for layer in clip_layers]
        self.finetune = finetune
        self.resolution = int(resolution)
        self.personalization = personalization
        self.num_prompts = int(num_prompts)
        self.prompt_strategy = prompt_strategy
        self.use_personalized = use_personalized
        self.use_pool = use_pool
        self.use_text = use_text
        self.alpha = float(alpha)
        self.beta = float(beta)
        self.temperature = float(temperature)
        self.sigma = float(sigma)
        self.seed = int(seed)
        self.personalization_batch_size = int(personalization_batch_size)
        self.chunk_size = int(chunk_size)
        self.class_name = class_name

        # §3.2: only the UNet learns; every other weight (VAE, text encoder, CLIP, CNN) stays frozen
        if finetune == "lora":
            add_unet_lora(diffusion.unet, rank=lora_rank, alpha=lora_alpha)
        else:
            diffusion.unet.requires_grad_(True)
        if gradient_checkpointing:
            set_gradient_checkpointing(diffusion.unet, True)

        self.prompts = PromptState()
        #: DreamBooth class-image latents ``[N, C, h, w]`` (derived, never in a checkpoint)
        self.class_latents: Tensor | None = None
        #: the memory bank M: one ``[M_l, C_l]`` bank per level (derived, never in a checkpoint)
        self.memory: list[Tensor] | None = None

    # ------------------------------------------------------------------ parameters and modes
    def trainable_parameters(self) -> list[nn.Parameter]:
        """The parameters eq. 1 optimises: the LoRA adapters, or every UNet weight."""
        return [p for p in self.diffusion.unet.parameters() if p.requires_grad]

    def train(self, mode: bool = True) -> OneToNormalModel:
        """Only the UNet follows ``mode``; the frozen VAE, text encoder, CLIP and CNN stay in eval mode."""
        super().train(False)
        self.diffusion.unet.train(mode)
        return self

    def image_encoders(self) -> list[nn.Module]:
        """The backbones of §3.4 (CLIP, the CNN): frozen, and unused by eq. 1's training."""
        return [encoder for encoder in (self.clip, self.cnn) if encoder is not None]

    def move_image_encoders(self, device: torch.device | str) -> None:
        """Move CLIP and the CNN to ``device``: off the GPU while the UNet trains (CLIP ViT-L/14 holds
        1.7 GB in fp32), back for inference."""
        for encoder in self.image_encoders():
            encoder.to(device)

    @contextlib.contextmanager
    def base_model(self) -> Iterator[None]:
        """Sample from the *base* diffusion model inside this context: the LoRA adapters are switched off
        (DreamBooth's class images must come from the model before fine-tuning). With ``finetune="full"``
        the UNet is the base model only before training starts."""
        if self.finetune != "lora":
            yield
            return
        self.diffusion.unet.disable_adapters()
        try:
            yield
        finally:
            self.diffusion.unet.enable_adapters()

    # ------------------------------------------------------------------ prompts
    def prompt_name(self, category: str) -> str:
        """The object name in every prompt (instance, prior-preservation class and personalization prompts):
        ``class_name`` when set, else the category's object name
        (:func:`fsad_lightning.class_names.object_name`: ``metal_nut`` -> ``metal nut``, ``pcb1`` ->
        ``printed circuit board``)."""
        return self.class_name if self.class_name is not None else object_name(category)

    def personalization_prompt_list(self, class_name: str) -> list[str]:
        """The prompts ``{c_i}`` of eq. 2 for ``class_name`` under :attr:`prompt_strategy`."""
        if self.prompt_strategy == "refined":
            return one_to_normal_prompts(class_name, self.num_prompts)
        if self.prompt_strategy == "instance":
            return [ONE_TO_NORMAL_INSTANCE_PROMPT.format(class_name)]
        return [""]

    @torch.no_grad()
    def prepare_prompts(self, category: str) -> PromptState:
        """Encode the prompts of ``category`` once (the text encoders are frozen): the instance and class
        prompts of §3.2, the normal-state prompts of §3.3 and the WinCLIP prompt features of eq. 6."""
        class_name = self.prompt_name(category)
        if self.prompts.class_name == class_name:
            return self.prompts
        state = PromptState(class_name=class_name)
        encoded = self.diffusion.encode_prompt(
            [ONE_TO_NORMAL_INSTANCE_PROMPT.format(class_name), ONE_TO_NORMAL_CLASS_PROMPT.format(class_name)]
        )
        state.instance_embeds, state.class_embeds = encoded[:1], encoded[1:]
        state.personalization_prompts = self.personalization_prompt_list(class_name)
        state.personalization_embeds = self.diffusion.encode_prompt(state.personalization_prompts)
        if self.use_text:
            state.text_features = self.clip.text_features_for(
                WINCLIP_NORMAL_STATES, WINCLIP_ANOMALOUS_STATES, WINCLIP_TEMPLATES, class_name
            )
        self.prompts = state
        return state

    def _require_prompts(self) -> PromptState:
        if self.prompts.instance_embeds is None:
            raise RuntimeError("OneToNormalModel has no prompts: call prepare_prompts(category) first")
        return self.prompts

    # ------------------------------------------------------------------ §3.2 customized model, eq. 1
    def set_class_latents(self, class_images: Tensor) -> None:
        """Encode the prior-preservation images ``[N, 3, H, W]`` once (VAE posterior mean, ``vae_batch_size``
        images per pass); the latents are kept in fp32."""
        if class_images.ndim != 4 or class_images.shape[0] == 0:
            raise ValueError(
                f"class images must be a non-empty [N, 3, H, W] batch, got {tuple(class_images.shape)}"
            )
        with torch.no_grad():
            images = resize_images(class_images.to(self.diffusion.device), self.resolution)
            self.class_latents = self.diffusion.encode_images(images).float()

    def dreambooth_loss(
        self,
        instance_images: Tensor,
        prior_loss_weight: float = 1.0,
        generator: torch.Generator | None = None,
    ) -> dict[str, Tensor]:
        """Eq. 1 with DreamBooth's class-specific prior preservation:
        ``L = E ||eps - eps_theta(z_t, t, c)||^2 over C_o  +  lambda E ||eps - eps_theta(z'_t, t, c_pr)||^2
        over C_o-bar``.

        ``instance_images``: ``[B, 3, H, W]`` augmented shots in ``[0, 1]`` (the demonstrations ``C_o``,
        paired with the instance prompt); ``B`` class latents are drawn from the cached class images
        (``C_o-bar``, paired with the class prompt) when ``prior_loss_weight > 0``. Instance latents are
        sampled from the VAE posterior. One UNet pass covers both halves. The paper writes eq. 1 as an
        ``x_0`` regression; the model's own parameterisation (epsilon for SD 1.5) is used, which differs
        only by a per-timestep weight. Returns ``loss``, ``instance_loss`` and ``prior_loss``.
        """
        prompts = self._require_prompts()
        batch = instance_images.shape[0]
        images = resize_images(instance_images.to(self.diffusion.device), self.resolution)
        with torch.no_grad():
            latents = self.diffusion.encode_images(images, generator=generator, sample=True)
        contexts = [prompts.instance_embeds.expand(batch, -1, -1)]
        use_prior = prior_loss_weight > 0
        if use_prior:
            if self.class_latents is None:
                raise RuntimeError("prior preservation needs class images: call set_class_latents first")
            pick = torch.randint(
                0,
                self.class_latents.shape[0],
                (batch,),
                generator=generator,
                device=generator.device if generator is not None else "cpu",
            )
            latents = torch.cat([latents, self.class_latents[pick.to(self.class_latents.device)]])
            contexts.append(prompts.class_embeds.expand(batch, -1, -1))
        per_sample = self.diffusion.noise_prediction_loss(
            latents, torch.cat(contexts), generator=generator, reduction="none"
        )
        instance_loss = per_sample[:batch].mean()
        prior_loss = per_sample[batch:].mean() if use_prior else torch.zeros_like(instance_loss)
        return {
            "loss": instance_loss + prior_loss_weight * prior_loss,
            "instance_loss": instance_loss.detach(),
            "prior_loss": prior_loss.detach(),
        }

    # ------------------------------------------------------------------ §3.3 personalization, eq. 2-3
    @torch.no_grad()
    def personalize(self, images: Tensor, keys: Sequence[int]) -> tuple[Tensor, Tensor, Tensor]:
        """Eq. 2-3: personalized images ``[B, 3, H, W]``, chosen prompt ``[B]``, SSIM losses ``[B, P]``."""
        prompts = self._require_prompts()
        return personalize(
            self.diffusion,
            images,
            prompts.personalization_embeds,
            self.personalization,
            self.resolution,
            keys,
            seed=self.seed,
            chunk_size=self.personalization_batch_size,
        )

    # ------------------------------------------------------------------ §3.4 features
    @torch.no_grad()
    def extract(self, images: Tensor, with_global: bool = False) -> ImageFeatures:
        """Multi-level patch features of ``images`` (and the global CLIP embedding when asked)."""
        global_embedding = None
        if self.image_encoder == "clip":
            features = self.clip.encode_image(images, layers=self.clip_layers)
            h, w = features.grid_size
            levels = [
                tokens.reshape(tokens.shape[0], h, w, tokens.shape[-1]) for tokens in features.patch_tokens
            ]
            if with_global:
                global_embedding = features.global_embedding
        else:
            levels = [level.permute(0, 2, 3, 1).float() for level in self.cnn(images)]
            if with_global:
                global_embedding = self.clip.encode_image(images).global_embedding
        return ImageFeatures(levels=levels, global_embedding=global_embedding)

    @torch.no_grad()
    def fit_pool(self, pool_images: Tensor, batch_size: int = 16) -> None:
        """Build the memory bank M (eq. 5) from the anomaly-free pool ``[N, 3, H, W]``: every patch
        feature of every pool image, one bank per level."""
        if pool_images.ndim != 4 or pool_images.shape[0] == 0:
            raise ValueError(
                "the anomaly-free pool must be a non-empty [N, 3, H, W] batch, "
                f"got {tuple(pool_images.shape)}"
            )
        per_level: list[list[Tensor]] = []
        for start in range(0, pool_images.shape[0], batch_size):
            levels = self.extract(pool_images[start : start + batch_size]).levels
            if not per_level:
                per_level = [[] for _ in levels]
            for bank, level in zip(per_level, levels):
                bank.append(level.reshape(-1, level.shape[-1]))
        self.memory = [torch.cat(bank) for bank in per_level]

    # ------------------------------------------------------------------ §3.4 scores, eq. 4-7
    @torch.no_grad()
    def score(
        self,
        query: ImageFeatures,
        personalized: ImageFeatures | None,
        image_size: tuple[int, int],
    ) -> TripletOutput:
        """Eq. 4-7 and the anomaly map from extracted features (a switched-off branch is skipped)."""
        p_grids = n_grids = None
        s_p = s_n = s_text = None
        if self.use_personalized:
            if personalized is None:
                raise ValueError("the S_P branch is on but no personalized features were given")
            p_grids = personalized_distance_grids(query.levels, personalized.levels)
            s_p = level_averaged_max(p_grids)
        if self.use_pool:
            if self.memory is None:
                raise RuntimeError("the memory bank is empty: call fit_pool with the anomaly-free pool first")
            n_grids = normal_pool_distance_grids(query.levels, self.memory, self.chunk_size)
            s_n = level_averaged_max(n_grids)
        if self.use_text:
            text_features = self._require_prompts().text_features
            s_text = text_score(
                query.global_embedding, text_features.to(query.global_embedding), self.temperature
            )
        pred_score = triplet_score(s_p, s_n, s_text, self.alpha, self.beta)
        anomaly_map = triplet_anomaly_map(p_grids, n_grids, image_size, self.alpha, self.sigma)
        return TripletOutput(pred_score=pred_score, anomaly_map=anomaly_map, s_p=s_p, s_n=s_n, s_text=s_text)

    @torch.no_grad()
    def forward(
        self, images: Tensor, keys: Sequence[int], timings: dict[str, float] | None = None
    ) -> TripletOutput:
        """Personalize (when S_P is on), extract, score: the whole §3.3-3.4 inference for a batch.

        ``timings``, when given, receives the seconds spent in ``personalization``, ``features`` and
        ``scoring`` (for latency reports).
        """
        personalized = prompt_index = None
        device = images.device
        if not self.use_personalized:
            with timed_stage(timings, "features", device):
                query, personal = self.extract(images, with_global=self.use_text), None
        else:
            with timed_stage(timings, "personalization", device):
                personalized, prompt_index, _ = self.personalize(images, keys)
            # one encoder pass over queries and personalized images; the CLIP global embedding comes
            # with it for a CLIP encoder, and from one CLIP pass over the queries for a CNN encoder
            with timed_stage(timings, "features", device):
                n = images.shape[0]
                clip_global = self.use_text and self.image_encoder == "clip"
                both = self.extract(torch.cat([images, personalized.to(images)]), with_global=clip_global)
                if clip_global:
                    global_embedding = both.global_embedding[:n]
                elif self.use_text:
                    global_embedding = self.clip.encode_image(images).global_embedding
                else:
                    global_embedding = None
                query = ImageFeatures([level[:n] for level in both.levels], global_embedding)
                personal = ImageFeatures([level[n:] for level in both.levels])
        with timed_stage(timings, "scoring", device):
            output = self.score(query, personal, tuple(images.shape[-2:]))
        output.personalized, output.prompt_index = personalized, prompt_index
        return output
