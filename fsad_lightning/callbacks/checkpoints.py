"""``last.ckpt`` during a fit, not only at its end: a kill or an out-of-memory loses minutes, not the fit.

:class:`PeriodicLastCheckpoint` is a ``ModelCheckpoint`` that keeps one file, ``last.ckpt``, rewritten
every ``every_n_minutes`` minutes of training (default 10) or every ``every_n_train_steps`` steps, and at
the end of the fit. Each save is atomic (the ``fsad`` trainer writes checkpoints with
:class:`~fsad_lightning.checkpoints.AtomicCheckpointIO`), and holds the learned state with the optimizer,
LR-scheduler and loop state, so ``fsad fit --ckpt_path last`` continues the step count and the schedule.

``fsad fit`` of a trainable method gets it by default (:func:`ensure_periodic_last_checkpoint`) unless
the config's own checkpointing already saves periodically or is switched off
(``trainer.enable_checkpointing: false``). A config ``ModelCheckpoint`` that saves ``last.ckpt`` only at
the end (``save_last: true, save_top_k: 0``, as in the method configs) is given the default interval
instead, and Lightning's default ``ModelCheckpoint`` (``epoch=E-step=S.ckpt``, when the config names
none) is replaced, so a fit keeps one file, ``checkpoints/last.ckpt``. Another interval::

    trainer:
      callbacks+:
        - class_path: fsad_lightning.callbacks.checkpoints.PeriodicLastCheckpoint
          init_args: {every_n_train_steps: 500}        # or {every_n_minutes: 30}
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import timedelta

from lightning.pytorch import Callback, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint

#: the default interval between two saves of ``last.ckpt``
DEFAULT_MINUTES = 10.0


class PeriodicLastCheckpoint(ModelCheckpoint):
    """``last.ckpt`` every ``every_n_minutes`` of training, or every ``every_n_train_steps`` steps when
    that is given, and at the end of the fit (see the module docstring).

    Args:
        every_n_train_steps: save after every this many optimizer steps (then minutes are not used).
        every_n_minutes: save when this many minutes of training passed since the last save.
        dirpath: the folder of ``last.ckpt``; default ``<run folder>/checkpoints``.
    """

    def __init__(
        self,
        every_n_train_steps: int | None = None,
        every_n_minutes: float | None = DEFAULT_MINUTES,
        dirpath: str | None = None,
    ) -> None:
        if every_n_train_steps is not None and (
            not isinstance(every_n_train_steps, int) or isinstance(every_n_train_steps, bool) or every_n_train_steps < 1
        ):
            raise ValueError(f"every_n_train_steps must be None or an integer >= 1, got {every_n_train_steps!r}")
        if every_n_train_steps is None and (every_n_minutes is None or not every_n_minutes > 0):
            raise ValueError(f"every_n_minutes must be > 0 when every_n_train_steps is None, got {every_n_minutes!r}")
        interval = None if every_n_train_steps is not None else timedelta(minutes=float(every_n_minutes))
        super().__init__(
            dirpath=dirpath,
            save_last=True,
            save_top_k=0,
            every_n_train_steps=every_n_train_steps,
            train_time_interval=interval,
            enable_version_counter=False,
        )


def saves_periodically(callback: ModelCheckpoint) -> bool:
    """Whether ``callback`` writes a checkpoint during an epoch (by steps or by time)."""
    return callback._every_n_train_steps >= 1 or callback._train_time_interval is not None


def ensure_periodic_last_checkpoint(
    trainer: Trainer, configured: Sequence[Callback], minutes: float = DEFAULT_MINUTES
) -> ModelCheckpoint | None:
    """Make the fit of ``trainer`` save ``last.ckpt`` at least every ``minutes`` (see the module
    docstring); returns the callback that does, ``None`` when checkpointing is off.

    Args:
        configured: the callbacks the config gave the trainer (a ``ModelCheckpoint`` of the trainer's
            that is not among them is Lightning's default).
    """
    callbacks = trainer.checkpoint_callbacks
    if not callbacks:
        return None
    for callback in callbacks:
        if callback.save_last and saves_periodically(callback):
            return callback
    for callback in callbacks:
        if callback.save_last:
            # only at the end today: the same callback also saves every `minutes` (one last.ckpt)
            callback._train_time_interval = timedelta(minutes=minutes)
            return callback
    if not any(c is given for c in callbacks for given in configured):
        for callback in callbacks:  # Lightning's default: a fit keeps one file, last.ckpt
            trainer.callbacks.remove(callback)
    added = PeriodicLastCheckpoint(every_n_minutes=minutes)
    trainer.callbacks.append(added)
    return added
