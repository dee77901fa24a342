"""``fsad benchmark`` end to end on tiny synthetic categories with PatchKNN: tables, resume, failures."""

from __future__ import annotations

import csv
import json
import statistics
from pathlib import Path

import pytest
import torch
from torch import nn

from fsad_lightning.callbacks.results import METRIC_KEYS
from fsad_lightning.commands import benchmark
from fsad_lightning.commands.benchmark import benchmark_main
from fsad_lightning.commands.dispatch import main
from fsad_lightning.methods.patchknn import PatchKNNModule

CATEGORIES = ("alpha", "beta")
SHOTS = ("1", "2")
SEEDS = ("0", "1")


class TinyTrainable(PatchKNNModule):
    """PatchKNN with one learned scalar: a trainable method cheap enough for a fit -> test benchmark."""

    learning_type = "trainable"
    method_name = "tiny_trainable"

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.offset = nn.Parameter(torch.zeros(()))

    def training_step(self, batch, batch_idx):
        return (self.offset - 1.0) ** 2 + 0.0 * batch["image"].mean()

    def configure_optimizers(self):
        return torch.optim.SGD([self.offset], lr=0.1)


@pytest.fixture(scope="module")
def tiny_setup(tmp_path_factory, tiny_benchmark):
    """Two 64 px synthetic categories (3 train, 2 good + 1 defective test images) and a PatchKNN config."""
    folder = tmp_path_factory.mktemp("benchmark")
    root, config = tiny_benchmark(folder, CATEGORIES)
    return folder, root, config


def _args(config: Path, output: Path, *extra: str) -> list[str]:
    return ["--config", str(config), "--shots", *SHOTS, "--seeds", *SEEDS, "--output", str(output), *extra]


def _cells(table_json: Path) -> dict:
    data = json.loads(table_json.read_text())
    return {(row["category"], k): cells for row in data["rows"] for k, cells in row["shots"].items()}


def test_benchmark_end_to_end_with_kill_and_resume(tiny_setup, monkeypatch, capsys):
    folder, _, config = tiny_setup
    output = folder / "out"
    real_run = benchmark.execute_run
    calls = []

    def killed_in_fourth_run(bench_config, spec):
        calls.append(spec)
        if len(calls) == 4:  # the process dies in the middle of run 4: a partial folder, no results.json
            spec.folder.mkdir(parents=True, exist_ok=True)
            (spec.folder / "partial.txt").write_text("half-written")
            raise KeyboardInterrupt
        return real_run(bench_config, spec)

    monkeypatch.setattr(benchmark, "execute_run", killed_in_fourth_run)
    with pytest.raises(KeyboardInterrupt):
        benchmark_main(_args(config, output))
    assert len(list((output / "runs").rglob("results.json"))) == 3

    monkeypatch.setattr(benchmark, "execute_run", real_run)
    report = benchmark_main(_args(config, output))
    printed = capsys.readouterr().out
    assert [o.status for o in report.outcomes] == ["skipped"] * 3 + ["done"] * 5
    assert "[4/8] alpha k=2 seed=1: running" in printed and "[8/8] beta k=2 seed=1: done" in printed
    assert not (output / "runs" / "alpha" / "k2" / "s1" / "partial.txt").exists()  # cleared, then run afresh

    # every run has its own folder with results, manifest and the CSV logger's files
    for category in CATEGORIES:
        for k in SHOTS:
            for seed in SEEDS:
                run = output / "runs" / category / f"k{k}" / f"s{seed}"
                result = json.loads((run / "results.json").read_text())
                assert (result["category"], result["k_shot"], result["seed"]) == (category, int(k), int(seed))
                assert (run / "manifest.json").is_file() and (run / "metrics.csv").is_file()
                assert json.loads((run / "manifest.json").read_text())["k_shot"] == int(k)

    # the tables: mean +- std over seeds of the per-run results, a row per category plus the mean
    assert sorted(p.name for p in report.tables) == ["data.csv", "data.json", "data.md"]
    cells = _cells(output / "data.json")
    for category in CATEGORIES:
        for k in SHOTS:
            runs = [
                json.loads((output / "runs" / category / f"k{k}" / f"s{s}" / "results.json").read_text())
                for s in SEEDS
            ]
            for metric in ("image_auroc", "pixel_auroc"):
                values = [r[metric] for r in runs]
                assert cells[(category, k)][metric]["mean"] == pytest.approx(statistics.mean(values))
                assert cells[(category, k)][metric]["std"] == pytest.approx(statistics.stdev(values))
                assert cells[(category, k)][metric]["seeds"] == [0, 1]
    rows = list(csv.DictReader((output / "data.csv").open()))
    assert [r["category"] for r in rows] == [*CATEGORIES, "mean"]
    markdown = (output / "data.md").read_text()
    assert "| patchknn | mean |" in markdown and "2-shot I-AUROC" in markdown
    assert set(json.loads((output / "data.json").read_text())["metrics"]) <= set(METRIC_KEYS)
    record = json.loads((output / "benchmark.json").read_text())
    assert record["state"] == "finished" and len(record["runs"]) == 8

    # an uninterrupted benchmark of the killed cell (alpha, k=2, seed 1) measures the same numbers
    reference = folder / "reference"
    benchmark_main(
        [
            "--config",
            str(config),
            "--categories",
            "alpha",
            "--shots",
            "2",
            "--seeds",
            "1",
            "--output",
            str(reference),
        ]
    )
    expected = json.loads((reference / "runs" / "alpha" / "k2" / "s1" / "results.json").read_text())
    resumed = json.loads((output / "runs" / "alpha" / "k2" / "s1" / "results.json").read_text())
    measured = [m for m in METRIC_KEYS if m in expected]
    assert measured and all(resumed[m] == expected[m] for m in measured)

    # a finished benchmark restarted runs nothing and rewrites the same tables
    before = (output / "data.csv").read_text()
    again = benchmark_main(_args(config, output))
    assert {o.status for o in again.outcomes} == {"skipped"} and (output / "data.csv").read_text() == before


def test_failed_run_is_reported_and_the_others_go_on(tiny_setup, monkeypatch, capsys):
    folder, _, config = tiny_setup
    output = folder / "failing"

    def fake_run(bench_config, spec):  # no model: results written by hand, one run raises
        if (spec.category, spec.k_shot, spec.seed) == ("beta", 1, 1):
            raise RuntimeError("CUDA out of memory (simulated)")
        spec.folder.mkdir(parents=True, exist_ok=True)
        result = {
            "method": "patchknn",
            "dataset": "data",
            "category": spec.category,
            "k_shot": spec.k_shot,
            "seed": spec.seed,
            "image_auroc": 0.5 + 0.1 * spec.seed + 0.01 * spec.k_shot,
        }
        (spec.folder / "results.json").write_text(json.dumps(result))
        return []

    monkeypatch.setattr(benchmark, "execute_run", fake_run)
    with pytest.raises(SystemExit) as exit_info:
        benchmark_main(_args(config, output))
    assert exit_info.value.code == 1
    printed = capsys.readouterr().out
    assert "[6/8] beta k=1 seed=1: FAILED" in printed and "CUDA out of memory (simulated)" in printed
    assert "1 of 8 runs failed" in printed
    assert "CUDA out of memory" in (output / "runs" / "beta" / "k1" / "s1" / "error.txt").read_text()
    statuses = [r["status"] for r in json.loads((output / "benchmark.json").read_text())["runs"]]
    assert statuses.count("failed") == 1 and statuses.count("done") == 7
    cells = _cells(output / "data.json")
    assert cells[("beta", "1")]["image_auroc"]["seeds"] == [0]
    assert cells[("mean", "1")]["image_auroc"]["seeds"] == [0]  # the mean row uses complete seeds only
    assert cells[("mean", "2")]["image_auroc"]["seeds"] == [0, 1]
    assert "*" in (output / "data.md").read_text()


def test_dry_run_defaults_and_bad_input(tiny_setup, capsys):
    folder, _, config = tiny_setup
    output = folder / "dry"
    assert (
        benchmark_main(["--config", str(config), "--seeds", "3", "--output", str(output), "--dry_run"])
        is None
    )
    printed = capsys.readouterr().out
    # categories found under the root, PatchKNN has no paper_shots: 1, 2, 4
    assert "2 categories x shots [1, 2, 4] x seeds [3] = 6 runs" in printed
    assert "[6/6] beta k=4 seed=3: to run" in printed
    assert "fsad test --config" in printed and "--data.init_args.k_shot=4" in printed
    assert not output.exists()

    with pytest.raises(FileNotFoundError, match="missing.yaml"):
        benchmark_main(["--config", str(folder / "missing.yaml"), "--dry_run"])
    with pytest.raises(SystemExit) as exit_info:  # an fsad key that does not exist fails before any run
        benchmark_main(["--config", str(config), "--model.init_args.no_such_key=1", "--dry_run"])
    assert exit_info.value.code != 0
    with pytest.raises(SystemExit):
        benchmark_main(["--config", str(config), "--shots", "0", "--dry_run"])


def test_resuming_other_settings_is_refused(tiny_setup, capsys):
    folder, _, config = tiny_setup
    output = folder / "settings"
    output.mkdir()
    (output / "benchmark.json").write_text(json.dumps({"fingerprint": "0" * 64}))
    with pytest.raises(SystemExit) as exit_info:  # `fsad benchmark` reports the ValueError in one line
        main(["benchmark", *_args(config, output)])
    assert exit_info.value.code == 2
    assert "other settings" in capsys.readouterr().err


def test_trainable_method_fits_then_tests_from_the_checkpoint(tiny_setup, tiny_benchmark):
    folder, root, _ = tiny_setup
    (folder / "trainable").mkdir()
    config = tiny_benchmark.config(folder / "trainable", root, model_class=f"{__name__}.TinyTrainable")
    output = folder / "trainable_out"
    report = benchmark_main(
        [
            "--config",
            str(config),
            "--categories",
            "alpha",
            "--shots",
            "1",
            "--seeds",
            "0",
            "--output",
            str(output),
        ]
    )
    run = output / "runs" / "alpha" / "k1" / "s0"
    result = json.loads((run / "results.json").read_text())
    assert result["method"] == "tiny_trainable"
    assert result["checkpoint"] and Path(result["checkpoint"]).is_file()
    assert Path(result["checkpoint"]).is_relative_to(run / "fit")
    checkpoint = torch.load(result["checkpoint"], map_location="cpu", weights_only=False)
    assert float(checkpoint["state_dict"]["offset"]) != 0.0  # the fit trained it
    assert report.outcomes[0].commands[0][0] == "fit" and report.outcomes[0].commands[1][0] == "test"


def test_multi_class_fits_all_categories_together_and_reports_each(tiny_setup, tiny_benchmark):
    folder, root, _ = tiny_setup
    (folder / "multi").mkdir()
    config = tiny_benchmark.config(folder / "multi", root, model_class=f"{__name__}.TinyTrainable")
    output = folder / "multi_out"
    report = benchmark_main(
        ["--config", str(config), "--shots", "1", "--seeds", "0", "--output", str(output), "--multi_class"]
    )
    # one fit and one test for both categories
    assert [o.spec.category for o in report.outcomes] == ["all"]
    fit_args = report.outcomes[0].commands[0]
    assert '--data.init_args.category=["alpha", "beta"]' in fit_args
    run = output / "runs" / "all" / "k1" / "s0"
    result = json.loads((run / "results.json").read_text())
    assert result["category"] == "alpha+beta" and set(result["per_category"]) == set(CATEGORIES)
    checkpoint = torch.load(result["checkpoint"], map_location="cpu", weights_only=False)
    assert len(checkpoint["fsad_manifest"]["files"]) == 2  # one shot of each category
    # the table has a row per category, filled from the run's per-category results
    cells = _cells(output / "data.json")
    for category in CATEGORIES:
        value = cells[(category, "1")]["image_auroc"]["mean"]
        assert value == pytest.approx(result["per_category"][category]["image_auroc"])
