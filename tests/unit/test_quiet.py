"""The dispatcher's noise filters: narrow (library module + message), scoped to the command, off with
``--verbose`` / ``FSAD_DEBUG=1``."""

from __future__ import annotations

import logging
import sys
import warnings

import pytest

from fsad_lightning.commands.dispatch import main, split_verbose
from fsad_lightning.commands.quiet import TIP_LOGGERS, WARNING_FILTERS, third_party_noise_filtered

LEAF_SPEC = "`isinstance(treespec, LeafSpec)` is deprecated, use `isinstance(treespec, TreeSpec)` instead."
EVAL_MODE = "Found 78 module(s) in eval mode at the start of training. This may lead to unexpected behavior."
PYTREE = "`torch.utils._pytree._register_pytree_node` is deprecated. Please use register_pytree_node."


def shown(message: str, category: type[Warning], module: str) -> bool:
    """Whether a warning raised from ``module`` reaches the user (not dropped by a filter)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with third_party_noise_filtered():
            warnings.warn_explicit(message, category, f"/x/{module.replace('.', '/')}.py", 1, module=module)
    return bool(caught)


@pytest.mark.parametrize(
    "message, category, module",
    [
        (LEAF_SPEC, FutureWarning, "lightning.pytorch.utilities._pytree"),
        (LEAF_SPEC, FutureWarning, "pytorch_lightning.utilities._pytree"),
        (EVAL_MODE, UserWarning, "lightning.pytorch.loops.fit_loop"),
        ("The number of training batches (1) is smaller than the logging interval", UserWarning,
         "lightning.pytorch.loops.fit_loop"),
        (PYTREE, FutureWarning, "transformers.utils.generic"),
        (PYTREE, UserWarning, "diffusers.utils.outputs"),
    ],
)  # fmt: skip
def test_known_library_noise_is_dropped(message, category, module):
    assert not shown(message, category, module)


@pytest.mark.parametrize(
    "message, category, module",
    [
        (LEAF_SPEC, FutureWarning, "my_project.training"),  # the same text from user code still shows
        (EVAL_MODE, UserWarning, "my_project.lightning.pytorch.loops.fit_loop"),
        ("some other deprecation", FutureWarning, "lightning.pytorch.utilities._pytree"),
        ("some other hint", UserWarning, "lightning.pytorch.loops.fit_loop"),
        ("a deprecation in user code", DeprecationWarning, "__main__"),
    ],
)
def test_everything_else_still_shows(message, category, module):
    assert shown(message, category, module)


def test_lightning_tips_are_dropped_and_other_info_kept():
    class Collect(logging.Handler):
        messages: list[str] = []

        def emit(self, record: logging.LogRecord) -> None:
            self.messages.append(record.getMessage())

    logger, handler = logging.getLogger(TIP_LOGGERS[0]), Collect()
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        with third_party_noise_filtered():
            logger.info("💡 Tip: For seamless cloud logging, try installing litlogger")
            logger.info("GPU available: False, used: False")
        logger.info("💡 Tip: shown again outside the command")
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    assert handler.messages == ["GPU available: False, used: False", "💡 Tip: shown again outside the command"]


def test_filters_are_scoped_to_the_block_and_can_be_off():
    before = list(warnings.filters)
    with third_party_noise_filtered():
        assert len(warnings.filters) == len(before) + len(WARNING_FILTERS)
    assert warnings.filters == before
    with third_party_noise_filtered(enabled=False):
        assert warnings.filters == before
        assert not any(logging.getLogger(name).filters for name in TIP_LOGGERS)


@pytest.mark.parametrize(
    "argv, kept, verbose",
    [
        (["--verbose", "fit", "--config", "x.yaml"], ["fit", "--config", "x.yaml"], True),
        (["test", "--config", "x.yaml", "--verbose"], ["test", "--config", "x.yaml"], True),
        (["test", "--verbose", "--config", "x.yaml"], ["test", "--config", "x.yaml"], True),
        (["test", "--verbose", "false"], ["test", "--verbose", "false"], False),  # Lightning's own flag
        (["test", "--verbose=true"], ["test", "--verbose=true"], False),
        (["benchmark", "--config", "x.yaml"], ["benchmark", "--config", "x.yaml"], False),
    ],
)
def test_the_dispatcher_takes_its_verbose_flag_anywhere(argv, kept, verbose):
    assert split_verbose(argv) == (kept, verbose)


def test_verbose_turns_the_filters_off_and_reaches_worker_processes(toy_command, monkeypatch):
    baseline = len(warnings.filters)
    main(["toy", "a"])
    assert toy_command.calls[-1]["filters"] == baseline + len(WARNING_FILTERS)
    main(["toy", "--verbose", "a"])  # in process: nothing leaks into the environment
    assert toy_command.calls[-1] == {
        "argv": ["a"], "command_line": toy_command.calls[-1]["command_line"], "FSAD_VERBOSE": None, "filters": baseline
    }  # fmt: skip
    # from the command line: the flag leaves sys.argv (what a DDP launcher re-runs) and stays in the
    # environment of the processes the command starts
    monkeypatch.setattr(sys, "argv", ["fsad", "--verbose", "toy", "a"])
    monkeypatch.setenv("FSAD_VERBOSE", "")  # so that monkeypatch restores the variable after the test
    main()
    assert toy_command.calls[-1] == {"argv": ["a"], "command_line": ["toy", "a"], "FSAD_VERBOSE": "1", "filters": baseline}
    monkeypatch.setenv("FSAD_VERBOSE", "")
    monkeypatch.setenv("FSAD_DEBUG", "1")
    main(["toy"])
    assert toy_command.calls[-1]["filters"] == baseline
