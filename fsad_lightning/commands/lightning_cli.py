"""``fsad fit|validate|test|predict``: the LightningCLI wiring.

``fsad fit|validate|test|predict --config X.yaml`` is a :class:`FSADCLI`, a LightningCLI whose model is
any :class:`~fsad_lightning.methods.base.FewShotAnomalyModule` and whose data is a
:class:`~fsad_lightning.data.FewShotDataModule`, both given as ``class_path`` / ``init_args``.
Every run writes its manifest; ``test`` writes results.json / .csv / .md into the run folder (before
any overlay image, so a failure while drawing keeps them), ``predict`` predictions.csv and
anomaly_maps.npz. ``--config`` also takes the name of a bundled config
(:mod:`fsad_lightning.commands.configs`).

Before anything is written (each a one-line error naming the file or field):

- ``data.image_size`` is checked against the method's minimum
  (:meth:`~fsad_lightning.methods.base.FewShotAnomalyModule.min_image_size`);
- ``test`` / ``validate`` / ``predict`` of a trainable method need ``--ckpt_path``;
- ``--ckpt_path`` is read (:func:`~fsad_lightning.checkpoints.read_checkpoint`) and must belong to the
  configured method, its fitted hyper-parameters and the datamodule's shots and dataset version
  (:meth:`~fsad_lightning.methods.base.FewShotAnomalyModule.checkpoint_mismatch`). LightningCLI's own
  behaviour, loading the checkpoint's hyper-parameters over the config, is off: the config always says
  what runs. ``--ckpt_path last`` is the newest ``last.ckpt`` of the logger's runs, and ``fit`` with it
  continues that fit in its own run folder (:mod:`fsad_lightning.commands.run_folder`);
- the run's folder is claimed atomically (:func:`~fsad_lightning.commands.run_folder.claim_run_folder`).

Arguments of fsad's own, beside LightningCLI's (top-level config keys):

- ``threshold: <float>``: the decision threshold (a score at or above it: anomalous); unset, it is set without
  labels from the shots by ``threshold_from_shots`` (:mod:`fsad_lightning.thresholds`:
  ``{quantile: 1.0, margin: 0.0, views: 0}``). ``test`` reports what it gives on the test split,
  ``predict`` writes each image's decision;
- ``overlays: true``: ``predict`` also writes a heat-map overlay PNG per image (``overlays/``).

A trainable fit saves ``last.ckpt`` every 10 minutes unless the config says otherwise
(:mod:`fsad_lightning.callbacks.checkpoints`); every checkpoint is written atomically
(:class:`~fsad_lightning.checkpoints.AtomicCheckpointIO`).

The dispatcher (:mod:`fsad_lightning.commands.dispatch`) runs it and turns a user error into one line.
"""

from __future__ import annotations

import contextlib
import sys
import warnings
from collections.abc import Iterator
from typing import Any

from jsonargparse import Namespace
from lightning.pytorch import Trainer
from lightning.pytorch.cli import ArgsType, LightningArgumentParser, LightningCLI
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities.rank_zero import rank_zero_only

from fsad_lightning.callbacks.checkpoints import ensure_periodic_last_checkpoint
from fsad_lightning.callbacks.predictions import PredictionWriter
from fsad_lightning.callbacks.results import ManifestWriter, ResultsWriter
from fsad_lightning.callbacks.wandb_media import WandbMedia
from fsad_lightning.checkpoints import AtomicCheckpointIO, read_checkpoint
from fsad_lightning.commands.configs import resolve_config_args
from fsad_lightning.commands.run_folder import LAST, claim_run_folder, find_last_checkpoint, resume_in
from fsad_lightning.data import FewShotDataModule
from fsad_lightning.methods.base import FewShotAnomalyModule
from fsad_lightning.thresholds import ThresholdRule

#: the subcommands that score with a fitted state (a trainable method needs --ckpt_path for them)
SCORING_COMMANDS = ("test", "validate", "predict")

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
        self._resuming: str | None = None  # the run folder a fit with --ckpt_path last continues
        super().__init__(*args, **kwargs)

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        """fsad's own arguments (module docstring): ``threshold``, ``threshold_from_shots``, ``overlays``."""
        parser.add_argument(
            "--threshold", type=float | None, default=None,
            help="decision threshold (a score at or above it: anomalous); default: set from the shots by threshold_from_shots",
        )
        parser.add_argument(
            "--threshold_from_shots", type=ThresholdRule, default=ThresholdRule(),
            help="label-free threshold: quantile/margin of the leave-one-out scores of the shots",
        )
        parser.add_argument(
            "--overlays", type=bool, default=False, help="predict: also write a heat-map overlay PNG per image"
        )

    def parse_arguments(self, parser: LightningArgumentParser, args: ArgsType) -> None:
        """LightningCLI's parsing, with every ``--config`` value that names a bundled config resolved to
        its file (:func:`~fsad_lightning.commands.configs.resolve_config_args`)."""
        if isinstance(args, (dict, Namespace)):
            super().parse_arguments(parser, args)
        elif args is None:  # the command line itself
            self.config = parser.parse_args(resolve_config_args(sys.argv[1:]))
        else:
            super().parse_arguments(parser, resolve_config_args(args))

    def _parse_ckpt_path(self) -> None:
        """Off: LightningCLI would load the checkpoint's hyper-parameters over the parsed config, so a
        checkpoint of another method or setting would silently replace the configured one. The
        checkpoint is checked against the config instead (:meth:`check_checkpoint`)."""

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        """The configured trainer, after the checks of the module docstring, with the writers every run
        needs first among its callbacks (W&B media acts only with a WandbLogger), atomic checkpoint
        writes and, for a trainable fit, a periodic ``last.ckpt``."""
        command = self.subcommand
        image_size = getattr(self.datamodule, "image_size", None)
        if command is not None and isinstance(self.model, FewShotAnomalyModule) and image_size is not None:
            self.model.check_image_size(image_size)
        if isinstance(self.model, FewShotAnomalyModule):
            rule = self._get(self.config_init, "threshold_from_shots", ThresholdRule())
            self.model.configure_threshold(self._get(self.config_init, "threshold"), rule)
        trainer = super().instantiate_trainer(**kwargs)
        resuming = self.check_checkpoint(trainer) if command is not None else None
        present = {type(c) for c in trainer.callbacks}
        overlays = bool(self._get(self.config_init, "overlays", False))
        writers = [
            PredictionWriter(overlays=overlays) if cls is PredictionWriter else cls()
            for cls in (ManifestWriter, ResultsWriter, PredictionWriter)
            if cls not in present
        ]
        # first: results are written before any other callback's end-of-test output (overlay images)
        trainer.callbacks[:0] = writers
        if WandbMedia not in present:
            trainer.callbacks.append(WandbMedia())
        if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:
            trainer.strategy.checkpoint_io = AtomicCheckpointIO()
        if command == "fit" and getattr(self.model, "learning_type", None) == "trainable":
            configured = self._get(self.config_init, "trainer", default={}).get("callbacks") or []
            ensure_periodic_last_checkpoint(trainer, configured)
        if command is not None and rank_zero_only.rank == 0:
            claim_run_folder(trainer.logger, resuming)
        return trainer

    def check_checkpoint(self, trainer: Trainer) -> str | None:
        """Resolve, read and check ``--ckpt_path`` (see the module docstring); returns the run folder a
        resumed fit continues in, if any.

        Raises:
            ValueError / FileNotFoundError: no checkpoint where one is needed, an unreadable one, or one
                of another method, setting or data (one line naming the file and both sides).
        """
        command, model = self.subcommand, self.model
        config = self.config_init[command]
        path = config.get("ckpt_path")
        trainable = getattr(model, "learning_type", None) == "trainable"
        if path is None:
            if trainable and command in SCORING_COMMANDS:
                raise ValueError(
                    f"{type(model).__name__} learns its state in `fsad fit`: `fsad {command}` needs "
                    "--ckpt_path (the fit's checkpoints/last.ckpt, or `last` for the newest fit's)"
                )
            return None
        resuming = None
        if path == LAST:
            path = find_last_checkpoint(trainer.logger, trainer.callbacks, command)
            if command == "fit":
                resuming = resume_in(trainer.logger, path)
            config["ckpt_path"] = path
        checkpoint = read_checkpoint(path)
        if isinstance(model, FewShotAnomalyModule):
            mismatch = model.checkpoint_mismatch(checkpoint, path, getattr(self.datamodule, "manifest", None))
            if mismatch:
                raise ValueError(mismatch)
        self._resuming = resuming
        return resuming

    def _run_subcommand(self, subcommand: str) -> None:
        with warnings.catch_warnings():
            if self._resuming:
                for expected in (
                    # a fit that continues in its own folder
                    r"Checkpoint directory .* exists and is not empty",
                    r"Experiment logs directory .* exists and is not empty",
                    # the FewShotDataModule continues the interrupted epoch itself (its state_dict)
                    r"You're resuming from a checkpoint that ended before",
                ):
                    warnings.filterwarnings("ignore", message=expected)
            super()._run_subcommand(subcommand)


def run_cli(args: list[str] | None = None) -> FSADCLI:
    """Run ``fsad`` with ``args`` in this process (used by tests and by ``fsad benchmark``)."""
    return FSADCLI(args=args)


@contextlib.contextmanager
def command_line_hidden() -> Iterator[None]:
    """Hide the process's own command line (``fsad benchmark ...``, ``fsad export ...``) from an
    in-process LightningCLI given ``args``: LightningCLI warns when it sees both."""
    saved = sys.argv
    sys.argv = saved[:1]
    try:
        yield
    finally:
        sys.argv = saved


def run_cli_without_running(args: list[str]) -> FSADCLI:
    """The configured model, datamodule and trainer of ``args`` (no subcommand), nothing run: what
    ``fsad export`` builds its detector from."""
    with command_line_hidden():
        return FSADCLI(args=args, run=False)
