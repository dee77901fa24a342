"""``fsad report``: one self-contained HTML page of a benchmark folder, checked as text and in a real
headless browser (Chromium): it loads without errors, its plots and tables render, its images decode.

The browser tests skip with a reason where no Chromium is installed (``.ci/run`` installs Debian's);
``FSAD_REQUIRE_BROWSER=1`` turns that skip into a failure."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fsad_lightning.commands.dispatch import main
from fsad_lightning.paper_results import load_paper_results
from fsad_lightning.reporting import write_tables
from fsad_lightning.reporting.page import METHOD_COLORS, write_report

MVTEC = sorted({r.category for r in load_paper_results() if r.dataset == "mvtec"} - {"mean"})
BROWSERS = ("chromium", "chromium-browser", "google-chrome")


def _results() -> list[dict]:
    rng = np.random.default_rng(0)
    results = []
    for method, offset in (("promptad", 0.03), ("patchknn", 0.0)):
        for category in MVTEC:
            for k in (1, 2, 4):
                for seed in (0, 1):
                    value = 0.85 + 0.02 * k + offset + float(rng.normal(0, 0.01))
                    results.append(
                        {"method": method, "dataset": "mvtec", "category": category, "k_shot": k, "seed": seed,
                         "image_auroc": value, "pixel_auroc": value + 0.02}
                    )  # fmt: skip
    results.append({"method": "patchknn", "dataset": "elpv", "category": "all", "k_shot": 4, "seed": 0,
                    "image_auroc": 0.773})  # fmt: skip
    return results


@pytest.fixture
def benchmark_folder(tmp_path) -> Path:
    """A benchmark folder as ``fsad benchmark`` leaves it: tables, record, two runs with visualizer images."""
    folder = tmp_path / "bench"
    tables = write_tables(_results(), folder)
    record = {"state": "finished", "configs": ["configs/x.yaml"], "fingerprint": "ab" * 32,
              "runs": [{"status": "done"}] * 3, "tables": [str(p) for p in tables]}  # fmt: skip
    (folder / "benchmark.json").write_text(json.dumps(record))
    rng = np.random.default_rng(1)
    for category in ("bottle", "cable"):
        for k in (2, 4):
            run = folder / "runs" / category / f"k{k}" / "s0"
            run.mkdir(parents=True)
            result = {"method": "patchknn", "dataset": "mvtec", "category": category, "k_shot": k, "seed": 0}
            (run / "results.json").write_text(json.dumps(result))
            panel = (rng.random((48, 144, 3)) * 255).astype("uint8")
            for defect, count in (("crack", 3), ("good", 2)):
                (run / "images" / category / defect).mkdir(parents=True)
                for i in range(count):
                    Image.fromarray(panel).save(run / "images" / category / defect / f"{i:03d}.png")
            Image.fromarray(np.tile(panel, (4, 1, 1))).save(run / "images" / "worst_cases.png")
    return folder


class _Page(HTMLParser):
    """Tags, attributes and text of a page."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict]] = []
        self.cells: list[str] = []
        self._in_cell = False

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))
        self._in_cell = tag == "td"
        if self._in_cell:
            self.cells.append("")

    def handle_endtag(self, tag):
        self._in_cell = self._in_cell and tag != "td"

    def handle_data(self, data):
        if self._in_cell:
            self.cells[-1] += data

    def count(self, tag: str, **attrs) -> int:
        return sum(
            1
            for t, a in self.tags
            if t == tag and all(v in (a.get(k) or "").split() for k, v in attrs.items())
        )


def _parse(text: str) -> _Page:
    page = _Page()
    page.feed(text)
    return page


def test_the_page_is_self_contained_and_holds_tables_plots_and_images(benchmark_folder, capsys):
    main(["report", str(benchmark_folder)])
    path = benchmark_folder / "report.html"
    assert f"results page written to {path}" in capsys.readouterr().out
    text = path.read_text(encoding="utf-8")
    page = _parse(text)
    # nothing to fetch: no external script, style sheet, image, frame or font
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:|//|file:)""", text)
    assert "@import" not in text and "url(" not in text and page.count("link") == 0
    assert all(a.get("src", "").startswith("data:image/jpeg;base64,") for t, a in page.tags if t == "img")
    # per dataset: a line plot and bars per method for every metric, and the table
    assert page.count("svg", **{"class": "line-plot"}) == 3  # mvtec: I- and P-AUROC; elpv: I-AUROC
    assert page.count("svg", **{"class": "bar-plot"}) == 2 * 2 + 1
    assert page.count("table", **{"class": "results"}) == 2
    assert page.count("path", **{"class": "paper-point"}) >= 6  # PromptAD and PatchCore at 1, 2 and 4 shots
    assert page.count("polygon", **{"class": "std-band"}) >= 2
    assert (
        any(c.startswith("83.4 (") for c in page.cells) and "PromptAD (Li et al., CVPR 2024) Table 1" in text
    )  # PatchCore's 1-shot
    assert "77.3" in page.cells and "75.6 (+1.7)" in page.cells  # ELPV, One-to-Normal's PatchCore row
    # images: the k=4 run of each category (the most shots), its sheet and 4 overlays, anomalous first
    captions = [a["alt"] for t, a in page.tags if t == "img"]
    assert "worst cases of bottle k=4 seed=0" in captions and "worst cases of cable k=4 seed=0" in captions
    assert not any("k=2" in c for c in captions)
    bottle = [c for c in captions if c.startswith("bottle/")]
    assert [c.split(" ")[0] for c in bottle] == ["bottle/crack/000", "bottle/good/000", "bottle/crack/001",
                                                 "bottle/good/001"]  # fmt: skip
    # the same folder gives the same bytes
    write_report(benchmark_folder, benchmark_folder / "again.html")
    assert (benchmark_folder / "again.html").read_bytes() == path.read_bytes()


def test_images_are_bounded_and_bad_input_fails_in_one_line(benchmark_folder, tmp_path, capsys):
    full = write_report(benchmark_folder).stat().st_size
    small = write_report(benchmark_folder, tmp_path / "small.html", max_image_bytes=3000)
    text = small.read_text(encoding="utf-8")
    assert small.stat().st_size < full and "image(s) left out to bound the page size" in text
    none = write_report(benchmark_folder, tmp_path / "none.html", max_image_bytes=0, overlays_per_category=0)
    assert "<img" not in none.read_text(encoding="utf-8")

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(SystemExit) as exit_info:
        main(["report", str(empty)])
    assert exit_info.value.code == 2
    [line] = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("fsad: error:") and "holds no benchmark tables" in line and "--report_only" in line
    with pytest.raises(FileNotFoundError, match="does not exist"):
        write_report(tmp_path / "nowhere")


# ---------------------------------------------------------------------------------------------- in a browser
def _browser() -> str:
    for name in BROWSERS:
        if found := shutil.which(name):
            return found
    if os.environ.get("FSAD_REQUIRE_BROWSER") == "1":
        pytest.fail(f"FSAD_REQUIRE_BROWSER=1 but none of {BROWSERS} is on PATH")
    pytest.skip(
        f"no headless browser ({', '.join(BROWSERS)}) on PATH: apt-get install chromium (.ci/run does)"
    )


def _chromium(browser: str, profile: Path, page: Path, *mode: str) -> str:
    command = [
        browser,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        f"--user-data-dir={profile}",
        "--virtual-time-budget=5000",
        *mode,
        page.resolve().as_uri(),
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def _rendered(browser: str, tmp_path: Path, page: Path) -> tuple[_Page, str]:
    dom = _chromium(browser, tmp_path / "profile", page, "--dump-dom")
    return _parse(dom), dom


def _errors(page: _Page, dom: str) -> str:
    match = re.search(r'<pre id="fsad-errors"[^>]*>(.*?)</pre>', dom, flags=re.S)
    assert match is not None, "the error box is missing"
    return match.group(1).strip()


def test_the_page_loads_in_chromium_without_errors_and_renders(benchmark_folder, tmp_path):
    browser = _browser()
    path = write_report(benchmark_folder)
    page, dom = _rendered(browser, tmp_path, path)
    assert _errors(page, dom) == ""
    assert 'data-fsad-ready="1"' in dom  # the page's script ran to the end of its load handler
    assert len(page.cells) > 100 and any(c.startswith("83.4 (") for c in page.cells)
    assert page.count("polyline", **{"class": "ours-line"}) >= 2
    # the metric switch shows one metric's figures per dataset
    hidden = [a for t, a in page.tags if t == "div" and a.get("data-metric-view") == "pixel_auroc"]
    assert hidden and all("hidden" in a for a in hidden)

    shot = tmp_path / "page.png"
    _chromium(browser, tmp_path / "profile", path, f"--screenshot={shot}", "--window-size=1280,1400",
              "--hide-scrollbars")  # fmt: skip
    pixels = np.asarray(Image.open(shot).convert("RGB")).astype(int)
    assert pixels.shape[:2] == (1400, 1280)
    not_white = (pixels < 245).any(axis=-1).mean()
    assert not_white > 0.01, f"the screenshot is nearly blank ({not_white:.1%} non-white)"
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 50
    colors = {tuple(int(c[i : i + 2], 16) for i in (1, 3, 5)) for c in METHOD_COLORS[:2]}
    drawn = {tuple(p) for p in np.unique(pixels.reshape(-1, 3), axis=0)}
    assert colors & drawn, "no method colour of the plots is on screen"


def test_the_browser_check_sees_script_errors_and_broken_images(benchmark_folder, tmp_path):
    """The error box is no formality: a page with a failing script and an undecodable image reports both."""
    browser = _browser()
    text = write_report(benchmark_folder).read_text(encoding="utf-8")
    broken = tmp_path / "broken.html"
    broken.write_text(
        text.replace(
            "</body>",
            '<img alt="broken" src="data:image/png;base64,AAAA"><script>noSuchFunction();</script>'
            '<script>console.error("logged failure")</script></body>',
        ),
        encoding="utf-8",
    )
    page, dom = _rendered(browser, tmp_path, broken)
    errors = _errors(page, dom)
    assert "noSuchFunction" in errors and "logged failure" in errors
    assert "broken" in errors or "resource failed to load: <img>" in errors


def test_report_of_a_real_benchmark_with_the_visualizer(tmp_path):
    """`fsad benchmark` (PatchKNN, random weights, synthetic data, callbacks/visualize.yaml), then
    `fsad report`: the page embeds the visualizer's sheets and overlays of the real file layout."""
    from fsad_lightning.data.synthetic import write_synthetic_category

    root = tmp_path / "data"
    write_synthetic_category(root, "widget", n_train=2, n_test_good=2, n_test_defect=2, size=32, seed=0)
    config = tmp_path / "patchknn.yaml"
    config.write_text(
        f"model: {{class_path: fsad_lightning.methods.patchknn.PatchKNNModule, init_args: {{backbone: resnet18, "
        f"weights: random, stages: [1, 2]}}}}\ndata: {{class_path: fsad_lightning.data.FewShotDataModule, "
        f"init_args: {{root: {root}, image_size: 32}}}}\ntrainer: {{accelerator: cpu, enable_progress_bar: false}}\n"
    )
    output = tmp_path / "bench"
    main(["benchmark", "--config", str(config), "--config", "callbacks/visualize.yaml", "--shots", "1", "2",
          "--seeds", "0", "--output", str(output)])  # fmt: skip
    assert (output / "runs" / "widget" / "k2" / "s0" / "images" / "worst_cases.png").is_file()
    page = _parse(write_report(output).read_text(encoding="utf-8"))
    captions = [a["alt"] for t, a in page.tags if t == "img"]
    assert "worst cases of widget k=2 seed=0" in captions
    assert sum(c.startswith("widget/") for c in captions) == 4 and any("/good/" in c for c in captions)
    assert (
        page.count("svg", **{"class": "line-plot"}) >= 1 and page.count("table", **{"class": "results"}) == 1
    )
