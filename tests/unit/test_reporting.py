"""Benchmark tables from hand-made run results: mean +- std over seeds, mean row, files."""

from __future__ import annotations

import csv
import io
import json
import math
import statistics

import pytest

from fsad_lightning.paper_results import PaperIndex, load_paper_results
from fsad_lightning.reporting import (
    MEAN_ROW,
    build_tables,
    category_mean_stats,
    find_run_results,
    format_mean_std,
    load_run_result,
    mean_and_std,
    seed_stats,
    write_tables,
)

# image AUROC per (category, k_shot, seed); pixel AUROC = image AUROC - 0.1
AUROC = {
    ("bottle", 1, 0): 0.90,
    ("bottle", 1, 1): 0.94,
    ("bottle", 1, 2): 0.92,
    ("bottle", 2, 0): 0.95,
    ("bottle", 2, 1): 0.97,
    ("bottle", 2, 2): 0.96,
    ("cable", 1, 0): 0.70,
    ("cable", 1, 1): 0.80,
    ("cable", 1, 2): 0.75,
    ("cable", 2, 0): 0.85,
    ("cable", 2, 1): 0.83,
    ("cable", 2, 2): 0.87,
}


def _results(drop: tuple[str, int, int] | None = None) -> list[dict]:
    return [
        {
            "method": "patchknn",
            "dataset": "mvtec",
            "category": c,
            "k_shot": k,
            "seed": s,
            "image_auroc": v,
            "pixel_auroc": v - 0.1,
            "image_auprc": None,
        }
        for (c, k, s), v in AUROC.items()
        if (c, k, s) != drop
    ]


def test_mean_and_std_is_sample_std():
    values = [0.90, 0.94, 0.92]
    mean, std = mean_and_std(values)
    assert mean == pytest.approx(statistics.mean(values))
    assert std == pytest.approx(statistics.stdev(values))
    assert mean_and_std([0.5]) == (0.5, 0.0)
    with pytest.raises(ValueError):
        mean_and_std([])


def test_cells_are_mean_and_std_over_seeds():
    table = build_tables(_results())["mvtec"]
    assert table.shots == [1, 2]
    assert table.metrics == ["image_auroc", "pixel_auroc"]  # image_auprc is None everywhere: left out
    cell = table.rows[("patchknn", "cable")][1]["image_auroc"]
    assert cell.mean == pytest.approx(statistics.mean([0.70, 0.80, 0.75]))
    assert cell.std == pytest.approx(statistics.stdev([0.70, 0.80, 0.75]))
    assert cell.seeds == (0, 1, 2)
    pixel = table.rows[("patchknn", "bottle")][2]["pixel_auroc"]
    assert pixel.mean == pytest.approx(statistics.mean([0.85, 0.87, 0.86]))


def test_mean_row_averages_categories_per_seed_then_over_seeds():
    table = build_tables(_results())["mvtec"]
    per_seed = [(AUROC[("bottle", 2, s)] + AUROC[("cable", 2, s)]) / 2 for s in range(3)]
    cell = table.rows[("patchknn", MEAN_ROW)][2]["image_auroc"]
    assert cell.mean == pytest.approx(statistics.mean(per_seed))
    assert cell.std == pytest.approx(statistics.stdev(per_seed))


def test_missing_run_drops_that_seed_from_the_mean_row_and_is_marked():
    table = build_tables(_results(drop=("cable", 1, 2)))["mvtec"]
    cable = table.rows[("patchknn", "cable")][1]["image_auroc"]
    assert cable.seeds == (0, 1)
    mean_cell = table.rows[("patchknn", MEAN_ROW)][1]["image_auroc"]
    assert mean_cell.seeds == (0, 1)
    expected = statistics.mean([(AUROC[("bottle", 1, s)] + AUROC[("cable", 1, s)]) / 2 for s in (0, 1)])
    assert mean_cell.mean == pytest.approx(expected)
    markdown = table.markdown()
    assert f"{100 * cable.mean:.1f}±{100 * cable.std:.1f}*" in markdown
    assert "fewer seeds" in markdown


def test_category_mean_with_no_common_seed_is_empty():
    assert category_mean_stats([{0: 0.5}, {1: 0.7}]) is None
    assert seed_stats({}) is None
    assert format_mean_std(None) is None


def test_markdown_has_a_row_per_category_and_a_column_block_per_shot():
    table = build_tables(_results(), papers=PaperIndex(()))["mvtec"]
    lines = [line for line in table.markdown().splitlines() if line.startswith("|")]
    header = [h.strip() for h in lines[0].strip("|").split("|")]
    assert header == [
        "method",
        "category",
        "1-shot I-AUROC",
        "1-shot P-AUROC",
        "2-shot I-AUROC",
        "2-shot P-AUROC",
    ]
    assert [line.split("|")[2].strip() for line in lines[2:]] == ["bottle", "cable", MEAN_ROW]
    bottle = [c.strip() for c in lines[2].strip("|").split("|")]
    stats = table.rows[("patchknn", "bottle")][1]["image_auroc"]
    assert bottle[2] == f"{100 * stats.mean:.1f}±{100 * stats.std:.1f}"


def test_write_tables_markdown_csv_json(tmp_path):
    paths = write_tables(_results(), tmp_path)
    assert sorted(p.name for p in paths) == ["mvtec.csv", "mvtec.json", "mvtec.md"]
    rows = list(csv.DictReader(io.StringIO((tmp_path / "mvtec.csv").read_text())))
    assert [r["category"] for r in rows] == ["bottle", "cable", MEAN_ROW]
    assert float(rows[1]["k1_image_auroc_mean"]) == pytest.approx(statistics.mean([0.70, 0.80, 0.75]))
    assert float(rows[1]["k1_image_auroc_std"]) == pytest.approx(statistics.stdev([0.70, 0.80, 0.75]))
    assert rows[0]["k2_n_seeds"] == "3"
    data = json.loads((tmp_path / "mvtec.json").read_text())
    assert data["shots"] == [1, 2] and len(data["runs"]) == len(AUROC)
    cell = data["rows"][0]["shots"]["2"]["image_auroc"]
    assert cell["seeds"] == [0, 1, 2]
    assert math.isclose(cell["mean"], statistics.mean([0.95, 0.97, 0.96]))
    assert not list(tmp_path.glob(".*.tmp"))  # atomic writes leave no temporary files


def test_single_seed_shows_mean_only():
    table = build_tables(
        [{"method": "m", "dataset": "d", "category": "a", "k_shot": 1, "seed": 0, "image_auroc": 0.875}]
    )["d"]
    assert "| 87.5 |" in table.markdown()


def test_results_from_disk_and_bad_input(tmp_path):
    run = tmp_path / "runs" / "a" / "k1" / "s0"
    run.mkdir(parents=True)
    (run / "results.json").write_text(json.dumps(_results()[0]))
    assert find_run_results(tmp_path / "runs")[0]["image_auroc"] == pytest.approx(0.90)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_run_result(tmp_path / "nope.json")
    (run / "results.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_run_result(run / "results.json")
    (run / "results.json").write_text(json.dumps({"category": "a", "k_shot": 1}))
    with pytest.raises(ValueError, match="'seed' is missing"):
        load_run_result(run / "results.json")
    with pytest.raises(ValueError, match="one run per cell"):
        build_tables(_results() + _results()[:1])


MVTEC = sorted({r.category for r in load_paper_results() if r.dataset == "mvtec"} - {"mean"})


def _mvtec_results(method: str = "patchknn", variant: str | None = None, categories=MVTEC) -> list[dict]:
    """Every MVTec AD category, 1 and 2 shots, seeds 0-1: image AUROC 0.80 + 0.01 * seed + 0.02 * k."""
    return [
        {"method": method, "variant": variant, "dataset": "mvtec_anomaly_detection", "category": c,
         "k_shot": k, "seed": s, "image_auroc": 0.80 + 0.01 * s + 0.02 * k, "pixel_auroc": 0.9,
         "image_f1_max": 0.7}
        for c in categories for k in (1, 2) for s in (0, 1)
    ]  # fmt: skip


def test_paper_column_and_difference_where_the_paper_has_the_cell(tmp_path):
    [table] = build_tables(_mvtec_results()).values()
    mean_1 = table.rows[("patchknn", MEAN_ROW)][1]["image_auroc"]
    assert mean_1.mean == pytest.approx(0.825)
    # PromptAD Table 1 prints PatchCore's MVTec AD 1-shot image AUROC as 83.4 (the preferred source)
    paper = table.paper_cell("patchknn", MEAN_ROW, 1, "image_auroc")
    assert (paper.source, paper.table, paper.value) == ("promptad", "Table 1", 83.4)
    assert table.paper_cell("patchknn", "bottle", 1, "image_auroc") is None  # no per-class PatchCore rows
    f1 = table.paper_cell("patchknn", MEAN_ROW, 1, "image_f1_max")  # only AnomalySD Table 1 prints F1-max
    assert (f1.source, f1.value, f1.std) == ("anomalysd", 90.5, None)
    assert (1, "image_auroc") in table.paper_columns() and (2, "pixel_auroc") in table.paper_columns()

    lines = [line for line in table.markdown().splitlines() if line.startswith("|")]
    header = [h.strip() for h in lines[0].strip("|").split("|")]
    assert header[2:4] == ["1-shot I-AUROC", "1-shot I-AUROC paper (Δ)"]
    mean_row = [c.strip() for c in lines[-1].strip("|").split("|")]
    assert mean_row[1] == MEAN_ROW and mean_row[3] == "83.4 (-0.9)"  # 82.5 - 83.4
    assert "PromptAD (Li et al., CVPR 2024) Table 1" in table.markdown()

    rows = list(csv.DictReader(io.StringIO(table.csv())))
    assert float(rows[-1]["k1_image_auroc_paper"]) == pytest.approx(0.834)
    assert float(rows[-1]["k1_image_auroc_paper_diff"]) == pytest.approx(0.825 - 0.834)
    assert rows[-1]["k1_image_auroc_paper_source"] == "promptad Table 1"
    assert rows[0]["k1_image_auroc_paper"] == ""

    cell = table.as_dict()["rows"][-1]["shots"]["1"]["image_auroc"]
    assert [p["source"] for p in cell["paper"]] == ["promptad", "anomalysd"]
    assert cell["paper"][0]["value_percent"] == 83.4 and cell["paper_diff"] == pytest.approx(0.825 - 0.834)
    assert table.as_dict()["rows"][0]["shots"]["1"]["image_auroc"].get("paper") is None


def test_the_class_average_is_compared_only_over_every_category():
    [table] = build_tables(_mvtec_results(categories=MVTEC[:3])).values()
    assert table.paper_cell("patchknn", MEAN_ROW, 1, "image_auroc") is None
    assert not table.paper_columns() and "paper" not in table.markdown() and "paper" not in table.csv()


def test_a_variant_gets_its_own_rows_and_the_papers_numbers_of_that_variant():
    results = _mvtec_results("adp", "label_aware") + _mvtec_results("adp")
    [table] = build_tables(results).values()
    assert table.methods == ["adp", "adp[label_aware]"]
    assert table.variants["adp[label_aware]"] == ("adp", "label_aware")
    # ADP Table 2 has no 1- or 2-shot classes; Table 1 gives the 2-shot class averages of ADP and ADP_l
    assert table.paper_cell("adp[label_aware]", MEAN_ROW, 2, "image_auroc").value == 95.4
    assert table.paper_cell("adp", MEAN_ROW, 2, "image_auroc").value == 94.4
    assert "| adp[label_aware] | mean |" in table.markdown()
