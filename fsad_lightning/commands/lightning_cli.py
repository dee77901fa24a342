"""``fsad fit|validate|test|predict``: the LightningCLI wiring.

``fsad fit|validate|test|predict --config X.yaml`` is a :class:`FSADCLI`, a LightningCLI whose model is
any :class:`~fsad_lightning.methods.base.FewShotAnomalyModule` and whose data is a
:class:`~fsad_lightning.data.FewShotDataModule`, both given as ``class_path`` / ``init_args``.
Every run writes its manifest; ``test`` writes results.json / .csv / .md into the run folder, ``predict``
predictions.csv and anomaly_maps.npz. ``--config`` also takes the name of a bundled config
(:mod:`fsad_lightning.commands.configs`).

The dispatcher (:mod:`fsad_lightning.commands.dispatch`) runs it and turns a user error into one line.
"""

from __future__ import annotations

import sys
from typing import Any

from jsonargparse import Namespace
from lightning.pytorch.cli import ArgsType, LightningArgumentParser, LightningCLI

from fsad_lightning.callbacks.predictions import PredictionWriter
from fsad_lightning.callbacks.results import ManifestWriter, ResultsWriter
from fsad_lightning.callbacks.wandb_media import WandbMedia
from fsad_lightning.commands.configs import resolve_config_args
from fsad_lightning.data import FewShotDataModule
from fsad_lightning.methods.base import FewShotAnomalyModule

TRAINER_DEFAULTS: dict[str, Any] = {
    "logger": {
        "class_path": "lightning.pytorch.loggers.CSVLogger",
        "init_args": {"save_dir": "runs", "name": "fsad"},
    },
    "max_epochs": 1,
    "num_sanity_val_steps": 0,
    "enable_model_summary": False,
}


class FSADCLI(LightningCLI):
    """LightningCLI for few-shot anomaly detection (see the module docstring)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("model_class", FewShotAnomalyModule)
        kwargs.setdefault("datamodule_class", FewShotDataModule)
        kwargs.setdefault("subclass_mode_model", True)
        kwargs.setdefault("subclass_mode_data", True)
        kwargs.setdefault("trainer_defaults", TRAINER_DEFAULTS)
        kwargs.setdefault("seed_everything_default", 0)
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        kwargs.setdefault("auto_configure_optimizers", False)
        super().__init__(*args, **kwargs)

    def parse_arguments(self, parser: LightningArgumentParser, args: ArgsType) -> None:
        """LightningCLI's parsing, with every ``--config`` value that names a bundled config resolved to
        its file (:func:`~fsad_lightning.commands.configs.resolve_config_args`)."""
        if isinstance(args, (dict, Namespace)):
            super().parse_arguments(parser, args)
        elif args is None:  # the command line itself
            self.config = parser.parse_args(resolve_config_args(sys.argv[1:]))
        else:
            super().parse_arguments(parser, resolve_config_args(args))

    def instantiate_trainer(self, **kwargs: Any):
        """The configured trainer, plus the writers every run needs (W&B media acts only with a WandbLogger)."""
        trainer = super().instantiate_trainer(**kwargs)
        present = {type(c) for c in trainer.callbacks}
        defaults = (ManifestWriter, ResultsWriter, PredictionWriter, WandbMedia)
        trainer.callbacks.extend(cls() for cls in defaults if cls not in present)
        return trainer


def run_cli(args: list[str] | None = None) -> FSADCLI:
    """Run ``fsad`` with ``args`` in this process (used by tests and by ``fsad benchmark``)."""
    return FSADCLI(args=args)
