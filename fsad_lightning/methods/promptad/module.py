"""Lightning wrapper of PromptAD (trainable: ``fsad fit`` learns both prompt sets, ``fsad test`` scores).

``fsad fit`` runs a fixed schedule and checkpoints the learned prompt vectors of both sets only; no
checkpoint is chosen by test metrics. The official code trains the image-level set (``train_cls.py``,
100 epochs) and the pixel-level set (``train_seg.py``, 1 epoch) in two separate runs. One fit covers both:
each epoch computes the losses of the sets still training and takes one SGD step per batch, the two sets
in two parameter groups of one optimizer, each group with its own cosine schedule over its own number of
epochs (``image_epochs``, ``pixel_epochs``). The sets share no parameter and SGD updates every parameter
on its own, so this is the two official runs side by side; a set whose epochs are over gets no loss, no
gradient and no update. ``trainer.max_epochs`` is the longer of the two (``image_epochs: null`` means
``trainer.max_epochs``).

``fsad test --ckpt_path`` restores both sets, re-lays out the prompts from the object name and rebuilds the
vision memory from the shots (:meth:`PromptADModule.fit_shots`).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from fsad_lightning.class_names import object_name
from fsad_lightning.data.batch import CATEGORY, IMAGE, AnomalyOutput
from fsad_lightning.methods.base import FewShotAnomalyModule
from fsad_lightning.methods.promptad.torch_model import PROMPT_SETS, PromptADModel
from fsad_lightning.scoring import DEFAULT_CHUNK


class PromptADModule(FewShotAnomalyModule):
    """PromptAD: one-class prompt learning with semantic concatenation and explicit anomaly margin.

    Li et al., "PromptAD: Learning Prompts with only Normal Samples for Few-Shot Anomaly Detection",
    CVPR 2024. See :mod:`fsad_lightning.methods.promptad.torch_model` for the method, where we follow the
    official code and where we refuse it (best epoch chosen on the test set, test defect names as anomaly
    suffixes, BGR test images).

    Args:
        model_name: open_clip architecture (paper: ``ViT-B-16-plus-240``; ``fsad-tiny-vit`` offline).
        pretrained: open_clip tag (official: LAION-400M ``laion400m_e32``), a local checkpoint path, or
            ``null`` for random weights (tests and latency only).
        image_size: side the CLIP input is resized to (240; ``null``: the model's own).
        precision: open_clip precision of the frozen backbone.
        class_name: the ``[obj.]`` words of the prompts; default: the category's object name
            (:func:`fsad_lightning.class_names.object_name`, e.g. ``pcb1`` -> ``printed circuit board``).
        image_normal_prompts: ``N`` of the image-level prompt set (3). pixel_normal_prompts: ``N`` of the
            pixel-level set (1).
        num_prefix_tokens: ``E_N`` (4). num_learnable_suffixes: ``L`` (4). num_suffix_tokens: ``E_A`` (1).
        anomaly_suffixes: manual anomaly suffixes (eq. 10). ``null``: generic defect phrases, identical for
            every category (never the test set's defect names); a list for all categories; or an explicit
            mapping ``{category: [...], default: [...]}``.
        align_weight: ``lambda`` of ``L_align`` (eq. 15, 0.001).
        margin: margin of ``L_ema`` (eq. 13, 0).
        temperature: ``1 / tau``; ``null`` uses CLIP's own ``exp(logit_scale)`` (100 for the LAION-400M
            weights, the paper's default). The official code multiplies by the raw log scale
            (``ln 100 = 4.6052``): ``temperature: 4.6052`` reproduces it.
        memory_layers: the two blocks (0-based) of the vision memory (eq. 8; official ``[2, 7]``).
        memory_tokens: ``after_next_attention`` (official hooks: block output plus the next block's
            attention update) or ``block_output``.
        vv_layers: final blocks with the VV local branch; ``null``: every block (official).
        semantic_concatenation / explicit_anomaly_margin / vision_guided: Table 3's SC / EAM / VAD switches.
        image_epochs: epochs of the image-level set (``null``: ``trainer.max_epochs``; official 100).
        pixel_epochs: epochs of the pixel-level set (official 1; ``null``: ``trainer.max_epochs``).
        lr / momentum / weight_decay / min_lr: SGD and the cosine schedule of each set (0.002, 0.9, 5e-4,
            1e-5), stepped once per epoch as the official ``CosineAnnealingLR(T_max=epochs)``.
        map_size: side of the anomaly maps before evaluation (400, official); ``null``: the image size.
        sigma: Gaussian blur of the anomaly maps at ``map_size`` (4).
        chunk_size: query patches per memory-distance chunk.
        eval_size: see :class:`~fsad_lightning.methods.base.FewShotAnomalyModule`.
    """

    learning_type = "trainable"
    method_name = "promptad"
    #: settings of the vision memory and the maps only: the learned prompts do not depend on them
    inference_hparams = frozenset(
        {
            "map_size", "memory_layers", "memory_tokens", "vision_guided"
        }
    )

    def __init__(
        self,
        model_name: str = "ViT-B-16-plus-240",
        pretrained: str | None = "laion400m_e32",
        image_size: int | None = 240,
        precision: str = "fp32",
        class_name: str | None = None,
        image_normal_prompts: int = 3,
        pixel_normal_prompts: int = 1,
        num_prefix_tokens: int = 4,
        num_learnable_suffixes: int = 4,
        num_suffix_tokens: int = 1,
        anomaly_suffixes: list[str] | dict[str, list[str]] | None = None,
        align_weight: float = 0.001,
        margin: float = 0.0,
        temperature: float | None = None,
        memory_layers: list[int] = [2, 7],  # noqa: B006 -- a plain list reads well in YAML, never mutated
        memory_tokens: str = "after_next_attention",
        vv_layers: int | None = None,
        semantic_concatenation: bool = True,
        explicit_anomaly_margin: bool = True,
        vision_guided: bool = True,
        image_epochs: int | None = None,
        pixel_epochs: int | None = 1,
        lr: float = 0.002,
        momentum: float = 0.9,
        weight_decay: float = 5e-4,
        min_lr: float = 1e-5,
        map_size: int | None = 400,
        sigma: float = 4.0,
        chunk_size: int = DEFAULT_CHUNK,
        eval_size: int | None = None,
    ) -> None:
        super().__init__(eval_size=eval_size)
        if class_name is not None and not class_name.strip():
            raise ValueError("class_name must be a non-empty string or null")
        if lr <= 0 or min_lr < 0 or min_lr > lr:
            raise ValueError(f"need 0 <= min_lr <= lr and lr > 0, got lr={lr}, min_lr={min_lr}")
        if temperature is not None and temperature <= 0:
            raise ValueError(f"temperature must be positive or null, got {temperature}")
        for name, epochs in (("image_epochs", image_epochs), ("pixel_epochs", pixel_epochs)):
            if epochs is not None and (isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1):
                raise ValueError(f"{name} must be a positive int or null (trainer.max_epochs), got {epochs!r}")
        self.save_hyperparameters()
        self.model = PromptADModel(
            clip_model=model_name,
            clip_pretrained=pretrained,
            image_size=image_size,
            precision=precision,
            image_normal_prompts=image_normal_prompts,
            pixel_normal_prompts=pixel_normal_prompts,
            num_prefix_tokens=num_prefix_tokens,
            num_learnable_suffixes=num_learnable_suffixes,
            num_suffix_tokens=num_suffix_tokens,
            anomaly_suffixes=anomaly_suffixes,
            align_weight=align_weight,
            margin=margin,
            temperature=temperature,
            memory_layers=memory_layers,
            memory_tokens=memory_tokens,
            vv_layers=vv_layers,
            semantic_concatenation=semantic_concatenation,
            explicit_anomaly_margin=explicit_anomaly_margin,
            vision_guided=vision_guided,
            map_size=map_size,
            sigma=sigma,
            chunk_size=chunk_size,
        )
        self.class_name = class_name

    # ------------------------------------------------------------------ prompts follow the batch's category
    def prepare_prompts(self, batch: dict[str, Any]) -> None:
        """Lay out the prompts for the (single) category of ``batch``."""
        categories = sorted({str(c) for c in batch.get(CATEGORY) or []})
        if len(categories) > 1:
            raise ValueError(
                f"PromptAD learns prompts for one object, but the shots hold categories {categories}: "
                "fit one category per run (`fsad benchmark` loops over categories)"
            )
        if not categories and self.class_name is None:
            raise ValueError(f"the batch has no '{CATEGORY}' field: set PromptADModule's class_name")
        category = categories[0] if categories else self.class_name
        name = self.class_name if self.class_name is not None else object_name(category)
        self.model.set_class_name(name, category)

    # ------------------------------------------------------------------ the schedule of the two prompt sets
    def prompt_epochs(self, max_epochs: int | None) -> dict[str, int]:
        """Epochs of each prompt set, ``{"image": ..., "pixel": ...}``, for a run of ``max_epochs`` epochs.

        ``null`` settings take ``max_epochs``. A run must be as long as its longer set: a set longer than
        the run, or a run longer than both sets, is a ValueError naming the settings.
        """
        if max_epochs is None or max_epochs < 1:
            raise ValueError(
                "PromptAD trains on a fixed schedule of epochs: set trainer.max_epochs to a positive number"
            )
        hp = self.hparams
        epochs = {
            "image": max_epochs if hp.image_epochs is None else int(hp.image_epochs),
            "pixel": max_epochs if hp.pixel_epochs is None else int(hp.pixel_epochs),
        }
        if max(epochs.values()) != max_epochs:
            raise ValueError(
                f"trainer.max_epochs={max_epochs} but the prompt sets train for "
                f"image_epochs={epochs['image']} and pixel_epochs={epochs['pixel']}: set "
                f"trainer.max_epochs to {max(epochs.values())} (or image_epochs: null to follow it)"
            )
        return epochs

    @staticmethod
    def active_prompt_sets(epoch: int, epochs: dict[str, int]) -> tuple[str, ...]:
        """The prompt sets that train in (0-based) ``epoch``."""
        return tuple(name for name in PROMPT_SETS if epoch < epochs[name])

    # ------------------------------------------------------------------ training
    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:  # noqa: ARG002
        self.prepare_prompts(batch)
        prompt_sets = self.active_prompt_sets(self.current_epoch, self.prompt_epochs(self.trainer.max_epochs))
        losses = self.model.compute_losses(batch[IMAGE], prompt_sets)
        self.log_dict(
            {f"train/{name}": value.detach() for name, value in losses.items()},
            batch_size=batch[IMAGE].shape[0],
            on_step=False,
            on_epoch=True,
            prog_bar=False,
        )
        return losses["loss"]

    def build_optimizer(
        self, epochs: dict[str, int]
    ) -> tuple[torch.optim.SGD, torch.optim.lr_scheduler.LambdaLR]:
        """SGD on both prompt sets (one parameter group each) and a per-epoch schedule: each group decays
        from ``lr`` to ``min_lr`` on a cosine over its own ``epochs[set]`` epochs, as the official
        ``CosineAnnealingLR(T_max=epochs, eta_min=min_lr)`` stepped once per epoch."""
        hp = self.hparams
        groups, schedules = [], []
        for name in PROMPT_SETS:
            if epochs[name] < 1:
                raise ValueError(f"{name} prompts need at least 1 epoch, got {epochs[name]}")
            parameters = [p for p in self.model.prompt_learner(name).parameters() if p.requires_grad]
            groups.append({"params": parameters, "name": f"{name}_prompts"})
            schedules.append(_cosine_factor(epochs[name], hp.lr, hp.min_lr))
        optimizer = torch.optim.SGD(groups, lr=hp.lr, momentum=hp.momentum, weight_decay=hp.weight_decay)
        return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, schedules)

    def configure_optimizers(self) -> dict[str, Any]:
        """:meth:`build_optimizer` for :meth:`prompt_epochs` of ``trainer.max_epochs``, stepped per epoch."""
        optimizer, scheduler = self.build_optimizer(self.prompt_epochs(self.trainer.max_epochs))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"}}

    # ------------------------------------------------------------------ inference
    def fit_shots(self, shots: dict[str, Any]) -> None:
        """Lay out the prompts, freeze both sets' text prototypes and build the vision memory."""
        self.prepare_prompts(shots)
        self.model.freeze_text_prototypes()
        self.model.fit_memory(shots[IMAGE])

    def predict_anomaly(self, batch: dict[str, Any]) -> AnomalyOutput:
        scores, maps = self.model(batch[IMAGE])
        return AnomalyOutput(pred_score=scores, anomaly_map=maps)


def _cosine_factor(epochs: int, lr: float, min_lr: float):
    """``epoch -> lr_epoch / lr`` of a cosine from ``lr`` (epoch 0) towards ``min_lr`` (epoch ``epochs``)."""

    def factor(epoch: int) -> float:
        progress = min(epoch, epochs) / epochs
        return (min_lr + (lr - min_lr) * (1.0 + math.cos(math.pi * progress)) / 2.0) / lr

    return factor
