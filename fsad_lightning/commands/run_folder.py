"""Run folders: every run claims a log folder of its own, and ``--ckpt_path last`` finds the last fit.

A run logs into ``<save_dir>/<name>/version_<N>`` (CSV and TensorBoard loggers). Lightning picks ``N`` as
one past the highest folder there, so two runs started together pick the same ``N`` and overwrite each
other, and a ``version`` set by hand silently reuses a folder that holds another run. Here:

- an automatic version is claimed with ``os.mkdir``, which exactly one process wins: a run that loses
  takes the next number;
- a version set by hand (``--trainer.logger.init_args.version=X``) is refused when the folder already
  holds a run (:func:`holds_a_run`), unless this run resumes the fit that folder holds;
- ``--ckpt_path last`` is the most recently written ``checkpoints/last.ckpt`` of the logger's runs (the
  version set by hand only, when there is one), or of a ``ModelCheckpoint`` folder the config names;
  with none, a one-line error says there is nothing to resume.
"""

from __future__ import annotations

import glob
import os
from typing import Any

from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

LAST_NAME = "last.ckpt"
#: the ``--ckpt_path`` value that means "the newest last.ckpt of these runs"
LAST = "last"
#: a folder holding one of these holds a run: a second run there would overwrite it
RUN_MARKERS = (
    "config.yaml",
    "manifest.json",
    "results.json",
    "predictions.csv",
    "metrics.csv",
    "checkpoints",
)


def versioned(logger: Any) -> bool:
    """Whether ``logger`` lays its runs out as ``.../version_<N>`` (CSV, TensorBoard)."""
    return isinstance(logger, (CSVLogger, TensorBoardLogger))


def holds_a_run(folder: str) -> list[str]:
    """The names in ``folder`` that show a run was there (:data:`RUN_MARKERS`)."""
    return [name for name in RUN_MARKERS if os.path.exists(os.path.join(folder, name))]


def version_set_by_hand(logger: Any) -> bool:
    """Whether the config names the version (Lightning sets ``_version`` also when it picks one: ask
    before anything reads ``log_dir``)."""
    return versioned(logger) and logger._version is not None


def runs_root(logger: Any) -> str:
    """The folder holding the logger's ``version_<N>`` folders, without making it pick a version."""
    chosen = logger._version
    logger._version = "_"
    try:
        return os.path.dirname(logger.log_dir)
    finally:
        logger._version = chosen


def claim_run_folder(logger: Any, resuming: str | None = None) -> str | None:
    """Create this run's log folder, atomically; returns it (``None`` for loggers without versions).

    Args:
        resuming: the folder of the fit this run resumes (:func:`resume_in`): it goes on there.

    Raises:
        ValueError: a hand-set version's folder holds another run.
        OSError: the folder cannot be created (read-only output, full disk): the message names it.
    """
    if not versioned(logger):
        return None
    by_hand = version_set_by_hand(logger)
    if resuming is not None and os.path.abspath(logger.log_dir) == os.path.abspath(resuming):
        return resuming  # the resumed fit goes on in its own folder (resume_in set the version)
    if by_hand:
        folder = logger.log_dir
        found = holds_a_run(folder)
        if found:
            raise ValueError(
                f"run folder {folder} already holds a run ({', '.join(found)}): choose another "
                "--trainer.logger.init_args.version, or move that run away"
            )
        _makedirs(folder)
        return folder
    number = logger.version  # one past the highest version_<N> there now
    while True:
        logger._version = number
        folder = logger.log_dir
        _makedirs(os.path.dirname(folder))
        try:
            os.mkdir(folder)
            return folder
        except FileExistsError:
            number += 1  # another run claimed it first
        except OSError as err:
            raise OSError(err.errno, f"cannot create the run folder {folder}: {err.strerror}") from err


def resume_in(logger: Any, checkpoint: str) -> str | None:
    """Point ``logger`` at the run folder holding ``checkpoint`` (``<run>/checkpoints/last.ckpt``) when
    that folder is one of its runs; returns the folder (``None`` otherwise: the fit logs anew)."""
    if not versioned(logger):
        return None
    run = os.path.dirname(os.path.dirname(os.path.abspath(checkpoint)))
    if version_set_by_hand(logger):
        return run if run == os.path.abspath(logger.log_dir) else None
    if os.path.dirname(run) != os.path.abspath(runs_root(logger)):
        return None
    logger._version = os.path.basename(run)
    return run


def find_last_checkpoint(logger: Any, callbacks: list[Any], command: str) -> str:
    """The newest ``last.ckpt`` of the logger's runs or the config's ModelCheckpoint folders.

    Raises:
        ValueError: none exists (nothing to resume / test), naming where it looked.
    """
    patterns = []
    if versioned(logger):
        if version_set_by_hand(logger):
            patterns.append(os.path.join(logger.log_dir, "checkpoints", LAST_NAME))
        else:
            patterns.append(os.path.join(runs_root(logger), "*", "checkpoints", LAST_NAME))
    patterns += [
        os.path.join(c.dirpath, LAST_NAME) for c in callbacks if isinstance(c, ModelCheckpoint) and c.dirpath
    ]
    found = [path for pattern in patterns for path in glob.glob(pattern) if os.path.isfile(path)]
    if not found:
        where = " or ".join(patterns) if patterns else "the run folders (this logger keeps none)"
        purpose = "nothing to resume" if command == "fit" else f"nothing to {command}"
        raise ValueError(
            f"--ckpt_path last: no {LAST_NAME} at {where} ({purpose}): run `fsad fit` first, or give the "
            "checkpoint's path"
        )
    return max(found, key=os.path.getmtime)


def _makedirs(folder: str) -> None:
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as err:
        raise OSError(err.errno, f"cannot create the run folder {folder}: {err.strerror}") from err
