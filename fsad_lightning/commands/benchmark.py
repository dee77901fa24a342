"""``fsad benchmark``: the few-shot protocol over categories x shots x seeds, with mean±std tables.

::

    fsad benchmark --config X.yaml [--config more.yaml] [--categories a b ...] [--shots 1 2 4]
                   [--seeds 0 1 2 3 4] [--output DIR] [--dry_run] [--report_only] [--no-tables] [--wandb]
                   [--worker_id ID] [--lock_timeout S] [--poll_interval S] [--any.fsad.key=value ...]

runs the few-shot protocol for every category x k_shot x seed of an ordinary ``fsad`` config
(``model`` / ``data`` / ``trainer``):

- defaults: every category of the dataset (``FewShotDataModule(category="all").categories``: for folder
  datasets the sub-folders with ``train`` and ``test``), the shots of the method's paper (a
  ``paper_shots`` class attribute on the module class, else ``[1, 2, 4]``), seeds 0..4;
- each run is an in-process :func:`fsad_lightning.commands.lightning_cli.run_cli` call with
  ``--data.init_args.category/k_shot/seed`` and ``--seed_everything`` set to the run's values and the
  logger pointed at the run's own folder ``<output>/runs/<category>/k<k>/s<seed>/``;
- a training-free method (``learning_type == "training_free"``) is only tested; a trainable one is fitted
  first (logging into ``<run folder>/fit/``) and then tested with ``--ckpt_path`` of that fit's last
  checkpoint;
- multi-class (``--multi_class``, the default for a method whose class sets ``multi_class = True``, like
  AnomalySD): one run per k_shot x seed fits a single model on the shots of every category and tests
  them all (``runs/all/k<k>/s<seed>/``); the run's per-category results are the table's rows;
- resume: a run whose ``results.json`` exists is skipped, and an unfinished run's folder is cleared
  before it runs again, so a benchmark killed and restarted ends with the same tables as one that was
  never interrupted. ``<output>/benchmark.json`` records a fingerprint of the resolved config
  (:func:`settings_fingerprint`); resuming into a folder of other settings is refused. The default
  ``--output`` is ``runs/benchmark_<config name>_<fingerprint>``, so every parameter set of a sweep gets
  its own folder;
- a run that raises is reported with its error (``<run folder>/error.txt`` holds the traceback) and the
  benchmark goes on; the exit status is 1 at the end if any run failed;
- at the end one table per dataset (:mod:`fsad_lightning.reporting`) is written to ``<output>/`` as
  Markdown, CSV and JSON, with the papers' numbers beside ours (:mod:`fsad_lightning.paper_results`; the
  method's variant, e.g. ADP_l, comes from the model's arguments), plus ``<output>/benchmark.json`` with
  the plan and every run's status. ``--wandb`` also logs the ``mean`` row and the tables to one W&B run
  (what a sweep optimises). ``--no-tables`` writes no tables (a one-cell trial of a grid sweep);
  ``--report_only`` runs nothing and writes the tables of the planned runs that have finished, the same
  bytes a single process that ran them all writes.

Several workers, one benchmark: any number of ``fsad benchmark`` processes with the same arguments and
``--output`` (a folder they share: one machine's disk, or a network file system for several nodes; e.g.
one per GPU with ``CUDA_VISIBLE_DEVICES``) split the runs between them. Each run is claimed with a lock
file ``runs/<category>/k<k>/s<seed>.lock`` (:mod:`fsad_lightning.locks`: an exclusive create with the
worker id, host and pid, and a heartbeat while it runs), so no two workers run it. A worker skips runs
that are finished or held by a live worker; when nothing is left to claim it waits (``--poll_interval``)
for the runs other workers hold, and takes over a run whose worker crashed: no heartbeat for
``--lock_timeout`` seconds, or at once when the worker ran on the same host and its process is gone (its
half-written folder is cleared first, as on resume). A run that failed (raised) since this worker
started is not retried by it; a restart retries it, as before. Every worker ends once every run is
finished or failed, and each writes the same tables. A W&B grid sweep over category x shots x seed is the
other way to spread a benchmark (``sweeps/one_to_normal_mvtec_grid.yaml``: each trial one run,
``--no-tables``; ``--report_only`` afterwards writes the tables).

Any argument the benchmark itself does not define (``--model.init_args.pool_size=5``) is passed to every
run, after the configs. The configs and these arguments are checked by the ``fsad`` parser before the
first run, so a typo fails at once.

A config may be named as bundled with the package (``--config promptad_mvtec.yaml``, see
:mod:`fsad_lightning.commands.configs`). W&B sweeps whose trials are benchmarks:
:mod:`fsad_lightning.commands.sweeps`.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import importlib
import inspect
import io
import json
import os
import shutil
import sys
import time
import traceback
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fsad_lightning.commands.configs import resolve_config
from fsad_lightning.commands.dispatch import is_user_error, user_error_message
from fsad_lightning.commands.lightning_cli import FSADCLI, command_line_hidden, run_cli
from fsad_lightning.io import atomic_write_json, atomic_write_text
from fsad_lightning.locks import DEFAULT_TIMEOUT_S, LockOwner, claim, read_owner, stale_reason
from fsad_lightning.paper_results import variant_of
from fsad_lightning.reporting import MEAN_ROW, VARIANT_KEY, build_tables, load_run_result, write_tables

#: shots when the method's class has no ``paper_shots``
DEFAULT_SHOTS = (1, 2, 4)
#: seeds when none are given
DEFAULT_SEEDS = (0, 1, 2, 3, 4)
WANDB_MEDIA = "fsad_lightning.callbacks.wandb_media.WandbMedia"
RESULTS_FILE = "results.json"
ERROR_FILE = "error.txt"
#: seconds between a waiting worker's looks at the runs other workers hold
DEFAULT_POLL_INTERVAL_S = 10.0
#: the category label (and folder) of a multi-class run, which fits and tests every category together
MULTI_CLASS_LABEL = "all"


# ---------------------------------------------------------------------------------------------- plan
@dataclass(frozen=True)
class RunSpec:
    """One cell of the benchmark: a category, a shot count and a seed, with its own folder."""

    index: int
    total: int
    category: str
    k_shot: int
    seed: int
    folder: Path
    #: a multi-class run (``category == "all"``): the categories fitted and tested together
    categories: tuple[str, ...] = ()

    @property
    def results_path(self) -> Path:
        return self.folder / RESULTS_FILE

    @property
    def error_path(self) -> Path:
        return self.folder / ERROR_FILE

    @property
    def lock_path(self) -> Path:
        """``runs/<category>/k<k>/s<seed>.lock``, beside the run folder (clearing the folder keeps it)."""
        return self.folder.with_name(self.folder.name + ".lock")

    @property
    def label(self) -> str:
        return f"[{self.index}/{self.total}] {self.category} k={self.k_shot} seed={self.seed}"

    def is_done(self) -> bool:
        return self.results_path.is_file()

    def failed_since(self, since: float) -> bool:
        """Whether the run failed (an ``error.txt`` and no results) at or after time ``since``."""
        try:
            return not self.is_done() and self.error_path.stat().st_mtime >= since
        except FileNotFoundError:
            return False


@dataclass
class BenchmarkConfig:
    """What ``fsad benchmark`` resolved from its arguments and the ``fsad`` config.

    Attributes:
        configs: the ``--config`` files, in order.
        extra_args: the ``fsad`` arguments passed through to every run (after the configs).
        output: the benchmark folder.
        model_class: the method's LightningModule class.
        data_init_args: the datamodule's resolved ``init_args``.
        data_class: the datamodule class.
        logger: the configured logger (``class_path`` / ``init_args``), ``None`` for none.
        has_wandb_media: whether the config already adds the :class:`WandbMedia` callback.
        fingerprint: :func:`settings_fingerprint` of the resolved config.
        variant: the method's variant the papers report separately (``label_aware`` for ADP_l,
            ``zero_shot``), from the model's arguments (:func:`fsad_lightning.paper_results.variant_of`).
    """

    configs: list[str]
    extra_args: list[str]
    output: Path
    model_class: type
    data_init_args: dict[str, Any]
    data_class: type
    logger: dict[str, Any] | None
    has_wandb_media: bool = False
    fingerprint: str = ""
    variant: str = ""

    @property
    def trainable(self) -> bool:
        return getattr(self.model_class, "learning_type", "training_free") != "training_free"


@dataclass
class RunOutcome:
    """How one run ended: ``done``, ``skipped`` (results existed) or ``failed`` (with ``error``)."""

    spec: RunSpec
    status: str
    seconds: float = 0.0
    error: str | None = None
    commands: list[list[str]] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {
            "category": self.spec.category,
            "k_shot": self.spec.k_shot,
            "seed": self.spec.seed,
            "folder": str(self.spec.folder),
            "status": self.status,
            "seconds": round(self.seconds, 3),
            "error": self.error,
        }


def _import(class_path: str) -> type:
    module_name, _, name = class_path.rpartition(".")
    if not module_name:
        raise ValueError(f"class_path {class_path!r} is not a dotted path such as package.module.Class")
    return getattr(importlib.import_module(module_name), name)


def _run_cli(args: list[str]) -> FSADCLI:
    with command_line_hidden():
        return run_cli(args)


class _ConfigReader(FSADCLI):
    """The ``fsad`` parser without instantiating anything: resolves configs and overrides to a config."""

    def instantiate_classes(self) -> None:
        """Build nothing: the resolved config is all the benchmark needs before its runs."""


def _to_dict(value: Any) -> Any:
    return value.as_dict() if hasattr(value, "as_dict") else value


def settings_fingerprint(config: dict[str, Any]) -> str:
    """SHA-256 (hex) of a resolved ``fsad`` config without what a benchmark sets per run (the data's
    category / k_shot / seed, ``seed_everything``) or per folder (the logger, ``default_root_dir``).

    Two benchmarks with the same fingerprint run the same experiment, so one may resume the other."""
    reduced = json.loads(json.dumps(config, default=str))
    reduced.pop("seed_everything", None)
    for key in ("category", "k_shot", "seed"):
        ((reduced.get("data") or {}).get("init_args") or {}).pop(key, None)
    for key in ("logger", "default_root_dir"):
        (reduced.get("trainer") or {}).pop(key, None)
    text = json.dumps(reduced, sort_keys=True, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def read_benchmark_config(
    configs: Sequence[str], extra_args: Sequence[str], output: str | os.PathLike | None = None
) -> BenchmarkConfig:
    """Resolve the ``fsad`` configs (plus pass-through arguments) as ``fsad`` would, building nothing.
    A config that is not a path but a bundled name is replaced by the bundled file's path.

    ``output`` defaults to ``runs/benchmark_<last config's name>_<first 8 digits of the fingerprint>``, so
    other settings (e.g. each parameter set of a sweep) get their own folder and the same settings resume.

    Raises:
        FileNotFoundError: a config is neither a file nor a bundled name.
        ValueError: the config has no model or data class, or several loggers.
        SystemExit: the ``fsad`` parser rejects a key or value (it prints the reason).
    """
    configs = [resolve_config(str(c)) for c in configs]
    for config in configs:
        if not os.path.isfile(config):
            raise FileNotFoundError(f"config file {config} does not exist")
    args: list[str] = []
    for config in configs:
        args += ["--config", str(config)]
    with command_line_hidden():
        reader = _ConfigReader(args=args + list(extra_args), run=False)
    config = _to_dict(reader.config)
    model, data = config.get("model") or {}, config.get("data") or {}
    if not isinstance(model, dict) or not model.get("class_path"):
        raise ValueError(f"{configs}: 'model' needs a class_path (a FewShotAnomalyModule subclass)")
    if not isinstance(data, dict) or not data.get("class_path"):
        raise ValueError(f"{configs}: 'data' needs a class_path (e.g. fsad_lightning.data.FewShotDataModule)")
    trainer = config.get("trainer") or {}
    logger = trainer.get("logger")
    if isinstance(logger, list):
        if len(logger) != 1:
            raise ValueError(
                f"{configs}: fsad benchmark gives every run its own log folder and supports one logger; "
                f"trainer.logger lists {len(logger)}"
            )
        logger = logger[0]
    if logger is True or logger is None:
        logger = {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {}}
    callbacks = trainer.get("callbacks") or []
    has_media = any(isinstance(c, dict) and c.get("class_path") == WANDB_MEDIA for c in callbacks)
    fingerprint = settings_fingerprint(config)
    if output is None:
        output = os.path.join("runs", f"benchmark_{Path(configs[-1]).stem}_{fingerprint[:8]}")
    model_class = _import(model["class_path"])
    method = getattr(model_class, "method_name", model_class.__name__)
    return BenchmarkConfig(
        configs=configs,
        extra_args=list(extra_args),
        output=Path(output),
        fingerprint=fingerprint,
        variant=variant_of(method, model.get("init_args")),
        model_class=model_class,
        data_class=_import(data["class_path"]),
        data_init_args=dict(data.get("init_args") or {}),
        logger=logger if logger is not False else None,
        has_wandb_media=has_media,
    )


def discover_categories(config: BenchmarkConfig) -> list[str]:
    """Every category of the configured dataset: the datamodule built with ``category="all"``.

    Raises:
        ValueError: the data class cannot list its categories (pass ``--categories``) or finds none.
    """
    init_args = {**config.data_init_args, "category": "all"}
    try:
        datamodule = config.data_class(**init_args)
    except TypeError as err:
        raise ValueError(
            f"cannot build {config.data_class.__name__} to list its categories ({err}): pass --categories"
        ) from err
    categories = getattr(datamodule, "categories", None)
    if categories is None:
        raise ValueError(f"{config.data_class.__name__} does not list its categories: pass --categories")
    categories = list(categories)
    if not categories:
        raise ValueError(f"no categories found under data root {config.data_init_args.get('root')!r}")
    return categories


def default_shots(model_class: type) -> list[int]:
    """The method's ``paper_shots`` class attribute, else :data:`DEFAULT_SHOTS`."""
    return [int(k) for k in getattr(model_class, "paper_shots", None) or DEFAULT_SHOTS]


def plan_runs(
    output: Path,
    categories: Sequence[str],
    shots: Sequence[int],
    seeds: Sequence[int],
    multi_class: bool = False,
) -> list[RunSpec]:
    """Every (category, k_shot, seed), categories outermost, with folders ``runs/<category>/k<k>/s<seed>``.

    ``multi_class``: one run per (k_shot, seed) fits and tests every category together (the multi-class
    setting of AnomalySD), labelled ``all`` (folders ``runs/all/k<k>/s<seed>``); its per-category
    results become the table's rows. A value listed twice is planned once."""
    categories, shots, seeds = (list(dict.fromkeys(v)) for v in (categories, shots, seeds))
    together = tuple(categories) if multi_class else ()
    labels = [MULTI_CLASS_LABEL] if multi_class else categories
    cells = [(c, k, s) for c in labels for k in shots for s in seeds]
    return [
        RunSpec(
            index=i + 1,
            total=len(cells),
            category=c,
            k_shot=k,
            seed=s,
            folder=output / "runs" / c / f"k{k}" / f"s{s}",
            categories=together,
        )
        for i, (c, k, s) in enumerate(cells)
    ]


# ---------------------------------------------------------------------------------------------- one run
def logger_args(config: BenchmarkConfig, spec: RunSpec, stage: str) -> list[str]:
    """Arguments that point the run's logger (and ``default_root_dir``) at its own folder.

    ``stage`` is ``"fit"`` (folder ``<run>/fit``) or ``"test"`` (the run folder itself). CSV and
    TensorBoard loggers, whose ``log_dir`` is ``save_dir/name/version``, get ``save_dir=<output>/runs``,
    ``name=<category>`` and ``version=k<k>/s<seed>[/fit]``. Any other logger (its ``log_dir`` is its
    ``save_dir``) gets ``save_dir=<folder>``; a WandbLogger also the run name
    ``<category>-k<k>-s<seed>[-fit]`` and, unless the config has it, the
    :class:`~fsad_lightning.callbacks.wandb_media.WandbMedia` callback.

    Raises:
        ValueError: the logger has no ``save_dir`` argument (it cannot be given a run folder).
    """
    folder = spec.folder / "fit" if stage == "fit" else spec.folder
    args = [f"--trainer.default_root_dir={folder}"]
    if config.logger is None:
        return args
    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger, WandbLogger

    logger_class = _import(config.logger["class_path"])
    prefix = "--trainer.logger.init_args"
    if issubclass(logger_class, (CSVLogger, TensorBoardLogger)):
        version = f"k{spec.k_shot}/s{spec.seed}" + ("/fit" if stage == "fit" else "")
        return args + [
            f"{prefix}.save_dir={config.output / 'runs'}",
            f"{prefix}.name={spec.category}",
            f"{prefix}.version={version}",
        ]
    if "save_dir" not in inspect.signature(logger_class.__init__).parameters:
        raise ValueError(
            f"fsad benchmark cannot point {logger_class.__name__} at a run folder: it has no save_dir"
        )
    args.append(f"{prefix}.save_dir={folder}")
    if issubclass(logger_class, WandbLogger):
        name = f"{spec.category}-k{spec.k_shot}-s{spec.seed}" + ("-fit" if stage == "fit" else "")
        args.append(f"{prefix}.name={name}")
        if not config.has_wandb_media:
            args.append(f"--trainer.callbacks+={WANDB_MEDIA}")
    return args


def run_args(config: BenchmarkConfig, spec: RunSpec, stage: str) -> list[str]:
    """The ``fsad <stage>`` argument list of one run (without the checkpoint of a trainable test)."""
    args = [stage]
    for path in config.configs:
        args += ["--config", path]
    args += list(config.extra_args)
    category = json.dumps(list(spec.categories)) if spec.categories else spec.category
    args += [
        f"--data.init_args.category={category}",
        f"--data.init_args.k_shot={spec.k_shot}",
        f"--data.init_args.seed={spec.seed}",
        f"--seed_everything={spec.seed}",
    ]
    return args + logger_args(config, spec, stage)


def _finish_wandb() -> None:
    """Close a W&B run left open by a run, so the next WandbLogger starts its own."""
    wandb = sys.modules.get("wandb")
    if wandb is not None and getattr(wandb, "run", None) is not None:
        wandb.finish()


def last_checkpoint(cli: FSADCLI, folder: Path) -> str:
    """The fit's last checkpoint: what its ModelCheckpoint wrote last, else one saved now."""
    callback = cli.trainer.checkpoint_callback
    for candidate in (getattr(callback, "last_model_path", ""), getattr(callback, "best_model_path", "")):
        if candidate and os.path.isfile(candidate):
            return candidate
    path = folder / "fit" / "checkpoints" / "last.ckpt"
    path.parent.mkdir(parents=True, exist_ok=True)
    cli.trainer.save_checkpoint(str(path))
    return str(path)


def execute_run(config: BenchmarkConfig, spec: RunSpec) -> list[list[str]]:
    """Fit (trainable methods) and test one cell in this process; returns the argument lists it ran.

    Raises whatever the run raises; :func:`run_benchmark` records it and goes on.
    """
    commands = []
    test_args = run_args(config, spec, "test")
    try:
        if config.trainable:
            fit_args = run_args(config, spec, "fit")
            commands.append(fit_args)
            cli = _run_cli(fit_args)
            checkpoint = last_checkpoint(cli, spec.folder)
            _finish_wandb()
            test_args = test_args + [f"--ckpt_path={checkpoint}"]
        commands.append(test_args)
        with warnings.catch_warnings():
            # expected here: the test logs into the run folder that holds fit/, and restores the fit's
            # ModelCheckpoint state from another folder
            warnings.filterwarnings("ignore", message=r"Experiment logs directory .* exists and is not empty")
            warnings.filterwarnings("ignore", message=r"The dirpath has changed from")
            _run_cli(test_args)
    finally:
        _finish_wandb()
    if not spec.is_done():
        raise RuntimeError(f"the test run finished without writing {spec.results_path}")
    return commands


def _failure_text(err: BaseException) -> str:
    """One line on why a run failed: for the user's input or environment the line ``fsad`` itself would
    print (the wrapped cause, not jsonargparse's "Does not validate ..."), else the error's type and its
    first line."""
    if isinstance(err, SystemExit):
        return f"fsad exited with status {err.code}"
    if is_user_error(err):
        return user_error_message(err)
    message = str(err).strip().splitlines()[0] if str(err).strip() else ""
    return f"{type(err).__name__}: {message}" if message else type(err).__name__


# ---------------------------------------------------------------------------------------------- the loop
@dataclass
class BenchmarkReport:
    """What :func:`run_benchmark` did: every run's outcome, the per-run results and the table files."""

    outcomes: list[RunOutcome]
    results: list[dict[str, Any]]
    tables: list[Path]

    @property
    def failed(self) -> list[RunOutcome]:
        return [o for o in self.outcomes if o.status == "failed"]


@dataclass
class WorkerSettings:
    """How a worker shares the runs with others (see the module docstring).

    Attributes:
        owner: the lock owner of this process (worker id, host, pid).
        lock_timeout_s: seconds without a heartbeat after which a run's lock is stale.
        poll_interval_s: seconds between looks at the runs other workers hold.
    """

    owner: LockOwner = field(default_factory=LockOwner.this_process)
    lock_timeout_s: float = DEFAULT_TIMEOUT_S
    poll_interval_s: float = DEFAULT_POLL_INTERVAL_S


def _print(text: str) -> None:
    print(text, flush=True)


def check_output_folder(config: BenchmarkConfig) -> None:
    """Refuse to resume into an output folder whose ``benchmark.json`` records other settings.

    Raises:
        ValueError: the fingerprints differ (the runs there are another experiment).
    """
    record = config.output / "benchmark.json"
    if not record.is_file():
        return
    try:
        previous = json.loads(record.read_text(encoding="utf-8")).get("fingerprint")
    except (json.JSONDecodeError, AttributeError) as err:
        raise ValueError(f"{record} is not a benchmark record ({err}): choose another --output") from err
    if previous and previous != config.fingerprint:
        raise ValueError(
            f"{config.output} holds a benchmark of other settings (fingerprint {previous[:8]}, now "
            f"{config.fingerprint[:8]}): its results cannot be resumed; choose another --output"
        )


def _write_record(
    config: BenchmarkConfig, outcomes: Sequence[RunOutcome], tables: Sequence[Path], state: str
) -> None:
    atomic_write_json(
        config.output / "benchmark.json",
        {
            "state": state,
            "configs": config.configs,
            "extra_args": config.extra_args,
            "fingerprint": config.fingerprint,
            "variant": config.variant,
            "runs": [o.as_dict() for o in outcomes],
            "tables": [str(p) for p in tables],
        },
    )


def holder_text(spec: RunSpec) -> str:
    """Who holds a run's lock, for messages: ``worker w1 (pid 12 on node3)``."""
    owner = read_owner(spec.lock_path) or {}
    return f"worker {owner.get('worker', '?')} (pid {owner.get('pid', '?')} on {owner.get('host', '?')})"


def run_cell(config: BenchmarkConfig, spec: RunSpec) -> RunOutcome:
    """Run one claimed cell afresh (a half-written folder is cleared first) and report how it ended; a
    failure writes ``error.txt`` and is returned, ``KeyboardInterrupt`` propagates."""
    if spec.folder.exists():  # an unfinished run (or one that failed before): start it afresh
        shutil.rmtree(spec.folder)
    _print(f"{spec.label}: running")
    start = time.perf_counter()
    try:
        commands = execute_run(config, spec)
    except (Exception, SystemExit) as err:  # noqa: BLE001 -- a failed run is reported, the rest go on
        if isinstance(err, SystemExit) and err.code in (0, None):
            err = RuntimeError("fsad exited before testing")
        seconds = time.perf_counter() - start
        error = _failure_text(err)
        detail = "".join(traceback.format_exception(type(err), err, err.__traceback__))
        atomic_write_text(spec.error_path, detail)
        _print(f"{spec.label}: FAILED after {seconds:.1f} s: {error} (traceback in {spec.error_path})")
        return RunOutcome(spec, "failed", seconds, error)
    seconds = time.perf_counter() - start
    _print(f"{spec.label}: done in {seconds:.1f} s")
    return RunOutcome(spec, "done", seconds, commands=commands)


def _failure_of_another_worker(spec: RunSpec) -> RunOutcome:
    lines = spec.error_path.read_text(encoding="utf-8", errors="replace").strip().splitlines()
    error = f"failed in another worker: {lines[-1] if lines else 'see error.txt'}"
    _print(f"{spec.label}: {error} ({spec.error_path})")
    return RunOutcome(spec, "failed", error=error)


def work_through(
    config: BenchmarkConfig, runs: Sequence[RunSpec], worker: WorkerSettings
) -> list[RunOutcome]:
    """Claim and run every planned run no other worker has finished or holds, then wait for the ones others
    hold (taking over those whose worker crashed) until every run is finished or failed.

    Returns one outcome per run, in plan order: ``done`` (run here), ``skipped`` (finished before, here or
    by another worker) or ``failed`` (here, or by another worker since this one started)."""
    started = time.time()
    outcomes: dict[int, RunOutcome] = {}
    pending = list(runs)
    announced: set[int] = set()
    while pending:
        held_elsewhere = []
        for spec in pending:
            if spec.is_done():
                by = "by another worker" if spec.index in announced else "before"
                _print(f"{spec.label}: done {by}, skipped ({spec.results_path})")
                outcomes[spec.index] = RunOutcome(spec, "skipped")
                continue
            if spec.failed_since(started):
                outcomes[spec.index] = _failure_of_another_worker(spec)
                continue
            lock = claim(spec.lock_path, worker.owner, worker.lock_timeout_s)
            if lock is None:
                if spec.index not in announced:
                    _print(f"{spec.label}: held by {holder_text(spec)}, left to it")
                    announced.add(spec.index)
                held_elsewhere.append(spec)
                continue
            with lock.heartbeat():
                if lock.took_over:
                    _print(f"{spec.label}: taking over, {lock.took_over}")
                if spec.is_done():  # finished by its previous holder between our look and the claim
                    outcomes[spec.index] = RunOutcome(spec, "skipped")
                    continue
                outcome = run_cell(config, spec)
            if lock.lost:
                _print(f"{spec.label}: another worker took this run over while it ran (no heartbeat)")
            outcomes[spec.index] = outcome
        pending = held_elsewhere
        if pending:
            time.sleep(worker.poll_interval_s)
    return [outcomes[spec.index] for spec in runs]


def collect_results(config: BenchmarkConfig, runs: Sequence[RunSpec]) -> list[dict[str, Any]]:
    """The table rows of every finished planned run, in plan order."""
    results = []
    for spec in runs:
        if spec.is_done():
            results.extend(category_results(spec, config.variant))
    return results


def run_benchmark(
    config: BenchmarkConfig,
    runs: Sequence[RunSpec],
    wandb_summary: bool = False,
    worker: WorkerSettings | None = None,
    tables: bool = True,
    report_only: bool = False,
) -> BenchmarkReport:
    """Run (or skip, when finished or held by another worker) every planned run, then write the tables.

    ``report_only``: run nothing, write the tables of the finished runs. ``tables=False``: write none.
    ``KeyboardInterrupt`` (a kill) propagates: finished runs keep their ``results.json``, the run's lock is
    released, and a restart resumes from there.

    Raises:
        ValueError: the output folder holds a benchmark of other settings (:func:`check_output_folder`).
    """
    check_output_folder(config)
    if report_only:
        outcomes = [RunOutcome(s, "skipped" if s.is_done() else "missing") for s in runs]
        missing = [o.spec for o in outcomes if o.status == "missing"]
        if missing:
            _print(f"{len(missing)} of {len(runs)} runs have no results yet, e.g. {missing[0].label}")
    else:
        _write_record(config, [], [], "running")
        outcomes = work_through(config, runs, worker or WorkerSettings())
    results = collect_results(config, runs)
    written = write_tables(results, config.output) if results and tables else []
    if tables or report_only:
        _write_record(config, outcomes, written, "finished")
    for path in written:
        if path.suffix == ".md":
            _print("\n" + path.read_text(encoding="utf-8"))
    if wandb_summary and results:
        log_benchmark_to_wandb(config, results)
    return BenchmarkReport(outcomes=outcomes, results=results, tables=written)


def category_results(spec: RunSpec, variant: str = "") -> list[dict[str, Any]]:
    """The table rows of a finished run: its result, or one row per category of a multi-class run, with
    the method's ``variant`` when it has one."""
    result = load_run_result(spec.results_path)
    # the plan names the cell, whatever the datamodule reported
    result.update(k_shot=spec.k_shot, seed=spec.seed)
    if variant:
        result[VARIANT_KEY] = variant
    if not spec.categories:
        return [{**result, "category": spec.category}]
    per_category = result.get("per_category") or {}
    missing = [c for c in spec.categories if c not in per_category]
    if missing:
        raise ValueError(f"{spec.results_path}: the multi-class run has no results for categories {missing}")
    shared = {k: v for k, v in result.items() if k != "per_category"}
    return [{**shared, **per_category[c], "category": c} for c in spec.categories]


def log_benchmark_to_wandb(config: BenchmarkConfig, results: Sequence[dict[str, Any]]) -> None:
    """Log the ``mean`` row of every table (``benchmark/[<dataset>/]k<k>/<metric>``) and the tables to one
    W&B run (under a sweep agent: the agent's run). The pass-through ``--key=value`` arguments go to the
    run config."""
    import wandb

    tables = build_tables(results)
    overrides = dict(
        arg[2:].split("=", 1) for arg in config.extra_args if arg.startswith("--") and "=" in arg
    )
    run = wandb.init(
        dir=str(config.output), config={"configs": config.configs, **overrides}, job_type="benchmark"
    )
    try:
        summary: dict[str, Any] = {}
        for dataset, table in tables.items():
            prefix = "benchmark/" if len(tables) == 1 else f"benchmark/{dataset}/"
            for method in table.methods:
                for k in table.shots:
                    for metric, stats in table.rows[(method, MEAN_ROW)][k].items():
                        if stats is not None:
                            summary[f"{prefix}k{k}/{metric}"] = stats.mean
                            summary[f"{prefix}k{k}/{metric}_std"] = stats.std
            rows = list(csv.reader(io.StringIO(table.csv())))
            summary[f"table/{dataset}"] = wandb.Table(columns=rows[0], data=rows[1:])
        run.log(summary)
    finally:
        run.finish()


# ---------------------------------------------------------------------------------------------- command line
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fsad benchmark",
        allow_abbrev=False,
        description="Fit and test every category x k_shot x seed of an fsad config and write mean±std "
        "tables. Arguments it does not know (--model.init_args.x=1) are passed to every run.",
    )
    parser.add_argument("--config", action="append", required=True, help="an fsad config (repeatable)")
    parser.add_argument(
        "--categories", nargs="+", default=None, help="default: every category of the dataset"
    )
    parser.add_argument(
        "--shots", nargs="+", type=int, default=None, help="default: the method's paper_shots"
    )
    parser.add_argument("--seeds", nargs="+", type=int, default=list(DEFAULT_SEEDS))
    parser.add_argument(
        "--output", default=None, help="default: runs/benchmark_<config name>_<settings fingerprint>"
    )
    parser.add_argument(
        "--dry_run", action="store_true", help="print the runs and their commands, run nothing"
    )
    parser.add_argument("--wandb", action="store_true", help="log the mean row and tables to a W&B run")
    parser.add_argument(
        "--report_only",
        action="store_true",
        help="run nothing: write the tables of the planned runs that have finished",
    )
    parser.add_argument(
        "--tables",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="write the tables at the end (--no-tables: not, e.g. for a one-run trial of a grid sweep)",
    )
    parser.add_argument(
        "--worker_id", default=None, help="this worker's name in the run locks (default: <host>-<pid>)"
    )
    parser.add_argument(
        "--lock_timeout",
        type=float,
        default=DEFAULT_TIMEOUT_S,
        help="seconds without a heartbeat after which another worker takes a run over (default: %(default)s)",
    )
    parser.add_argument(
        "--poll_interval",
        type=float,
        default=DEFAULT_POLL_INTERVAL_S,
        help="seconds between looks at the runs other workers hold (default: %(default)s)",
    )
    parser.add_argument(
        "--multi_class",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="fit and test all categories together, one run per shots x seed (default: the method's "
        "multi_class class attribute, else off)",
    )
    return parser


def benchmark_main(argv: Sequence[str] | None = None) -> BenchmarkReport | None:
    """``fsad benchmark``: parse ``argv``, run the benchmark, exit with status 1 if any run failed.

    Returns the :class:`BenchmarkReport` (``None`` for ``--dry_run``) when every run succeeded.
    """
    parser = build_parser()
    args, passthrough = parser.parse_known_args(list(sys.argv[1:] if argv is None else argv))
    stray = [a for a in passthrough if a.startswith("-") and not a.startswith("--")]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    for name, values in (("shots", args.shots), ("seeds", args.seeds)):
        if values is not None and (not values or any(v < (1 if name == "shots" else 0) for v in values)):
            parser.error(f"--{name} must list integers >= {1 if name == 'shots' else 0}, got {values}")
    if not args.lock_timeout > 0 or not 0 <= args.poll_interval:
        parser.error(
            f"--lock_timeout must be > 0 and --poll_interval >= 0, got {args.lock_timeout}, {args.poll_interval}"
        )
    config = read_benchmark_config(args.config, passthrough, args.output)
    output = config.output
    categories = list(args.categories) if args.categories else discover_categories(config)
    shots = list(args.shots) if args.shots else default_shots(config.model_class)
    multi_class = args.multi_class
    if multi_class is None:
        multi_class = bool(getattr(config.model_class, "multi_class", False))
    runs = plan_runs(output, categories, shots, list(args.seeds), multi_class=multi_class)
    worker = WorkerSettings(
        owner=LockOwner.this_process(args.worker_id),
        lock_timeout_s=args.lock_timeout,
        poll_interval_s=args.poll_interval,
    )
    kind = "trainable" if config.trainable else "training-free"
    _print(
        f"fsad benchmark: {config.model_class.__name__} ({kind}), {len(categories)} categories"
        f"{' together (multi-class)' if multi_class else ''} x shots "
        f"{shots} x seeds {list(args.seeds)} = {len(runs)} runs -> {output}"
        + ("" if args.dry_run or args.report_only else f" (worker {worker.owner.worker})")
    )
    if args.dry_run:
        check_output_folder(config)
        for spec in runs:
            state = "done, will be skipped" if spec.is_done() else "to run"
            if not spec.is_done() and spec.lock_path.exists():
                stale = stale_reason(spec.lock_path, args.lock_timeout)
                state = f"held by {holder_text(spec)}" + (f", stale: {stale}" if stale else "")
            _print(f"{spec.label}: {state}")
            stages = ["fit", "test"] if config.trainable else ["test"]
            for stage in stages:
                _print("    fsad " + " ".join(run_args(config, spec, stage)))
        return None
    report = run_benchmark(
        config,
        runs,
        wandb_summary=args.wandb,
        worker=worker,
        tables=args.tables,
        report_only=args.report_only,
    )
    if report.failed:
        _print(f"{len(report.failed)} of {len(runs)} runs failed:")
        for outcome in report.failed:
            _print(f"  {outcome.spec.label}: {outcome.error}")
        sys.exit(1)
    return report
