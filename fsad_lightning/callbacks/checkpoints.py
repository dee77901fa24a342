"""``last.ckpt`` during a fit, not only at its end: a kill or an out-of-memory loses minutes, not the fit.

:class:`PeriodicLastCheckpoint` is a ``ModelCheckpoint`` that keeps one file, ``last.ckpt``, rewritten
every ``every_n_minutes`` minutes of training (default 10) or every ``every_n_train_steps`` steps, and at
the end of the fit. Each save is atomic (the ``fsad`` trainer writes checkpoints with
:class:`~fsad_lightning.checkpoints.AtomicCheckpointIO`), and holds the learned state with the optimizer,
LR-scheduler and loop state, so ``fsad fit --ckpt_path last`` continues the step count and the schedule.

``fsad fit`` of a trainable method gets it by default (:func:`ensure_periodic_last_checkpoint`) unless
the config's own checkpointing already saves during the fit (by steps, by time, or ``last.ckpt`` beside
top-k checkpoints every epoch) or is switched off (``trainer.enable_checkpointing: false``). A config
``ModelCheckpoint`` that saves ``last.ckpt`` only at the end (``save_last: true, save_top_k: 0``, as in
the method configs) is replaced by it in the same folder, and so is Lightning's default
``ModelCheckpoint`` (``epoch=E-step=S.ckpt``, when the config names none): a fit keeps one file,
``checkpoints/last.ckpt``. Another interval::

    trainer:
      callbacks+:
        - class_path: fsad_lightning.callbacks.checkpoints.PeriodicLastCheckpoint
          init_args: {every_n_train_steps: 500}        # or {every_n_minutes: 30}
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import timedelta

from lightning.pytorch import Callback, LightningModule, Trainer
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
            not isinstance(every_n_train_steps, int)
            or isinstance(every_n_train_steps, bool)
            or every_n_train_steps < 1
        ):
            raise ValueError(
                f"every_n_train_steps must be None or an integer >= 1, got {every_n_train_steps!r}"
            )
        if every_n_train_steps is None and (every_n_minutes is None or not every_n_minutes > 0):
            raise ValueError(
                f"every_n_minutes must be > 0 when every_n_train_steps is None, got {every_n_minutes!r}"
            )
        interval = None if every_n_train_steps is not None else timedelta(minutes=float(every_n_minutes))
        super().__init__(
            dirpath=dirpath,
            save_last=True,
            save_top_k=0,
            every_n_train_steps=every_n_train_steps,
            train_time_interval=interval,
            enable_version_counter=False,
        )

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """The end of the fit goes into ``last.ckpt`` too (``ModelCheckpoint`` saves at the end only when it
        never saved before, which would leave the last periodic save there)."""
        if not self._should_skip_saving_checkpoint(trainer):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))


def saves_during_the_fit(callback: ModelCheckpoint) -> bool:
    """Whether ``callback`` writes ``last.ckpt`` before the fit ends: by steps, by time, or beside its
    top-k checkpoints at every epoch."""
    if not callback.save_last:
        return False
    periodic = callback._every_n_train_steps >= 1 or callback._train_time_interval is not None
    return periodic or callback.save_top_k != 0


def ensure_periodic_last_checkpoint(
    trainer: Trainer, configured: Sequence[Callback], minutes: float = DEFAULT_MINUTES
) -> ModelCheckpoint | None:
    """Make the fit of ``trainer`` save ``last.ckpt`` during the fit, every ``minutes`` by default (see the
    module docstring); returns the callback that does, ``None`` when checkpointing is off.

    Args:
        configured: the callbacks the config gave the trainer (a ``ModelCheckpoint`` of the trainer's
            that is not among them is Lightning's default).
    """
    callbacks = trainer.checkpoint_callbacks
    if not callbacks:
        return None
    for callback in callbacks:
        if saves_during_the_fit(callback):
            return callback
    replaced = [c for c in callbacks if c.save_last is True and c.save_top_k == 0 and not c.save_weights_only]
    if not any(c is given for c in callbacks for given in configured):
        replaced = list(callbacks)  # Lightning's default
    added = PeriodicLastCheckpoint(every_n_minutes=minutes, dirpath=replaced[0].dirpath if replaced else None)
    for callback in replaced:
        trainer.callbacks.remove(callback)
    trainer.callbacks.append(added)
    return added
