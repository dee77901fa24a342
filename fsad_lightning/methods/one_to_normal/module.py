"""Lightning glue of One-to-Normal: ``DreamBoothNormalModule`` (trainable: ``fsad fit`` then ``fsad test``).

- ``fsad fit``: :meth:`~DreamBoothNormalModule.on_fit_start` encodes the category's prompts and makes
  the DreamBooth class images with the *base* model (cached on disk when ``cache_dir`` is set);
  :meth:`~DreamBoothNormalModule.training_step` minimises eq. 1 with prior preservation on the
  datamodule's augmented shots. The checkpoint holds the LoRA adapters only (megabytes), or the UNet
  with ``finetune: full``.
- ``fsad test``: :meth:`~DreamBoothNormalModule.fit_shots` generates the anomaly-free pool with the
  customized model (txt2img + the §3.3 process on the shots; cached when ``cache_dir`` is set) and
  builds the memory bank M from the shots and the pool; each test batch is personalized and scored
  (eq. 2-7). The pool, the memory bank and the personalized images are derived, never checkpointed.
- ``fsad generate``: :meth:`~DreamBoothNormalModule.generate_normal_pool` writes the pool for other
  methods (``extra_normal_dirs``), see :mod:`fsad_lightning.commands.generate`.

Documented choices where the paper is silent or a default departs from it:

- **LoRA by default.** The paper fine-tunes SD 1.5 with DreamBooth (every UNet weight); ``finetune: lora``
  (rank 4 on the attention projections, lr 1e-4, 500 steps in the configs) is the default for megabyte
  checkpoints and a smaller fit; ``finetune: full`` (lr 5e-6, 800 steps) is the paper's setting, in
  ``configs/one_to_normal_mvtec_full.yaml``.
- **CLIP at 224 px.** ViT-L/14 runs at its native 224 px (16 x 16 patches) on the 240 px queries; the
  anomaly maps are upsampled to 240.
- **Noise ratio.** ``strength`` t starts img2img at timestep ``round(t * 1000)`` (300 for t = 0.3) whatever
  ``num_inference_steps`` is, which only sets the stride (:meth:`StableDiffusion.img2img`).
- **Augmentation** of the shots (§3.2, unspecified): photometric + small affine jitter; flips / rot90 only
  where a config opts in (:mod:`fsad_lightning.data.augment`), never for MVTec AD, VisA or MNIST.
- **Memory.** The class images and the pool are generated in the trainer's precision; the VAE runs
  ``vae_batch_size`` images per pass and personalization ``personalization_batch_size`` pairs per call;
  CLIP and the CNN wait on the CPU while the UNet trains. Estimate: ``benchmarks/one_to_normal_memory.py``.
"""

from __future__ import annotations

import hashlib
from typing import Any, Literal

import torch
from torch import Tensor

from fsad_lightning.backbones.clip import load_clip
from fsad_lightning.backbones.cnn import CNNFeaturePyramid
from fsad_lightning.backbones.diffusion_zoo import load_diffusion_model
from fsad_lightning.backbones.sampling import SamplingSettings, path_key, resize_images
from fsad_lightning.cache import ImagePoolCache, generate_pool_images
from fsad_lightning.data.batch import CATEGORY, IMAGE, PATH, AnomalyOutput
from fsad_lightning.methods.base import FewShotAnomalyModule
from fsad_lightning.methods.one_to_normal.personalize import generate_from_references, generate_txt2img
from fsad_lightning.methods.one_to_normal.torch_model import OneToNormalModel
from fsad_lightning.prompts import ONE_TO_NORMAL_CLASS_PROMPT, ONE_TO_NORMAL_INSTANCE_PROMPT
from fsad_lightning.validation import require_fractions, require_integers

#: DreamBooth learning rates (Ruiz et al.; diffusers' DreamBooth / DreamBooth-LoRA examples)
DEFAULT_LEARNING_RATES = {"lora": 1e-4, "full": 5e-6}


class DreamBoothNormalModule(FewShotAnomalyModule):
    """One-to-Normal: anomaly personalization for few-shot anomaly detection (Li et al., NeurIPS 2024).

    See :mod:`fsad_lightning.methods.one_to_normal.torch_model` for the method. Defaults are the paper's
    where it gives them; the other choices are documented per argument.

    Customized model (§3.2):
        diffusion_model: hub id or diffusers folder (paper: SD 1.5,
            ``stable-diffusion-v1-5/stable-diffusion-v1-5``); ``fsad-tiny-sd`` for the offline tiny twin;
            ``fsad-random-sd15`` for SD 1.5's architecture with random weights (benchmarks only).
        diffusion_dtype: weight dtype of the frozen SD components (``float32``, ``float16``, ``bfloat16``).
        scheduler: diffusers sampler class for every sampling loop (DDIM: deterministic img2img).
        resolution: side at which SD trains, personalizes and generates (512 for SD 1.5); queries are
            resized to it and back.
        finetune: ``lora`` (adapters, checkpoint of megabytes; default) or ``full`` (the whole UNet, the
            paper's DreamBooth: ``configs/one_to_normal_mvtec_full.yaml``).
        lora_rank, lora_alpha: LoRA size (diffusers' DreamBooth-LoRA default rank 4).
        learning_rate: AdamW learning rate; ``null`` = 1e-4 for LoRA, 5e-6 for full fine-tuning.
        weight_decay: AdamW weight decay (DreamBooth script: 1e-2).
        prior_loss_weight: DreamBooth's lambda for the prior-preservation term (1.0); 0 disables it.
        num_class_images: class images the base model generates for the prior term (100, as the
            diffusers DreamBooth example; the paper is silent).
        class_inference_steps, class_guidance_scale: their sampling (25 DDIM steps, guidance 7.5).
        gradient_checkpointing: UNet activation checkpointing in training (memory for compute).

    Personalization (§3.3):
        strength: the noise ratio ``t`` of eq. 3 (paper: 0.3): img2img starts at timestep ``round(t * 1000)``.
        num_inference_steps: full schedule length, whose stride ``1000 // steps`` img2img steps down by
            (20 -> 300, 250, ..., 50: 6 denoising steps; the paper does not say).
        guidance_scale: classifier-free guidance of personalization and pool generation (7.5).
        num_prompts: normal-state prompts tried per query (paper: 3; A.1 studies 1/3/5/10, up to 30).
        prompt_strategy: ``refined`` (A.1 prompts), ``instance`` (the fine-tuning prompt) or ``none``
            (empty prompt; Table 5's "w/o text").

    Anomaly-free pool (§3.4):
        pool_size: images whose features form the memory bank M: the shots plus
            ``pool_size - k`` generated ones (paper: 30).
        pool_txt2img_fraction: share of the generated images sampled by txt2img with the instance
            prompt; the rest is the §3.3 process applied to the shots (the paper gives no split: half).
        reference_strength: noise ratio of that process on the shots (0.5; see
            :func:`~fsad_lightning.methods.one_to_normal.personalize.generate_from_references`).
        pool_inference_steps: sampling steps of pool generation (25).
        generation_batch_size: images per sampling call when generating (class images and pool).
        personalization_batch_size: (query, prompt) pairs per img2img call of eq. 3; a test batch of
            ``B`` queries makes ``B * num_prompts`` pairs (48 at batch 16), guidance doubles the UNet batch.
        vae_batch_size: images per VAE encoder / decoder pass (:attr:`StableDiffusion.vae_batch_size`;
            ``null``: the whole batch in one pass). Same images whatever the value; it bounds the decoder's
            activation memory (0.75 GiB of fp32 activations per 512 px image).
        cache_dir: folder of the generated-image cache (class images and pools, keyed by base model,
            manifest, prompts, seed and settings); ``null`` regenerates in memory every run.
        class_name: the object name ``[o]`` in every prompt (instance, prior-preservation class,
            personalization and WinCLIP prompts); default: the category's name in the shared map
            :func:`fsad_lightning.class_names.object_name` (``metal_nut`` -> ``metal nut``, ``pcb1`` ->
            ``printed circuit board``, MNIST's ``3`` -> ``digit 3``).

    Image encoder and scores (§3.4):
        image_encoder: ``clip`` (paper: CLIP ViT-L/14 blocks) or ``cnn`` (any timm pyramid).
        clip_model, clip_pretrained, clip_image_size, clip_precision: the CLIP of S_text and of the
            ``clip`` encoder (paper: ``ViT-L-14`` / ``openai``; its native 224 px by default, not the
            queries' 240 px). Off the GPU while the UNet trains.
        clip_layers: blocks whose patch tokens are the n levels (the paper does not list them: the
            outputs of blocks 6, 12, 18, 24 of ViT-L/14, 0-based ``[5, 11, 17, 23]``).
        cnn_backbone, cnn_stages, cnn_weights: the ``cnn`` encoder
            (:class:`~fsad_lightning.backbones.cnn.CNNFeaturePyramid`).
        use_personalized, use_pool, use_text: the branches S_P, S_N, S_text (Table 4).
        alpha, beta: eq. 7 weights (1, 0.5). temperature: eq. 6 logit scale (100).
        sigma: anomaly-map blur. seed: seed of every generated image and of the personalization noise.
        eval_size: see :class:`~fsad_lightning.methods.base.FewShotAnomalyModule`.
    """

    learning_type = "trainable"
    method_name = "one_to_normal"
    #: fit_shots generates the anomaly-free pool: the k extra fits of the label-free threshold are left to
    #: `fsad predict` / `fsad export` (where decisions are made); `threshold:` gives `fsad test` its rates
    threshold_in_test = False
    #: personalization, pool and scoring settings (§3.3-3.4): the DreamBooth fine-tune (§3.2) ignores them
    inference_hparams = frozenset(
        {
            "strength", "num_inference_steps", "guidance_scale", "num_prompts", "prompt_strategy", "pool_size",
            "pool_txt2img_fraction", "reference_strength", "pool_inference_steps", "image_encoder",
            "clip_model", "clip_pretrained", "clip_image_size", "clip_layers", "cnn_backbone", "cnn_stages",
            "cnn_weights", "use_personalized", "use_pool", "use_text", "alpha", "beta", "temperature"
        }
    )
    single_category_reason = "fits one customized diffusion model per category"

    def __init__(
        self,
        diffusion_model: str = "stable-diffusion-v1-5/stable-diffusion-v1-5",
        diffusion_dtype: str = "float32",
        scheduler: str | None = "DDIMScheduler",
        resolution: int = 512,
        finetune: Literal["lora", "full"] = "lora",
        lora_rank: int = 4,
        lora_alpha: float = 4.0,
        learning_rate: float | None = None,
        weight_decay: float = 1e-2,
        prior_loss_weight: float = 1.0,
        num_class_images: int = 100,
        class_inference_steps: int = 25,
        class_guidance_scale: float = 7.5,
        gradient_checkpointing: bool = False,
        strength: float = 0.3,
        num_inference_steps: int = 20,
        guidance_scale: float = 7.5,
        num_prompts: int = 3,
        prompt_strategy: Literal["refined", "instance", "none"] = "refined",
        pool_size: int = 30,
        pool_txt2img_fraction: float = 0.5,
        reference_strength: float = 0.5,
        pool_inference_steps: int = 25,
        generation_batch_size: int = 8,
        personalization_batch_size: int = 48,
        vae_batch_size: int | None = 8,
        cache_dir: str | None = None,
        class_name: str | None = None,
        image_encoder: Literal["clip", "cnn"] = "clip",
        clip_model: str = "ViT-L-14",
        clip_pretrained: str | None = "openai",
        clip_image_size: int | None = None,
        clip_precision: str = "fp32",
        clip_layers: list[int] = [5, 11, 17, 23],  # noqa: B006 -- a plain list reads well in YAML, never mutated
        cnn_backbone: str = "wide_resnet50_2",
        cnn_stages: list[int] = [1, 2, 3],  # noqa: B006
        cnn_weights: str = "timm",
        use_personalized: bool = True,
        use_pool: bool = True,
        use_text: bool = True,
        alpha: float = 1.0,
        beta: float = 0.5,
        temperature: float = 100.0,
        sigma: float = 4.0,
        seed: int = 0,
        eval_size: int | None = None,
    ) -> None:
        super().__init__(eval_size=eval_size)
        require_fractions(
            strength=strength, reference_strength=reference_strength, pool_txt2img_fraction=pool_txt2img_fraction
        )
        require_integers(
            num_class_images=num_class_images,
            pool_size=pool_size,
            generation_batch_size=generation_batch_size,
            personalization_batch_size=personalization_batch_size,
            num_inference_steps=num_inference_steps,
            pool_inference_steps=pool_inference_steps,
            class_inference_steps=class_inference_steps,
        )
        if not (use_personalized or use_pool or use_text):
            raise ValueError(
                "use_personalized, use_pool and use_text are all false: enable at least one branch"
            )
        if class_name is not None and not class_name.strip():
            raise ValueError("class_name must be a non-empty string or null")
        if prior_loss_weight < 0:
            raise ValueError(f"prior_loss_weight must be >= 0, got {prior_loss_weight}")
        self.save_hyperparameters()
        diffusion = load_diffusion_model(diffusion_model, "txt2img", diffusion_dtype, scheduler)
        diffusion.set_vae_batch_size(vae_batch_size)
        needs_clip = image_encoder == "clip" or use_text
        clip = (
            load_clip(
                clip_model, pretrained=clip_pretrained, image_size=clip_image_size, precision=clip_precision
            )
            if needs_clip
            else None
        )
        cnn = CNNFeaturePyramid(cnn_backbone, cnn_stages, cnn_weights) if image_encoder == "cnn" else None
        self.model = OneToNormalModel(
            diffusion,
            clip,
            cnn,
            image_encoder=image_encoder,
            clip_layers=clip_layers,
            finetune=finetune,
            lora_rank=lora_rank,
            lora_alpha=lora_alpha,
            gradient_checkpointing=gradient_checkpointing,
            resolution=resolution,
            personalization=SamplingSettings(strength, num_inference_steps, guidance_scale),
            num_prompts=num_prompts,
            prompt_strategy=prompt_strategy,
            use_personalized=use_personalized,
            use_pool=use_pool,
            use_text=use_text,
            alpha=alpha,
            beta=beta,
            temperature=temperature,
            sigma=sigma,
            seed=seed,
            personalization_batch_size=personalization_batch_size,
            class_name=class_name,
        )
        self.learning_rate = learning_rate if learning_rate is not None else DEFAULT_LEARNING_RATES[finetune]
        self._train_generator: torch.Generator | None = None

    # ------------------------------------------------------------------ helpers
    def _datamodule(self) -> Any:
        return getattr(self.trainer, "datamodule", None) if self._trainer is not None else None

    def _cache(
        self, base: str, manifest: dict | None, prompts: list[str], extra: dict
    ) -> ImagePoolCache | None:
        if self.hparams.cache_dir is None:
            return None
        return ImagePoolCache(self.hparams.cache_dir, base, manifest, prompts, self.hparams.seed, extra)

    def adapter_fingerprint(self) -> str:
        """SHA-256 (16 hex digits) of the learned weights: pools of different customized models never mix."""
        digest = hashlib.sha256()
        for name, param in sorted(self.model.diffusion.unet.named_parameters()):
            if param.requires_grad:
                digest.update(name.encode("utf-8"))
                digest.update(param.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
        return digest.hexdigest()[:16]

    # ------------------------------------------------------------------ fit (§3.2)
    def on_fit_start(self) -> None:
        """Encode the category's prompts and make the class images of the prior term (base model), in the
        trainer's precision; then park CLIP and the CNN on the CPU, unused until inference."""
        datamodule = self._datamodule()
        if datamodule is None or not hasattr(datamodule, "categories"):
            raise RuntimeError("DreamBoothNormalModule needs a FewShotDataModule to know its category")
        category = self.single_category(datamodule.categories, "the datamodule")
        with self.trainer_precision():
            self.model.prepare_prompts(category)
            if self.hparams.prior_loss_weight > 0:
                self.model.set_class_latents(self.class_images(category))
        self.model.move_image_encoders("cpu")
        self._train_generator = torch.Generator(device=self.device).manual_seed(self.hparams.seed)

    def on_fit_end(self) -> None:
        """Bring CLIP and the CNN back to the module's device for inference."""
        self.model.move_image_encoders(self.device)

    def class_images(self, category: str) -> Tensor:
        """The DreamBooth prior-preservation images ``[N, 3, R, R]``: the base model's samples for the
        class prompt, cached under (base model, class prompt, seed, sampling settings)."""
        hp = self.hparams
        prompts = self.model.prepare_prompts(category)
        settings = SamplingSettings(1.0, hp.class_inference_steps, hp.class_guidance_scale)
        extra = {
            "kind": "one_to_normal/class_images",
            "resolution": hp.resolution,
            "scheduler": hp.scheduler,
            "steps": settings.num_inference_steps,
            "guidance": settings.guidance_scale,
        }
        class_prompt = ONE_TO_NORMAL_CLASS_PROMPT.format(prompts.class_name)
        cache = self._cache(hp.diffusion_model, None, [class_prompt], extra)

        def make(indices: list[int]) -> Tensor:
            with self.model.base_model():
                return generate_txt2img(
                    self.model.diffusion, prompts.class_embeds, indices, settings, hp.resolution, hp.seed
                ).cpu()

        return generate_pool_images(hp.num_class_images, make, hp.generation_batch_size, cache)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:  # noqa: ARG002
        self.single_category(batch[CATEGORY], "the training batch")
        losses = self.model.dreambooth_loss(
            batch[IMAGE], self.hparams.prior_loss_weight, generator=self._train_generator
        )
        size = batch[IMAGE].shape[0]
        self.log("train/loss", losses["loss"], prog_bar=True, batch_size=size)
        self.log("train/instance_loss", losses["instance_loss"], batch_size=size)
        self.log("train/prior_loss", losses["prior_loss"], batch_size=size)
        return losses["loss"]

    def configure_optimizers(self) -> torch.optim.Optimizer:
        params = self.model.trainable_parameters()
        if not params:
            raise RuntimeError("DreamBoothNormalModule has no trainable parameters")
        return torch.optim.AdamW(params, lr=self.learning_rate, weight_decay=self.hparams.weight_decay)

    # ------------------------------------------------------------------ anomaly-free pool (§3.4)
    def pool_split(self, num_shots: int, count: int | None = None) -> tuple[int, int]:
        """``(txt2img, from-reference)`` counts of the generated part of the pool."""
        generated = max(self.hparams.pool_size - num_shots, 0) if count is None else int(count)
        txt2img = round(generated * self.hparams.pool_txt2img_fraction)
        return txt2img, generated - txt2img

    def normal_pool_cache(
        self, manifest: dict | None, num_shots: int, count: int | None = None, cache_dir: str | None = None
    ) -> ImagePoolCache | None:
        """The cache entry of the pool the customized model generates for these shots, keyed by base
        model, manifest, prompts, seed, the learned weights' fingerprint and the sampling settings
        (``None`` when neither ``cache_dir`` nor the ``cache_dir`` hyperparameter is set). Needs the
        category's prompts (:meth:`OneToNormalModel.prepare_prompts`)."""
        hp = self.hparams
        folder = cache_dir if cache_dir is not None else hp.cache_dir
        if folder is None:
            return None
        prompts = self.model.prompts
        if not prompts.class_name:
            raise RuntimeError("prepare the category's prompts before asking for its pool cache")
        n_txt, n_ref = self.pool_split(num_shots, count)
        extra = {
            "kind": "one_to_normal/normal_pool",
            "adapter": self.adapter_fingerprint(),
            "resolution": hp.resolution,
            "scheduler": hp.scheduler,
            "steps": hp.pool_inference_steps,
            "guidance": hp.guidance_scale,
            "reference_strength": hp.reference_strength,
            "txt2img": n_txt,
            "from_references": n_ref,
        }
        prompt_list = [
            ONE_TO_NORMAL_INSTANCE_PROMPT.format(prompts.class_name),
            *prompts.personalization_prompts,
        ]
        return ImagePoolCache(folder, hp.diffusion_model, manifest, prompt_list, hp.seed, extra)

    @torch.no_grad()
    def generate_normal_pool(
        self,
        shots: dict[str, Any],
        manifest: dict | None = None,
        count: int | None = None,
        cache_dir: str | None = None,
    ) -> tuple[Tensor, ImagePoolCache | None]:
        """Generated anomaly-free images ``[G, 3, R, R]`` for the shots (§3.4, S_N paragraph), and the
        cache entry they were written to / read from (``None`` without a cache folder).

        The first ``round(G * pool_txt2img_fraction)`` are txt2img samples of the customized model for
        the instance prompt; the rest apply the §3.3 process to the shots. ``G`` is ``count``, or
        ``pool_size - k`` (the generated part of the memory-bank pool).
        """
        hp = self.hparams
        category = self.single_category(shots[CATEGORY], "the shots")
        prompts = self.model.prepare_prompts(category)
        references = shots[IMAGE].to(self.device)
        n_txt, n_ref = self.pool_split(references.shape[0], count)
        cache = self.normal_pool_cache(manifest, references.shape[0], count, cache_dir)
        if n_txt + n_ref == 0:
            return references.new_zeros(0, 3, hp.resolution, hp.resolution), cache
        txt_settings = SamplingSettings(1.0, hp.pool_inference_steps, hp.guidance_scale)
        ref_settings = SamplingSettings(hp.reference_strength, hp.pool_inference_steps, hp.guidance_scale)
        diffusion = self.model.diffusion

        reference_latents: list[Tensor] = []  # the shots' VAE latents, encoded once on first use

        def make(indices: list[int]) -> Tensor:
            txt = [i for i in indices if i < n_txt]
            ref = [i for i in indices if i >= n_txt]
            parts = {}
            if txt:
                images = generate_txt2img(
                    diffusion, prompts.instance_embeds, txt, txt_settings, hp.resolution, hp.seed
                )
                parts.update(zip(txt, images))
            if ref:
                if not reference_latents:
                    reference_latents.append(diffusion.encode_images(resize_images(references, hp.resolution)))
                images = generate_from_references(
                    diffusion,
                    reference_latents[0],
                    prompts.personalization_embeds,
                    [i - n_txt for i in ref],
                    ref_settings,
                    hp.seed + 1,
                )
                parts.update(zip(ref, images))
            return torch.stack([parts[i] for i in indices]).cpu()

        return generate_pool_images(n_txt + n_ref, make, hp.generation_batch_size, cache), cache

    # ------------------------------------------------------------------ inference (§3.3-3.4)
    def fit_shots(self, shots: dict[str, Any]) -> None:
        """Prompts of the category, the anomaly-free pool (shots + generated) and its memory bank M."""
        category = self.single_category(shots[CATEGORY], "the shots")
        self.model.prepare_prompts(category)
        if not self.model.use_pool:
            return
        images = shots[IMAGE]
        manifest = getattr(self._datamodule(), "manifest", None)
        generated, _ = self.generate_normal_pool(shots, manifest)
        pool = torch.cat([images, resize_images(generated.to(images), images.shape[-1])])
        self.model.fit_pool(pool)

    def predict_anomaly(self, batch: dict[str, Any]) -> AnomalyOutput:
        self.single_category(batch[CATEGORY], "the test batch")
        keys = [path_key(path) for path in batch[PATH]]
        output = self.model(batch[IMAGE], keys)
        return AnomalyOutput(pred_score=output.pred_score, anomaly_map=output.anomaly_map)
