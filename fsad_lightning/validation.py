"""Argument checks shared by the datamodule and the methods, each a one-line ``ValueError`` naming the field."""

from __future__ import annotations


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
