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

Checkpoints: besides the learned state (and Lightning's optimizer, LR-scheduler and loop state, so a fit
resumes where it stopped) a checkpoint holds ``fsad_manifest`` (the shots it was fitted on),
``fsad`` (:meth:`FewShotAnomalyModule.checkpoint_record`: the method class, the fsad version and the
hyper-parameters the learned state depends on) and ``fsad_generators`` (the state of the module's own
``torch.Generator`` s, restored when a fit resumes, so a resumed fit draws what an uninterrupted one
would; a method that overrides ``on_train_start`` calls ``super().on_train_start()``).
:meth:`FewShotAnomalyModule.checkpoint_mismatch` says, in one line, why a checkpoint does not belong to
the configured module and data; the configured method and arguments are never replaced by the
checkpoint's. Hyper-parameters in :data:`INFERENCE_HPARAMS` or a method's ``inference_hparams`` may
differ from the fit's (the configured value is used); every other one must equal it.

Test flow: ``on_test_start`` checks that a trainable method was fitted (or restored with
``--ckpt_path``) on the same shots the datamodule selects, sets the decision threshold
(:meth:`calibrate_threshold`), calls :meth:`fit_shots`, then every ``test_step`` scores the batch and
feeds the :class:`~fsad_lightning.metrics.Evaluator`; ``on_test_epoch_end`` computes the metrics
(synchronised across DDP ranks; beside the threshold-free ones, what the decision threshold gives),
logs them and keeps them in ``self.test_results`` for the results writer. ``predict`` runs the same
preparation.

Decision threshold (:mod:`fsad_lightning.thresholds`): :attr:`decision_threshold` is ``None`` until
set, then the score at or above which an image is anomalous; :attr:`threshold_record` says how it was set.
It is the configured ``threshold`` when there is one, else the label-free rule applied to the
leave-one-out scores of the shots (:meth:`leave_one_out_scores`): each shot scored against the memory
that :meth:`fit_shots` builds from the other shots. That default works for every method whose
inference state comes from :meth:`fit_shots`; a method may override :meth:`leave_one_out_scores` with
a cheaper exact one. For a trainable method only the shot memory is rebuilt without the held-out shot:
its learned state (prompts, adapters) was trained on every shot, so the held-out shot is not wholly
unseen and its score is, if anything, lower than a new good part's (the threshold errs towards false
alarms, not misses).

Shot memory (what :meth:`fit_shots` derives, e.g. a patch memory bank): :meth:`shot_memory` returns it
as tensors for a detector folder (:mod:`fsad_lightning.detector`) and :meth:`load_shot_memory` puts it
back. The default covers the module's non-persistent buffers, where methods keep their memories; a
method keeping shot state elsewhere rebuilds it with :meth:`fit_shots` from the shots the detector
also stores.
"""

from __future__ import annotations

import contextlib
import importlib
import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any, ClassVar, Literal

import torch
from lightning.pytorch import LightningModule

import fsad_lightning
from fsad_lightning.data.batch import IMAGE, MASK, PATH, AnomalyOutput, select_rows
from fsad_lightning.metrics import Evaluator
from fsad_lightning.thresholds import (
    ThresholdRecord,
    ThresholdRule,
    fixed_record,
    leave_one_out_record,
    require_calibration_shots,
)
from fsad_lightning.validation import warn_once

LearningType = Literal["training_free", "trainable"]
#: the checkpoint keys fsad adds: the fit's manifest, its record, the module's generator states
MANIFEST_KEY, RECORD_KEY, GENERATORS_KEY = "fsad_manifest", "fsad", "fsad_generators"
#: hyper-parameters that mean the same in every method and that a test may set otherwise than the fit:
#: they act only when scoring (map smoothing, memory chunking, metric resolution) or only on speed and
#: memory (where caches live, batch sizes of generation, compute precision of frozen backbones, gradient
#: checkpointing), never on what the learned state means
INFERENCE_HPARAMS = frozenset(
    {
        "sigma", "chunk_size", "eval_size", "cache_dir", "generation_batch_size", "inpaint_batch_size",
        "precision", "diffusion_dtype", "clip_precision", "gradient_checkpointing", "vae_batch_size",
        "personalization_batch_size", "compile",
    }
)


def class_path(cls: type) -> str:
    """``package.module.ClassName``: how checkpoints name the class that wrote them."""
    return f"{cls.__module__}.{cls.__qualname__}"


def names_class(path: str, cls: type) -> bool:
    """Whether the dotted ``path`` (``fsad_lightning.methods.promptad.PromptADModule`` or its defining
    module's spelling) names ``cls``."""
    module_name, _, name = path.rpartition(".")
    try:
        return getattr(importlib.import_module(module_name), name) is cls
    except (ImportError, AttributeError, ValueError):
        return path == class_path(cls)


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
    #: hyper-parameters of this method that act only when scoring (besides :data:`INFERENCE_HPARAMS`): a
    #: test may set them otherwise than the fit did; every other one must equal the checkpoint's
    inference_hparams: ClassVar[frozenset[str]] = frozenset()
    #: whether ``fsad test`` sets the label-free threshold (k more :meth:`fit_shots`); methods whose
    #: :meth:`fit_shots` is costly (generation, self-tuning) say False and report threshold rates only
    #: with a fixed ``threshold``; ``fsad predict`` / ``fsad export`` always set it
    threshold_in_test: ClassVar[bool] = True

    def __init__(self, eval_size: int | None = None) -> None:
        super().__init__()
        # checkpoints hold the learned state only; the frozen backbone comes from its own weights
        self.strict_loading = False
        self.evaluator = Evaluator(eval_size=eval_size)
        self.register_buffer("trained_epochs", torch.zeros((), dtype=torch.long))
        self.fit_manifest: dict[str, Any] | None = None
        self.test_results: dict[str, Any] | None = None
        self._shots_ready_for: tuple[str, ...] | None = None
        self._generators_to_restore: dict[str, torch.Tensor] | None = None
        #: the score at or above which an image is anomalous (None until set; see the module docstring)
        self.decision_threshold: float | None = None
        self.threshold_record: ThresholdRecord | None = None
        self.decision_rule = ThresholdRule()
        self.fixed_threshold: float | None = None
        self._threshold_for: tuple[str, ...] | None = None

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

    @contextlib.contextmanager
    def trainer_precision(self) -> Iterator[None]:
        """The trainer's precision context (bf16 autocast for ``bf16-mixed``), without gradients, for
        generation and encoding outside the Lightning steps (``on_fit_start`` and the hooks run in fp32
        otherwise); only ``no_grad`` without a trainer."""
        context = self.trainer.precision_plugin.forward_context() if self._trainer is not None else None
        with torch.no_grad(), context or contextlib.nullcontext():
            yield

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

    def fitted_hparams(self) -> dict[str, Any]:
        """The hyper-parameters the learned state depends on: all of a trainable method's except
        :data:`INFERENCE_HPARAMS` and :attr:`inference_hparams`; none for a training-free one."""
        if self.learning_type != "trainable":
            return {}
        free = INFERENCE_HPARAMS | self.inference_hparams
        return {k: v for k, v in dict(self.hparams).items() if k not in free and not k.startswith("_")}

    def checkpoint_record(self) -> dict[str, Any]:
        """What a checkpoint records of the module that wrote it (``checkpoint["fsad"]``)."""
        return {
            "method": class_path(type(self)),
            "fsad_version": fsad_lightning.__version__,
            "hyper_parameters": self.fitted_hparams(),
        }

    def min_image_size(self) -> tuple[int, str]:
        """The smallest ``data.image_size`` this method scores, and why: its Gaussian map smoothing
        (hyper-parameter ``sigma``) reflects ``ceil(4 sigma)`` pixels at each border, which needs a larger
        map; a method that smooths its maps at a size of its own (hyper-parameter ``map_size``) has no such
        limit. Methods with other limits override it."""
        hparams = dict(self.hparams)
        sigma = float(hparams.get("sigma") or 0.0)
        if sigma <= 0 or hparams.get("map_size") is not None:
            return 1, ""
        border = math.ceil(4.0 * sigma)
        return border + 1, f"its anomaly-map smoothing (sigma={sigma:g}) reflects {border} px at each border"

    def check_image_size(self, image_size: int | Sequence[int]) -> None:
        """ValueError naming ``data.image_size`` when it (its shorter side for ``[H, W]``) is below
        :meth:`min_image_size`."""
        minimum, reason = self.min_image_size()
        side = min(image_size) if isinstance(image_size, (list, tuple)) else image_size
        if side < minimum:
            raise ValueError(
                f"data.image_size={image_size} is too small for {type(self).__name__}: it needs at least "
                f"{minimum} px ({reason})"
            )

    def checkpoint_mismatch(
        self, checkpoint: dict[str, Any], path: str | None = None, manifest: dict[str, Any] | None = None
    ) -> str | None:
        """Why ``checkpoint`` (read from ``path``) does not fit this module and the data of ``manifest``,
        in one line naming both sides; ``None`` when it fits.

        Checked: the method class (from the fsad record, else Lightning's ``_class_path``), each fitted
        hyper-parameter (:meth:`fitted_hparams`), the shots and the ``dataset_version`` of the manifest.
        A checkpoint of a regenerated dataset (same shot names, other ``dataset_version``) is refused: the
        version is the only evidence that the shot files hold the images the state was fitted on, and the
        results of such a run would describe a fit that never happened (refit, or point root at the
        original data).
        """
        what = f"checkpoint {path}" if path else "the checkpoint"
        record = checkpoint.get(RECORD_KEY) or {}
        hparams = checkpoint.get("hyper_parameters") or {}
        method = record.get("method") or hparams.get("_class_path")
        if method and not names_class(method, type(self)):
            return (
                f"{what} was written by {method.rpartition('.')[2]} but the config runs "
                f"{type(self).__name__}: give the config of that method, or a checkpoint of this one"
            )
        fitted = record.get("hyper_parameters", hparams)
        for name, configured in self.fitted_hparams().items():
            if name in fitted and _plain(fitted[name]) != _plain(configured):
                return (
                    f"{what} was fitted with {name}={fitted[name]!r} but the config sets "
                    f"{name}={configured!r}: set it as the fit did, or fit again with the new value"
                )
        version = record.get("fsad_version")
        if version and version != fsad_lightning.__version__:
            warn_once(f"{what} was written by fsad {version}, this is fsad {fsad_lightning.__version__}")
        fit_manifest = checkpoint.get(MANIFEST_KEY)
        if manifest is not None and fit_manifest is not None:
            return manifest_mismatch(fit_manifest, manifest, what)
        return None

    def _generators(self) -> dict[str, torch.Generator]:
        """The module's own random generators (attributes of it or its sub-modules), by dotted name."""
        found = {}
        for prefix, module in self.named_modules():
            for name, value in vars(module).items():
                if isinstance(value, torch.Generator):
                    found[f"{prefix}.{name}" if prefix else name] = value
        return found

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        keep = self.learned_state_keys()
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in keep}
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        manifest = getattr(datamodule, "manifest", None)
        if manifest is not None:
            checkpoint[MANIFEST_KEY] = manifest
        checkpoint[RECORD_KEY] = self.checkpoint_record()
        generators = {name: g.get_state() for name, g in self._generators().items()}
        if generators:
            checkpoint[GENERATORS_KEY] = generators

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.fit_manifest = checkpoint.get(MANIFEST_KEY)
        mismatch = self.checkpoint_mismatch(checkpoint)
        if mismatch:
            raise ValueError(mismatch)
        expected = self.learned_state_keys()
        unexpected = set(checkpoint["state_dict"]) - expected - set(self.state_dict())
        if unexpected:
            raise ValueError(
                f"checkpoint has state {sorted(unexpected)[:5]} that {type(self).__name__} does not know: "
                "was it written by another method or configuration?"
            )
        self._generators_to_restore = checkpoint.get(GENERATORS_KEY)

    def on_train_start(self) -> None:
        """On a resumed fit: the module's generators continue from the checkpoint's state (a method seeds
        them in ``on_fit_start``, which runs before this)."""
        states, self._generators_to_restore = self._generators_to_restore, None
        generators = self._generators()
        for name, state in (states or {}).items():
            if name in generators:
                generators[name].set_state(state)

    # ------------------------------------------------------------------ decision threshold
    def configure_threshold(self, threshold: float | None = None, rule: ThresholdRule | None = None) -> None:
        """Use the fixed ``threshold`` (a float) or, when ``None``, the label-free ``rule`` (default
        :class:`~fsad_lightning.thresholds.ThresholdRule`); takes effect at the next preparation."""
        self.fixed_threshold = None if threshold is None else fixed_record(threshold).value
        self.decision_rule = rule if rule is not None else ThresholdRule()
        self._threshold_for = None
        self.decision_threshold, self.threshold_record = None, None

    def leave_one_out_scores(
        self, shots: dict[str, Any], views: int = 0, augment: Callable[..., Any] | None = None, seed: int = 0
    ) -> torch.Tensor:
        """The normal scores of the label-free threshold: for each shot ``i``, :meth:`fit_shots` on the
        other shots, then shot ``i`` scored (and ``views`` views of it made by
        ``augment(image, mask, seed=...)``); float32 ``[n * (1 + views)]``. The caller rebuilds the
        memory of all shots afterwards (:meth:`fit_shots`). Needs at least 2 shots."""
        n = int(shots[IMAGE].shape[0])
        require_calibration_shots(n)
        scores = []
        for i in range(n):
            self.fit_shots(select_rows(shots, [j for j in range(n) if j != i]))
            held_out = select_rows(shots, [i])
            scores.append(self._score(held_out).pred_score.float().reshape(-1))
            if views and augment is not None:
                images = held_out[IMAGE].repeat(views, 1, 1, 1)
                masks = held_out.get(MASK)
                masks = torch.zeros_like(images[:, :1]) if masks is None else masks.repeat(views, 1, 1, 1)
                images, _ = augment(images, masks, seed=seed * 1_000_003 + i)
                view_batch = select_rows(held_out, [0] * views)
                view_batch[IMAGE] = images.to(held_out[IMAGE].dtype)
                scores.append(self._score(view_batch).pred_score.float().reshape(-1))
        return torch.cat(scores).detach().cpu()

    def threshold_views_augment(self, datamodule: Any) -> Callable[..., Any] | None:
        """The datamodule's shot augmentation when the threshold rule scores augmented ``views`` of the
        held-out shots, else ``None`` (kornia is imported only then)."""
        if not self.decision_rule.views:
            return None
        from fsad_lightning.data.augment import FewShotAugment

        return FewShotAugment(getattr(datamodule, "augment_config", None))

    def calibrate_threshold(
        self, shots: dict[str, Any], augment: Callable[..., Any] | None = None, seed: int = 0, required: bool = True
    ) -> ThresholdRecord | None:
        """Set :attr:`decision_threshold` from the configured value, else from the leave-one-out scores
        of ``shots`` (:mod:`fsad_lightning.thresholds`). With fewer than 2 shots and no fixed value it
        raises the one-line ValueError of :func:`~fsad_lightning.thresholds.require_calibration_shots`
        when ``required``, else warns and leaves the threshold unset. Leaves the memory of some subset of
        the shots behind: call :meth:`fit_shots` on all of them next."""
        if self.fixed_threshold is not None:
            record = fixed_record(self.fixed_threshold)
        else:
            n = int(shots[IMAGE].shape[0])
            if n < 2 and not required:
                warn_once(
                    f"{n} normal shot: no label-free threshold (leave-one-out needs 2 shots), so no decisions "
                    "and no threshold metrics; set `threshold: <float>` to have them"
                )
                self.decision_threshold, self.threshold_record = None, None
                return None
            rule = self.decision_rule
            scores = self.leave_one_out_scores(shots, rule.views, augment if rule.views else None, seed)
            record = leave_one_out_record(scores, rule, n)
        self.decision_threshold, self.threshold_record = record.value, record
        return record

    # ------------------------------------------------------------------ shot memory (detector folders)
    def shot_memory(self) -> dict[str, torch.Tensor]:
        """What :meth:`fit_shots` built, as tensors: by default every non-persistent buffer (the memory
        banks and prototypes methods keep there), on the CPU."""
        persistent = set(self.state_dict())
        return {
            name: buffer.detach().cpu().clone()
            for name, buffer in self.named_buffers()
            if name not in persistent and buffer is not None
        }

    def load_shot_memory(self, memory: dict[str, torch.Tensor]) -> None:
        """Put back what :meth:`shot_memory` returned (after :meth:`fit_shots` rebuilt any other state).

        Raises:
            ValueError: a name this module has no buffer for (a detector of another configuration).
        """
        buffers = dict(self.named_buffers())
        unknown = sorted(set(memory) - set(buffers))
        if unknown:
            raise ValueError(
                f"the shot memory has {unknown[:3]} that {type(self).__name__} does not hold: was it written "
                "by another method or configuration?"
            )
        for name, value in memory.items():
            owner_name, _, attribute = name.rpartition(".")
            owner = self.get_submodule(owner_name) if owner_name else self
            owner._buffers[attribute] = value.to(device=buffers[name].device)

    # ------------------------------------------------------------------ inference
    def check_fitted(self, manifest: dict[str, Any] | None) -> None:
        """ValueError (one line) when a trainable method has no learned state, or was fitted on other
        shots than ``manifest`` names."""
        if self.learning_type == "trainable" and int(self.trained_epochs) == 0:
            raise ValueError(
                f"{type(self).__name__} has learned state: run `fsad fit` first or pass --ckpt_path to a "
                "checkpoint written by it"
            )
        if self.fit_manifest is not None and manifest is not None:
            mismatch = manifest_mismatch(self.fit_manifest, manifest, "the checkpoint")
            if mismatch:
                raise ValueError(mismatch)

    def prepare_for_inference(self) -> None:
        """Check fitted state, set the decision threshold and build the shot-derived state from the
        datamodule's shots (see the module docstring). Without a threshold (one shot, no fixed value) a
        test runs without threshold metrics and a prediction without decisions (a warning says so)."""
        datamodule = getattr(self.trainer, "datamodule", None)
        if datamodule is None or not hasattr(datamodule, "shot_batch"):
            raise RuntimeError(f"{type(self).__name__} needs a FewShotDataModule to provide its normal shots")
        manifest = datamodule.manifest
        self.check_fitted(manifest)
        key = tuple(manifest.get("files", ())) + tuple(manifest.get("extra_normals", ()))
        if self._shots_ready_for != key or self._threshold_for != key:
            shots = datamodule.shot_batch()
            shots = self.transfer_batch_to_device(shots, self.device, 0)
            # the shots' memory is encoded in the precision the queries are (Lightning runs test_step /
            # predict_step under the precision plugin's autocast), so a query equal to a shot scores 0
            with self.trainer_precision():
                skip = self.trainer.testing and not self.threshold_in_test and self.fixed_threshold is None
                if self._threshold_for != key and skip:
                    warn_once(
                        f"{type(self).__name__}: `fsad test` reports no threshold rates (the label-free "
                        "threshold costs k more shot fits here; `fsad predict` / `fsad export` set it): "
                        "give `threshold: <float>` to have them"
                    )
                    self.decision_threshold, self.threshold_record = None, None
                elif self._threshold_for != key:
                    self.calibrate_threshold(
                        shots, self.threshold_views_augment(datamodule), int(getattr(datamodule, "seed", 0)),
                        required=False,
                    )
                    self._threshold_for = key
                self.fit_shots(shots)
            self._shots_ready_for = key

    def on_test_start(self) -> None:
        self.prepare_for_inference()
        # several categories in one test run (multi-class): metrics per category and their mean
        self.evaluator.set_categories(getattr(self.trainer.datamodule, "categories", None))
        self.evaluator.decision_threshold = self.decision_threshold
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
        if self.threshold_record is not None:
            self.test_results["threshold_record"] = self.threshold_record.to_dict()

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Any]:  # noqa: ARG002
        output = self._score(batch).detach_cpu()
        return {PATH: batch[PATH], "pred_score": output.pred_score, "anomaly_map": output.anomaly_map}


def _plain(value: Any) -> Any:
    """A hyper-parameter as compared across a checkpoint and a config (tuples and lists alike)."""
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def manifest_mismatch(fitted: dict[str, Any], current: dict[str, Any], what: str) -> str | None:
    """Why a fit on the manifest ``fitted`` does not apply to the data of ``current`` (one line), or
    ``None``: other shots, or the same shot names in a dataset of another ``dataset_version``."""

    def shots(manifest: dict[str, Any]) -> str:
        return ", ".join(f"{key}={manifest.get(key)}" for key in ("category", "k_shot", "seed"))

    if fitted.get("files") != current.get("files"):
        return (
            f"{what} was fitted on other shots ({shots(fitted)}) than the datamodule selects "
            f"({shots(current)}): use the same data settings"
        )
    old, new = fitted.get("dataset_version"), current.get("dataset_version")
    if old and new and old != new:
        return (
            f"{what} was fitted on dataset version {old} but {current.get('root')} is version {new} (its "
            "files were added, removed or changed since): fit again, or use the data it was fitted on"
        )
    return None
