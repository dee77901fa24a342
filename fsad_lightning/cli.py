"""The ``fsad`` command.

``fsad fit|validate|test|predict --config X.yaml`` is a :class:`FSADCLI`, a LightningCLI whose model is
any :class:`~fsad_lightning.methods.base.FewShotAnomalyModule` and whose data is a
:class:`~fsad_lightning.data.FewShotDataModule`, both given as ``class_path`` / ``init_args``.
Every run writes its manifest; ``test`` writes results.json / .csv / .md into the run folder, ``predict`` predictions.csv and
anomaly_maps.npz.

``fsad benchmark`` (categories x shots x seeds) and ``fsad generate`` (anomaly-free image pools) are
subcommands of their own, dispatched by :func:`main`.

A mistake in the user's input (missing folder, unknown category, impossible ``k_shot``, corrupt image,
missing weights) ends the command with one line on stderr and exit status 2; set ``FSAD_DEBUG=1`` for
the traceback.
"""

from __future__ import annotations

import os
import sys
from typing import Any

from lightning.pytorch.cli import LightningCLI

from fsad_lightning.backbones.cnn import WeightsUnavailableError
from fsad_lightning.callbacks.predictions import PredictionWriter
from fsad_lightning.callbacks.results import ManifestWriter, ResultsWriter
from fsad_lightning.callbacks.wandb_media import WandbMedia
from fsad_lightning.data import FewShotDataModule
from fsad_lightning.methods.base import FewShotAnomalyModule

#: errors caused by the user's input or environment, reported in one line
USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, FileNotFoundError, WeightsUnavailableError)

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

    def instantiate_trainer(self, **kwargs: Any):
        """The configured trainer, plus the writers every run needs (W&B media acts only with a WandbLogger)."""
        trainer = super().instantiate_trainer(**kwargs)
        present = {type(c) for c in trainer.callbacks}
        defaults = (ManifestWriter, ResultsWriter, PredictionWriter, WandbMedia)
        trainer.callbacks.extend(cls() for cls in defaults if cls not in present)
        return trainer


def user_error_message(err: BaseException) -> str:
    """One line for the user: the innermost cause (jsonargparse wraps errors raised in ``__init__``)."""
    while isinstance(err.__cause__, USER_ERRORS):
        err = err.__cause__
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def run_cli(args: list[str] | None = None) -> FSADCLI:
    """Run ``fsad`` with ``args`` in this process (used by tests and by ``fsad benchmark``)."""
    return FSADCLI(args=args)


def main(argv: list[str] | None = None) -> None:
    from_command_line = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv and argv[0] == "benchmark":
            from fsad_lightning.experiment import benchmark_main

            benchmark_main(argv[1:])
        elif argv and argv[0] == "generate":
            from fsad_lightning.generate import generate_main

            generate_main(argv[1:])
        else:
            # LightningCLI reads sys.argv itself; passing it again only earns a warning
            run_cli(None if from_command_line else argv)
    except USER_ERRORS as err:
        if os.environ.get("FSAD_DEBUG"):
            raise
        message = user_error_message(err)
        print(f"fsad: error: {message}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
