"""Lightning glue of ADP: ``ADPConceptModule`` (trainable: ``fsad fit`` learns both concepts, ``fsad test``
self-tunes and scores).

``fsad fit`` runs both concept-learning steps in one schedule of ``trainer.max_steps = 2 x
steps_per_concept`` optimizer steps (checked with a clear error):

- steps ``[0, S)``: the normal-aware concept c_n* (eq. 3) from "object";
- at step ``S``: c_n* is stored in the ``normal_concept`` buffer, the Adam moments are reset (a new
  optimisation problem) and the SDEdit pseudo-anomalies of the shots are generated (base model, cached);
- steps ``[S, 2S)``: the anomaly-aware concept c_a* (eq. 4), started from c_n*.

The shots' VAE latents (and those of their mirror images, textual inversion's flip augmentation) and CLIP
embeddings are computed once in :meth:`ADPConceptModule.on_fit_start`; every training batch only says
which shots to use (its ``path`` field), so the datamodule must not augment (``data.augment: false``).

The checkpoint holds the learned state only: the concept parameter (c_a* after the fit), the
``normal_concept`` buffer (c_n*) and its ``normal_concept_learned`` flag -- a few kilobytes.

``fsad test`` (:meth:`ADPConceptModule.fit_shots`): the self-tuning pseudo-anomalies are generated with
c_a* (cached on disk, keyed by c_a*'s fingerprint), the importance weights and prototypes (eq. 5-6) and the
reference memories (eq. 8) are built from the shots. These are *derived* state -- a deterministic function
of the two concepts, the shots and the seed -- so they are rebuilt rather than checkpointed: the
checkpoint stays two vectors, and a cached pool makes the rebuild cost a few CLIP forwards.

Choices where the paper is vague (each is an argument, so it can be changed):

- Eq. 3 conditions the diffusion loss on the normal state prompt ``T(S_n(c))``; ``condition_on_normal_state:
  false`` uses plain textual inversion's ``T(c)``. One template ``T`` is drawn per sample and shared by its
  diffusion condition and its CLIP pair ``{T(S_n(c)), T(S_a(c))}`` (the sum over ``T`` of eq. 3 sampled);
  the sums over the shots are batch means (the objective divided by ``K``, as LDM's per-sample mean
  diffusion loss is).
- Eq. 4 sums the repel hinge over the ``L`` pseudo-anomalies and the attraction over the ``K`` shots: with
  both taken as means over the images drawn for a step, the repel mean is scaled by ``L / K``
  (:func:`~fsad_lightning.methods.adp.losses.repel_loss`), so the two keep the paper's ``L : K`` ratio
  (5 : 1 at the default L = 20, K = 4) rather than 1 : 1.
- In step 2 the single ``alpha`` of Appendix A (0.002) weights both CLIP terms of eq. 4 (the attraction
  inherited from J_n and the repel hinge).
- Learning rate: the paper's literal "base learning rate 5e-4" is the rate AdamW uses (``scale_lr: false``,
  the default). LDM's trainer would scale a base rate by the total batch size (``scale_lr: true``: 5e-4 x 4
  = 2e-3, diffusers' textual-inversion recipe); the paper does not say it kept that scaling, so it is an
  option, not the default. AdamW (weight decay 0.01), constant rate, fresh moments for c_a.
- Step 2 draws as many pseudo-anomalies per step as shots (batch 4 + 4). Their number ``L`` is not given:
  ``num_pseudo_anomalies: 20`` (as the self-tuning set), image ``i`` editing shot ``i mod K`` under prompt
  ``(i mod K + i // K) mod 2``: the two prompts alternate, so each gets 10 of the 20 images and each shot
  its share of both at every K = 1-16 (``(i // K) mod 2`` gave prompt 0 16 of 20 images at K = 16). The
  self-tuning set is assigned the same way. Random resized crop: area in ``crop_scale`` (0.5-1, so a crop
  keeps most of the object), aspect 3/4-4/3, applied per step to the cached images (they only feed CLIP).
- Shot latents are the VAE posterior means (encoded once), not per-step posterior samples.
- Self-tuning: eq. 5's ``P_CLIP`` uses eq. 1's template ensemble ``G`` (normalised features averaged); the
  20 pseudo-anomalies are SDEdits of the shots (strength 0.5, as Appendix B says) under the two c_a* prompts,
  "synthesized ... as described in Section IV-B": CLIP reads them after the same random resized crop as
  eq. 4's (``crop_scale``, one seeded draw per image), not whole.
  ADP_l (``label_aware: true``) adds the class label as a third concept with its own eq. 5 weight in eq. 6
  ("the class label alongside the two learned concepts").
- Eq. 7 as printed has ``p_n`` in the numerator, the probability of *normal*; an anomaly score (and eq. 10,
  which adds the maximum of an anomaly map) needs the probability of ``p_a``, which is what is computed.
- CLIP input (Appendix B: "the data pre-processing pipeline from OpenCLIP", 224 px): OpenCLIP's resize of
  the shortest side to 224 and centre crop, not a squash of the whole image
  (:func:`~fsad_lightning.backbones.clip.openclip_view`). The datamodule's square 512 px images carry their
  source size (``original_size``), so the crop is the source's centred square as OpenCLIP would take it
  from the file (VisA's 1.5 : 1 images lose their sides, as in the paper's pipeline; square MVTec AD
  images are only resized). The anomaly map ``M^W`` covers that crop; outside it the crop's border values
  are extended (no CLIP evidence there). Eq. 4's randomly cropped pseudo-anomalies are resized to 224 by
  the crop itself.
- Memory (a batch-4 fit at 512 px on a 24 GB GPU): UNet gradient checkpointing is on by default, and the
  frozen SD and CLIP take the trainer's precision (``diffusion_dtype`` / ``clip_precision: null``: their
  weights are cast to :attr:`~fsad_lightning.methods.base.FewShotAnomalyModule.compute_dtype` when a fit,
  test or predict starts; the configs run ``bf16-mixed``), with the encodes and SDEdits outside the
  steps under the trainer's autocast (``trainer_precision``), and the VAE runs ``vae_batch_size`` (4)
  images per pass, as One-to-Normal does. Only the concept embedding is fp32; every score is fp32.
  Estimate (``benchmarks/adp_memory.py``, counted on the meta device): a batch-4 fit at 512 px peaks at
  5.9-7.4 GiB (bf16 weights 4.3 GiB + the eq. 4 step's 1.6-3.1 GiB of activations), a test at 5.7-7.2 GiB;
  the fp32 / no-checkpointing / unsliced defaults before issue 13 needed 16.0 GiB to fit, 14.5 GiB to test.
- Eq. 8-9: WinCLIP+'s reference association as this repository implements it
  (:class:`~fsad_lightning.methods.winclip.torch_model.WinCLIPModel`): 2 x 2 and 3 x 3 windows of ViT-H/14's
  16 x 16 grid at 224 px and the last block's patch tokens (after ``ln_post``, before ``proj``) as the
  "penultimate" features. The anomaly map is ``M^W`` (the paper scores images only).
"""

from __future__ import annotations

import hashlib
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from fsad_lightning.backbones.clip import load_clip, openclip_crop_boxes
from fsad_lightning.backbones.diffusion import cast_frozen_parameters, resolve_dtype
from fsad_lightning.backbones.diffusion_zoo import load_diffusion_model
from fsad_lightning.backbones.sampling import SamplingSettings
from fsad_lightning.cache import ImagePoolCache, generate_pool_images, image_seed
from fsad_lightning.class_names import object_name
from fsad_lightning.data.batch import CATEGORY, IMAGE, ORIGINAL_SIZE, PATH, AnomalyOutput
from fsad_lightning.methods.adp.torch_model import CONCEPT_TOKEN, SDEDIT_PROMPT_ORDER, ADPModel
from fsad_lightning.methods.base import FewShotAnomalyModule
from fsad_lightning.prompts import ADP_PSEUDO_ANOMALY_PROMPTS, ADP_SELF_TUNING_PROMPTS
from fsad_lightning.scoring import upsample_and_smooth
from fsad_lightning.validation import require_fractions, require_integers


class ADPConceptModule(FewShotAnomalyModule):
    """ADP: Anomaly Detection via Personalization (Kwak et al., IEEE Access 2024).

    See :mod:`fsad_lightning.methods.adp.torch_model` for the method and the module docstring for the
    training schedule and the choices made. Defaults are the paper's (§V-B, Appendix A).

    Backbones:
        diffusion_model: hub id or diffusers folder of the text-to-image model (paper: SD 2.1; default the
            512 px base model ``stabilityai/stable-diffusion-2-1-base``, the one that matches the paper's
            512 x 512 inputs and epsilon-prediction -- the 768 px ``stable-diffusion-2-1`` is a
            v-prediction model for 768 px); ``fsad-tiny-sd`` offline; ``fsad-random-sd21`` for benchmarks.
        diffusion_dtype: weights of the frozen SD (``float32``, ``bfloat16``, ``float16``); ``null``
            (default): the trainer's compute dtype (bf16 under ``bf16-mixed``), cast when a fit, test or
            predict starts. The concept embedding stays fp32.
        scheduler: diffusers sampler class of the SDEdit loops.
        resolution: side at which SD learns and generates (512).
        clip_model, clip_pretrained: the CLIP sharing SD's text space (``ViT-H-14`` / ``laion2b_s32b_b79k``
            for SD 2.1; ``fsad-tiny-vit-sd`` with ``null`` offline). Its text width must equal SD's.
        clip_image_size: CLIP input side (224). clip_precision: open_clip precision; ``null`` (default):
            CLIP's frozen weights in the trainer's compute dtype, as ``diffusion_dtype: null``.

    Concept learning (eq. 3-4):
        steps_per_concept: optimizer steps of each concept (3,000); ``trainer.max_steps`` must be twice it.
        learning_rate: AdamW's learning rate (the paper's 5e-4). scale_lr: multiply it by the total batch size
            (shots per step x gradient accumulation x devices), LDM's ``scale_lr`` convention; off by default
            (5e-4 as printed; on: 2e-3 at batch 4).
        weight_decay: AdamW weight decay (0.01, LDM / diffusers textual inversion).
        normal_alpha: eq. 3's alpha (0.003). anomaly_alpha: eq. 4's alpha (0.002). margin: gamma (0.8).
        temperature: ``1 / tau`` of every CLIP softmax; ``null``: CLIP's logit scale (100 when trained).
        condition_on_normal_state: diffusion condition ``T(S_n(c))`` (eq. 3) or ``T(c)``.
        flip_probability: horizontal-flip probability of the shots (0.5, LDM's textual inversion).
        gradient_checkpointing: UNet activation checkpointing while learning (default on: the UNet
            backward that reaches the concept through the cross-attention then keeps ~2.4 x fewer
            activations, 7.5 -> 3.1 GiB at batch 4 and 512 px, fp32 bound).

    Pseudo-anomalies (SDEdit, §IV-B and §IV-C-1):
        num_pseudo_anomalies: ``L`` of eq. 4 (20). num_self_tuning_anomalies: ``L'`` of eq. 5 (20).
        strength, guidance_scale, num_inference_steps: SDEdit settings (0.5, 7.5, 30).
        crop_scale: area range of the random resized crop of eq. 4's pseudo-anomalies.
        generation_batch_size: images per sampling call.
        vae_batch_size: images per VAE encoder / decoder pass (:meth:`StableDiffusion.set_vae_batch_size`,
            as One-to-Normal's; ``null``: a whole call at once). Same images whatever the value; 4 bounds a
            512 px decode's activations to ~3 GiB (fp32 bound) instead of ~6 GiB for the 8 of a call.
        cache_dir: folder of the generated-image cache (``null``: regenerate in memory every run).

    Detection (eq. 5-10):
        label_aware: ADP_l, the class label as a third concept in eq. 5-6.
        class_name: the label words; default: the category with ``_`` read as a space.
        window_sizes, patch_layer, project_patch_tokens: the reference association (eq. 8-9).
        use_reference_association: score with eq. 10 (ADP_ad) or eq. 7 alone.
        sigma: Gaussian blur of the anomaly map. seed: seed of every random draw and generated image.
        eval_size: see :class:`~fsad_lightning.methods.base.FewShotAnomalyModule`.
    """

    learning_type = "trainable"
    method_name = "adp"
    #: fit_shots self-tunes (eq. 5-6): the k extra fits of the label-free threshold are left to
    #: `fsad predict` / `fsad export` (where decisions are made); `threshold:` gives `fsad test` its rates
    threshold_in_test = False
    #: detection settings (§IV-C): the two concepts are learned without them
    inference_hparams = frozenset(
        {
            "num_self_tuning_anomalies", "label_aware", "window_sizes", "patch_layer", "project_patch_tokens",
            "use_reference_association"
        }
    )
    single_category_reason = "learns its concepts for one category"
    extra_learned_state = ("model.normal_concept", "model.normal_concept_learned")

    def __init__(
        self,
        diffusion_model: str = "stabilityai/stable-diffusion-2-1-base",
        diffusion_dtype: str | None = None,
        scheduler: str | None = "DDIMScheduler",
        resolution: int = 512,
        clip_model: str = "ViT-H-14",
        clip_pretrained: str | None = "laion2b_s32b_b79k",
        clip_image_size: int | None = 224,
        clip_precision: str | None = None,
        steps_per_concept: int = 3000,
        learning_rate: float = 5e-4,
        scale_lr: bool = False,
        weight_decay: float = 0.01,
        normal_alpha: float = 0.003,
        anomaly_alpha: float = 0.002,
        margin: float = 0.8,
        temperature: float | None = None,
        condition_on_normal_state: bool = True,
        flip_probability: float = 0.5,
        gradient_checkpointing: bool = True,
        num_pseudo_anomalies: int = 20,
        num_self_tuning_anomalies: int = 20,
        strength: float = 0.5,
        guidance_scale: float = 7.5,
        num_inference_steps: int = 30,
        crop_scale: list[float] = [0.5, 1.0],  # noqa: B006 -- a plain list reads well in YAML, never mutated
        generation_batch_size: int = 8,
        vae_batch_size: int | None = 4,
        cache_dir: str | None = None,
        label_aware: bool = False,
        class_name: str | None = None,
        window_sizes: list[int] = [2, 3],  # noqa: B006
        patch_layer: int = -1,
        project_patch_tokens: bool = False,
        use_reference_association: bool = True,
        sigma: float = 4.0,
        seed: int = 0,
        eval_size: int | None = None,
    ) -> None:
        super().__init__(eval_size=eval_size)
        require_integers(
            steps_per_concept=steps_per_concept,
            num_pseudo_anomalies=num_pseudo_anomalies,
            num_self_tuning_anomalies=num_self_tuning_anomalies,
            num_inference_steps=num_inference_steps,
            generation_batch_size=generation_batch_size,
        )
        require_fractions(strength=strength, margin=margin)
        for name, value in (
            ("normal_alpha", normal_alpha),
            ("anomaly_alpha", anomaly_alpha),
            ("weight_decay", weight_decay),
        ):
            if value < 0:
                raise ValueError(f"{name} must be >= 0, got {value}")
        if learning_rate <= 0:
            raise ValueError(f"learning_rate must be positive, got {learning_rate}")
        if len(crop_scale) != 2:
            raise ValueError(f"crop_scale must be [low, high], got {crop_scale}")
        if class_name is not None and not class_name.strip():
            raise ValueError("class_name must be a non-empty string or null")
        self.save_hyperparameters()
        diffusion = load_diffusion_model(diffusion_model, "txt2img", diffusion_dtype or "float32", scheduler)
        diffusion.set_vae_batch_size(vae_batch_size)
        clip = load_clip(
            clip_model, pretrained=clip_pretrained, image_size=clip_image_size, precision=clip_precision or "fp32"
        )
        self.model = ADPModel(
            diffusion,
            clip,
            resolution=resolution,
            condition_on_normal_state=condition_on_normal_state,
            temperature=temperature,
            flip_probability=flip_probability,
            crop_scale=crop_scale,
            window_sizes=window_sizes,
            patch_layer=patch_layer,
            project_patch_tokens=project_patch_tokens,
            use_reference_association=use_reference_association,
            gradient_checkpointing=gradient_checkpointing,
        )
        self.sampling = SamplingSettings(strength, num_inference_steps, guidance_scale)
        #: shot path -> index into the cached training shots (set in on_fit_start)
        self.shot_index: dict[str, int] = {}

    # ------------------------------------------------------------------ helpers
    def prompt_name(self, category: str) -> str:
        """The class label words of ADP_l: ``class_name`` or the category's object name
        (:func:`fsad_lightning.class_names.object_name`)."""
        return self.hparams.class_name or object_name(category)

    def _datamodule(self) -> Any:
        return getattr(self.trainer, "datamodule", None) if self._trainer is not None else None

    def _manifest(self) -> dict | None:
        return getattr(self._datamodule(), "manifest", None)

    def concept_fingerprint(self) -> str:
        """SHA-256 (16 hex digits) of the current concept vector: pools made with different c_a* never mix."""
        vector = self.model.concept_vector().detach().float().cpu().contiguous()
        return hashlib.sha256(vector.numpy().tobytes()).hexdigest()[:16]

    def generation_cache(
        self, kind: str, prompts: list[str], manifest: dict | None, extra: dict
    ) -> ImagePoolCache | None:
        """The cache entry of a generated set, keyed by base model, shots (manifest), prompts, seed and the
        sampling settings; ``None`` without ``cache_dir`` or without a manifest naming the shots."""
        hp = self.hparams
        if hp.cache_dir is None or manifest is None:
            return None
        settings = {
            "kind": f"adp/{kind}",
            "resolution": hp.resolution,
            "scheduler": hp.scheduler,
            "dtype": str(self.diffusion_weight_dtype).removeprefix("torch."),
            "strength": hp.strength,
            "steps": hp.num_inference_steps,
            "guidance": hp.guidance_scale,
            "prompt_order": SDEDIT_PROMPT_ORDER,  # pools assigned by another rule are not reused
            **extra,
        }
        return ImagePoolCache(hp.cache_dir, hp.diffusion_model, manifest, prompts, hp.seed, settings)

    def _generate(
        self, kind: str, prompts: list[str], count: int, references: Tensor, seed: int, extra: dict
    ) -> Tensor:
        cache = self.generation_cache(kind, prompts, self._manifest(), extra)

        def make(indices: list[int]) -> Tensor:
            return self.model.sdedit(references, prompts, indices, self.sampling, seed).cpu()

        return generate_pool_images(count, make, self.hparams.generation_batch_size, cache)

    # ------------------------------------------------------------------ precision
    @property
    def diffusion_weight_dtype(self) -> torch.dtype:
        """The frozen SD's weight dtype: ``diffusion_dtype`` when set, else the trainer's compute dtype."""
        chosen = self.hparams.diffusion_dtype
        return resolve_dtype(chosen) if chosen is not None else self.compute_dtype

    def cast_frozen_backbones(self) -> None:
        """Frozen SD and CLIP weights in :attr:`diffusion_weight_dtype` / the trainer's compute dtype (for
        ``clip_precision: null``); the concept parameter stays fp32 (it is trainable)."""
        cast_frozen_parameters(self.model.diffusion, self.diffusion_weight_dtype)
        if self.hparams.clip_precision is None:
            cast_frozen_parameters(self.model.clip, self.compute_dtype)

    def on_test_start(self) -> None:
        self.cast_frozen_backbones()
        super().on_test_start()

    def on_predict_start(self) -> None:
        self.cast_frozen_backbones()
        super().on_predict_start()

    # ------------------------------------------------------------------ fit: schedule and shots
    def train_batch_size(self) -> int:
        """Shots per training step: the datamodule's ``train_batch_size`` (``null``: every shot)."""
        datamodule = self._datamodule()
        size = getattr(datamodule, "train_batch_size", None)
        if size is None:
            manifest = self._manifest() or {}
            size = len(manifest.get("files", ())) + len(manifest.get("extra_normals", ()))
        return max(int(size), 1)

    def check_schedule(self) -> None:
        """``trainer.max_steps`` must be ``2 x steps_per_concept``; no epoch limit may end the fit sooner."""
        steps, trainer = self.hparams.steps_per_concept, self.trainer
        if trainer.max_steps != 2 * steps:
            raise ValueError(
                f"ADP learns c_n* for steps_per_concept={steps} steps then c_a* for as many: set "
                f"trainer.max_steps to {2 * steps} (got {trainer.max_steps})"
            )
        total = trainer.estimated_stepping_batches
        if total < 2 * steps:
            raise ValueError(
                f"trainer.max_epochs={trainer.max_epochs} ends the fit after {int(total)} of the {2 * steps} "
                "steps of ADP's two concepts: set trainer.max_epochs: -1"
            )

    def effective_learning_rate(self, total_batch_size: int) -> float:
        """``learning_rate``, times the total batch size when ``scale_lr`` (LDM's convention)."""
        scale = total_batch_size if self.hparams.scale_lr else 1
        return self.hparams.learning_rate * scale

    def build_optimizer(self, total_batch_size: int) -> torch.optim.AdamW:
        """AdamW on the concept embedding only (constant learning rate)."""
        return torch.optim.AdamW(
            self.model.trainable_parameters(),
            lr=self.effective_learning_rate(total_batch_size),
            weight_decay=self.hparams.weight_decay,
        )

    def configure_optimizers(self) -> torch.optim.Optimizer:
        self.check_schedule()
        trainer = self.trainer
        return self.build_optimizer(
            self.train_batch_size() * trainer.accumulate_grad_batches * trainer.world_size
        )

    def on_fit_start(self) -> None:
        """Check the data and cache the shots' latents and CLIP embeddings for the whole fit."""
        datamodule = self._datamodule()
        if datamodule is None or not hasattr(datamodule, "shot_batch"):
            raise RuntimeError("ADPConceptModule needs a FewShotDataModule to provide its shots")
        if getattr(datamodule, "augment", False):
            raise ValueError(
                "ADP encodes the un-augmented shots once (and applies textual inversion's flip itself): set "
                "data.augment: false"
            )
        self.single_category(datamodule.categories, "the datamodule")
        self.cast_frozen_backbones()
        shots = self.transfer_batch_to_device(datamodule.shot_batch(), self.device, 0)
        with self.trainer_precision():
            self.prepare_training(shots)

    def prepare_training(self, shots: dict[str, Any]) -> None:
        """Encode the shots once (:meth:`ADPModel.set_training_shots`) and index them by path."""
        self.single_category(shots[CATEGORY], "the shots")
        self.model.set_training_shots(shots[IMAGE].to(self.device), shots.get(ORIGINAL_SIZE))
        self.shot_index = {str(path): i for i, path in enumerate(shots.get(PATH) or [])}

    def shot_indices(self, paths: list[str]) -> Tensor:
        """Indices of a training batch's shots among the cached ones."""
        missing = [p for p in paths if str(p) not in self.shot_index]
        if missing:
            raise RuntimeError(
                f"training image {missing[0]!r} is not among the shots encoded in on_fit_start"
            )
        return torch.tensor([self.shot_index[str(p)] for p in paths], dtype=torch.long)

    # ------------------------------------------------------------------ fit: the two steps
    def pseudo_anomaly_images(self) -> Tensor:
        """Eq. 4's pseudo-anomalies ``[L, 3, R, R]``: SDEdit of the shots by the base model under "a photo
        with damage" / "a photo of an object with damage" (cached when ``cache_dir`` is set)."""
        references = self.model.shot_latents[: self.model.num_training_shots]
        return self._generate(
            "pseudo_anomalies",
            list(ADP_PSEUDO_ANOMALY_PROMPTS),
            self.hparams.num_pseudo_anomalies,
            references,
            self.hparams.seed,
            {},
        )

    def start_anomaly_phase(self, optimizer: torch.optim.Optimizer) -> None:
        """Step 2 begins: store c_n*, reset the optimizer's moments and make / load the pseudo-anomalies.

        Idempotent, and safe on a resumed fit (c_n* and the moments then come from the checkpoint)."""
        if not bool(self.model.normal_concept_learned):
            self.model.store_normal_concept()
            optimizer.state.clear()  # c_a is a new optimisation problem started from c_n*
        if self.model.pseudo_anomalies is None:
            with self.trainer_precision():  # hooks run outside the step's autocast
                self.model.set_pseudo_anomalies(self.pseudo_anomaly_images())

    def on_train_batch_start(self, batch: dict[str, Any], batch_idx: int) -> None:  # noqa: ARG002
        if self.global_step >= self.hparams.steps_per_concept:
            self.start_anomaly_phase(self.optimizers(use_pl_optimizer=False))

    def training_losses(self, shot_indices: Tensor, step: int) -> dict[str, Tensor]:
        """The eq. 3 (``step < steps_per_concept``) or eq. 4 loss for the shots ``shot_indices`` ``[B]``.

        Every random draw (flips, templates, pseudo-anomalies and their crops, timesteps, noise) comes from
        generators seeded by ``(seed, step)``, so a step is reproducible on its own (and on a resume).
        """
        hp = self.hparams
        anomaly_step = step >= hp.steps_per_concept
        choices = torch.Generator().manual_seed(image_seed(hp.seed, step))
        noise = torch.Generator(device=self.device).manual_seed(image_seed(hp.seed, step))
        batch = shot_indices.shape[0]
        num_templates = len(self.model.templates)
        flips = torch.rand(batch, generator=choices) < self.model.flip_probability
        views = shot_indices.cpu() + flips.long() * self.model.num_training_shots
        templates = torch.randint(0, num_templates, (batch,), generator=choices)
        pseudo_features = pseudo_templates = None
        if anomaly_step:
            if self.model.pseudo_anomalies is None:
                raise RuntimeError("step 2 needs the pseudo-anomalies: call start_anomaly_phase first")
            pseudo_templates = torch.randint(0, num_templates, (batch,), generator=choices)
            pseudo_features = self.model.pseudo_anomaly_features(batch, choices)
        return self.model.concept_learning_loss(
            views,
            templates,
            hp.anomaly_alpha if anomaly_step else hp.normal_alpha,
            generator=noise,
            pseudo_features=pseudo_features,
            pseudo_templates=pseudo_templates,
            margin=hp.margin,
        )

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:  # noqa: ARG002
        self.single_category(batch[CATEGORY], "the training batch")
        losses = self.training_losses(self.shot_indices(batch[PATH]), self.global_step)
        size = len(batch[PATH])
        self.log("train/loss", losses["loss"], prog_bar=True, batch_size=size)
        logged = ["reconstruction", "alignment", "repel", "p_normal_shots"]
        if self.global_step >= self.hparams.steps_per_concept:
            logged.append("p_normal_pseudo")
        for name in logged:
            self.log(f"train/{name}", losses[name], batch_size=size)
        return losses["loss"]

    # ------------------------------------------------------------------ inference (eq. 5-10)
    def self_tuning_images(self, references: Tensor) -> Tensor:
        """Eq. 5's pseudo-anomalies ``[L', 3, R, R]``: SDEdit of the shots under "a photo of a damaged
        [c_a*]" / "a photo of a [c_a*] with damage" (cached, keyed by c_a*'s fingerprint)."""
        prompts = [prompt.format(CONCEPT_TOKEN) for prompt in ADP_SELF_TUNING_PROMPTS]
        return self._generate(
            "self_tuning",
            prompts,
            self.hparams.num_self_tuning_anomalies,
            references,
            self.hparams.seed + 1,
            {"concept": self.concept_fingerprint()},
        )

    def fit_shots(self, shots: dict[str, Any]) -> None:
        """Self-tuning (eq. 5-6) on the shots and pseudo-anomalies made with c_a*, and the reference
        memories of eq. 8."""
        category = self.single_category(shots[CATEGORY], "the shots")
        if not bool(self.model.normal_concept_learned):
            raise RuntimeError(
                "ADP has no normal-aware concept c_n*: fit both steps (trainer.max_steps = 2 x "
                "steps_per_concept) or pass --ckpt_path to a checkpoint of a complete fit"
            )
        images = shots[IMAGE].to(self.device)
        pseudo_anomalies = self.self_tuning_images(self.model.encode_latents(images))
        label = self.prompt_name(category) if self.hparams.label_aware else None
        sizes = shots.get(ORIGINAL_SIZE)
        crops = torch.Generator().manual_seed(image_seed(self.hparams.seed + 1, -1))  # the set is seed + 1's
        self.model.self_tune(images, pseudo_anomalies, label, sizes, generator=crops)
        self.model.fit_reference(images, category, sizes)

    def predict_anomaly(self, batch: dict[str, Any]) -> AnomalyOutput:
        images = batch[IMAGE]
        category = self.single_category(batch[CATEGORY], "the test batch")
        sizes = batch.get(ORIGINAL_SIZE)
        output = self.model(images, category, sizes)
        anomaly_map = self.anomaly_map(output.grid_map, images.shape[-2], images.shape[-1], sizes)
        return AnomalyOutput(pred_score=output.pred_score, anomaly_map=anomaly_map)

    def anomaly_map(self, grid_map: Tensor, height: int, width: int, original_sizes: Tensor | None) -> Tensor:
        """``M^W`` ``[B, h, w]`` as a ``[B, height, width]`` map of the batch images: upsampled onto the
        centre crop CLIP saw (:func:`~fsad_lightning.backbones.clip.openclip_crop_boxes`; the whole image
        for square sources), its border values extended over the rest (edge padding), then blurred."""
        sigma = self.hparams.sigma
        boxes = openclip_crop_boxes(height, width, original_sizes, grid_map.shape[0])
        if all(box == (0, 0, height, width) for box in boxes):
            return upsample_and_smooth(grid_map, (height, width), sigma=sigma)
        maps = []
        for grid, (top, left, box_h, box_w) in zip(grid_map, boxes):
            inside = upsample_and_smooth(grid[None], (box_h, box_w), sigma=0.0)
            padding = (left, width - left - box_w, top, height - top - box_h)
            maps.append(F.pad(inside[None], padding, mode="replicate")[0])
        return upsample_and_smooth(torch.cat(maps), (height, width), sigma=sigma)
