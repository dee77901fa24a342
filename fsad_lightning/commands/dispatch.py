"""The ``fsad`` command: one dispatcher for every subcommand.

::

    fsad [--verbose] <command> [options]      fsad --help      fsad <command> --help

A subcommand is one :func:`register` line in :data:`SUBCOMMANDS`: its name, the ``module:function`` that
runs it (imported only when it runs, so ``fsad --help`` and ``fsad configs`` start at once and no
command module imports this one) and its one-line summary for ``fsad --help``. A function receives
the arguments after its name; a LightningCLI one (``whole_command_line``) receives the whole list from
the subcommand on, or ``None`` for the process's own command line, which LightningCLI reads itself.

In one place for all subcommands:

- a mistake in the user's input (missing folder, unknown category or config, impossible ``k_shot``,
  corrupt image, missing weights) or a full disk / read-only output folder (:data:`ENVIRONMENT_ERRNOS`)
  ends the command with one line, ``fsad: error: ...``, on stderr and exit status 2 (an error raised in a
  DataLoader worker is reported by its own message, not torch's "Caught ... in DataLoader worker");
  ``FSAD_DEBUG=1`` raises it with its traceback instead;
- third-party tips and deprecation noise are filtered (:mod:`fsad_lightning.commands.quiet`);
  ``--verbose``, anywhere on the command line, or ``FSAD_DEBUG=1`` shows everything. ``--verbose``
  followed by a value (``--verbose false``, ``--verbose=true``) is left to the subcommand: it is the
  ``verbose`` argument of Lightning's ``test`` / ``validate`` (whether to print the metrics table).
"""

from __future__ import annotations

import difflib
import errno
import importlib
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from fsad_lightning.allocator import keep_freed_memory
from fsad_lightning.commands.quiet import third_party_noise_filtered, verbose_from_environment

#: the fsad_lightning package folder (where the errors that fsad raises itself come from)
PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
#: errors caused by the user's input or environment, reported in one line (with :func:`user_errors`)
USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, FileNotFoundError)
#: (module, class) of the user errors defined in modules the dispatcher does not import itself
LAZY_USER_ERRORS = (("fsad_lightning.backbones.cnn", "WeightsUnavailableError"),)
#: ``OSError`` numbers that are the environment's, not a bug: full disk or quota, read-only filesystem,
#: no permission, a file where a folder should be (or the reverse)
ENVIRONMENT_ERRNOS = frozenset(
    {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOTDIR, errno.EISDIR}
)
#: how torch re-raises an error of a DataLoader worker: this line, then the worker's traceback
WORKER_ERROR_PREFIX = "Caught "
HELP_FLAGS = ("-h", "--help")
VERBOSE_FLAG = "--verbose"
#: values that make ``--verbose VALUE`` the subcommand's own argument (Lightning's ``test --verbose``)
BOOLEAN_WORDS = frozenset({"true", "false", "yes", "no", "on", "off", "1", "0", "null"})


@dataclass(frozen=True)
class Subcommand:
    """A registered subcommand: ``target`` is ``"package.module:function"``."""

    name: str
    target: str
    summary: str
    whole_command_line: bool = False

    def load(self) -> Callable[..., Any]:
        module_name, _, function = self.target.partition(":")
        return getattr(importlib.import_module(module_name), function)


SUBCOMMANDS: dict[str, Subcommand] = {}


def register(name: str, target: str, summary: str, whole_command_line: bool = False) -> None:
    """Add ``fsad <name>``, run by ``target`` (``"package.module:function"``)."""
    SUBCOMMANDS[name] = Subcommand(name, target, summary, whole_command_line)


_TRAINER = "fsad_lightning.commands.lightning_cli:run_cli"
register("fit", _TRAINER, "fit a method on the k shots (LightningCLI: --config X.yaml, --print_config)", True)
register("validate", _TRAINER, "validate a method (LightningCLI)", True)
register("test", _TRAINER, "score the test split and write results.json / .csv / .md (LightningCLI)", True)
register(
    "predict",
    "fsad_lightning.commands.detector_cli:predict_main",
    "score images (test split, or any folder: --data.init_args.predict_dir; with --detector DIR no config)",
    True,
)
register(
    "export",
    "fsad_lightning.commands.detector_cli:export_main",
    "write a detector folder (method, learned state, shot memory, threshold) for `fsad predict --detector`",
)
register(
    "benchmark",
    "fsad_lightning.commands.benchmark:benchmark_main",
    "fit and test every category x shots x seed of a config, then write mean±std tables",
)
register(
    "report",
    "fsad_lightning.commands.report:report_main",
    "write a benchmark folder's results page (one self-contained HTML file)",
)
register(
    "generate",
    "fsad_lightning.commands.generate:generate_main",
    "write a generated anomaly-free image pool for a category (One-to-Normal)",
)
register(
    "configs",
    "fsad_lightning.commands.configs:configs_main",
    "list the bundled configs and callback presets (each usable by name: --config NAME.yaml)",
)


def split_verbose(argv: Sequence[str]) -> tuple[list[str], bool]:
    """``argv`` without the dispatcher's bare ``--verbose`` flags, and whether there was one."""
    kept, verbose = [], False
    for i, token in enumerate(argv):
        following = argv[i + 1] if i + 1 < len(argv) else None
        if token == VERBOSE_FLAG and (following is None or following.lower() not in BOOLEAN_WORDS):
            verbose = True
        else:
            kept.append(token)
    return kept, verbose


def help_text() -> str:
    options = {"-h, --help": "show this message; `fsad <command> --help` shows a command's options"}
    options[VERBOSE_FLAG] = "show third-party tips and deprecation warnings (filtered by default)"
    width = max(len(name) for name in [*SUBCOMMANDS, *options])
    lines = [
        "usage: fsad [--verbose] <command> [options]",
        "",
        "Few-shot visual anomaly detection with PyTorch Lightning.",
        "",
        "commands:",
        *(f"  {c.name:<{width}}  {c.summary}" for c in SUBCOMMANDS.values()),
        "",
        "options:",
        *(f"  {flag:<{width}}  {text}" for flag, text in options.items()),
        "",
        "FSAD_DEBUG=1 shows tracebacks (and everything --verbose shows).",
    ]
    return "\n".join(lines)


def user_errors() -> tuple[type[BaseException], ...]:
    """:data:`USER_ERRORS` plus those of :data:`LAZY_USER_ERRORS` whose module is loaded (an error class
    of a module never imported cannot have been raised; importing it here would slow ``fsad --help``)."""
    lazy = tuple(
        getattr(sys.modules[module], name) for module, name in LAZY_USER_ERRORS if module in sys.modules
    )
    return USER_ERRORS + lazy


def is_user_error(err: BaseException) -> bool:
    """Whether ``err`` is the user's input or environment (reported in one line), not a bug."""
    if isinstance(err, user_errors()):
        return True
    return isinstance(err, OSError) and err.errno in ENVIRONMENT_ERRNOS


def raised_by_fsad(err: BaseException) -> bool:
    """Whether ``err`` was raised in fsad_lightning's own code (the innermost frame of its traceback):
    its message is one fsad wrote for the user."""
    frame = err.__traceback__
    if frame is None:
        return False
    while frame.tb_next is not None:
        frame = frame.tb_next
    return os.path.abspath(frame.tb_frame.f_code.co_filename).startswith(PACKAGE_DIR + os.sep)


def user_error_message(err: BaseException) -> str:
    """One line for the user: the cause that jsonargparse (which wraps errors raised in ``__init__``) or
    another library wrapped, down to the first error fsad raised itself (its cause, e.g. the hub's
    "cannot find the requested files", says less); for an error re-raised from a DataLoader worker, the
    worker's own message (it names the file)."""
    while not raised_by_fsad(err) and isinstance(err.__cause__, user_errors()):
        err = err.__cause__
    text = str(err).strip()
    lines = text.splitlines()
    if lines and lines[0].startswith(WORKER_ERROR_PREFIX) and "DataLoader worker" in lines[0]:
        prefix = f"{type(err).__name__}: "
        original = [line for line in lines[1:] if line.startswith(prefix)]
        if original:
            return original[-1][len(prefix):].strip()
    return lines[0] if lines else type(err).__name__


def fail(message: str) -> None:
    print(f"fsad: error: {message}", file=sys.stderr)
    sys.exit(2)


def run_subcommand(argv: list[str], from_command_line: bool) -> Any:
    """Run the subcommand ``argv`` names; arguments that start with an option (``fsad --config X fit``)
    go to LightningCLI, as before subcommands of fsad's own existed."""
    name = argv[0] if argv else None
    if name is None:
        print(help_text(), file=sys.stderr)
        sys.exit(2)
    if name in HELP_FLAGS and len(argv) == 1:
        print(help_text())
        return None
    if name.startswith("-"):  # LightningCLI's own top-level options: the whole line goes to it
        command = SUBCOMMANDS["fit"]
    elif name in SUBCOMMANDS:
        command = SUBCOMMANDS[name]
    else:
        near = difflib.get_close_matches(name, list(SUBCOMMANDS), n=3)
        hint = f"; did you mean {', '.join(near)}?" if near else ""
        fail(f"unknown command {name!r}{hint} (fsad --help lists the commands)")
    function = command.load()
    if command.whole_command_line:
        return function(None if from_command_line else argv)
    return function(argv[1:])


def main(argv: Sequence[str] | None = None) -> None:
    """``fsad``: dispatch ``argv`` (default: the command line) to its subcommand (see the module
    docstring). Returns ``None``, whatever the subcommand returns: the console script exits with
    ``sys.exit(main())``, for which any other value is a failure."""
    from_command_line = argv is None
    argv, verbose = split_verbose(sys.argv[1:] if argv is None else argv)
    verbose = verbose or verbose_from_environment()
    if from_command_line:
        # the fsad process's own allocator: freed memory stays for reuse (fsad_lightning.allocator)
        keep_freed_memory()
        # what LightningCLI and a DDP launcher (which re-runs the command line per worker) read
        sys.argv[1:] = argv
        if verbose:
            os.environ["FSAD_VERBOSE"] = "1"
    try:
        with third_party_noise_filtered(enabled=not verbose):
            run_subcommand(argv, from_command_line)
    except Exception as err:
        if not is_user_error(err) or os.environ.get("FSAD_DEBUG"):
            raise
        fail(user_error_message(err))
