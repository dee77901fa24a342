"""Reporting: the benchmark's tables across categories, shots and seeds (:mod:`.tables`, beside the
papers' numbers) and the self-contained HTML results page (:mod:`.page`)."""

from fsad_lightning.reporting.tables import (
    MEAN_ROW,
    METRIC_LABELS,
    RUN_KEYS,
    VARIANT_KEY,
    BenchmarkTable,
    SeedStats,
    build_tables,
    category_mean_stats,
    find_run_results,
    format_mean_std,
    format_paper,
    load_run_result,
    mean_and_std,
    method_label,
    seed_stats,
    validate_run_result,
    write_tables,
)

__all__ = [
    "MEAN_ROW",
    "METRIC_LABELS",
    "RUN_KEYS",
    "VARIANT_KEY",
    "BenchmarkTable",
    "SeedStats",
    "build_tables",
    "category_mean_stats",
    "find_run_results",
    "format_mean_std",
    "format_paper",
    "load_run_result",
    "mean_and_std",
    "method_label",
    "seed_stats",
    "validate_run_result",
    "write_tables",
]
