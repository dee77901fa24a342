"""Quiet by default: the third-party noise a normal ``fsad`` run would print, filtered where it arises.

The dispatcher runs every command inside :func:`third_party_noise_filtered`. Each filter names the
library module that raises the message and the message itself, so a warning from the user's own code
(or any other message of these libraries) still shows. ``fsad --verbose ...`` or ``FSAD_DEBUG=1``
turns every filter off.

Filtered (each seen on every run, none actionable for an fsad user):

- Lightning's advertising tips (``💡 Tip: For seamless cloud logging ... litlogger``, ``... litmodels``),
  logged at INFO by ``lightning.pytorch.utilities.rank_zero``;
- deprecations inside libraries, which only their maintainers can act on: torch's ``LeafSpec``
  FutureWarning raised by Lightning's ``utilities/_pytree.py`` on every fit / test, and
  ``torch.utils._pytree._register_pytree_node is deprecated`` raised on import by older transformers /
  diffusers releases within the supported ranges;
- two Lightning hints that every few-shot fit triggers by design: "Found N module(s) in eval mode at
  the start of training" (the frozen CLIP / Stable Diffusion / CNN backbones stay in eval mode) and
  "The number of training batches (N) is smaller than the logging interval" (k shots make an epoch of
  one or two batches);
- "Be aware that when using `ckpt_path`, callbacks used to create the checkpoint need to be provided"
  on ``fsad test --ckpt_path``: the fit's periodic ``last.ckpt`` callback
  (:mod:`fsad_lightning.callbacks.checkpoints`) has nothing to do in a test.

Kept: Lightning's device summary ("GPU available: ..."), seeds, checkpoint restores, open_clip's
"No pretrained weights loaded" (a model really is random), and every warning of fsad's own.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import warnings
from collections.abc import Iterator
from dataclasses import dataclass

#: modules that log Lightning's tips (``rank_zero_info`` of both distributions of Lightning)
TIP_LOGGERS = ("lightning.pytorch.utilities.rank_zero", "pytorch_lightning.utilities.rank_zero")
TIP_PATTERN = re.compile(r"^💡 Tip:")

_LIGHTNING = r"(lightning\.pytorch|pytorch_lightning)"


@dataclass(frozen=True)
class WarningFilter:
    """A ``warnings.filterwarnings("ignore", ...)`` entry: message and raising module are regexes
    matched at their start, as :mod:`warnings` does."""

    message: str
    module: str
    category: type[Warning] = Warning

    def install(self) -> None:
        warnings.filterwarnings("ignore", message=self.message, category=self.category, module=self.module)


WARNING_FILTERS = (
    WarningFilter(
        r"`isinstance\(treespec, LeafSpec\)` is deprecated",
        _LIGHTNING + r"\.utilities\._pytree\Z",
        FutureWarning,
    ),
    WarningFilter(
        r"`?torch\.utils\._pytree\._register_pytree_node`? is deprecated",
        r"(transformers|diffusers)(\.|\Z)",
    ),
    WarningFilter(
        r"Found \d+ module\(s\) in eval mode at the start of training", _LIGHTNING + r"\.loops\.fit_loop\Z"
    ),
    WarningFilter(
        r"The number of training batches \(\d+\) is smaller than the logging interval",
        _LIGHTNING + r"\.loops\.fit_loop\Z",
    ),
    WarningFilter(
        r"Be aware that when using `ckpt_path`, callbacks used to create the checkpoint need to be provided",
        _LIGHTNING + r"\.trainer\.call\Z",
    ),
)


class _DropTips(logging.Filter):
    """Drops Lightning's advertising tips from the logger it is attached to."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not TIP_PATTERN.match(record.getMessage())


def verbose_from_environment() -> bool:
    """``FSAD_DEBUG`` (tracebacks, and everything shown) or ``FSAD_VERBOSE`` (what ``--verbose`` sets for
    processes a command starts, e.g. DDP workers) is set to a non-empty value."""
    return bool(os.environ.get("FSAD_DEBUG") or os.environ.get("FSAD_VERBOSE"))


@contextlib.contextmanager
def third_party_noise_filtered(enabled: bool = True) -> Iterator[None]:
    """Within the block, drop the messages listed in the module docstring; ``enabled=False`` changes
    nothing. The previous warning filters and loggers are restored on exit."""
    if not enabled:
        yield
        return
    drop_tips = _DropTips()
    loggers = [logging.getLogger(name) for name in TIP_LOGGERS]
    with warnings.catch_warnings():
        for entry in WARNING_FILTERS:
            entry.install()
        for logger in loggers:
            logger.addFilter(drop_tips)
        try:
            yield
        finally:
            for logger in loggers:
                logger.removeFilter(drop_tips)
