"""``fsad report <benchmark folder>``: the benchmark's results page, one self-contained HTML file.

::

    fsad report BENCHMARK_FOLDER [--output PAGE.html] [--max_image_mb 8] [--overlays_per_category 4]

reads the tables ``fsad benchmark`` wrote into the folder (and the visualizer's images of its runs) and
writes ``<folder>/report.html`` (:mod:`fsad_lightning.reporting.page`): plots of each metric against the
shots with ± std bands and the papers' numbers, per-category bars, the tables beside the papers, the
worst-case sheets and overlays. The page fetches nothing: open it anywhere, offline.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from fsad_lightning.reporting.page import DEFAULT_MAX_IMAGE_BYTES, DEFAULT_OVERLAYS_PER_CATEGORY, write_report


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fsad report",
        allow_abbrev=False,
        description="Write a benchmark folder's results page: one self-contained HTML file.",
    )
    parser.add_argument("folder", help="the --output folder of an fsad benchmark")
    parser.add_argument("--output", default=None, help="the page to write (default: <folder>/report.html)")
    parser.add_argument(
        "--max_image_mb",
        type=float,
        default=DEFAULT_MAX_IMAGE_BYTES / 2**20,
        help="embed at most this many MiB of images (default: %(default)g); 0 embeds none",
    )
    parser.add_argument(
        "--overlays_per_category",
        type=int,
        default=DEFAULT_OVERLAYS_PER_CATEGORY,
        help="overlay images per category (default: %(default)s)",
    )
    return parser


def report_main(argv: Sequence[str] | None = None) -> Path:
    """``fsad report``: write the page and print its path."""
    args = build_parser().parse_args(argv)
    path = write_report(
        args.folder,
        args.output,
        max_image_bytes=int(args.max_image_mb * 2**20),
        overlays_per_category=args.overlays_per_category,
    )
    print(f"results page written to {path} ({path.stat().st_size / 2**20:.1f} MiB)")
    return path
