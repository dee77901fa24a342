"""The papers' numbers as data: cells spot-checked against the seed texts, every number found in its
paper, loading errors, the join keys (method, variant, dataset aliases, class averages)."""

from __future__ import annotations

import csv
import os
import re
from pathlib import Path

import pytest

from fsad_lightning.paper_results import (
    COLUMNS,
    PAPER_RESULTS_FILE,
    PaperIndex,
    canonical_dataset,
    load_paper_results,
    paper_results_for,
    read_paper_results,
    variant_of,
)

SEEDS = Path(__file__).resolve().parents[2].parent / "shared" / "seeds"
SEED_FILES = {
    "one_to_normal": "000_d9f8354af1b789fc.txt",
    "adp": "001_4fa8fa8a99bff66c.txt",
    "anomalysd": "002_6c163cd78623f57d.txt",
    "promptad": "004_d3101190ad894649.txt",
}

# (source, table, method, variant, dataset, category, shots, metric), value, std,
# then where the seed prints it: the start of its line, the tab-separated column, the text in that column
SPOT_CELLS = [
    (("one_to_normal", "Table 1", "patchknn", "", "mvtec", "mean", 2, "image_auroc"), 85.8, 3.4,
     "\tMVTec\t$(78.5", 3, "85.8{\\pm}3.4"),
    (("one_to_normal", "Table 1", "one_to_normal", "", "elpv", "mean", 8, "image_auprc"), 94.1, 0.8,
     "\tELPV\t(72.4±1.7", 8, "94.1±0.8"),
    (("one_to_normal", "Table 1", "inctrl", "", "afid", "mean", 2, "image_auroc"), 76.1, 2.9,
     "\tAFID\t(78.4±2.8", 7, "76.1±2.9"),
    (("one_to_normal", "Table 1", "winclip", "", "ksdd", "mean", 4, "image_auprc"), 86.8, 0.3,
     "4-shot\tKSDD", 6, "86.8{\\pm}0.3"),
    (("one_to_normal", "Table 2", "patchknn", "", "headct", "mean", 4, "image_auroc"), 80.5, 0.6,
     "4-31101\tHeadCT", 3, "80.5{\\pm}0.6"),
    (("one_to_normal", "Table 2", "winclip", "", "resc", "mean", 2, "image_auroc"), 85.46, 2.1,
     "\tRESC\t-\t$(69.3", 5, "85.46{\\pm}2.1"),
    (("one_to_normal", "Table 3", "one_to_normal", "", "cifar10", "mean", 8, "image_auroc"), 94.9, 0.1,
     "\tCIFAR-10\t(67.2", 7, "94.9{\\pm}0.1"),
    (("adp", "Table 1", "adp", "label_aware", "visa", "mean", 2, "image_auroc"), 86.9, 0.9,
     "VisA\t80.7", 6, "86.9 _{±0.9}"),
    (("adp", "Table 2", "adp", "", "mvtec", "metal_nut", 8, "image_auroc"), 99.6, 0.4,
     "Metal nut\t", 5, "99.6 _{±0.4}"),
    (("adp", "Table 2", "adp", "label_aware", "mvtec", "mean", 16, "image_auroc"), 97.0, 0.3,
     "Mean\t94.1", 9, "97.0 _{±0.3}"),
    (("adp", "Table 3", "adp", "", "visa", "pcb3", 16, "image_auroc"), 75.0, 14.0,
     "PCB3\t", 8, "75.0 _{±14.0}"),
    (("promptad", "Table 1", "promptad", "", "visa", "mean", 4, "image_auroc"), 89.1, 1.7,
     "<b>PromptAD†</b>\t-\t<b>94.6", 7, "89.1±1.7"),
    (("promptad", "Table 1", "fastrecon", "", "mvtec", "mean", 2, "image_auroc"), 91.0, None,
     "FastRecon [12]\tICCV'2023\t-\t91.0", 3, "91.0"),
    (("promptad", "Table 4", "winclip", "", "mvtec", "mean", 1, "pixel_auroc"), 95.2, 0.5,
     "WinCLIP+† [19]\tCVPR'2023\t<u>95.2", 2, "95.2±0.5"),
    (("promptad", "Table 2", "regad", "", "mvtec", "mean", 8, "pixel_auroc"), 96.7, None,
     "RegAD [17]\tECCV2022\t8-shot", 4, "96.7"),
    (("anomalysd", "Table 1", "anomalysd", "", "visa", "mean", 4, "pixel_aupro"), 94.3, None,
     "\tAnomalySD (ours)\t95.6", 11, "94.3"),
    (("anomalysd", "Table 1", "winclip", "zero_shot", "mvtec", "mean", 0, "image_f1_max"), 92.9, None,
     "\tWinCLIP [17]\t91.8", 4, "92.9"),
    (("anomalysd", "Table 1", "patchknn", "", "mvtec", "mean", 2, "pixel_auroc"), 93.3, None,
     "2-51101\tPatchCore [25]", 5, "93.3"),
]  # fmt: skip
KEY_FIELDS = ("source", "table", "method", "variant", "dataset", "category", "shots", "metric")


def _find(key: tuple):
    matches = [r for r in load_paper_results() if tuple(getattr(r, f) for f in KEY_FIELDS) == key]
    assert len(matches) == 1, f"{key}: {len(matches)} rows"
    return matches[0]


@pytest.mark.parametrize("key, value, std, anchor, column, text", SPOT_CELLS, ids=lambda v: None)
def test_spot_cells_match_the_papers(key, value, std, anchor, column, text):
    result = _find(key)
    assert result.value == value and result.std == std
    assert result.fraction == pytest.approx(value / 100)
    seed = SEEDS / SEED_FILES[key[0]]
    if not seed.is_file():  # the values above were read off the seed text, which lies beside the checkout
        return
    lines = [line for line in seed.read_text(encoding="utf-8").splitlines() if line.startswith(anchor)]
    assert len(lines) >= 1, f"no line of {seed.name} starts with {anchor!r}"
    # the line of this cell: the one in the right table block (a row label can repeat across tables)
    assert any(text in line.split("\t")[column] for line in lines if len(line.split("\t")) > column), (
        f"{text!r} is not in column {column} of {lines}"
    )


def _normalized(text: str) -> str:
    """The seed text with LaTeX and spacing inside a cell removed; cells and lines stay apart."""
    text = text.replace("{\\pm}", "±").replace("\\pm", "±").replace("\t", "|").replace("\n", "|")
    return re.sub(r"[ ${}_^()\\]", "", text)


def test_every_number_is_printed_in_its_paper():
    if not SEEDS.is_dir():
        pytest.skip(f"{SEEDS} (the papers' texts) is not beside the checkout")
    texts = {s: _normalized((SEEDS / name).read_text(encoding="utf-8")) for s, name in SEED_FILES.items()}
    with PAPER_RESULTS_FILE.open(encoding="utf-8", newline="") as handle:
        rows = list(csv.DictReader(handle))
    missing = []
    for row in rows:
        printed = f"{row['value']}±{row['std']}" if row["std"] else row["value"]
        if not re.search(rf"(?<![\d.]){re.escape(printed)}(?![\d.])", texts[row["source"]]):
            missing.append((row["source"], row["table"], row["paper_method"], row["dataset"], printed))
    assert not missing, missing[:10]


def test_the_file_covers_the_tables_of_the_issue():
    results = load_paper_results()
    tables = {(r.source, r.table) for r in results}
    assert {
        ("one_to_normal", "Table 1"),
        ("one_to_normal", "Table 2"),
        ("promptad", "Table 1"),
        ("promptad", "Table 2"),
        ("anomalysd", "Table 1"),
        ("adp", "Table 1"),
        ("adp", "Table 2"),
    } <= tables
    one_to_normal = {r.paper_method for r in results if r.source == "one_to_normal"}
    assert {"Patchcore", "WinCLIP", "InCTRL", "One-to-Normal"} <= one_to_normal
    ours = {"patchknn", "winclip", "promptad", "one_to_normal", "adp", "anomalysd"}
    assert ours <= {r.method for r in results}
    # One-to-Normal: 5 runs with std; ADP: 3 seeds; AnomalySD prints no spread
    assert all(r.runs == 5 and r.std is not None for r in results if r.source == "one_to_normal")
    assert all(r.runs == 3 and r.mean_over_runs for r in results if r.source == "adp")
    assert all(r.std is None and r.mean_over_runs is None for r in results if r.source == "anomalysd")
    assert {r.setting for r in results if r.method == "anomalysd"} == {"multi-class"}


def test_lookup_prefers_the_methods_own_paper_then_the_copied_numbers():
    promptad = paper_results_for("promptad", "mvtec", "mean", 1, "image_auroc")
    assert [(r.source, r.table) for r in promptad] == [("promptad", "Table 1"), ("promptad", "Table 2")]
    patchcore = paper_results_for("patchknn", "mvtec_anomaly_detection", "mean", 2, "image_auroc")
    assert [r.source for r in patchcore] == ["promptad", "anomalysd", "adp", "one_to_normal"]
    assert [r.value for r in patchcore] == [86.3, 86.3, 86.3, 85.8]
    # ADP_l is its own variant; a zero-shot variant is looked up at 0 shots whatever k_shot says
    assert paper_results_for("adp", "mvtec", "zipper", 4, "image_auroc", "label_aware")[0].value == 98.8
    assert paper_results_for("adp", "mvtec", "zipper", 4, "image_auroc")[0].value == 94.9
    assert paper_results_for("winclip", "mvtec", "mean", 4, "image_auroc", "zero_shot")[0].value == 91.8
    assert paper_results_for("winclip", "mvtec", "mean", 4, "image_auroc")[0].value == 95.2
    assert paper_results_for("patchknn", "mvtec", "mean", 3, "image_auroc") == []
    assert variant_of("adp", {"label_aware": True}) == "label_aware"
    assert variant_of("adp", {"label_aware": False}) == variant_of("promptad", {"zero_shot": True}) == ""
    assert canonical_dataset("MVTec_AD") == "mvtec" and canonical_dataset("VisA") == "visa"


def test_class_average_needs_every_category():
    from fsad_lightning.paper_results import bundled_index

    index = bundled_index()
    mvtec = {r.category for r in load_paper_results() if r.dataset == "mvtec"} - {"mean"}
    assert len(mvtec) == 15 and index.covers_dataset("mvtec", mvtec)
    assert not index.covers_dataset("mvtec", sorted(mvtec)[:3])
    assert index.covers_dataset("cifar10", ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog",
                                            "horse", "ship", "truck"])  # fmt: skip
    assert index.covers_dataset("elpv", ["all"]) and not index.covers_dataset("ksdd", ["a", "b"])


def _write(path: Path, rows: list[dict], columns=COLUMNS) -> Path:
    with path.open("w", encoding="utf-8", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(columns), extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    return path


GOOD = dict(source="promptad", table="Table 1", paper_method="PromptAD", method="promptad", variant="",
            dataset="mvtec", category="mean", shots="1", metric="image_auroc", value="94.6", std="1.7",
            runs="", mean_over_runs="yes", setting="")  # fmt: skip


def test_bad_files_fail_with_the_file_line_and_field(tmp_path):
    assert read_paper_results(_write(tmp_path / "ok.csv", [GOOD]))[0].std == 1.7
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_paper_results(tmp_path / "none.csv")
    with pytest.raises(ValueError, match=r"columns \['setting'\] are missing"):
        read_paper_results(_write(tmp_path / "cols.csv", [GOOD], COLUMNS[:-1]))
    for field, bad, message in (
        ("value", "9x", "field 'value' is '9x'"),
        ("shots", "two", "shots 'two'"),
        ("metric", "auc", "metric 'auc'"),
        ("source", "winclip", "source 'winclip'"),
        ("mean_over_runs", "maybe", "mean_over_runs 'maybe'"),
    ):
        path = _write(tmp_path / f"{field}.csv", [{**GOOD, field: bad}])
        with pytest.raises(ValueError, match=f"line 2: {re.escape(message)}"):
            read_paper_results(path)
    with pytest.raises(ValueError, match="line 3: the same cell as line 2"):
        read_paper_results(_write(tmp_path / "dup.csv", [GOOD, {**GOOD, "value": "90"}]))
    full_shot = PaperIndex(read_paper_results(_write(tmp_path / "full.csv", [{**GOOD, "shots": "full"}])))
    assert full_shot.lookup("promptad", "mvtec", "mean", 1, "image_auroc") == []


def test_the_data_file_ships_beside_the_module():
    assert PAPER_RESULTS_FILE.is_file() and os.path.dirname(PAPER_RESULTS_FILE).endswith("fsad_lightning")
    assert len(load_paper_results()) > 900
