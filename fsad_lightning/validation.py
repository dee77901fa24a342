"""Argument checks shared by the datamodule and the methods, each a one-line ``ValueError`` naming the field,
and :func:`warn_once` for input that is accepted but looks wrong."""

from __future__ import annotations

import logging


def require_integers(low: int = 1, **values: object) -> None:
    """Every value is an integer (not a bool) of at least ``low``: ``"<name> must be an integer >= <low>"``."""
    for name, value in values.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")


def require_fractions(**values: float) -> None:
    """Every value lies in ``[0, 1]``: ``"<name> must be in [0, 1]"``."""
    for name, value in values.items():
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"{name} must be in [0, 1], got {value}")


_logger = logging.getLogger("fsad_lightning")
_warned: set[str] = set()


def warn_once(message: str) -> None:
    """One line ``fsad: warning: <message>`` on stderr (through the ``fsad_lightning`` logger), once per
    process for the same message: for input that is read but is probably not what the user meant."""
    if message in _warned:
        return
    _warned.add(message)
    _logger.warning("fsad: warning: %s", message)
