"""`fsad` end to end in process: fit/test round trip, results files, config handling, bad input."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from fsad_cli import exit_status as run
from PIL import Image

PATCHKNN = {
    "class_path": "fsad_lightning.methods.patchknn.PatchKNNModule",
    "init_args": {"backbone": "tf_efficientnet_lite0", "weights": "random", "sigma": 1.0},
}


def run_folders(tmp_path: Path) -> list[Path]:
    return sorted((tmp_path / "runs" / "test").glob("version_*"))


def test_test_writes_results_manifest_and_table(synthetic_mvtec, write_config, tmp_path, capsys):
    config = write_config(PATCHKNN, {"root": str(synthetic_mvtec), "category": "widget", "k_shot": 2, "image_size": 32})
    assert run(["test", "--config", config]) == 0
    [folder] = run_folders(tmp_path)
    results = json.loads((folder / "results.json").read_text())
    for key in ("image_auroc", "image_auprc", "image_f1_max", "pixel_auroc", "pixel_aupro", "pixel_f1_max"):
        assert 0.0 <= results[key] <= 1.0, key
    assert results["method"] == "patchknn" and results["category"] == "widget"
    assert results["k_shot"] == 2 and results["seed"] == 0 and results["dataset"] == "data"
    manifest = json.loads(Path(results["manifest"]).read_text())
    assert len(manifest["files"]) == 2 and manifest["seed"] == 0
    csv_lines = (folder / "results.csv").read_text().splitlines()
    assert csv_lines[0].startswith("method,dataset,category,k_shot,seed,image_auroc") and len(csv_lines) == 2
    table = (folder / "results.md").read_text()
    assert "| patchknn | data | widget | 2 | 0 |" in table
    assert table in capsys.readouterr().out
    assert not [p for p in os.listdir(folder) if p.endswith(".tmp")]


def test_multi_class_test_reports_each_category_and_the_mean(synthetic_mvtec, write_config, tmp_path):
    config = write_config(PATCHKNN, {"root": str(synthetic_mvtec), "category": "all", "k_shot": 2, "image_size": 32})
    assert run(["test", "--config", config]) == 0
    [folder] = run_folders(tmp_path)
    results = json.loads((folder / "results.json").read_text())
    assert results["category"] == "gadget+widget" and results["aggregation"] == "category_mean"
    per_category = results["per_category"]
    on_disk = {name: len(list((synthetic_mvtec / name / "test").rglob("*.png"))) for name in ("gadget", "widget")}
    assert {name: r["num_images"] for name, r in per_category.items()} == on_disk
    mean = (per_category["gadget"]["pixel_aupro"] + per_category["widget"]["pixel_aupro"]) / 2
    assert results["pixel_aupro"] == pytest.approx(mean)
    rows = (folder / "results.csv").read_text().splitlines()
    assert [row.split(",")[2] for row in rows[1:]] == ["gadget", "widget", "mean"]


def test_fit_saves_learned_state_only_and_test_restores_it(synthetic_mvtec, write_config, tmp_path):
    config = write_config(PATCHKNN, {"root": str(synthetic_mvtec), "category": "widget", "k_shot": 2, "image_size": 32})
    assert run(["fit", "--config", config]) == 0
    [ckpt] = list((tmp_path / "runs").rglob("*.ckpt"))
    state = torch.load(ckpt, map_location="cpu", weights_only=False)
    assert set(state["state_dict"]) == {"trained_epochs"}  # the frozen backbone is not in the checkpoint
    assert state["fsad_manifest"]["k_shot"] == 2
    assert run(["test", "--config", config, "--ckpt_path", str(ckpt)]) == 0
    # shots other than the checkpoint's are refused
    assert run(["test", "--config", config, "--ckpt_path", str(ckpt), "--data.init_args.seed", "3"]) == 2


def test_print_config_and_unknown_keys(synthetic_mvtec, write_config, capsys):
    config = write_config(PATCHKNN, {"root": str(synthetic_mvtec), "category": "widget"})
    assert run(["fit", "--config", config, "--print_config"]) == 0
    printed = capsys.readouterr().out
    assert "fsad_lightning.methods.patchknn.PatchKNNModule" in printed and "k_shot: 4" in printed
    assert run(["fit", "--config", config, "--model.init_args.not_a_key", "1"]) != 0
    assert "not_a_key" in capsys.readouterr().err


def _bad_input_case(case: str, root: Path) -> dict:
    data = {"root": str(root), "category": "widget", "k_shot": 2, "image_size": 32}
    if case == "missing_root":
        data["root"] = str(root / "nowhere")
    elif case == "missing_category":
        data["category"] = "wigdet"
    elif case == "too_many_shots":
        data["k_shot"] = 50
    elif case == "zero_shots":
        data["k_shot"] = 0
    elif case == "corrupt_image":
        (root / "widget" / "test" / "scratch" / "000.png").write_bytes(b"not a png")
    elif case == "mask_size":
        Image.new("L", (7, 9)).save(root / "widget" / "ground_truth" / "blob" / "000_mask.png")
    elif case == "one_class":
        for defect in ("scratch", "blob"):
            for path in (root / "widget" / "test" / defect).iterdir():
                path.unlink()
            (root / "widget" / "test" / defect).rmdir()
    return data


BAD_INPUT = {
    "missing_root": "nowhere",
    "missing_category": "gadget, widget",
    "too_many_shots": "4",
    "zero_shots": "k_shot",
    "corrupt_image": "000.png",
    "mask_size": "000_mask.png",
    "one_class": "AUROC",
}


@pytest.mark.parametrize("case", sorted(BAD_INPUT))
def test_bad_input_is_one_clear_line_and_no_results(case, synthetic_mvtec, write_config, tmp_path, capsys):
    data = _bad_input_case(case, synthetic_mvtec)
    config = write_config(PATCHKNN, data)
    assert run(["test", "--config", config]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("fsad: error: "), err
    assert BAD_INPUT[case] in err[0], err[0]
    assert not list((tmp_path / "runs").rglob("results.*"))


def test_predict_writes_scores_and_maps(synthetic_mvtec, write_config, tmp_path):
    import csv

    import numpy as np

    config = write_config(PATCHKNN, {"root": str(synthetic_mvtec), "category": "widget", "k_shot": 2, "image_size": 32})
    assert run(["predict", "--config", config]) == 0
    [folder] = run_folders(tmp_path)
    rows = list(csv.DictReader((folder / "predictions.csv").open()))
    assert len(rows) == 7 and all(float(r["score"]) >= 0 for r in rows)
    saved = np.load(folder / "anomaly_maps.npz")
    assert list(saved["paths"]) == [r["path"] for r in rows]
    assert saved["maps"].shape == (7, 32, 32) and np.isfinite(saved["maps"]).all()
