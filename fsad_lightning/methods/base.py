"""``FewShotAnomalyModule``: the Lightning glue every method shares.

A method subclasses it and provides:

- :meth:`fit_shots` -- build what inference needs from the k normal shots (memory banks, reference
  features). Called once before test / predict with the datamodule's un-augmented shots (plus any
  ``extra_normal_dirs`` images). The shots are derived from the run's manifest, so this state is
  rebuilt, never stored in checkpoints.
- :meth:`predict_anomaly` -- score a batch: :class:`~fsad_lightning.data.batch.AnomalyOutput`.
- for trainable methods (``learning_type = "trainable"``): ``training_step`` and
  ``configure_optimizers``. Only parameters with ``requires_grad`` (prompts, tokens, LoRA adapters)
  and the names listed in ``extra_learned_state`` go into a checkpoint; frozen backbones never do.

Test flow: ``on_test_start`` checks that a trainable method was fitted (or restored with
``--ckpt_path``) on the same shots the datamodule selects, calls :meth:`fit_shots`, then every
``test_step`` scores the batch and feeds the :class:`~fsad_lightning.metrics.Evaluator`;
``on_test_epoch_end`` computes the metrics (synchronised across DDP ranks), logs them and keeps them
in ``self.test_results`` for the results writer.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar, Literal

import torch
from lightning.pytorch import LightningModule

from fsad_lightning.data.batch import IMAGE, PATH, AnomalyOutput
from fsad_lightning.metrics import Evaluator

LearningType = Literal["training_free", "trainable"]


class FewShotAnomalyModule(LightningModule):
    """Base class of every few-shot anomaly detection method in fsad_lightning.

    Args:
        eval_size: side length at which pixel metrics are computed; ``None`` (default) evaluates at
            each image's ground-truth resolution, upsampling the anomaly map per image.
    """

    learning_type: ClassVar[LearningType] = "training_free"
    method_name: ClassVar[str] = "base"
    #: names (as in ``state_dict``) of buffers that are learned state besides trainable parameters
    extra_learned_state: ClassVar[tuple[str, ...]] = ()
    #: why a method fits one category at a time, named in :meth:`single_category`'s error
    single_category_reason: ClassVar[str] = "fits one category at a time"

    def __init__(self, eval_size: int | None = None) -> None:
        super().__init__()
        # checkpoints hold the learned state only; the frozen backbone comes from its own weights
        self.strict_loading = False
        self.evaluator = Evaluator(eval_size=eval_size)
        self.register_buffer("trained_epochs", torch.zeros((), dtype=torch.long))
        self.fit_manifest: dict[str, Any] | None = None
        self.test_results: dict[str, Any] | None = None
        self._shots_ready_for: tuple[str, ...] | None = None

    # ------------------------------------------------------------------ precision
    @property
    def compute_dtype(self) -> torch.dtype:
        """The dtype the trainer computes in: bf16 for ``bf16-mixed`` / ``bf16-true``, fp16 for
        ``16-mixed`` / ``16-true``, else fp32 (also without a trainer). Frozen backbones may be cast to it
        (a mixed-precision run computes their matmuls in it anyway); learned state and every score stay
        fp32."""
        trainer = self._trainer
        precision = str(getattr(trainer, "precision", "32-true")) if trainer is not None else "32-true"
        if precision.startswith("bf16"):
            return torch.bfloat16
        if precision.startswith("16"):
            return torch.float16
        return torch.float32

    # ------------------------------------------------------------------ what a method implements
    def fit_shots(self, shots: dict[str, Any]) -> None:
        """Build inference state (memory banks, reference features) from a batch of normal shots."""

    def predict_anomaly(self, batch: dict[str, Any]) -> AnomalyOutput:
        raise NotImplementedError(f"{type(self).__name__} must implement predict_anomaly")

    def single_category(self, categories: Sequence[str], where: str) -> str:
        """The one category of ``where`` (the datamodule, the shots, a batch), or a ValueError that says
        why the method needs a single category (:attr:`single_category_reason`)."""
        unique = sorted({str(c) for c in categories})
        if len(unique) != 1:
            raise ValueError(
                f"{where} holds categories {unique}: {type(self).__name__} {self.single_category_reason}, "
                "so run one category at a time (data.category: <name>)"
            )
        return unique[0]

    # ------------------------------------------------------------------ training (trainable methods)
    def training_step(self, batch: dict[str, Any], batch_idx: int):  # noqa: ARG002
        if self.learning_type == "trainable":
            raise NotImplementedError(f"{type(self).__name__} is trainable and must implement training_step")
        return None  # training-free: `fsad fit` only records the manifest

    def configure_optimizers(self):
        if self.learning_type == "trainable":
            raise NotImplementedError(f"{type(self).__name__} must implement configure_optimizers")
        return None

    def on_train_epoch_end(self) -> None:
        self.trained_epochs += 1

    # ------------------------------------------------------------------ checkpoints: learned state only
    def learned_state_keys(self) -> set[str]:
        keys = {name for name, p in self.named_parameters() if p.requires_grad}
        keys.add("trained_epochs")
        keys.update(self.extra_learned_state)
        return keys

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        keep = self.learned_state_keys()
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in keep}
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        manifest = getattr(datamodule, "manifest", None)
        if manifest is not None:
            checkpoint["fsad_manifest"] = manifest

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.fit_manifest = checkpoint.get("fsad_manifest")
        expected = self.learned_state_keys()
        unexpected = set(checkpoint["state_dict"]) - expected - set(self.state_dict())
        if unexpected:
            raise ValueError(
                f"checkpoint has state {sorted(unexpected)[:5]} that {type(self).__name__} does not know: "
                "was it written by another method or configuration?"
            )

    # ------------------------------------------------------------------ inference
    def prepare_for_inference(self) -> None:
        """Check fitted state and build the shot-derived state from the datamodule's shots."""
        datamodule = getattr(self.trainer, "datamodule", None)
        if datamodule is None or not hasattr(datamodule, "shot_batch"):
            raise RuntimeError(f"{type(self).__name__} needs a FewShotDataModule to provide its normal shots")
        manifest = datamodule.manifest
        if self.learning_type == "trainable" and int(self.trained_epochs) == 0:
            raise RuntimeError(
                f"{type(self).__name__} has learned state: run `fsad fit` first or pass --ckpt_path to a "
                "checkpoint written by it"
            )
        if self.fit_manifest is not None and self.fit_manifest.get("files") != manifest.get("files"):
            raise ValueError(
                "the checkpoint was fitted on other shots "
                f"(category={self.fit_manifest.get('category')}, k_shot={self.fit_manifest.get('k_shot')}, "
                f"seed={self.fit_manifest.get('seed')}) than the datamodule selects "
                f"(category={manifest.get('category')}, k_shot={manifest.get('k_shot')}, "
                f"seed={manifest.get('seed')}): test with the same data settings"
            )
        key = tuple(manifest.get("files", ())) + tuple(manifest.get("extra_normals", ()))
        if self._shots_ready_for != key:
            shots = datamodule.shot_batch()
            shots = self.transfer_batch_to_device(shots, self.device, 0)
            # the shots' memory is encoded in the precision the queries are (Lightning runs test_step /
            # predict_step under the precision plugin's autocast), so a query equal to a shot scores 0
            with torch.no_grad(), self.trainer.precision_plugin.forward_context():
                self.fit_shots(shots)
            self._shots_ready_for = key

    def on_test_start(self) -> None:
        self.prepare_for_inference()
        # several categories in one test run (multi-class): metrics per category and their mean
        self.evaluator.set_categories(getattr(self.trainer.datamodule, "categories", None))
        self.evaluator.reset()

    def on_predict_start(self) -> None:
        self.prepare_for_inference()

    def _score(self, batch: dict[str, Any]) -> AnomalyOutput:
        output = self.predict_anomaly(batch)
        # scores and maps are float32 whatever the trainer's precision (the shared scoring math is)
        output.pred_score = output.pred_score.float()
        if output.anomaly_map is not None:
            output.anomaly_map = output.anomaly_map.float()
        n = batch[IMAGE].shape[0]
        if output.pred_score.shape != (n,):
            raise RuntimeError(
                f"{type(self).__name__}.predict_anomaly returned pred_score of shape "
                f"{tuple(output.pred_score.shape)}, expected ({n},)"
            )
        if output.anomaly_map is not None and (output.anomaly_map.ndim != 3 or output.anomaly_map.shape[0] != n):
            raise RuntimeError(
                f"{type(self).__name__}.predict_anomaly returned anomaly_map of shape "
                f"{tuple(output.anomaly_map.shape)}, expected ({n}, H, W)"
            )
        return output

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> AnomalyOutput:  # noqa: ARG002
        output = self._score(batch)
        self.evaluator.update(output, batch)
        return output

    def on_test_epoch_end(self) -> None:
        metrics = self.evaluator.compute()
        logged = {k: float(v) for k, v in metrics.items() if isinstance(v, float)}
        for category, values in metrics.get("per_category", {}).items():
            logged.update({f"{k}/{category}": float(v) for k, v in values.items() if isinstance(v, float)})
        self.log_dict(logged, sync_dist=False)
        self.test_results = dict(metrics)

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Any]:  # noqa: ARG002
        output = self._score(batch).detach_cpu()
        return {PATH: batch[PATH], "pred_score": output.pred_score, "anomaly_map": output.anomaly_map}
