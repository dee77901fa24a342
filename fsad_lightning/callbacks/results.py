"""Write what a test run measured: ``results.json``, ``results.csv``, ``results.md`` and the manifest.

The files go into the run's log folder (``trainer.log_dir``), each written atomically. The Markdown
table is also printed. Beside the threshold-free metrics the table shows the decision threshold and
what it gives on the test split (precision, recall, F1 and the false-positive rate on good images);
``results.json`` also says how the threshold was set (``threshold_record``).
"""

from __future__ import annotations

import csv
import io
import os
from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_only

from fsad_lightning.io import atomic_write_json, atomic_write_text

IMAGE_METRICS = ("image_auroc", "image_auprc", "image_f1_max")
PIXEL_METRICS = ("pixel_auroc", "pixel_aupro", "pixel_f1_max")
#: what the label-free decision threshold gives on the labelled test split (fsad_lightning.thresholds)
THRESHOLD_METRICS = ("threshold_precision", "threshold_recall", "threshold_f1", "threshold_fpr")
METRIC_KEYS = IMAGE_METRICS + PIXEL_METRICS


def run_folder(trainer: Trainer) -> str:
    folder = trainer.log_dir or trainer.default_root_dir
    os.makedirs(folder, exist_ok=True)
    return folder


def markdown_table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    """A Markdown table of ``rows``; metrics (fractions) are shown as percentages with one decimal."""

    def cell(key: str, value: Any) -> str:
        if value is None:
            return "-"
        if key in METRIC_KEYS + THRESHOLD_METRICS and isinstance(value, float):
            return f"{100 * value:.1f}"
        if key == "threshold" and isinstance(value, float):
            return f"{value:.4g}"
        return str(value)

    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(cell(c, row.get(c)) for c in columns) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def csv_text(rows: list[dict[str, Any]], columns: list[str]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def run_description(trainer: Trainer, pl_module: LightningModule) -> dict[str, Any]:
    """Method, dataset, category, shots and seed of this run, from the module and the datamodule."""
    datamodule = trainer.datamodule
    category = getattr(datamodule, "category", None)
    resolved = getattr(datamodule, "categories", None)
    if isinstance(resolved, (list, tuple)) and len(resolved) > 1:
        category = list(resolved)  # "all" spelled out: the categories this run tested
    return {
        "method": getattr(pl_module, "method_name", type(pl_module).__name__),
        "dataset": getattr(datamodule, "name", None),
        "category": "+".join(category) if isinstance(category, (list, tuple)) else category,
        "k_shot": getattr(datamodule, "k_shot", None),
        "seed": getattr(datamodule, "seed", None),
    }


class ManifestWriter(Callback):
    """Saves the few-shot manifest (files, seed, k, dataset version) with every fit, test and predict run."""

    def _write(self, trainer: Trainer) -> None:
        manifest = getattr(trainer.datamodule, "manifest", None)
        if manifest is not None and trainer.is_global_zero:
            atomic_write_json(os.path.join(run_folder(trainer), "manifest.json"), manifest)

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._write(trainer)

    def on_test_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._write(trainer)

    def on_predict_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._write(trainer)


class ResultsWriter(Callback):
    """After ``fsad test``: results.json / results.csv / results.md in the run folder, table printed.

    A multi-class run (several categories in one test) has one row per category and a last ``mean`` row
    (the top-level metrics: their mean over categories).
    """

    def __init__(self, print_table: bool = True) -> None:
        self.print_table = print_table
        self.last_results: dict[str, Any] | None = None

    @rank_zero_only
    def on_test_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        measured = getattr(pl_module, "test_results", None)
        if not measured:
            return
        folder = run_folder(trainer)
        results: dict[str, Any] = run_description(trainer, pl_module)
        results.update(measured)
        results["manifest"] = os.path.join(folder, "manifest.json")
        results["checkpoint"] = trainer.ckpt_path
        self.last_results = results

        shown = METRIC_KEYS + ("threshold",) + THRESHOLD_METRICS
        columns = ["method", "dataset", "category", "k_shot", "seed"] + [k for k in shown if k in results]
        rows = [results]
        if results.get("per_category"):
            rows = [{**results, **values, "category": name} for name, values in results["per_category"].items()]
            rows.append({**results, "category": "mean"})
        atomic_write_json(os.path.join(folder, "results.json"), results)
        atomic_write_text(os.path.join(folder, "results.csv"), csv_text(rows, columns))
        table = markdown_table(rows, columns)
        atomic_write_text(os.path.join(folder, "results.md"), table)
        if self.print_table:
            print(f"\n{table}\nresults written to {folder}")
