"""The results page of a benchmark: one self-contained HTML file (``fsad report <benchmark folder>``).

Everything is inline, nothing is fetched: CSS in a ``<style>``, the plots as SVG drawn here, images as
``data:`` URIs, a little JavaScript for the metric switch. Per dataset (one table of
:mod:`fsad_lightning.reporting.tables`):

- a plot of the metric against the shots: per method the ``mean`` row (mean over categories) as a line
  with a band of ± its std over seeds, and the papers' numbers for those cells as hollow diamonds with
  their printed ± (the paper-std as an error bar);
- per method, bars per category (and ``mean``), one bar per shot count, with ± std whiskers and the
  papers' per-category numbers as black ticks;
- the table itself (:meth:`~fsad_lightning.reporting.tables.BenchmarkTable.display`: the cells of the
  Markdown table, paper columns included);
- the visualizer's images when the runs have them (:mod:`fsad_lightning.callbacks.visualizer`): per run
  label (category, or ``all`` for a multi-class run) the run with the most shots (lowest seed among them):
  its worst-cases sheet and up to ``overlays_per_category`` overlays per category, anomalous ones first.
  Images are downscaled to at most :data:`MAX_IMAGE_SIDE` px and re-encoded as JPEG; once
  ``max_image_bytes`` of images are embedded, the rest are left out and the page says how many.

The numbers come from the table JSON files the benchmark wrote (their ``runs``), rebuilt with
:func:`~fsad_lightning.reporting.tables.build_tables`, so the page and the Markdown tables agree. The
page has no timestamp: the same folder gives the same bytes.

For a browser test the page reports its own failures: a script first in ``<body>`` records uncaught
errors, unhandled promise rejections, ``console.error`` calls and images that fail to load in
``<pre id="fsad-errors">``, and ``<body data-fsad-ready="1">`` is set once the page has loaded.
"""

from __future__ import annotations

import base64
import html
import io
import itertools
import json
import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fsad_lightning.io import atomic_write_text
from fsad_lightning.reporting.tables import MEAN_ROW, METRIC_LABELS, BenchmarkTable, build_tables

PAGE_NAME = "report.html"
#: the longest side of an embedded image, in pixels
MAX_IMAGE_SIDE = 960
#: default bound on the bytes of all embedded images together
DEFAULT_MAX_IMAGE_BYTES = 8 * 1024 * 1024
DEFAULT_OVERLAYS_PER_CATEGORY = 4
#: colours of the methods (matplotlib's tab10) and of the shot counts in the bars (a blue ramp)
METHOD_COLORS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f")
SHOT_COLORS = ("#9ecae1", "#6baed6", "#4292c6", "#2171b5", "#08519c", "#08306b")
SHEET_NAME = "worst_cases.png"

CSS = """
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; margin: 0 auto; max-width: 1280px;
       padding: 0 24px 48px; color: #1d1d1f; background: #fff; }
h1 { font-size: 24px; margin: 24px 0 4px; } h2 { font-size: 20px; margin: 36px 0 8px; border-bottom: 1px solid #ddd; }
h3 { font-size: 16px; margin: 20px 0 6px; }
.meta { color: #555; margin: 0 0 8px; } .note { color: #555; font-size: 12px; }
.switch button { font: inherit; margin: 0 4px 4px 0; padding: 3px 10px; border: 1px solid #999; background: #f5f5f5;
                 border-radius: 4px; cursor: pointer; }
.switch button[aria-pressed="true"] { background: #1f77b4; color: #fff; border-color: #1f77b4; }
.scroll { overflow-x: auto; }
table.results { border-collapse: collapse; font-size: 12px; margin: 8px 0; }
table.results th, table.results td { border: 1px solid #ddd; padding: 3px 6px; text-align: right; white-space: nowrap; }
table.results th { background: #f5f5f5; } table.results td.label { text-align: left; }
table.results tr.mean td { font-weight: 600; background: #fafafa; } table.results td.paper { color: #555; }
figure { margin: 8px 0 16px; } figcaption { color: #555; font-size: 12px; }
svg text { font: 11px system-ui, sans-serif; fill: #333; } svg .axis { stroke: #999; } svg .grid { stroke: #eee; }
.images img { max-width: 100%; border: 1px solid #ddd; margin: 4px 0; }
.overlays { display: flex; flex-wrap: wrap; gap: 8px; } .overlays figure { margin: 0; max-width: 48%; }
#fsad-errors { color: #b00020; white-space: pre-wrap; }
"""

ERROR_CAPTURE_JS = """
(function () {
  var box = document.getElementById("fsad-errors");
  window.fsadReport = function (message) { box.textContent += message + "\\n"; box.hidden = false; };
  window.addEventListener("error", function (event) {
    var target = event.target;
    if (target && target !== window && target.tagName) {
      window.fsadReport("resource failed to load: <" + target.tagName.toLowerCase() + ">");
    } else {
      window.fsadReport("error: " + event.message + " (" + event.filename + ":" + event.lineno + ")");
    }
  }, true);
  window.addEventListener("unhandledrejection", function (event) {
    window.fsadReport("unhandled rejection: " + event.reason);
  });
  var consoleError = console.error;
  console.error = function () {
    window.fsadReport("console.error: " + Array.prototype.join.call(arguments, " "));
    return consoleError.apply(console, arguments);
  };
})();
"""

PAGE_JS = """
(function () {
  function show(scope, metric) {
    document.querySelectorAll('[data-scope="' + scope + '"][data-metric-view]').forEach(function (el) {
      el.hidden = el.getAttribute("data-metric-view") !== metric;
    });
    document.querySelectorAll('button[data-scope="' + scope + '"]').forEach(function (button) {
      button.setAttribute("aria-pressed", String(button.getAttribute("data-metric") === metric));
    });
  }
  document.querySelectorAll("button[data-metric]").forEach(function (button) {
    button.addEventListener("click", function () {
      show(button.getAttribute("data-scope"), button.getAttribute("data-metric"));
    });
  });
  window.addEventListener("load", function () {
    document.querySelectorAll("img").forEach(function (img) {
      if (!img.complete || img.naturalWidth === 0) { window.fsadReport("image did not decode: " + img.alt); }
    });
    document.body.setAttribute("data-fsad-ready", "1");
  });
})();
"""


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]+", "-", text).strip("-") or "x"


# ---------------------------------------------------------------------------------------------- inputs
def load_benchmark_tables(folder: str | os.PathLike) -> tuple[dict[str, BenchmarkTable], dict[str, Any]]:
    """The tables of a benchmark folder (rebuilt from the runs of its table JSON files) and its
    ``benchmark.json`` record (``{}`` when absent).

    Raises:
        FileNotFoundError: the folder does not exist.
        ValueError: it holds no benchmark tables, or a table file is malformed (naming the file).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"benchmark folder {folder} does not exist")
    record: dict[str, Any] = {}
    record_path = folder / "benchmark.json"
    if record_path.is_file():
        try:
            record = json.loads(record_path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise ValueError(f"{record_path}: not valid JSON ({err})") from err
    listed = [folder / Path(p).name for p in record.get("tables") or [] if str(p).endswith(".json")]
    candidates = listed or sorted(p for p in folder.glob("*.json") if p.name != "benchmark.json")
    runs: list[dict[str, Any]] = []
    for path in candidates:
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as err:
            raise ValueError(f"{path}: not a readable benchmark table ({err})") from err
        if not isinstance(data, dict) or not isinstance(data.get("runs"), list) or "rows" not in data:
            if listed:
                raise ValueError(f"{path}: expected a benchmark table with 'rows' and 'runs'")
            continue
        runs.extend(data["runs"])
    if not runs:
        raise ValueError(
            f"{folder} holds no benchmark tables: run `fsad benchmark` there (or `fsad benchmark ... "
            "--report_only` to write the tables of the finished runs) first"
        )
    return build_tables(runs), record


@dataclass
class EmbeddedImage:
    """An image of the page: its caption and ``data:`` URI."""

    caption: str
    uri: str
    size: int


@dataclass
class RunImages:
    """The images of one run: its worst-cases sheet and overlays (``{category: [image, ...]}``)."""

    dataset: str
    label: str
    k_shot: int
    seed: int
    sheet: EmbeddedImage | None
    overlays: dict[str, list[EmbeddedImage]]


class ImageBudget:
    """Encodes images as JPEG ``data:`` URIs until ``max_bytes`` are used; counts what it leaves out."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.used = 0
        self.left_out = 0

    def embed(self, path: Path, caption: str) -> EmbeddedImage | None:
        from PIL import Image

        try:
            with Image.open(path) as image:
                image = image.convert("RGB")
                image.thumbnail((MAX_IMAGE_SIDE, MAX_IMAGE_SIDE * 4))
                buffer = io.BytesIO()
                image.save(buffer, format="JPEG", quality=82)
        except OSError:
            self.left_out += 1
            return None
        uri = "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")
        if self.used + len(uri) > self.max_bytes:
            self.left_out += 1
            return None
        self.used += len(uri)
        return EmbeddedImage(caption, uri, len(uri))


def _overlay_paths(images: Path) -> dict[str, list[Path]]:
    """``images/<category>/<defect type>/<stem>.png`` by category, anomalous defect types first, then good,
    taking defect types in turn so each shows."""
    by_category: dict[str, list[Path]] = {}
    for category_dir in sorted(p for p in images.iterdir() if p.is_dir()):
        defect_dirs = sorted(
            (p for p in category_dir.iterdir() if p.is_dir()), key=lambda p: (p.name == "good", p.name)
        )
        in_turn = itertools.zip_longest(*(sorted(d.glob("*.png")) for d in defect_dirs))
        paths = [p for group in in_turn for p in group if p is not None]
        if paths:
            by_category[category_dir.name] = paths
    return by_category


def collect_run_images(
    folder: str | os.PathLike, budget: ImageBudget, overlays_per_category: int
) -> list[RunImages]:
    """The images of the runs below ``<folder>/runs`` that have a visualizer ``images/`` folder: per
    (dataset, run label) the run with the most shots, lowest seed first (see the module docstring)."""
    chosen: dict[tuple[str, str], tuple[int, int, Path, dict[str, Any]]] = {}
    runs = Path(folder) / "runs"
    if not runs.is_dir():
        return []
    for images in sorted(runs.rglob("images")):
        result_path = images.parent / "results.json"
        if not images.is_dir() or not result_path.is_file():
            continue
        try:
            result = json.loads(result_path.read_text(encoding="utf-8"))
            k_shot, seed = int(result["k_shot"]), int(result["seed"])
        except (ValueError, KeyError, TypeError):
            continue
        key = (str(result.get("dataset") or "unknown"), images.parent.parent.parent.name)
        best = chosen.get(key)
        if best is None or (-k_shot, seed) < (-best[0], best[1]):
            chosen[key] = (k_shot, seed, images, result)
    found = []
    for (dataset, label), (k_shot, seed, images, _) in sorted(chosen.items()):
        where = f"{label} k={k_shot} seed={seed}"
        sheet = None
        if (images / SHEET_NAME).is_file():
            sheet = budget.embed(images / SHEET_NAME, f"worst cases of {where}")
        overlays = {}
        for category, paths in _overlay_paths(images).items():
            embedded = []
            for path in paths[:overlays_per_category]:
                caption = f"{category}/{path.parent.name}/{path.stem} ({where})"
                if (image := budget.embed(path, caption)) is not None:
                    embedded.append(image)
            if embedded:
                overlays[category] = embedded
        found.append(RunImages(dataset, label, k_shot, seed, sheet, overlays))
    return found


# ---------------------------------------------------------------------------------------------- plots
def nice_ticks(low: float, high: float, count: int = 5) -> list[float]:
    """About ``count`` round tick values covering ``[low, high]``."""
    span = max(high - low, 1e-9)
    raw = span / max(count, 1)
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw)
    first = math.ceil(low / step) * step
    ticks, value = [], first
    while value <= high + 1e-9:
        ticks.append(round(value, 6))
        value += step
    return ticks


def _axis_range(values: Sequence[float]) -> tuple[float, float]:
    low, high = min(values), max(values)
    pad = max(1.0, 0.1 * (high - low))
    low, high = max(0.0, low - pad), min(100.0, high + pad)
    if high - low < 2.0:
        low, high = max(0.0, high - 2.0), max(high, 2.0)
    return low, high


def _fmt(value: float) -> str:
    return f"{value:.1f}"


def line_plot_svg(table: BenchmarkTable, metric: str, width: int = 600, height: int = 320) -> str:
    """The metric (percent) against the shots: per method its ``mean`` row, ± std band, papers' diamonds."""
    left, right, top, bottom = 52, 150, 16, 40
    shots = table.shots
    series = []
    values: list[float] = []
    for index, label in enumerate(table.methods):
        color = METHOD_COLORS[index % len(METHOD_COLORS)]
        ours, papers = [], []
        for k in shots:
            stats = table.rows[(label, MEAN_ROW)].get(k, {}).get(metric)
            if stats is not None:
                mean, std = 100 * stats.mean, 100 * stats.std
                ours.append((k, mean, std, stats.n))
                values += [mean - std, mean + std]
            paper = table.paper_cell(label, MEAN_ROW, k, metric)
            if paper is not None:
                papers.append((k, paper))
                values += [paper.value - (paper.std or 0.0), paper.value + (paper.std or 0.0)]
        series.append((label, color, ours, papers))
    name = METRIC_LABELS.get(metric, metric)
    if not values:
        return f'<p class="note">no {name} results in the mean rows</p>'
    low, high = _axis_range(values)
    plot_w, plot_h = width - left - right, height - top - bottom

    def x(k: int) -> float:
        return left + plot_w * ((shots.index(k) + 0.5) / len(shots))

    def y(v: float) -> float:
        return top + plot_h * (1 - (v - low) / (high - low))

    parts = [
        f'<svg class="fsad-plot line-plot" data-metric="{_e(metric)}" xmlns="http://www.w3.org/2000/svg" '
        f'width="{width}" height="{height}" viewBox="0 0 {width} {height}" role="img" '
        f'aria-label="{_e(name)} against shots">'
    ]
    for tick in nice_ticks(low, high):
        parts.append(
            f'<line class="grid" x1="{left}" x2="{left + plot_w}" y1="{y(tick):.1f}" y2="{y(tick):.1f}"/>'
        )
        parts.append(f'<text x="{left - 6}" y="{y(tick) + 4:.1f}" text-anchor="end">{tick:g}</text>')
    parts.append(f'<line class="axis" x1="{left}" x2="{left}" y1="{top}" y2="{top + plot_h}"/>')
    parts.append(
        f'<line class="axis" x1="{left}" x2="{left + plot_w}" y1="{top + plot_h}" y2="{top + plot_h}"/>'
    )
    for k in shots:
        parts.append(f'<text x="{x(k):.1f}" y="{top + plot_h + 16}" text-anchor="middle">{k}</text>')
    parts.append(f'<text x="{left + plot_w / 2:.1f}" y="{height - 6}" text-anchor="middle">shots (k)</text>')
    parts.append(
        f'<text transform="translate(14 {top + plot_h / 2:.1f}) rotate(-90)" text-anchor="middle">{_e(name)} (%)</text>'
    )
    for label, color, ours, papers in series:
        if ours:
            band = [(x(k), y(m + s)) for k, m, s, _ in ours] + [
                (x(k), y(m - s)) for k, m, s, _ in reversed(ours)
            ]
            if len(ours) > 1:
                points = " ".join(f"{px:.1f},{py:.1f}" for px, py in band)
                parts.append(
                    f'<polygon class="std-band" points="{points}" fill="{color}" fill-opacity="0.18"/>'
                )
            line = " ".join(f"{x(k):.1f},{y(m):.1f}" for k, m, _, _ in ours)
            parts.append(
                f'<polyline class="ours-line" points="{line}" fill="none" stroke="{color}" stroke-width="2"/>'
            )
            for k, m, s, n in ours:
                parts.append(
                    f'<line class="std-bar" x1="{x(k):.1f}" x2="{x(k):.1f}" y1="{y(m - s):.1f}" y2="{y(m + s):.1f}" '
                    f'stroke="{color}" stroke-opacity="0.5"/>'
                    f'<circle class="ours-point" cx="{x(k):.1f}" cy="{y(m):.1f}" r="4" fill="{color}">'
                    f"<title>{_e(label)} k={k}: {_fmt(m)}±{_fmt(s)} ({n} seeds)</title></circle>"
                )
        for k, paper in papers:
            px, py, r = x(k) + 9, y(paper.value), 5
            if paper.std:
                parts.append(
                    f'<line class="paper-std" x1="{px:.1f}" x2="{px:.1f}" y1="{y(paper.value - paper.std):.1f}" '
                    f'y2="{y(paper.value + paper.std):.1f}" stroke="{color}"/>'
                )
            spread = f"±{paper.std:g}" if paper.std is not None else ""
            parts.append(
                f'<path class="paper-point" d="M{px:.1f},{py - r:.1f} L{px + r:.1f},{py:.1f} L{px:.1f},{py + r:.1f} '
                f'L{px - r:.1f},{py:.1f} Z" fill="#fff" stroke="{color}" stroke-width="2">'
                f"<title>paper, {_e(paper.citation)} ({_e(paper.paper_method)}) k={k}: {paper.value:g}{spread}</title></path>"
            )
    legend_x = left + plot_w + 14
    for row, (label, color, _, _) in enumerate(series):
        ly = top + 10 + 18 * row
        parts.append(
            f'<rect x="{legend_x}" y="{ly - 8}" width="12" height="12" fill="{color}"/>'
            f'<text x="{legend_x + 18}" y="{ly + 2}">{_e(label)}</text>'
        )
    ly = top + 10 + 18 * len(series) + 8
    parts.append(
        f'<circle cx="{legend_x + 6}" cy="{ly - 2}" r="4" fill="#555"/><text x="{legend_x + 18}" y="{ly + 2}">ours ± std</text>'
        f'<path d="M{legend_x + 6},{ly + 11} l5,5 l-5,5 l-5,-5 Z" fill="#fff" stroke="#555" stroke-width="2"/>'
        f'<text x="{legend_x + 18}" y="{ly + 20}">paper</text>'
    )
    parts.append("</svg>")
    return "".join(parts)


def shot_color(index: int, count: int) -> str:
    """The colour of the ``index``-th of ``count`` shot counts: spread over :data:`SHOT_COLORS`."""
    if count <= 1:
        return SHOT_COLORS[len(SHOT_COLORS) // 2]
    if count > len(SHOT_COLORS):
        return SHOT_COLORS[index % len(SHOT_COLORS)]
    return SHOT_COLORS[round(index * (len(SHOT_COLORS) - 1) / (count - 1))]


def category_bars_svg(table: BenchmarkTable, label: str, metric: str, height: int = 300) -> str:
    """Bars per category (and ``mean``) of one method, one per shot count (percent, from 0), ± std whiskers,
    the papers' numbers as black ticks."""
    left, right, top, bottom = 44, 110, 14, 70
    categories = [*table.categories[label], MEAN_ROW]
    shots = table.shots
    bar_w, gap = 9, 14
    group_w = bar_w * len(shots) + gap
    width = max(480, left + right + group_w * len(categories))
    plot_h = height - top - bottom
    name = METRIC_LABELS.get(metric, metric)

    def y(v: float) -> float:
        return top + plot_h * (1 - v / 100.0)

    parts = [
        f'<svg class="fsad-plot bar-plot" data-metric="{_e(metric)}" data-method="{_e(label)}" '
        f'xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" viewBox="0 0 {width} {height}" '
        f'role="img" aria-label="{_e(name)} per category, {_e(label)}">'
    ]
    for tick in range(0, 101, 20):
        parts.append(
            f'<line class="grid" x1="{left}" x2="{width - right}" y1="{y(tick):.1f}" y2="{y(tick):.1f}"/>'
            f'<text x="{left - 6}" y="{y(tick) + 4:.1f}" text-anchor="end">{tick}</text>'
        )
    parts.append(f'<line class="axis" x1="{left}" x2="{width - right}" y1="{y(0):.1f}" y2="{y(0):.1f}"/>')
    for gi, category in enumerate(categories):
        gx = left + gap / 2 + gi * group_w
        for si, k in enumerate(shots):
            bx = gx + si * bar_w
            color = shot_color(si, len(shots))
            stats = table.rows[(label, category)].get(k, {}).get(metric)
            if stats is not None:
                m, s = 100 * stats.mean, 100 * stats.std
                parts.append(
                    f'<rect class="bar" x="{bx:.1f}" y="{y(m):.1f}" width="{bar_w - 1}" height="{y(0) - y(m):.1f}" '
                    f'fill="{color}"><title>{_e(category)} k={k}: {_fmt(m)}±{_fmt(s)}</title></rect>'
                )
                if s > 0:
                    cx = bx + (bar_w - 1) / 2
                    parts.append(
                        f'<line class="std-bar" x1="{cx:.1f}" x2="{cx:.1f}" y1="{y(min(100, m + s)):.1f}" '
                        f'y2="{y(max(0, m - s)):.1f}" stroke="#333"/>'
                    )
            paper = table.paper_cell(label, category, k, metric)
            if paper is not None:
                parts.append(
                    f'<line class="paper-tick" x1="{bx - 1:.1f}" x2="{bx + bar_w:.1f}" y1="{y(paper.value):.1f}" '
                    f'y2="{y(paper.value):.1f}" stroke="#000" stroke-width="2.5"><title>paper, '
                    f"{_e(paper.citation)} k={k}: {paper.value:g}</title></line>"
                )
        tx = gx + bar_w * len(shots) / 2
        parts.append(
            f'<text transform="translate({tx:.1f} {y(0) + 10:.1f}) rotate(40)" text-anchor="start">{_e(category)}</text>'
        )
    legend_x = width - right + 12
    for si, k in enumerate(shots):
        color = shot_color(si, len(shots))
        parts.append(
            f'<rect x="{legend_x}" y="{top + 18 * si}" width="12" height="12" fill="{color}"/>'
            f'<text x="{legend_x + 18}" y="{top + 18 * si + 10}">k={k}</text>'
        )
    ly = top + 18 * len(shots) + 10
    parts.append(
        f'<line x1="{legend_x}" x2="{legend_x + 12}" y1="{ly}" y2="{ly}" stroke="#000" stroke-width="2.5"/>'
        f'<text x="{legend_x + 18}" y="{ly + 4}">paper</text>'
    )
    parts.append("</svg>")
    return "".join(parts)


# ---------------------------------------------------------------------------------------------- page
def table_html(table: BenchmarkTable) -> str:
    """The table's :meth:`~fsad_lightning.reporting.tables.BenchmarkTable.display` as an HTML table."""
    columns, rows, note = table.display()
    head = "".join(f"<th>{_e(c)}</th>" for c in columns)
    body = []
    for row in rows:
        cells = []
        for column in columns:
            value = row.get(column)
            kind = (
                "label" if column in ("method", "category") else ("paper" if column.endswith("(Δ)") else "")
            )
            cells.append(f'<td class="{kind}">{"-" if value is None else _e(value)}</td>')
        mean = ' class="mean"' if row.get("category") == MEAN_ROW else ""
        body.append(f"<tr{mean}>{''.join(cells)}</tr>")
    return (
        f'<div class="scroll"><table class="results" data-dataset="{_e(table.dataset)}"><thead><tr>{head}</tr>'
        f'</thead><tbody>{"".join(body)}</tbody></table></div><p class="note">{_markdown_code(note)}</p>'
    )


def _markdown_code(text: str) -> str:
    """Escape ``text`` for HTML, with Markdown's `code` spans as ``<code>``."""
    return re.sub(r"`([^`]*)`", r"<code>\1</code>", _e(text))


def _metric_switch(scope: str, metrics: Sequence[str]) -> str:
    buttons = "".join(
        f'<button type="button" data-scope="{scope}" data-metric="{_e(m)}" aria-pressed="{str(i == 0).lower()}">'
        f"{_e(METRIC_LABELS.get(m, m))}</button>"
        for i, m in enumerate(metrics)
    )
    return f'<div class="switch">{buttons}</div>'


def _views(scope: str, metrics: Sequence[str], render) -> str:
    return "".join(
        f'<div data-scope="{scope}" data-metric-view="{_e(m)}"{" hidden" if i else ""}>{render(m)}</div>'
        for i, m in enumerate(metrics)
    )


def _image_figure(image: EmbeddedImage) -> str:
    return f'<figure><img src="{image.uri}" alt="{_e(image.caption)}"><figcaption>{_e(image.caption)}</figcaption></figure>'


def dataset_section(table: BenchmarkTable, images: Sequence[RunImages]) -> str:
    scope = "ds-" + _slug(table.dataset)
    parts = [f'<section class="dataset" id="{scope}"><h2>{_e(table.dataset)}</h2>']
    parts.append(
        f'<p class="meta">methods: {_e(", ".join(table.methods))}; shots {_e(table.shots)}; '
        f"{table.max_seeds} seed(s); {len(table.runs)} run result(s)</p>"
    )
    parts.append(_metric_switch(scope, table.metrics))
    parts.append("<h3>Metric against shots (mean over categories)</h3>")
    parts.append(
        _views(scope, table.metrics, lambda m: f"<figure>{line_plot_svg(table, m)}<figcaption>line: our mean row, "
               "band: ± std over seeds; diamonds: the papers' numbers (bar: their printed ±)</figcaption></figure>")
    )  # fmt: skip
    parts.append("<h3>Per category</h3>")
    for label in table.methods:
        parts.append(
            _views(scope, table.metrics, lambda m, label=label: f'<figure><div class="scroll">'
                   f"{category_bars_svg(table, label, m)}</div><figcaption>{_e(label)}: bars per category and shots, "
                   "whiskers ± std over seeds, black ticks: the papers' numbers</figcaption></figure>")
        )  # fmt: skip
    parts.append("<h3>Table</h3>")
    parts.append(table_html(table))
    own = [run for run in images if run.dataset == table.dataset]
    if own:
        parts.append('<h3>Images</h3><div class="images">')
        for run in own:
            parts.append(f"<h4>{_e(run.label)}: k={run.k_shot}, seed {run.seed}</h4>")
            if run.sheet is not None:
                parts.append(_image_figure(run.sheet))
            for category, overlays in run.overlays.items():
                parts.append(
                    f'<p class="note">overlays of {_e(category)}: image | ground truth | anomaly map</p>'
                    f'<div class="overlays">{"".join(_image_figure(o) for o in overlays)}</div>'
                )
        parts.append("</div>")
    parts.append("</section>")
    return "".join(parts)


def render_page(
    tables: dict[str, BenchmarkTable],
    record: dict[str, Any],
    images: Sequence[RunImages],
    title: str,
    left_out: int,
) -> str:
    """The whole page as one HTML string."""
    statuses: dict[str, int] = {}
    for run in record.get("runs") or []:
        # "skipped": a worker found the run finished (before, or by another worker)
        status = "finished" if run.get("status") in ("done", "skipped") else str(run.get("status"))
        statuses[status] = statuses.get(status, 0) + 1
    summary = ", ".join(f"{n} {status}" for status, n in sorted(statuses.items()))
    configs = ", ".join(str(c) for c in record.get("configs") or [])
    meta = []
    if configs:
        meta.append(f"configs: {_e(configs)}")
    if record.get("extra_args"):
        meta.append(f"arguments: {_e(' '.join(record['extra_args']))}")
    if record.get("fingerprint"):
        meta.append(f"settings fingerprint {_e(str(record['fingerprint'])[:12])}")
    if summary:
        meta.append(f"runs: {_e(summary)}")
    citations = sorted({c for table in tables.values() for c in table.paper_citations()})
    sections = "".join(dataset_section(table, images) for table in tables.values())
    images_note = (
        f'<p class="note">{left_out} image(s) left out to bound the page size.</p>' if left_out else ""
    )
    papers = (
        f'<p class="note">The papers\' numbers: {_e("; ".join(citations))} (fsad_lightning/paper_results.csv).</p>'
        if citations
        else ""
    )
    return (
        "<!DOCTYPE html>\n"
        f'<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width">'
        f"<title>{_e(title)}</title><style>{CSS}</style></head>"
        f'<body><pre id="fsad-errors" hidden></pre><script>{ERROR_CAPTURE_JS}</script>'
        f"<h1>{_e(title)}</h1>"
        f'<p class="meta">{"<br>".join(meta)}</p>{sections}{images_note}{papers}'
        '<p class="note">Written by <code>fsad report</code>; metrics in percent, mean ± sample std over seeds.</p>'
        f"<script>{PAGE_JS}</script></body></html>\n"
    )


def write_report(
    folder: str | os.PathLike,
    output: str | os.PathLike | None = None,
    max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES,
    overlays_per_category: int = DEFAULT_OVERLAYS_PER_CATEGORY,
) -> Path:
    """Write the results page of a benchmark folder (default ``<folder>/report.html``, atomically).

    Raises:
        FileNotFoundError: the folder does not exist.
        ValueError: it holds no benchmark tables, or the limits are negative.
    """
    if max_image_bytes < 0 or overlays_per_category < 0:
        raise ValueError(
            f"max_image_bytes and overlays_per_category must be >= 0, got {max_image_bytes}, {overlays_per_category}"
        )
    tables, record = load_benchmark_tables(folder)
    budget = ImageBudget(max_image_bytes)
    images = collect_run_images(folder, budget, overlays_per_category)
    title = f"fsad benchmark: {Path(folder).resolve().name}"
    page = render_page(tables, record, images, title, budget.left_out)
    return atomic_write_text(Path(output) if output else Path(folder) / PAGE_NAME, page)
