"""What fsad sends to Weights & Biases besides the metrics Lightning logs itself.

With ``trainer.logger`` a :class:`~lightning.pytorch.loggers.WandbLogger`:

- metrics: logged by the module (``self.log_dict``) through the logger, nothing to add;
- hyper-parameters: Lightning logs the model's and datamodule's ``hparams`` to the run config;
- :class:`WandbMedia` adds the whole resolved ``fsad`` config (``config["fsad_config"]``) and the
  few-shot manifest, as a config entry (``config["manifest"]``: dataset, category, k_shot, seed, files)
  and as a ``manifest`` artifact holding ``manifest.json``;
- :func:`log_images_to_wandb` logs images as ``wandb.Image``; the
  :class:`~fsad_lightning.callbacks.visualizer.Visualizer` logs its overlays under ``test/overlays``, each
  captioned with its title line (file, image score, threshold and decision), and its worst-case sheet under
  ``test/worst_cases``, captioned with the rule that picked its false positives / negatives.

Everything works with ``WANDB_MODE=offline`` (or ``offline: true`` on the logger): the run, its media and
artifacts land in ``<save_dir>/wandb/offline-run-*`` for a later ``wandb sync``. Without a WandbLogger
every function here does nothing, so the callback can be added to any run.
"""

from __future__ import annotations

import json
import re
from typing import Any

import yaml
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.cli import SaveConfigCallback
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_only


def wandb_loggers(trainer: Trainer) -> list[WandbLogger]:
    """The trainer's W&B loggers (empty when it logs elsewhere)."""
    return [logger for logger in trainer.loggers if isinstance(logger, WandbLogger)]


@rank_zero_only
def log_images_to_wandb(
    trainer: Trainer, key: str, images: list[Any], captions: list[str] | None = None
) -> None:
    """Log ``images`` (PIL images or uint8 arrays) under ``key`` as ``wandb.Image`` to every W&B logger."""
    if not images:
        return
    kwargs = {"caption": list(captions)} if captions is not None else {}
    for logger in wandb_loggers(trainer):
        logger.log_image(key=key, images=list(images), **kwargs)


def resolved_config(trainer: Trainer) -> dict[str, Any] | None:
    """The run's full ``fsad`` config as LightningCLI resolved it, or ``None`` outside the CLI."""
    for callback in trainer.callbacks:
        if isinstance(callback, SaveConfigCallback):
            text = callback.parser.dump(callback.config, skip_none=False, format="yaml")
            return yaml.safe_load(text)
    return None


def manifest_summary(manifest: dict[str, Any]) -> dict[str, Any]:
    """The fields of a few-shot manifest that identify the run, for the W&B config."""
    keys = ("dataset", "dataset_version", "category", "k_shot", "seed", "files", "extra_normals")
    return {k: manifest[k] for k in keys if k in manifest}


def _artifact_name(manifest: dict[str, Any]) -> str:
    parts = ["manifest", manifest.get("category"), f"k{manifest.get('k_shot')}", f"s{manifest.get('seed')}"]
    name = "-".join(str(p) for p in parts if p is not None)
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


class WandbMedia(Callback):
    """Log the resolved config and the few-shot manifest to every W&B logger of the run.

    Runs once per stage (fit, test, predict) on rank zero; without a WandbLogger it does nothing.

    Args:
        log_manifest_artifact: also store ``manifest.json`` as a W&B artifact of type ``manifest``.
    """

    def __init__(self, log_manifest_artifact: bool = True) -> None:
        super().__init__()
        self.log_manifest_artifact = log_manifest_artifact

    @rank_zero_only
    def _log(self, trainer: Trainer) -> None:
        loggers = wandb_loggers(trainer)
        if not loggers:
            return
        config = resolved_config(trainer)
        manifest = getattr(trainer.datamodule, "manifest", None) if trainer.datamodule is not None else None
        for logger in loggers:
            run = logger.experiment
            entries: dict[str, Any] = {}
            if config is not None:
                entries["fsad_config"] = config
            if manifest is not None:
                entries["manifest"] = manifest_summary(manifest)
            if entries:
                run.config.update(json.loads(json.dumps(entries, default=str)), allow_val_change=True)
            if manifest is not None and self.log_manifest_artifact:
                import wandb

                artifact = wandb.Artifact(
                    _artifact_name(manifest), type="manifest", metadata=manifest_summary(manifest)
                )
                with artifact.new_file("manifest.json", mode="w", encoding="utf-8") as handle:
                    json.dump(manifest, handle, indent=2, sort_keys=True, default=str)
                run.log_artifact(artifact)

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._log(trainer)

    def on_test_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._log(trainer)

    def on_predict_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._log(trainer)
