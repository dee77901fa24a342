"""Lightning wrapper of PromptAD (trainable: ``fsad fit`` learns the prompts, ``fsad test`` scores).

``fsad fit`` runs a fixed schedule (SGD, cosine decay, ``trainer.max_epochs`` epochs, all shots in one
batch) and checkpoints the learned prompt vectors only; no checkpoint is chosen by test metrics.
``fsad test --ckpt_path`` restores them, re-lays out the prompts from the object name and rebuilds the
vision memory from the shots (:meth:`PromptADModule.fit_shots`).
"""

from __future__ import annotations

from typing import Any

import torch

from fsad_lightning.class_names import object_name
from fsad_lightning.data.batch import CATEGORY, IMAGE, AnomalyOutput
from fsad_lightning.methods.base import FewShotAnomalyModule
from fsad_lightning.methods.promptad.torch_model import PromptADModel
from fsad_lightning.scoring import DEFAULT_CHUNK


class PromptADModule(FewShotAnomalyModule):
    """PromptAD: one-class prompt learning with semantic concatenation and explicit anomaly margin.

    Li et al., "PromptAD: Learning Prompts with only Normal Samples for Few-Shot Anomaly Detection",
    CVPR 2024. See :mod:`fsad_lightning.methods.promptad.torch_model` for the method and our choices.

    Args:
        model_name: open_clip architecture (paper: ``ViT-B-16-plus-240``; ``fsad-tiny-vit`` offline).
        pretrained: open_clip tag (paper: LAION-400M, ``laion400m_e31``), a local checkpoint path, or
            ``null`` for random weights (tests and latency only).
        image_size: side the CLIP input is resized to (240; ``null``: the model's own).
        precision: open_clip precision of the frozen backbone.
        class_name: the ``[obj.]`` words of the prompts; default: the category's object name
            (:func:`fsad_lightning.class_names.object_name`, e.g. ``pcb1`` -> ``printed circuit board``).
        num_normal_prompts: ``N`` (3). num_prefix_tokens: ``E_N`` (4).
        num_learnable_suffixes: ``L`` (4). num_suffix_tokens: ``E_A`` (1).
        anomaly_suffixes: manual anomaly suffixes (eq. 10). ``null``: generic defect phrases, identical for
            every category (never the test set's defect names); a list for all categories; or an explicit
            mapping ``{category: [...], default: [...]}``.
        align_weight: ``lambda`` of ``L_align`` (eq. 15, 0.001).
        margin: margin of ``L_ema`` (eq. 13, 0).
        temperature: ``1 / tau``; ``null`` uses CLIP's own logit scale (the paper keeps CLIP's default).
        memory_layers: the two blocks (0-based) of the vision memory (eq. 8).
        vv_layers: final blocks with the VV local branch.
        semantic_concatenation / explicit_anomaly_margin / vision_guided: Table 3's SC / EAM / VAD switches.
        lr / momentum / weight_decay / min_lr: SGD and its cosine schedule (0.002, 0.9, 5e-4, 1e-5).
        sigma: Gaussian blur of the anomaly maps (4).
        chunk_size: query patches per memory-distance chunk.
        eval_size: see :class:`~fsad_lightning.methods.base.FewShotAnomalyModule`.
    """

    learning_type = "trainable"
    method_name = "promptad"

    def __init__(
        self,
        model_name: str = "ViT-B-16-plus-240",
        pretrained: str | None = "laion400m_e31",
        image_size: int | None = 240,
        precision: str = "fp32",
        class_name: str | None = None,
        num_normal_prompts: int = 3,
        num_prefix_tokens: int = 4,
        num_learnable_suffixes: int = 4,
        num_suffix_tokens: int = 1,
        anomaly_suffixes: list[str] | dict[str, list[str]] | None = None,
        align_weight: float = 0.001,
        margin: float = 0.0,
        temperature: float | None = None,
        memory_layers: list[int] = [5, 8],  # noqa: B006 -- a plain list reads well in YAML, never mutated
        vv_layers: int = 6,
        semantic_concatenation: bool = True,
        explicit_anomaly_margin: bool = True,
        vision_guided: bool = True,
        lr: float = 0.002,
        momentum: float = 0.9,
        weight_decay: float = 5e-4,
        min_lr: float = 1e-5,
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
        self.save_hyperparameters()
        self.model = PromptADModel(
            clip_model=model_name,
            clip_pretrained=pretrained,
            image_size=image_size,
            precision=precision,
            num_normal_prompts=num_normal_prompts,
            num_prefix_tokens=num_prefix_tokens,
            num_learnable_suffixes=num_learnable_suffixes,
            num_suffix_tokens=num_suffix_tokens,
            anomaly_suffixes=anomaly_suffixes,
            align_weight=align_weight,
            margin=margin,
            temperature=temperature,
            memory_layers=memory_layers,
            vv_layers=vv_layers,
            semantic_concatenation=semantic_concatenation,
            explicit_anomaly_margin=explicit_anomaly_margin,
            vision_guided=vision_guided,
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

    # ------------------------------------------------------------------ training
    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:  # noqa: ARG002
        self.prepare_prompts(batch)
        losses = self.model.compute_losses(batch[IMAGE])
        self.log_dict(
            {f"train/{name}": value.detach() for name, value in losses.items()},
            batch_size=batch[IMAGE].shape[0],
            on_step=False,
            on_epoch=True,
            prog_bar=False,
        )
        return losses["loss"]

    def build_optimizer(
        self, total_steps: int
    ) -> tuple[torch.optim.SGD, torch.optim.lr_scheduler.CosineAnnealingLR]:
        """SGD on the prompt vectors, cosine decay from ``lr`` to ``min_lr`` over ``total_steps`` steps."""
        if total_steps < 1:
            raise ValueError(f"total_steps must be >= 1, got {total_steps}")
        parameters = [p for p in self.parameters() if p.requires_grad]
        hp = self.hparams
        optimizer = torch.optim.SGD(parameters, lr=hp.lr, momentum=hp.momentum, weight_decay=hp.weight_decay)
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(
            optimizer, T_max=total_steps, eta_min=hp.min_lr
        )
        return optimizer, scheduler

    def configure_optimizers(self) -> dict[str, Any]:
        """:meth:`build_optimizer` over the whole run, the schedule stepping once per optimizer step.

        The length is ``trainer.estimated_stepping_batches``; with all shots in one batch (the paper's
        setting) that is one step per epoch over ``trainer.max_epochs``.
        """
        total = self.trainer.estimated_stepping_batches
        if total is None or not float(total) < float("inf") or total < 1:
            raise ValueError(
                "PromptAD trains on a fixed schedule: set trainer.max_epochs (or max_steps) to a positive "
                "number"
            )
        optimizer, scheduler = self.build_optimizer(int(total))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ------------------------------------------------------------------ inference
    def fit_shots(self, shots: dict[str, Any]) -> None:
        """Lay out the prompts, freeze the text prototypes and build the vision memory from the shots."""
        self.prepare_prompts(shots)
        self.model.freeze_text_prototypes()
        self.model.fit_memory(shots[IMAGE])

    def predict_anomaly(self, batch: dict[str, Any]) -> AnomalyOutput:
        scores, maps = self.model(batch[IMAGE])
        return AnomalyOutput(pred_score=scores, anomaly_map=maps)
