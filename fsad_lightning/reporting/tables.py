"""Tables across categories, shots and seeds: the shape of the few-shot papers' result tables.

A benchmark (``fsad benchmark``) runs every category x k_shot x seed and leaves one ``results.json`` per
run (written by :class:`~fsad_lightning.callbacks.results.ResultsWriter`). This module turns those flat
per-run results into one table per dataset:

- one row per category (per method, when results of several methods are mixed) plus a ``mean`` row,
- one column block per shot count (``1-shot``, ``2-shot``, ...), each holding the image metrics (AUROC,
  AUPRC, F1-max) and, where the method produced anomaly maps, the pixel metrics (AUROC, AUPRO, F1-max),
- every cell ``mean +- std`` over the seeds,

written atomically as Markdown (percentages, one decimal, as the papers print them), CSV (fractions, one
``_mean`` / ``_std`` column pair per cell) and JSON (fractions, with the seeds behind every cell and the
per-run results).

Choices where the papers are not explicit:

- ``std`` is the sample standard deviation over seeds (Bessel's correction, ``ddof = 1``); with a single
  seed it is 0 and the Markdown cell shows the mean alone.
- The ``mean`` row is computed per seed first (the average over categories of that seed's results), then
  reported as ``mean +- std`` of those per-seed averages, so its spread is the seed-to-seed spread of the
  dataset average. A seed enters the ``mean`` row only if every category of the row block has a result
  for it (an average over a subset of categories would not be comparable); with no such seed the cell
  is empty.
- A cell averaged over fewer seeds than the most complete cell of its table is marked ``*`` in Markdown
  (e.g. a failed run); the CSV and JSON carry the exact seed count.

The papers' numbers (:mod:`fsad_lightning.paper_results`) are joined into every cell a paper reports (same
method and variant, dataset, category or ``mean`` row, shots and metric; a ``mean`` row only when the
table has every category of the dataset, :meth:`~fsad_lightning.paper_results.PaperIndex.covers_dataset`).
Markdown gains a ``<k>-shot <metric> paper (Δ)`` column after each such metric column (the paper's number
in percent and, in brackets, ours minus the paper's in points), CSV a ``_paper`` / ``_paper_diff`` /
``_paper_source`` column triple (fractions), JSON the paper's entries (all papers that report the cell,
preferred first) and ``paper_diff`` in the cell. A run result may carry ``variant`` (``fsad benchmark`` sets it from the
model's arguments, :func:`fsad_lightning.paper_results.variant_of`): its rows are labelled
``<method>[<variant>]`` and joined to the papers' rows of that variant (ADP_ℓ, zero-shot WinCLIP).
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fsad_lightning.callbacks.results import METRIC_KEYS, csv_text, markdown_table
from fsad_lightning.io import atomic_write_json, atomic_write_text
from fsad_lightning.paper_results import MEAN_CATEGORY, PaperIndex, PaperResult, bundled_index

#: row label of the average over categories
MEAN_ROW = "mean"
#: short column labels the papers use for each metric
METRIC_LABELS = {
    "image_auroc": "I-AUROC",
    "image_auprc": "I-AUPRC",
    "image_f1_max": "I-F1max",
    "pixel_auroc": "P-AUROC",
    "pixel_aupro": "P-AUPRO",
    "pixel_f1_max": "P-F1max",
}
#: the keys of a run result that say which cell of a table it belongs to
RUN_KEYS = ("method", "dataset", "category", "k_shot", "seed")
#: the key of a run result that names the method's variant (``fsad benchmark`` sets it)
VARIANT_KEY = "variant"


# ---------------------------------------------------------------------------------------------- statistics
@dataclass(frozen=True)
class SeedStats:
    """``mean +- std`` of one metric over seeds.

    Attributes:
        mean: arithmetic mean over the seeds.
        std: sample standard deviation (``ddof = 1``), 0 for a single seed.
        seeds: the seeds that entered, sorted.
    """

    mean: float
    std: float
    seeds: tuple[int, ...]

    @property
    def n(self) -> int:
        return len(self.seeds)

    def as_dict(self) -> dict[str, Any]:
        return {"mean": self.mean, "std": self.std, "n": self.n, "seeds": list(self.seeds)}


def mean_and_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation ``sqrt(sum (x - mean)^2 / (n - 1))`` (0 when ``n == 1``)."""
    if len(values) == 0:
        raise ValueError("mean_and_std needs at least one value")
    n = len(values)
    mean = math.fsum(values) / n
    if n == 1:
        return mean, 0.0
    return mean, math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (n - 1))


def seed_stats(values_by_seed: dict[int, float]) -> SeedStats | None:
    """:class:`SeedStats` of ``{seed: value}``; ``None`` when there are no values."""
    if not values_by_seed:
        return None
    seeds = tuple(sorted(values_by_seed))
    mean, std = mean_and_std([values_by_seed[s] for s in seeds])
    return SeedStats(mean=mean, std=std, seeds=seeds)


def format_paper(paper: PaperResult | None, stats: SeedStats | None) -> str | None:
    """Markdown cell of a paper column: ``96.6 (-0.5)``, the paper's number and ours minus it, in percent
    points (the number alone when we have no result)."""
    if paper is None:
        return None
    text = f"{paper.value:.1f}"
    if stats is not None:
        text += f" ({100 * stats.mean - paper.value:+.1f})"
    return text


def method_label(result: dict[str, Any]) -> str:
    """The row label of a run result: its method, with ``[<variant>]`` when it has one."""
    method = str(result.get("method") or "unknown")
    variant = result.get(VARIANT_KEY)
    return f"{method}[{variant}]" if variant else method


def format_mean_std(stats: SeedStats | None, marker: str = "") -> str | None:
    """Markdown cell: percentages with one decimal, ``95.3±1.2`` (``95.3`` for a single seed)."""
    if stats is None:
        return None
    text = f"{100 * stats.mean:.1f}"
    if stats.n > 1:
        text += f"±{100 * stats.std:.1f}"
    return text + marker


# ---------------------------------------------------------------------------------------------- run results
def _metric_value(result: dict[str, Any], metric: str) -> float | None:
    value = result.get(metric)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(float(value)):
        return None
    return float(value)


def validate_run_result(result: dict[str, Any], source: str = "result") -> dict[str, Any]:
    """Check that a run result names its cell (category, k_shot, seed) and return it.

    Raises:
        ValueError: naming ``source`` and the missing or malformed field.
    """
    if not isinstance(result, dict):
        raise ValueError(
            f"{source}: expected a JSON object with the run's metrics, got {type(result).__name__}"
        )
    for key in ("category", "k_shot", "seed"):
        if result.get(key) is None:
            raise ValueError(f"{source}: field {key!r} is missing; expected the run's {key}")
    for key in ("k_shot", "seed"):
        if isinstance(result[key], bool) or not isinstance(result[key], int):
            raise ValueError(f"{source}: field {key!r} must be an integer, got {result[key]!r}")
    return result


def load_run_result(path: str | os.PathLike) -> dict[str, Any]:
    """Read one run's ``results.json``.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: the file is not JSON or lacks the run's category / k_shot / seed.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"run result {path} does not exist")
    try:
        result = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from err
    return validate_run_result(result, str(path))


def find_run_results(folder: str | os.PathLike) -> list[dict[str, Any]]:
    """Every ``results.json`` below ``folder`` (e.g. ``<benchmark output>/runs``), sorted by path."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"results folder {folder} does not exist")
    return [load_run_result(p) for p in sorted(folder.rglob("results.json"))]


# ---------------------------------------------------------------------------------------------- the table
@dataclass
class BenchmarkTable:
    """The results of one dataset: ``rows[(method, category)][k_shot][metric] -> SeedStats``.

    Build it with :func:`build_tables`; render it with :meth:`markdown`, :meth:`csv` and :meth:`as_dict`.
    """

    dataset: str
    shots: list[int]
    metrics: list[str]
    methods: list[str]
    categories: dict[str, list[str]]
    rows: dict[tuple[str, str], dict[int, dict[str, SeedStats | None]]]
    runs: list[dict[str, Any]] = field(default_factory=list)
    #: row label -> (method, variant) of that label
    variants: dict[str, tuple[str, str]] = field(default_factory=dict)
    #: the papers' numbers of a cell, preferred first: ``paper[(label, category)][k_shot][metric]``
    paper: dict[tuple[str, str], dict[int, dict[str, list[PaperResult]]]] = field(default_factory=dict)

    def paper_entries(self, label: str, category: str, k_shot: int, metric: str) -> list[PaperResult]:
        return self.paper.get((label, category), {}).get(k_shot, {}).get(metric, [])

    def paper_cell(self, label: str, category: str, k_shot: int, metric: str) -> PaperResult | None:
        """The preferred paper number of a cell, ``None`` when no paper reports it."""
        entries = self.paper_entries(label, category, k_shot, metric)
        return entries[0] if entries else None

    def paper_columns(self) -> set[tuple[int, str]]:
        """``(k_shot, metric)`` columns in which some row has a paper number."""
        return {
            (k, m)
            for key in self.row_keys()
            for k in self.shots
            for m in self.metrics
            if self.paper_entries(*key, k, m)
        }

    def paper_citations(self) -> list[str]:
        """The sources of the preferred paper numbers shown, in first-use order."""
        cited = []
        for key in self.row_keys():
            for k in self.shots:
                for metric in self.metrics:
                    paper = self.paper_cell(*key, k, metric)
                    if paper is not None and paper.citation not in cited:
                        cited.append(paper.citation)
        return cited

    @property
    def max_seeds(self) -> int:
        counts = [s.n for row in self.rows.values() for cells in row.values() for s in cells.values() if s]
        return max(counts, default=0)

    def row_keys(self) -> list[tuple[str, str]]:
        """``(method, category)`` in print order: each method's categories sorted, then its mean row."""
        return [(m, c) for m in self.methods for c in [*self.categories[m], MEAN_ROW]]

    def column_name(self, k_shot: int, metric: str) -> str:
        return f"{k_shot}-shot {METRIC_LABELS.get(metric, metric)}"

    def paper_column_name(self, k_shot: int, metric: str) -> str:
        return f"{self.column_name(k_shot, metric)} paper (Δ)"

    def display(self) -> tuple[list[str], list[dict[str, str | None]], str]:
        """The table as shown (Markdown, the results page): its columns, one row of cell texts per
        ``(method, category)`` (``None``: no result) and the note under it. Cells are ``mean±std`` in
        percent, ``*`` marking fewer seeds; a paper column follows each metric column a paper reports."""
        with_paper = self.paper_columns()
        columns = ["method", "category"]
        for k in self.shots:
            for metric in self.metrics:
                columns.append(self.column_name(k, metric))
                if (k, metric) in with_paper:
                    columns.append(self.paper_column_name(k, metric))
        full = self.max_seeds
        any_marked = False
        rows = []
        for method, category in self.row_keys():
            row: dict[str, str | None] = {"method": method, "category": category}
            for k in self.shots:
                for metric in self.metrics:
                    stats = self.rows[(method, category)].get(k, {}).get(metric)
                    marker = "*" if stats is not None and stats.n < full else ""
                    any_marked = any_marked or bool(marker)
                    row[self.column_name(k, metric)] = format_mean_std(stats, marker)
                    if (k, metric) in with_paper:
                        paper = self.paper_cell(method, category, k, metric)
                        row[self.paper_column_name(k, metric)] = format_paper(paper, stats)
            rows.append(row)
        note = f"mean±std over seeds (at most {full}), in percent; `-`: no result"
        if any_marked:
            note += "; `*`: fewer seeds than the other cells (a run failed or is missing)"
        if with_paper:
            note += (
                "; paper (Δ): the number the paper reports, in percent, and ours minus it in points "
                f"(from {'; '.join(self.paper_citations())}; a `mean` row only when it covers every category)"
            )
        return columns, rows, note + "."

    def markdown(self) -> str:
        """The table in Markdown (:meth:`display`)."""
        columns, rows, note = self.display()
        return f"### {self.dataset}\n\n" + markdown_table(rows, columns) + f"\n{note}\n"

    def csv_columns(self) -> list[str]:
        with_paper = self.paper_columns()
        columns = ["method", "dataset", "category"]
        for k in self.shots:
            columns.append(f"k{k}_n_seeds")
            for metric in self.metrics:
                columns += [f"k{k}_{metric}_mean", f"k{k}_{metric}_std"]
                if (k, metric) in with_paper:
                    columns += [
                        f"k{k}_{metric}_paper",
                        f"k{k}_{metric}_paper_diff",
                        f"k{k}_{metric}_paper_source",
                    ]
        return columns

    def csv(self) -> str:
        """The table as CSV: fractions, a ``_mean`` / ``_std`` column pair per shot and metric, and the
        paper's number, ours minus it and its source where a paper reports the column."""
        rows = []
        for method, category in self.row_keys():
            row: dict[str, Any] = {"method": method, "dataset": self.dataset, "category": category}
            for k in self.shots:
                cells = self.rows[(method, category)].get(k, {})
                row[f"k{k}_n_seeds"] = max((s.n for s in cells.values() if s), default=0)
                for metric in self.metrics:
                    stats = cells.get(metric)
                    row[f"k{k}_{metric}_mean"] = "" if stats is None else repr(stats.mean)
                    row[f"k{k}_{metric}_std"] = "" if stats is None else repr(stats.std)
                    paper = self.paper_cell(method, category, k, metric)
                    if paper is not None:
                        row[f"k{k}_{metric}_paper"] = repr(paper.fraction)
                        row[f"k{k}_{metric}_paper_diff"] = (
                            "" if stats is None else repr(stats.mean - paper.fraction)
                        )
                        row[f"k{k}_{metric}_paper_source"] = paper.label
            rows.append(row)
        return csv_text(rows, self.csv_columns())

    def cell_dict(self, label: str, category: str, k_shot: int, metric: str) -> dict[str, Any] | None:
        """One cell as JSON-ready data: its :class:`SeedStats` and, where a paper reports it, ``paper``
        (every paper's entry, preferred first) and ``paper_diff`` (ours minus the preferred one)."""
        stats = self.rows[(label, category)].get(k_shot, {}).get(metric)
        papers = self.paper_entries(label, category, k_shot, metric)
        if stats is None and not papers:
            return None
        cell: dict[str, Any] = stats.as_dict() if stats else {"mean": None, "std": None, "n": 0, "seeds": []}
        if papers:
            cell["paper"] = [p.as_dict() for p in papers]
            cell["paper_diff"] = None if stats is None else stats.mean - papers[0].fraction
        return cell

    def as_dict(self) -> dict[str, Any]:
        """The table as JSON-ready data: fractions with the seeds of every cell, plus the per-run results."""
        rows = []
        for method, category in self.row_keys():
            rows.append(
                {
                    "method": method,
                    "category": category,
                    "shots": {
                        str(k): {m: self.cell_dict(method, category, k, m) for m in self.metrics}
                        for k in self.shots
                    },
                }
            )
        return {
            "dataset": self.dataset,
            "shots": self.shots,
            "metrics": self.metrics,
            "statistic": "mean and sample std (ddof=1) over seeds; the mean row averages categories per seed",
            "variants": {label: {"method": m, "variant": v} for label, (m, v) in self.variants.items()},
            "paper_sources": self.paper_citations(),
            "rows": rows,
            "runs": self.runs,
        }


def _present_metrics(results: Iterable[dict[str, Any]], metrics: Sequence[str] | None) -> list[str]:
    results = list(results)
    candidates = list(metrics) if metrics is not None else list(METRIC_KEYS)
    return [m for m in candidates if any(_metric_value(r, m) is not None for r in results)]


def build_tables(
    results: Sequence[dict[str, Any]],
    metrics: Sequence[str] | None = None,
    papers: PaperIndex | None = None,
) -> dict[str, BenchmarkTable]:
    """Group per-run results by dataset and compute every cell's ``mean +- std`` over seeds.

    Args:
        results: run results (``results.json`` contents): ``method``, ``dataset``, ``category``,
            ``k_shot``, ``seed`` and metric values (fractions), optionally ``variant``. A missing
            ``dataset`` / ``method`` is shown as ``unknown``.
        metrics: metric keys to tabulate, in order; by default every key of
            :data:`~fsad_lightning.callbacks.results.METRIC_KEYS` that some run has.
        papers: the papers' numbers to join; default: the bundled ones
            (:func:`fsad_lightning.paper_results.bundled_index`); ``PaperIndex(())`` for none.

    Returns:
        ``{dataset: BenchmarkTable}``.

    Raises:
        ValueError: a result lacks its category / k_shot / seed, or two results claim the same cell.
    """
    by_dataset: dict[str, list[dict[str, Any]]] = {}
    for index, result in enumerate(results):
        validate_run_result(result, f"result #{index}")
        by_dataset.setdefault(str(result.get("dataset") or "unknown"), []).append(result)

    papers = bundled_index() if papers is None else papers
    tables = {}
    for dataset, runs in sorted(by_dataset.items()):
        table_metrics = _present_metrics(runs, metrics)
        shots = sorted({int(r["k_shot"]) for r in runs})
        variants = {
            method_label(r): (str(r.get("method") or "unknown"), str(r.get(VARIANT_KEY) or "")) for r in runs
        }
        methods = sorted(variants)
        categories = {m: sorted({str(r["category"]) for r in runs if method_label(r) == m}) for m in methods}
        # values[(method label, category)][k][metric][seed]
        values: dict[tuple[str, str], dict[int, dict[str, dict[int, float]]]] = {}
        for run in runs:
            method, category = method_label(run), str(run["category"])
            k, seed = int(run["k_shot"]), int(run["seed"])
            cell = values.setdefault((method, category), {}).setdefault(k, {})
            for metric in table_metrics:
                value = _metric_value(run, metric)
                if value is None:
                    continue
                if seed in cell.setdefault(metric, {}):
                    raise ValueError(
                        f"two results for dataset={dataset} method={method} category={category} "
                        f"k_shot={k} seed={seed}: expected one run per cell"
                    )
                cell[metric][seed] = value

        rows: dict[tuple[str, str], dict[int, dict[str, SeedStats | None]]] = {}
        for method in methods:
            for category in categories[method]:
                cells = values.get((method, category), {})
                rows[(method, category)] = {
                    k: {m: seed_stats(cells.get(k, {}).get(m, {})) for m in table_metrics} for k in shots
                }
            rows[(method, MEAN_ROW)] = {
                k: {
                    m: category_mean_stats(
                        [values.get((method, c), {}).get(k, {}).get(m, {}) for c in categories[method]]
                    )
                    for m in table_metrics
                }
                for k in shots
            }
        paper = {}
        for label, category in rows:
            method, variant = variants[label]
            paper_category = category
            if category == MEAN_ROW:
                if not papers.covers_dataset(dataset, categories[label]):
                    continue  # a paper's class average is no match for the average of a subset
                paper_category = MEAN_CATEGORY
            paper[(label, category)] = {
                k: {m: papers.lookup(method, dataset, paper_category, k, m, variant) for m in table_metrics}
                for k in shots
            }
        tables[dataset] = BenchmarkTable(
            dataset=dataset,
            shots=shots,
            metrics=table_metrics,
            methods=methods,
            categories=categories,
            rows=rows,
            runs=[dict(r) for r in runs],
            variants=variants,
            paper=paper,
        )
    return tables


def category_mean_stats(per_category: Sequence[dict[int, float]]) -> SeedStats | None:
    """The ``mean`` row's cell: per seed the average over categories, then ``mean +- std`` over seeds.

    ``per_category``: one ``{seed: value}`` per category. Only seeds that every category has enter.
    """
    if not per_category:
        return None
    common = set(per_category[0])
    for values in per_category[1:]:
        common &= set(values)
    return seed_stats({s: math.fsum(v[s] for v in per_category) / len(per_category) for s in common})


# ---------------------------------------------------------------------------------------------- files
def _file_stem(dataset: str) -> str:
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", dataset).strip("._")
    return stem or "results"


def write_tables(
    results: Sequence[dict[str, Any]],
    output_dir: str | os.PathLike,
    metrics: Sequence[str] | None = None,
    prefix: str = "",
    papers: PaperIndex | None = None,
) -> list[Path]:
    """Write one table per dataset as ``<output_dir>/<prefix><dataset>.md|.csv|.json`` (atomically).

    Returns the written paths. See :func:`build_tables` for ``results``, ``metrics`` and ``papers``.
    """
    written = []
    for dataset, table in build_tables(results, metrics, papers).items():
        base = os.path.join(output_dir, f"{prefix}{_file_stem(dataset)}")
        written.append(atomic_write_text(base + ".md", table.markdown()))
        written.append(atomic_write_text(base + ".csv", table.csv()))
        written.append(atomic_write_json(base + ".json", table.as_dict()))
    return written
