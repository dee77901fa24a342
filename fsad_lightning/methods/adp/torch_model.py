"""ADP, Anomaly Detection via Personalization (Kwak et al., IEEE Access 2024), as a plain ``nn.Module``.

A concept word ``[c]`` is learned by textual inversion in the token-embedding space that Stable Diffusion
2.1 and OpenCLIP ViT-H/14 share (see :mod:`.concepts`), then read by CLIP to detect anomalies:

1. **Normal-aware concept c_n*** (§IV-A, eq. 3): the diffusion loss of the shots conditioned on
   ``T(S_n(c))`` ("a photo of a flawless [c]") plus ``alpha * P_CLIP(S_n(c) | x)`` (eq. 1 on
   ``{S_n(c), S_a(c)}``), with ``T`` drawn per sample from the 27 templates and ``c`` initialised from
   "object" (:meth:`ADPModel.concept_learning_loss` without pseudo-anomalies).
2. **Anomaly-aware concept c_a*** (§IV-B, eq. 4): the same objective started from c_n*, minus
   ``alpha * (P_CLIP(S_n(c) | x~) - gamma)^+`` on SDEdit pseudo-anomalies ``x~`` of the shots
   (:meth:`ADPModel.sdedit`), randomly resized and cropped (:func:`random_resized_crop`).
3. **Self-tuning** (§IV-C-1, eq. 5-6): importance weights of c_n*, c_a* (and, for ADP_l, the class label)
   on the shots and on pseudo-anomalies generated with c_a*, mixed into two prototypes ``p_n``, ``p_a``
   (:meth:`ADPModel.self_tune`).
4. **Detection** (§IV-C-2, eq. 7-10): ``ADP(x)``, the prototype softmax, averaged with the maximum of
   WinCLIP+'s reference-association map ``M^W`` (patch tokens, small and mid windows against the shots'),
   reused from :class:`~fsad_lightning.methods.winclip.torch_model.WinCLIPModel` (:meth:`ADPModel.forward`).

Only the concept's embedding row is a trainable parameter (fp32, whatever the dtype of the frozen
Stable Diffusion); c_n* is kept in the buffer ``normal_concept`` once step 1 is over, while the parameter
goes on to become c_a*. Backbones are built by the caller and passed in.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fsad_lightning.backbones.clip import CLIPBackbone, openclip_view
from fsad_lightning.backbones.diffusion import (
    StableDiffusion,
    TrainableTokenEmbedding,
    set_gradient_checkpointing,
)
from fsad_lightning.backbones.sampling import SamplingSettings, img2img_from_references, resize_images
from fsad_lightning.methods.adp.concepts import (
    CLIP_CONCEPT_PLACEHOLDER,
    ConceptSentences,
    encode_concept_sentences,
    state_sentences,
    tokenize_concept_sentences,
)
from fsad_lightning.methods.adp.losses import (
    importance_weight,
    normal_alignment_loss,
    normal_state_probability,
    reference_associated_score,
    repel_loss,
    weighted_prototypes,
)
from fsad_lightning.methods.winclip.torch_model import WinCLIPModel
from fsad_lightning.prompts import (
    ADP_ANOMALOUS_STATE,
    ADP_INITIALIZER_WORD,
    ADP_NORMAL_STATE,
    ADP_TEMPLATES,
)
from fsad_lightning.scoring import text_anomaly_probability

#: the pseudo-word of the concept in Stable Diffusion's tokenizer
CONCEPT_TOKEN = "<adp-concept>"
#: aspect-ratio range of the pseudo-anomalies' random resized crop (torchvision's default)
CROP_RATIO = (3.0 / 4.0, 4.0 / 3.0)
#: images per VAE encode of the shots
ENCODE_CHUNK = 8
#: prompt of SDEdit image ``i`` (:func:`~fsad_lightning.backbones.sampling.reference_prompt_pairs`): the
#: prompts rotate, so each gets an equal share of the set and of every shot's images at any K
SDEDIT_PROMPT_ORDER = "rotate"


@dataclass
class ADPOutput:
    """Scores of a batch: ``pred_score`` ``[B]`` (eq. 10, or eq. 7 without reference association),
    ``grid_map`` ``[B, h, w]`` the reference-association map ``M^W`` (eq. 9) at patch-grid resolution,
    ``concept_score`` ``[B]`` eq. 7 and ``vision_score`` ``[B]`` ``max_ij M^W_ij``."""

    pred_score: Tensor
    grid_map: Tensor
    concept_score: Tensor
    vision_score: Tensor


@dataclass
class SelfTuningResult:
    """Eq. 5-6: the concepts mixed (``names``), their importance ``weights`` ``[C]`` and ``prototypes``
    ``[2, D]`` (row 0 ``p_n``, row 1 ``p_a``)."""

    names: list[str]
    weights: Tensor
    prototypes: Tensor


def random_resized_crop(
    images: Tensor,
    size: int,
    scale: Sequence[float],
    generator: torch.Generator,
    ratio: Sequence[float] = CROP_RATIO,
) -> Tensor:
    """One random crop per image, resized to ``size`` (§IV-B: pseudo-anomalies "are further augmented with
    random resizing and cropping").

    The crop covers a fraction of the image area drawn uniformly from ``scale`` with an aspect ratio drawn
    log-uniformly from ``ratio`` (clipped to the image), at a uniform position; it is resized bicubically.
    Every draw comes from the CPU ``generator``. ``images``: ``[N, 3, H, W]`` in ``[0, 1]``.
    """
    low, high = float(scale[0]), float(scale[1])
    if not 0.0 < low <= high <= 1.0:
        raise ValueError(f"crop scale must satisfy 0 < low <= high <= 1, got {tuple(scale)}")
    n, _, height, width = images.shape
    log_low, log_high = math.log(ratio[0]), math.log(ratio[1])
    draws = torch.rand(n, 4, generator=generator)
    crops = []
    for i in range(n):
        area = height * width * (low + (high - low) * float(draws[i, 0]))
        aspect = math.exp(log_low + (log_high - log_low) * float(draws[i, 1]))
        crop_w = min(width, max(1, round(math.sqrt(area * aspect))))
        crop_h = min(height, max(1, round(math.sqrt(area / aspect))))
        top = int(float(draws[i, 2]) * (height - crop_h + 1))
        left = int(float(draws[i, 3]) * (width - crop_w + 1))
        crop = images[i : i + 1, :, top : top + crop_h, left : left + crop_w].float()
        crops.append(
            F.interpolate(crop, size=(size, size), mode="bicubic", align_corners=False, antialias=True)
        )
    return torch.cat(crops).clamp(0.0, 1.0)


class ADPModel(nn.Module):
    """ADP on given backbones (Stable Diffusion for the concept and the pseudo-anomalies, CLIP for the
    guidance and the detection).

    Args:
        diffusion: a frozen :class:`StableDiffusion` (SD 2.1 in the paper); a concept token is added here.
        clip: a frozen :class:`CLIPBackbone` whose text encoder shares the diffusion text encoder's token
            space (OpenCLIP ViT-H/14 LAION-2B for SD 2.1).
        resolution: side at which Stable Diffusion learns and generates (512).
        templates, normal_state, anomalous_state: ``T``, ``S_n``, ``S_a`` (Appendix D, §IV).
        initializer_word: the word whose embedding starts c_n ("object", §IV-A).
        condition_on_normal_state: condition the diffusion loss on ``T(S_n(c))`` as eq. 3 writes it;
            ``False`` uses the neutral ``T(c)`` of plain textual inversion.
        temperature: ``1 / tau`` of every CLIP softmax (eq. 1, 5, 7); ``None``: CLIP's own logit scale.
        flip_probability: textual inversion's horizontal-flip augmentation of the shots (LDM: 0.5), applied
            by picking the cached latents of the mirrored shot.
        crop_scale: area range of the pseudo-anomalies' random resized crop.
        window_sizes, patch_layer, project_patch_tokens: the reference association of eq. 8-9 (WinCLIP+'s
            small / mid windows and patch tokens).
        use_reference_association: eq. 10 (``ADP_ad``) when true, eq. 7 alone otherwise.
        gradient_checkpointing: UNet activation checkpointing during concept learning.
        diffusion_model_key, clip_model_key: configuration keys named in the text-width error.
    """

    def __init__(
        self,
        diffusion: StableDiffusion,
        clip: CLIPBackbone,
        *,
        resolution: int = 512,
        templates: Sequence[str] = ADP_TEMPLATES,
        normal_state: str = ADP_NORMAL_STATE,
        anomalous_state: str = ADP_ANOMALOUS_STATE,
        initializer_word: str = ADP_INITIALIZER_WORD,
        condition_on_normal_state: bool = True,
        temperature: float | None = None,
        flip_probability: float = 0.5,
        crop_scale: Sequence[float] = (0.5, 1.0),
        window_sizes: Sequence[int] = (2, 3),
        patch_layer: int = -1,
        project_patch_tokens: bool = False,
        use_reference_association: bool = True,
        gradient_checkpointing: bool = True,
        diffusion_model_key: str = "diffusion_model",
        clip_model_key: str = "clip_model",
    ) -> None:
        super().__init__()
        sd_width = diffusion.text_encoder.get_input_embeddings().embedding_dim
        if sd_width != clip.text_width:
            raise ValueError(
                f"`{diffusion_model_key}` has {sd_width}-wide token embeddings but `{clip_model_key}` "
                f"({clip.model_name}) has a {clip.text_width}-wide text encoder: ADP reads the learned "
                "concept with CLIP, so they must share the text space (SD 2.1 with ViT-H-14, "
                "fsad-tiny-sd with fsad-tiny-vit-sd)"
            )
        scale = diffusion.vae_scale_factor
        if resolution < scale or resolution % scale:
            raise ValueError(
                f"resolution must be a positive multiple of the VAE scale factor {scale}, got {resolution}"
            )
        if not 0.0 <= flip_probability <= 1.0:
            raise ValueError(f"flip_probability must be in [0, 1], got {flip_probability}")
        if temperature is not None and temperature <= 0:
            raise ValueError(f"temperature must be positive or None, got {temperature}")
        if len(templates) == 0:
            raise ValueError("ADP needs at least one prompt template")
        self.diffusion = diffusion
        # WinCLIP+'s reference association (eq. 8-9) owns the CLIP backbone; see the `clip` property
        self.reference_association = WinCLIPModel(
            clip,
            window_sizes=window_sizes,
            temperature=100.0,  # WinCLIP's zero-shot text branch is not used by ADP
            patch_layer=patch_layer,
            project_patch_tokens=project_patch_tokens,
        )
        self.resolution = int(resolution)
        self.templates = tuple(templates)
        self.normal_state = normal_state
        self.anomalous_state = anomalous_state
        self.condition_on_normal_state = bool(condition_on_normal_state)
        self.temperature = None if temperature is None else float(temperature)
        self.flip_probability = float(flip_probability)
        self.crop_scale = (float(crop_scale[0]), float(crop_scale[1]))
        self.use_reference_association = bool(use_reference_association)

        # textual inversion: the concept is the only trainable parameter, kept in fp32
        self.concept_token_id = diffusion.add_token(CONCEPT_TOKEN, initializer_token=initializer_word)
        embedding = self.token_embedding
        embedding.new_embeddings = nn.Parameter(embedding.new_embeddings.detach().float())
        if gradient_checkpointing:
            set_gradient_checkpointing(diffusion.unet, True)
        # c_n*, stored when step 1 ends (learned state, checkpointed by the Lightning module)
        self.register_buffer("normal_concept", torch.zeros(sd_width))
        self.register_buffer("normal_concept_learned", torch.zeros((), dtype=torch.bool))

        # CLIP sentences T(S_n(*)) then T(S_a(*)), tokenized once; derived, never checkpointed
        sentences = tokenize_concept_sentences(
            clip,
            state_sentences(normal_state, self.templates, CLIP_CONCEPT_PLACEHOLDER)
            + state_sentences(anomalous_state, self.templates, CLIP_CONCEPT_PLACEHOLDER),
        )
        self.register_buffer("clip_token_embeddings", sentences.token_embeddings, persistent=False)
        self.register_buffer("clip_eot_index", sentences.eot_index, persistent=False)
        self.register_buffer("clip_concept_mask", sentences.concept_mask, persistent=False)

        # derived state: rebuilt from the shots / generated images, never checkpointed
        self.shot_latents: Tensor | None = None  # [2K, C, h, w] shots then their mirror images
        self.shot_clip_features: Tensor | None = None  # [2K, D]
        self.pseudo_anomalies: Tensor | None = None  # [L, 3, R, R] eq. 4's x~
        self.self_tuning: SelfTuningResult | None = None

    # ------------------------------------------------------------------ parts and modes
    @property
    def clip(self) -> CLIPBackbone:
        return self.reference_association.backbone

    @property
    def token_embedding(self) -> TrainableTokenEmbedding:
        return self.diffusion.text_encoder.get_input_embeddings()

    def concept_vector(self) -> Tensor:
        """The concept being learned ``[W]`` (c_n in step 1, c_a from step 2 on); carries gradients."""
        return self.token_embedding.embedding_of(self.concept_token_id)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [self.token_embedding.new_embeddings]

    def train(self, mode: bool = True) -> ADPModel:
        """Every backbone stays in eval mode: only an embedding row learns, nothing has dropout to train."""
        return super().train(False)

    @property
    def logit_scale(self) -> float:
        """``1 / tau`` of the CLIP softmaxes: the configured temperature or CLIP's own logit scale."""
        if self.temperature is not None:
            return self.temperature
        return float(self.clip.model.logit_scale.exp())

    @property
    def device(self) -> torch.device:
        return self.normal_concept.device

    # ------------------------------------------------------------------ prompts
    def diffusion_prompts(self, template_index: Tensor) -> list[str]:
        """The diffusion conditions of eq. 3, ``T(S_n(c))`` (or ``T(c)``), one per template index."""
        state = self.normal_state if self.condition_on_normal_state else None
        sentences = state_sentences(state, self.templates, CONCEPT_TOKEN)
        return [sentences[int(i)] for i in template_index]

    def clip_sentences(self) -> ConceptSentences:
        """CLIP sentences: rows ``[0, T)`` ``T(S_n(*))``, rows ``[T, 2T)`` ``T(S_a(*))``."""
        return ConceptSentences(self.clip_token_embeddings, self.clip_eot_index, self.clip_concept_mask)

    def state_text_features(self, concept: Tensor, template_index: Tensor) -> tuple[Tensor, Tensor]:
        """``(g(T_i(S_n(c))), g(T_i(S_a(c))))``, each ``[N, D]``, for templates ``template_index`` ``[N]``.

        Each distinct template is encoded once; differentiable in ``concept`` ``[W]``.
        """
        unique, inverse = template_index.to(self.device).unique(return_inverse=True)
        rows = torch.cat([unique, unique + len(self.templates)])
        features = encode_concept_sentences(self.clip, self.clip_sentences().select(rows), concept)
        count = unique.shape[0]
        return features[:count][inverse], features[count:][inverse]

    # ------------------------------------------------------------------ concept learning (eq. 3-4)
    @torch.no_grad()
    def encode_latents(self, images: Tensor) -> Tensor:
        """VAE posterior means ``[N, C, h, w]`` of images resized to :attr:`resolution` (in chunks)."""
        chunks = [
            self.diffusion.encode_images(resize_images(part.to(self.device), self.resolution))
            for part in images.split(ENCODE_CHUNK)
        ]
        return torch.cat(chunks)

    def clip_view(self, images: Tensor, original_sizes: Tensor | None = None) -> Tensor:
        """What CLIP sees of ``images`` ``[B, 3, H, W]``: OpenCLIP's shortest-side resize and centre crop to
        its input size (:func:`~fsad_lightning.backbones.clip.openclip_view`; ``original_sizes`` ``[B, 2]``:
        the sources the square batch images were resized from)."""
        return openclip_view(images.to(self.device), self.clip.image_size, original_sizes)

    @torch.no_grad()
    def set_training_shots(self, images: Tensor, original_sizes: Tensor | None = None) -> None:
        """Encode the shots ``[K, 3, H, W]`` and their mirror images once: VAE latents for the diffusion loss
        and CLIP embeddings (of :meth:`clip_view`) for eq. 3's guidance. View ``i + K`` is the mirror of
        shot ``i``."""
        if images.ndim != 4 or images.shape[0] == 0:
            raise ValueError(f"the shots must be a non-empty [K, 3, H, W] batch, got {tuple(images.shape)}")
        views = torch.cat([images, images.flip(-1)]).to(self.device)
        sizes = None if original_sizes is None else torch.cat([original_sizes, original_sizes])
        self.shot_latents = self.encode_latents(views)
        self.shot_clip_features = self.clip.encode_image(self.clip_view(views, sizes)).global_embedding

    @property
    def num_training_shots(self) -> int:
        if self.shot_latents is None:
            raise RuntimeError("no training shots: call set_training_shots first")
        return self.shot_latents.shape[0] // 2

    def set_pseudo_anomalies(self, images: Tensor) -> None:
        """Eq. 4's pseudo-anomalies ``x~`` ``[L, 3, H, W]`` in ``[0, 1]`` (cropped per step)."""
        if images.ndim != 4 or images.shape[0] == 0:
            raise ValueError(
                f"pseudo-anomalies must be a non-empty [L, 3, H, W] batch, got {tuple(images.shape)}"
            )
        self.pseudo_anomalies = images.to(self.device)

    def pseudo_anomaly_count(self) -> int:
        """``L`` of eq. 4: the number of pseudo-anomalies (the sum of its repel term runs over them)."""
        if self.pseudo_anomalies is None:
            raise RuntimeError("no pseudo-anomalies: call set_pseudo_anomalies first")
        return int(self.pseudo_anomalies.shape[0])

    @torch.no_grad()
    def pseudo_anomaly_features(self, count: int, generator: torch.Generator) -> Tensor:
        """CLIP embeddings ``[count, D]`` of randomly drawn, resized and cropped pseudo-anomalies."""
        if self.pseudo_anomalies is None:
            raise RuntimeError("no pseudo-anomalies: call set_pseudo_anomalies first")
        picks = torch.randint(0, self.pseudo_anomalies.shape[0], (count,), generator=generator)
        views = random_resized_crop(
            self.pseudo_anomalies[picks.to(self.device)], self.clip.image_size, self.crop_scale, generator
        )
        return self.clip.encode_image(views).global_embedding

    @torch.no_grad()
    def store_normal_concept(self) -> None:
        """End of step 1: keep c_n* in ``normal_concept``; the parameter goes on as c_a's initialisation."""
        self.normal_concept.copy_(self.concept_vector().detach().float())
        self.normal_concept_learned.fill_(True)

    def concept_learning_loss(
        self,
        shot_views: Tensor,
        shot_templates: Tensor,
        alpha: float,
        generator: torch.Generator | None = None,
        pseudo_features: Tensor | None = None,
        pseudo_templates: Tensor | None = None,
        margin: float = 0.8,
    ) -> dict[str, Tensor]:
        """The loss of eq. 3 (step 1) or eq. 4 (step 2, with pseudo-anomalies) for one batch.

        ``loss = ||eps - eps_theta(z_t, t, tau(T(S_n(c))))||^2 - alpha * mean P_CLIP(S_n(c) | x)
        [+ alpha * (L / K) * mean (P_CLIP(S_n(c) | x~) - gamma)^+]``: eq. 3-4 divided by the ``K`` shots,
        so the repel sum over the ``L`` pseudo-anomalies keeps its ``L : K`` weight (:func:`repel_loss`).

        Args:
            shot_views: ``[B]`` indices into the cached shot views (``i + K`` = mirrored shot ``i``).
            shot_templates: ``[B]`` template index ``T`` of each shot view (shared by its diffusion
                condition and its CLIP state pair).
            alpha: eq. 3 / eq. 4's ``alpha`` (0.003 in step 1, 0.002 in step 2).
            generator: draws the diffusion timesteps and noise.
            pseudo_features: ``[B', D]`` CLIP embeddings of pseudo-anomalies (step 2), with
                ``pseudo_templates`` ``[B']``.
            margin: eq. 4's ``gamma``.
        Returns ``loss``, ``reconstruction``, ``alignment``, ``repel`` (zero in step 1) and the mean
        probabilities ``p_normal_shots`` / ``p_normal_pseudo`` (detached).
        """
        if self.shot_latents is None or self.shot_clip_features is None:
            raise RuntimeError("no training shots: call set_training_shots first")
        if (pseudo_features is None) != (pseudo_templates is None):
            raise ValueError("pseudo_features and pseudo_templates go together")
        shot_views = shot_views.to(self.device)
        concept = self.concept_vector()
        context = self.diffusion.encode_prompt(self.diffusion_prompts(shot_templates))
        reconstruction = self.diffusion.noise_prediction_loss(
            self.shot_latents[shot_views], context, generator=generator
        )

        templates = (
            shot_templates if pseudo_templates is None else torch.cat([shot_templates, pseudo_templates])
        )
        normal_text, anomalous_text = self.state_text_features(concept, templates)
        batch = shot_views.shape[0]
        scale = self.logit_scale
        p_shots = normal_state_probability(
            self.shot_clip_features[shot_views], normal_text[:batch], anomalous_text[:batch], scale
        )
        alignment = normal_alignment_loss(p_shots, alpha)
        repel = torch.zeros((), device=reconstruction.device)
        p_pseudo = torch.full((), float("nan"))
        if pseudo_features is not None:
            probabilities = normal_state_probability(
                pseudo_features, normal_text[batch:], anomalous_text[batch:], scale
            )
            repel = repel_loss(
                probabilities, margin, alpha, self.pseudo_anomaly_count(), self.num_training_shots
            )
            p_pseudo = probabilities.detach().mean()
        return {
            "loss": reconstruction + alignment + repel,
            "reconstruction": reconstruction.detach(),
            "alignment": alignment.detach(),
            "repel": repel.detach(),
            "p_normal_shots": p_shots.detach().mean(),
            "p_normal_pseudo": p_pseudo,
        }

    # ------------------------------------------------------------------ generation (SDEdit)
    @torch.no_grad()
    def sdedit(
        self,
        reference_latents: Tensor,
        prompts: Sequence[str],
        indices: Sequence[int],
        settings: SamplingSettings,
        seed: int,
    ) -> Tensor:
        """SDEdit images ``[len(indices), 3, R, R]`` of the references (Meng et al.; §IV-B, §IV-C-1).

        Image ``i`` edits reference ``i mod R`` under prompt ``(i mod R + i // R) mod P``
        (:data:`SDEDIT_PROMPT_ORDER`: the two prompts alternate, so each prompt gets half of the set and
        each shot its share of both) at ``settings.strength`` from the cached latents (no VAE encode),
        seeded by ``(seed, i)``; prompts holding the concept token use the concept's current value.
        """
        if reference_latents.shape[0] == 0 or len(prompts) == 0:
            raise ValueError("SDEdit needs at least one reference and one prompt")
        prompt_embeds = self.diffusion.encode_prompt(list(prompts))
        return img2img_from_references(
            self.diffusion, reference_latents, prompt_embeds, indices, settings, seed, SDEDIT_PROMPT_ORDER
        )

    # ------------------------------------------------------------------ self-tuning (eq. 5-6)
    @torch.no_grad()
    def concept_text_features(self, concept: Tensor) -> tuple[Tensor, Tensor]:
        """``[|T|, D]`` features of all templates for ``S_n(c)``, ``S_a(c)``, ``c`` the vector ``concept``."""
        every = torch.arange(len(self.templates), device=self.device)
        return self.state_text_features(concept, every)

    @torch.no_grad()
    def label_text_features(self, label: str) -> tuple[Tensor, Tensor]:
        """``[|T|, D]`` features of all templates for ``S_n(l)``, ``S_a(l)``; ``l`` = the class label."""
        normal = self.clip.encode_text(state_sentences(self.normal_state, self.templates, label))
        anomalous = self.clip.encode_text(state_sentences(self.anomalous_state, self.templates, label))
        return normal, anomalous

    @torch.no_grad()
    def self_tune(
        self,
        shot_images: Tensor,
        pseudo_anomalies: Tensor,
        label: str | None = None,
        original_sizes: Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> SelfTuningResult:
        """Eq. 5-6 on the pseudo-validation set: the shots and pseudo-anomalies made with c_a*.

        ``w(c)`` uses eq. 1's template ensemble ``G(S(c))`` (mean of the normalised per-template features);
        the prototypes mix the per-template features (eq. 6). ``label`` adds the class label as a third
        concept (ADP_l). ``original_sizes``: the shots' source sizes (:meth:`clip_view`).

        The pseudo-anomalies are "synthesized ... as described in Section IV-B", so they get §IV-B's
        random resize and crop (:func:`random_resized_crop`, ``crop_scale``; draws from the CPU
        ``generator``, a fixed seed when ``None``) before CLIP reads them, as eq. 4's do.
        """
        if not bool(self.normal_concept_learned):
            raise RuntimeError(
                "the normal-aware concept c_n* was never stored: train both steps (trainer.max_steps = "
                "2 x steps_per_concept) or load a checkpoint written after step 1"
            )
        shot_features = self.clip.encode_image(self.clip_view(shot_images, original_sizes)).global_embedding
        generator = generator if generator is not None else torch.Generator().manual_seed(0)
        crops = random_resized_crop(
            pseudo_anomalies.to(self.device), self.clip.image_size, self.crop_scale, generator
        )
        pseudo_features = self.clip.encode_image(crops).global_embedding
        sources = {
            "normal-aware concept": self.concept_text_features(self.normal_concept),
            "anomaly-aware concept": self.concept_text_features(self.concept_vector().detach()),
        }
        if label is not None:
            sources[f"label '{label}'"] = self.label_text_features(label)
        scale = self.logit_scale
        weights = []
        for normal, anomalous in sources.values():
            ensemble_normal = F.normalize(normal.mean(dim=0), dim=-1)
            ensemble_anomalous = F.normalize(anomalous.mean(dim=0), dim=-1)
            p_shots = normal_state_probability(shot_features, ensemble_normal, ensemble_anomalous, scale)
            p_pseudo = normal_state_probability(pseudo_features, ensemble_normal, ensemble_anomalous, scale)
            weights.append(importance_weight(p_shots, 1.0 - p_pseudo))
        weights_tensor = torch.stack(weights)
        prototypes = weighted_prototypes(
            weights_tensor,
            torch.stack([normal for normal, _ in sources.values()]),
            torch.stack([anomalous for _, anomalous in sources.values()]),
        )
        self.self_tuning = SelfTuningResult(list(sources), weights_tensor, prototypes)
        return self.self_tuning

    # ------------------------------------------------------------------ detection (eq. 7-10)
    @torch.no_grad()
    def fit_reference(self, shot_images: Tensor, category: str, original_sizes: Tensor | None = None) -> None:
        """The reference memories ``R^P``, ``R^W_s``, ``R^W_m`` of eq. 8 from the shots (WinCLIP+), on
        their :meth:`clip_view`."""
        self.reference_association.reset_reference()
        self.reference_association.fit_reference(self.clip_view(shot_images, original_sizes), category)

    def forward(self, images: Tensor, category: str, original_sizes: Tensor | None = None) -> ADPOutput:
        """Score ``images`` ``[B, 3, H, W]`` in ``[0, 1]`` against the prototypes and ``category``'s shots.

        CLIP sees :meth:`clip_view` of the images (``original_sizes``: their sources' sizes), so
        ``grid_map`` covers the centre crop :func:`~fsad_lightning.backbones.clip.openclip_crop_boxes`
        names (the whole image for square sources)."""
        if self.self_tuning is None:
            raise RuntimeError("ADP has no prototypes: run self_tune (the module's fit_shots) first")
        if category not in self.reference_association.references:
            raise RuntimeError(f"no reference memory for category {category!r}: run fit_reference first")
        features = self.reference_association.extract(self.clip_view(images, original_sizes))
        concept_score = text_anomaly_probability(
            features.global_embedding, self.self_tuning.prototypes, self.logit_scale
        )  # eq. 7 read as the probability of p_a (choices in fsad_lightning.methods.adp.module)
        vision_map = self.reference_association.few_shot_map(
            features, self.reference_association.references[category]
        )  # eq. 8-9
        vision_score = vision_map.flatten(1).amax(dim=1)
        if self.use_reference_association:
            pred_score = reference_associated_score(concept_score, vision_map)  # eq. 10
        else:
            pred_score = concept_score
        return ADPOutput(pred_score, vision_map, concept_score, vision_score)
