"""Lightning wrapper of WinCLIP / WinCLIP+ (training-free: ``fsad test`` runs it directly).

With shots (the datamodule's ``k_shot >= 1``) it is WinCLIP+: :meth:`WinCLIPModule.fit_shots` builds the
reference memory of each category from the shots. ``zero_shot: true`` ignores the shots and runs the
language-only WinCLIP (the datamodule still needs ``k_shot >= 1`` to draw its manifest).
"""

from __future__ import annotations

from typing import Any

from fsad_lightning.backbones.clip import load_clip
from fsad_lightning.class_names import object_name
from fsad_lightning.data.batch import CATEGORY, IMAGE, AnomalyOutput
from fsad_lightning.methods.base import FewShotAnomalyModule
from fsad_lightning.methods.winclip.torch_model import WinCLIPModel
from fsad_lightning.prompts import WINCLIP_ANOMALOUS_STATES, WINCLIP_NORMAL_STATES, WINCLIP_TEMPLATES
from fsad_lightning.scoring import upsample_and_smooth


class WinCLIPModule(FewShotAnomalyModule):
    """WinCLIP (zero-shot) / WinCLIP+ (few-normal-shot), Jeong et al., CVPR 2023.

    See :mod:`fsad_lightning.methods.winclip.torch_model` for the method and the choices made.

    Args:
        model_name: open_clip architecture (the paper: ``ViT-B-16-plus-240``; ``fsad-tiny-vit`` offline).
        pretrained: open_clip tag, local checkpoint path, or ``null`` for random weights (tests only).
        image_size: side the CLIP input is resized to (240 in the paper; ``null``: the model's own).
        precision: open_clip precision of the backbone (``fp32``, ``fp16``, ``bf16``, ...).
        window_sizes: window scales in patches (``[2, 3]``: 32 and 48 px windows of ViT-B-16+ at 240 px).
        temperature: ``1 / tau`` of the text softmax (CLIP's logit scale, 100).
        zero_shot: ignore the shots (WinCLIP); ``false`` uses them as reference memory (WinCLIP+).
        class_name: object name put into the prompts; default: each image's category with ``_`` read
            as a space (``metal_nut`` -> ``metal nut``).
        normal_states / anomalous_states / templates: the compositional prompt ensemble; ``null`` uses
            WinCLIP's lists (:mod:`fsad_lightning.prompts`). Each entry has one ``{}`` slot.
        patch_layer: block whose (``ln_post``-normalised) patch tokens form the patch-level memory.
        project_patch_tokens: map the patch-level tokens into the joint space (``+ proj``).
        sigma: Gaussian blur of the upsampled anomaly map (``0`` disables it).
        eval_size: see :class:`~fsad_lightning.methods.base.FewShotAnomalyModule`.
    """

    learning_type = "training_free"
    method_name = "winclip"

    def __init__(
        self,
        model_name: str = "ViT-B-16-plus-240",
        pretrained: str | None = "laion400m_e31",
        image_size: int | None = 240,
        precision: str = "fp32",
        window_sizes: list[int] = [2, 3],  # noqa: B006 -- a plain list reads well in YAML and is never mutated
        temperature: float = 100.0,
        zero_shot: bool = False,
        class_name: str | None = None,
        normal_states: list[str] | None = None,
        anomalous_states: list[str] | None = None,
        templates: list[str] | None = None,
        patch_layer: int = -1,
        project_patch_tokens: bool = False,
        sigma: float = 4.0,
        eval_size: int | None = None,
    ) -> None:
        super().__init__(eval_size=eval_size)
        if class_name is not None and not class_name.strip():
            raise ValueError("class_name must be a non-empty string or null")
        self.save_hyperparameters()
        backbone = load_clip(model_name, pretrained=pretrained, image_size=image_size, precision=precision)
        self.model = WinCLIPModel(
            backbone,
            window_sizes=window_sizes,
            temperature=temperature,
            normal_states=WINCLIP_NORMAL_STATES if normal_states is None else normal_states,
            anomalous_states=WINCLIP_ANOMALOUS_STATES if anomalous_states is None else anomalous_states,
            templates=WINCLIP_TEMPLATES if templates is None else templates,
            patch_layer=patch_layer,
            project_patch_tokens=project_patch_tokens,
        )
        self.zero_shot = zero_shot
        self.class_name = class_name
        self.sigma = sigma

    def _categories(self, batch: dict[str, Any]) -> list[str]:
        n = batch[IMAGE].shape[0]
        categories = batch.get(CATEGORY)
        if categories is None:
            if self.class_name is None:
                raise ValueError(f"the batch has no '{CATEGORY}' field: set WinCLIPModule's class_name")
            return [self.class_name] * n
        return [str(c) for c in categories]

    def prompt_name(self, category: str) -> str:
        """The object name in the prompts for ``category``."""
        return self.class_name if self.class_name is not None else object_name(category)

    def fit_shots(self, shots: dict[str, Any]) -> None:
        """WinCLIP+: one reference memory per category of the shots (nothing in zero-shot mode)."""
        self.model.reset_reference()
        if self.zero_shot:
            return
        categories = self._categories(shots)
        for category in sorted(set(categories)):
            rows = [i for i, c in enumerate(categories) if c == category]
            self.model.fit_reference(shots[IMAGE][rows], category)

    def predict_anomaly(self, batch: dict[str, Any]) -> AnomalyOutput:
        images = batch[IMAGE]
        categories = self._categories(batch)
        output = self.model(images, [self.prompt_name(c) for c in categories], categories)
        anomaly_map = upsample_and_smooth(output.grid_map, tuple(images.shape[-2:]), sigma=self.sigma)
        return AnomalyOutput(pred_score=output.pred_score, anomaly_map=anomaly_map)
