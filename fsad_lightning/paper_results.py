"""The papers' reported numbers as data, to put beside ours.

``paper_results.csv`` (shipped in the package) holds the result tables of the four papers this project
implements, transcribed from their texts (``../shared/seeds``, see its README):

- One-to-Normal (Li et al., NeurIPS 2024): Tables 1 (industrial), 2 (medical) and 3 (semantic), every
  method column, including its re-runs of PaDiM, PatchCore, RegAD, CoOp, WinCLIP(+) and InCTRL;
- ADP (Kwak et al., IEEE Access 2024): Table 1 (2-shot means), Tables 2 and 3 (per class, MVTec AD and
  VisA, 4 / 8 / 16 shots);
- PromptAD (Li et al., CVPR 2024): Tables 1 (image AUROC), 2 (against many-shot methods) and 4 (pixel
  AUROC);
- AnomalySD (Yan et al.): Table 1 (0 / 1 / 2 / 4 shots, five metrics, multi-class).

One row per number, with the columns

============== ==============================================================================================
source         the paper that reports it: ``one_to_normal``, ``adp``, ``promptad``, ``anomalysd``
table          its table, as the paper numbers it (``Table 1``)
paper_method   the method as the paper writes it (``Patchcore``, ``WinCLIP+``, ``ADP_ℓ``; a paper's ``Ours``
               is written as its method's name)
method         our name for it: ``patchknn`` (PatchCore), ``winclip`` (WinCLIP / WinCLIP+), ``promptad``,
               ``one_to_normal``, ``adp``, ``anomalysd``; methods we do not implement keep a lower-case slug
               of the paper's name (``inctrl``, ``padim``, ``regad``, ``coop``, ``spade``, ``rwda``, ...)
variant        a setting of our method that the paper reports as a separate row: ``label_aware`` (ADP_ℓ),
               ``zero_shot`` (WinCLIP and AnomalySD at 0 shots); empty for the default
dataset        the datamodule's ``name`` for that dataset (``mvtec``, ``visa``, ``ksdd``, ``afid``, ``elpv``,
               ``oct2017``, ``brainmri``, ``headct``, ``resc``, ``mnist``, ``cifar10``)
category       a category folder name (``metal_nut``, ``pipe_fryum``), or ``mean`` for the class average
               (the benchmark table's ``mean`` row)
shots          k normal shots per category; ``full`` for full-shot rows (never matched to a benchmark)
metric         our metric key: ``image_auroc``, ``image_auprc`` (AUPRC / AUPR), ``image_f1_max``,
               ``pixel_auroc``, ``pixel_aupro`` (PRO)
value          the number as printed, in percent
std            the ± printed beside it, in percent; empty when none is printed
runs           how many runs the paper says the mean is over (One-to-Normal 5, ADP 3); empty when unstated
mean_over_runs ``yes`` when the paper prints a mean ± std over runs; empty when it does not say
setting        ``multi-class`` for AnomalySD's own rows (one model for every class); else empty
============== ==============================================================================================

The papers' numbers are percentages; :class:`PaperResult` keeps them so (``value``, ``std``) and gives
the fractions our results use (``fraction``, ``std_fraction``).

Joining a benchmark cell to the papers (:func:`paper_results_for`): the method, its :func:`variant_of`
(a zero-shot variant is looked up at 0 shots whatever the datamodule's ``k_shot``), the dataset name
(:func:`canonical_dataset`: lower case, ``mvtec_anomaly_detection`` and the like read as ``mvtec``), the
category, the shots and the metric. Several papers report the same baseline cell; they are ordered by
:data:`SOURCE_PREFERENCE`: the method's own paper first, then the papers that copy the numbers of the
baselines' own publications (PromptAD, AnomalySD, ADP print Jeong et al.'s WinCLIP-paper numbers for
SPADE / PaDiM / PatchCore / WinCLIP+), then One-to-Normal, which re-ran its baselines; within a paper,
in table order. The first is the table's ``paper`` number; all of them are kept in the JSON tables.
"""

from __future__ import annotations

import csv
import functools
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

#: the bundled data file
PAPER_RESULTS_FILE = Path(__file__).with_name("paper_results.csv")
COLUMNS = (
    "source",
    "table",
    "paper_method",
    "method",
    "variant",
    "dataset",
    "category",
    "shots",
    "metric",
    "value",
    "std",
    "runs",
    "mean_over_runs",
    "setting",
)
#: the papers (``source`` keys) with a short citation and the method each introduced
PAPERS = {
    "one_to_normal": ("One-to-Normal (Li et al., NeurIPS 2024)", "one_to_normal"),
    "adp": ("ADP (Kwak et al., IEEE Access 2024)", "adp"),
    "promptad": ("PromptAD (Li et al., CVPR 2024)", "promptad"),
    "anomalysd": ("AnomalySD (Yan et al.)", "anomalysd"),
}
#: which paper's number comes first when several report a cell (after the method's own paper)
SOURCE_PREFERENCE = ("promptad", "anomalysd", "adp", "one_to_normal")
#: the category of a class-average row
MEAN_CATEGORY = "mean"
#: shots of a full-shot row
FULL_SHOT = "full"
#: dataset names that mean the same dataset as a paper's name
DATASET_ALIASES = {
    "mvtec_anomaly_detection": "mvtec",
    "mvtec_ad": "mvtec",
    "mvtec-ad": "mvtec",
    "mvtecad": "mvtec",
    "cifar-10": "cifar10",
    "cifar_10": "cifar10",
    "brain_mri": "brainmri",
    "head_ct": "headct",
    "oct": "oct2017",
}
#: (method, model init argument) whose true value selects a variant the papers report separately
VARIANT_SWITCHES = {
    ("adp", "label_aware"): "label_aware",
    ("winclip", "zero_shot"): "zero_shot",
    ("anomalysd", "zero_shot"): "zero_shot",
}
ZERO_SHOT = "zero_shot"
METRICS = ("image_auroc", "image_auprc", "image_f1_max", "pixel_auroc", "pixel_aupro", "pixel_f1_max")


@dataclass(frozen=True)
class PaperResult:
    """One reported number (see the module docstring for the fields). ``shots`` is an int, or
    ``"full"``; ``value`` and ``std`` are percentages; ``mean_over_runs`` is ``None`` when unstated."""

    source: str
    table: str
    paper_method: str
    method: str
    variant: str
    dataset: str
    category: str
    shots: int | str
    metric: str
    value: float
    std: float | None
    runs: int | None
    mean_over_runs: bool | None
    setting: str = ""

    @property
    def fraction(self) -> float:
        """``value`` as a fraction, the unit of our results."""
        return self.value / 100.0

    @property
    def std_fraction(self) -> float | None:
        return None if self.std is None else self.std / 100.0

    @property
    def citation(self) -> str:
        """``PromptAD (Li et al., CVPR 2024) Table 1``."""
        return f"{PAPERS[self.source][0]} {self.table}"

    @property
    def label(self) -> str:
        """Short source label: ``promptad Table 1``."""
        return f"{self.source} {self.table}"

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready, with the number as a fraction beside the printed percentage."""
        return {
            "source": self.source,
            "table": self.table,
            "citation": self.citation,
            "paper_method": self.paper_method,
            "variant": self.variant,
            "setting": self.setting,
            "value_percent": self.value,
            "std_percent": self.std,
            "value": self.fraction,
            "std": self.std_fraction,
            "runs": self.runs,
            "mean_over_runs": self.mean_over_runs,
        }


def _parse_row(row: dict[str, str], where: str) -> PaperResult:
    def number(field: str, required: bool) -> float | None:
        text = (row.get(field) or "").strip()
        if not text:
            if required:
                raise ValueError(f"{where}: field {field!r} is empty; expected a number in percent")
            return None
        try:
            return float(text)
        except ValueError:
            raise ValueError(f"{where}: field {field!r} is {text!r}; expected a number in percent") from None

    for field in ("source", "table", "paper_method", "method", "dataset", "category", "shots", "metric"):
        if not (row.get(field) or "").strip():
            raise ValueError(f"{where}: field {field!r} is empty")
    if row["source"] not in PAPERS:
        raise ValueError(f"{where}: source {row['source']!r} is not one of {sorted(PAPERS)}")
    if row["metric"] not in METRICS:
        raise ValueError(f"{where}: metric {row['metric']!r} is not one of {list(METRICS)}")
    shots_text = row["shots"].strip()
    if shots_text == FULL_SHOT:
        shots: int | str = FULL_SHOT
    elif shots_text.isdigit():
        shots = int(shots_text)
    else:
        raise ValueError(f"{where}: shots {shots_text!r} is neither a non-negative integer nor {FULL_SHOT!r}")
    runs_text = (row.get("runs") or "").strip()
    if runs_text and not runs_text.isdigit():
        raise ValueError(f"{where}: runs {runs_text!r} is not a positive integer")
    over = (row.get("mean_over_runs") or "").strip().lower()
    if over not in ("", "yes", "no"):
        raise ValueError(f"{where}: mean_over_runs {over!r} must be yes, no or empty")
    return PaperResult(
        source=row["source"],
        table=row["table"],
        paper_method=row["paper_method"],
        method=row["method"],
        variant=(row.get("variant") or "").strip(),
        dataset=row["dataset"],
        category=row["category"],
        shots=shots,
        metric=row["metric"],
        value=number("value", True),  # type: ignore[arg-type]
        std=number("std", False),
        runs=int(runs_text) if runs_text else None,
        mean_over_runs=None if not over else over == "yes",
        setting=(row.get("setting") or "").strip(),
    )


def read_paper_results(path: str | os.PathLike) -> tuple[PaperResult, ...]:
    """Read a paper-results CSV (the columns of :data:`COLUMNS`).

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: a column is missing, a field is malformed, or two rows give the same cell of the same
            table (naming the file and the line).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"paper results file {path} does not exist")
    with path.open(encoding="utf-8", newline="") as handle:
        reader = csv.DictReader(handle)
        missing = [c for c in COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"{path}: columns {missing} are missing; expected {list(COLUMNS)}")
        results, seen = [], {}
        for line, row in enumerate(reader, start=2):
            result = _parse_row(row, f"{path}, line {line}")
            key = (result.source, result.table, result.method, result.variant, result.dataset,
                   result.category, result.shots, result.metric)  # fmt: skip
            if key in seen:
                raise ValueError(f"{path}, line {line}: the same cell as line {seen[key]}")
            seen[key] = line
            results.append(result)
    return tuple(results)


@functools.cache
def load_paper_results() -> tuple[PaperResult, ...]:
    """The bundled :data:`PAPER_RESULTS_FILE`, read once."""
    return read_paper_results(PAPER_RESULTS_FILE)


def canonical_dataset(name: str | None) -> str:
    """The papers' name for a dataset name of ours: lower case, :data:`DATASET_ALIASES` applied."""
    text = str(name or "").strip().lower()
    return DATASET_ALIASES.get(text, text)


def variant_of(method: str, model_init_args: Mapping[str, Any] | None) -> str:
    """The variant (:data:`VARIANT_SWITCHES`) a method's init arguments select, ``""`` for the default."""
    args = model_init_args or {}
    for (name, argument), variant in VARIANT_SWITCHES.items():
        if name == method and args.get(argument) is True:
            return variant
    return ""


def _preference(result: PaperResult, method: str) -> int:
    if PAPERS[result.source][1] == method:
        return -1
    return (
        SOURCE_PREFERENCE.index(result.source)
        if result.source in SOURCE_PREFERENCE
        else len(SOURCE_PREFERENCE)
    )


def semantic_classes() -> dict[str, tuple[str, ...]]:
    """The classes of the one-vs-all sets, each a category of ours (:mod:`fsad_lightning.data.semantic`)."""
    from fsad_lightning.data.semantic import CIFAR10_CLASSES, MNIST_CLASSES

    return {"mnist": tuple(MNIST_CLASSES), "cifar10": tuple(CIFAR10_CLASSES)}


class PaperIndex:
    """The paper results keyed by (method, variant, dataset, category, shots, metric) for fast joins.

    A paper's class average (category ``mean``) is only comparable with a benchmark's ``mean`` row when
    the benchmark covers every category of the dataset: :meth:`covers_dataset`. The categories of a
    dataset are those its per-category paper rows name (MVTec AD's 15 and VisA's 12 from ADP Tables 2-3)
    or, for MNIST and CIFAR-10, the ten classes; a dataset with neither is taken as one category."""

    def __init__(
        self, results: Iterable[PaperResult], dataset_categories: Mapping[str, Iterable[str]] | None = None
    ) -> None:
        self._cells: dict[tuple, list[PaperResult]] = {}
        self._categories: dict[str, set[str]] = {k: set(v) for k, v in (dataset_categories or {}).items()}
        order = {}
        for index, result in enumerate(results):
            key = (
                result.method,
                result.variant,
                result.dataset,
                result.category,
                result.shots,
                result.metric,
            )
            self._cells.setdefault(key, []).append(result)
            order[id(result)] = index
            if result.category != MEAN_CATEGORY:
                self._categories.setdefault(result.dataset, set()).add(result.category)
        for key, cell in self._cells.items():
            cell.sort(key=lambda r: (_preference(r, key[0]), order[id(r)]))

    def covers_dataset(self, dataset: str, categories: Iterable[str]) -> bool:
        """Whether ``categories`` are every category of ``dataset`` (see the class docstring)."""
        categories = set(categories)
        known = self._categories.get(canonical_dataset(dataset))
        return known <= categories if known else len(categories) == 1

    def lookup(
        self, method: str, dataset: str, category: str, k_shot: int, metric: str, variant: str = ""
    ) -> list[PaperResult]:
        """Every paper's number for this cell, preferred first (see the module docstring)."""
        shots = 0 if variant == ZERO_SHOT else int(k_shot)
        key = (method, variant, canonical_dataset(dataset), category, shots, metric)
        return list(self._cells.get(key, ()))


@functools.cache
def bundled_index() -> PaperIndex:
    """:class:`PaperIndex` of the bundled file."""
    return PaperIndex(load_paper_results(), semantic_classes())


def paper_results_for(
    method: str, dataset: str, category: str, k_shot: int, metric: str, variant: str = ""
) -> list[PaperResult]:
    """The bundled papers' numbers for one benchmark cell, preferred first; ``[]`` when none reports it."""
    return bundled_index().lookup(method, dataset, category, k_shot, metric, variant)
