"""The inspector workflow (issue 16): score any folder, decide without labels, ship the detector.

Tiny random backbones on synthetic data: `fsad predict` on an unlabelled folder with nested sub-folders
and odd file names, shots from a plain folder; the label-free threshold on the synthetic defects;
`fsad export` -> `Detector.load` in a fresh process gives the same scores; bad detector folders are
refused in one line.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from fsad_cli import exit_status as run
from PIL import Image

from fsad_lightning.data.synthetic import write_synthetic_category
from fsad_lightning.detector import FORMAT_VERSION, MANIFEST_NAME, STATE_NAME, Detector

# The predict / threshold path under test, not the pooling choice: with random Lite0 weights on the 64 px
# synthetic defects, pooling each stage before concatenating separates them (the Lite0 quickstart order
# is chosen on real data, README "PatchKNN on the development sets").
PATCHKNN = {
    "class_path": "fsad_lightning.methods.patchknn.PatchKNNModule",
    "init_args": {"backbone": "tf_efficientnet_lite0", "weights": "random", "stages": [1, 2], "sigma": 1.0,
                  "pool_order": "pool_first"},
}
REPO = Path(__file__).resolve().parents[2]


def rows_of(path: Path) -> list[dict[str, str]]:
    return list(csv.DictReader(path.open(encoding="utf-8")))


@pytest.fixture
def widget(tmp_path) -> Path:
    """A 64 px synthetic category: 6 good train images, 8 good and 8 defective test images."""
    root = tmp_path / "data"
    write_synthetic_category(root, "widget", n_train=6, n_test_good=8, n_test_defect=4, size=64, seed=0)
    return root


@pytest.fixture
def inbox(tmp_path, widget) -> tuple[Path, dict[str, str]]:
    """An unlabelled folder as a camera fills it: nested sub-folders, odd names, other sizes and formats,
    plus files that are no image (skipped). Returns the folder and {relative path: source kind}."""
    folder = tmp_path / "camera inbox"
    test = widget / "widget" / "test"
    placed = {
        "line 1/2026-12-02 08h00 part #1.png": test / "good" / "000.png",
        "line 1/nested/deeper/Teil_ä ö (2).PNG": test / "scratch" / "000.png",
        "line 2/part,with,commas.jpeg": test / "good" / "001.png",
        "top-level BLOB.bmp": test / "blob" / "001.png",
    }
    for relative, source in placed.items():
        target = folder / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        image = Image.open(source).convert("RGB")
        if target.suffix.lower() == ".bmp":
            image = image.resize((96, 80))  # another size: resized like every image
        image.save(target)
    (folder / "notes.txt").write_text("not an image")
    (folder / ".hidden.png").write_bytes((folder / "top-level BLOB.bmp").read_bytes())
    kinds = {relative: source.parent.name for relative, source in placed.items()}
    return folder, kinds


def shots_folder(tmp_path: Path, widget: Path) -> Path:
    """A plain folder of the good train images (no dataset layout), one in a sub-folder."""
    folder = tmp_path / "good parts"
    for i, image in enumerate(sorted((widget / "widget" / "train" / "good").glob("*.png"))[:4]):
        target = folder / ("sub" if i == 3 else "") / f"good {i}.png"
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(image, target)
    return folder


def test_predict_scores_an_unlabelled_nested_folder_with_shots_from_a_plain_folder(tmp_path, widget, inbox, write_config):
    folder, kinds = inbox
    shots = shots_folder(tmp_path, widget)
    config = write_config(PATCHKNN, {"shots_dir": str(shots), "k_shot": 4, "image_size": 64})
    assert run(["predict", "--config", config, "--data.init_args.predict_dir", str(folder), "--overlays", "true"]) == 0
    [run_folder] = sorted((tmp_path / "runs" / "test").glob("version_*"))
    rows = rows_of(run_folder / "predictions.csv")
    assert [os.path.relpath(r["path"], folder) for r in rows] == sorted(kinds)  # every image, hidden/txt skipped
    assert {r["decision"] for r in rows} <= {"anomalous", "normal"}
    threshold = json.loads((run_folder / "threshold.json").read_text())
    assert threshold["source"] == "leave_one_out" and len(threshold["normal_scores"]) == 4
    assert all(float(r["threshold"]) == pytest.approx(threshold["value"]) for r in rows)
    decided = {os.path.relpath(r["path"], folder): r["decision"] for r in rows}
    for relative, kind in kinds.items():
        assert decided[relative] == ("normal" if kind == "good" else "anomalous"), relative
    maps = np.load(run_folder / "anomaly_maps.npz")
    assert maps["maps"].shape == (4, 64, 64) and list(maps["paths"]) == [r["path"] for r in rows]
    overlays = sorted(p.relative_to(run_folder / "overlays").as_posix() for p in (run_folder / "overlays").rglob("*.png"))
    assert len(overlays) == 4 and any(p.startswith("line_1/nested/deeper/") for p in overlays), overlays
    manifest = json.loads((run_folder / "manifest.json").read_text())
    assert manifest["format"] == "shots_dir" and sorted(manifest["files"]) == ["good 0.png", "good 1.png", "good 2.png", "sub/good 3.png"]


def test_label_free_threshold_flags_the_defects_and_passes_the_good_images(tmp_path, widget, write_config):
    config = write_config(PATCHKNN, {"root": str(widget), "category": "widget", "k_shot": 4, "image_size": 64})
    assert run(["test", "--config", config]) == 0
    [run_folder] = sorted((tmp_path / "runs" / "test").glob("version_*"))
    results = json.loads((run_folder / "results.json").read_text())
    record = results["threshold_record"]
    assert record["source"] == "leave_one_out" and record["value"] == pytest.approx(max(record["normal_scores"]))
    assert results["threshold"] == pytest.approx(record["value"])
    assert results["threshold_recall"] >= 0.75  # of the 8 synthetic defects
    assert results["threshold_fpr"] <= 0.125  # of the 8 good test images
    assert results["threshold_precision"] >= 0.75
    table = (run_folder / "results.md").read_text()
    assert "threshold_fpr" in table.splitlines()[0]
    # a fixed threshold replaces the rule: above every score nothing is flagged
    assert run(["test", "--config", config, "--threshold", "1e9"]) == 0
    [_, fixed_folder] = sorted((tmp_path / "runs" / "test").glob("version_*"))
    fixed = json.loads((fixed_folder / "results.json").read_text())
    assert fixed["threshold_record"]["source"] == "fixed" and fixed["threshold_recall"] == 0.0
    assert fixed["threshold_fpr"] == 0.0


FRESH_PROCESS = """
import json, sys
import torch
from fsad_lightning.detector import Detector
torch.set_num_threads(1)
result = Detector.load(sys.argv[1], device="cpu").predict(sys.argv[2])
print(json.dumps({"paths": result.paths, "scores": result.scores.tolist(), "decisions": result.decisions.tolist(),
                  "map_sum": result.maps.double().sum(dim=(1, 2)).tolist(), "threshold": result.threshold}))
"""


@pytest.mark.slow
def test_export_then_load_in_a_fresh_process_gives_identical_scores(tmp_path, widget, write_config, capsys):
    config = write_config(PATCHKNN, {"root": str(widget), "category": "widget", "k_shot": 4, "image_size": 64})
    detector_dir = tmp_path / "detector"
    assert run(["export", "--config", config, "--output", str(detector_dir)]) == 0
    assert "detector written to" in capsys.readouterr().out
    manifest = json.loads((detector_dir / MANIFEST_NAME).read_text())
    assert manifest["format_version"] == FORMAT_VERSION and manifest["versions"]["torch"] == torch.__version__
    assert manifest["method"].endswith("PatchKNNModule") and manifest["threshold"]["source"] == "leave_one_out"
    assert not list(tmp_path.glob(".detector.*"))  # no staging folder left behind
    images = widget / "widget" / "test"

    # the same images scored by `fsad predict --config` (dataset and shots from the config)
    assert run(["predict", "--config", config, "--data.init_args.predict_dir", str(images)]) == 0
    [run_folder] = sorted((tmp_path / "runs" / "test").glob("version_*"))
    expected = rows_of(run_folder / "predictions.csv")

    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    moved = tmp_path / "shipped"  # the detector alone, elsewhere, without the dataset
    shutil.copytree(detector_dir, moved)
    shutil.rmtree(widget / "widget" / "train")
    done = subprocess.run(
        [sys.executable, "-c", FRESH_PROCESS, str(moved), str(images)], capture_output=True, text=True, env=env,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    fresh = json.loads(done.stdout.strip().splitlines()[-1])
    assert fresh["paths"] == [r["path"] for r in expected]
    np.testing.assert_allclose(fresh["scores"], [float(r["score"]) for r in expected], rtol=0, atol=1e-6)
    assert fresh["decisions"] == [r["decision"] == "anomalous" for r in expected]
    here = Detector.load(moved, device="cpu").predict(str(images))
    np.testing.assert_allclose(fresh["map_sum"], here.maps.double().sum(dim=(1, 2)).numpy(), rtol=1e-6)
    assert fresh["threshold"] == pytest.approx(float(expected[0]["threshold"]), abs=1e-6)

    # `fsad predict --detector` writes the same predictions
    out = tmp_path / "detector run"
    assert run(["predict", "--detector", str(moved), "--data.init_args.predict_dir", str(images), "--output", str(out)]) == 0
    shipped = rows_of(out / "predictions.csv")
    assert [r["decision"] for r in shipped] == [r["decision"] for r in expected]
    np.testing.assert_allclose([float(r["score"]) for r in shipped], [float(r["score"]) for r in expected], atol=1e-6)


def _break(detector: Path, case: str) -> str:
    """Damage a copy of a detector folder; the phrase its one-line error must hold."""
    if case == "missing":
        shutil.rmtree(detector)
        return "does not exist"
    if case == "not_a_detector":
        (detector / MANIFEST_NAME).unlink()
        return "is not an fsad detector folder"
    if case == "old_format":
        manifest = json.loads((detector / MANIFEST_NAME).read_text())
        manifest["format_version"] = 0
        (detector / MANIFEST_NAME).write_text(json.dumps(manifest))
        return "format version 0"
    if case == "bad_resize_mode":
        manifest = json.loads((detector / MANIFEST_NAME).read_text())
        manifest["resize_mode"] = "squash"
        (detector / MANIFEST_NAME).write_text(json.dumps(manifest))
        return "resize_mode 'squash'"
    if case == "truncated_state":
        state = detector / STATE_NAME
        state.write_bytes(state.read_bytes()[:100])
        return "state.pt is truncated or corrupt"
    raise AssertionError(case)


@pytest.mark.parametrize("case", ["missing", "not_a_detector", "old_format", "bad_resize_mode", "truncated_state"])
def test_a_bad_detector_folder_is_refused_in_one_line(tmp_path, widget, write_config, capsys, case, request):
    config = write_config(PATCHKNN, {"root": str(widget), "category": "widget", "k_shot": 2, "image_size": 32})
    detector = tmp_path / "detector"
    assert run(["export", "--config", config, "--output", str(detector)]) == 0
    capsys.readouterr()
    phrase = _break(detector, case)
    images = widget / "widget" / "test"
    assert run(["predict", "--detector", str(detector), "--data.init_args.predict_dir", str(images)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("fsad: error: ") and phrase in err[0], err
    with pytest.raises((ValueError, FileNotFoundError), match=phrase.split(" ")[0]):
        Detector.load(detector)


def test_export_keeps_its_own_command_line_from_lightningcli(tmp_path, widget, write_config, monkeypatch):
    import warnings

    config = write_config(PATCHKNN, {"root": str(widget), "category": "widget", "k_shot": 2, "image_size": 32})
    argv = ["export", "--config", config, "--output", str(tmp_path / "d")]
    monkeypatch.setattr(sys, "argv", ["fsad", *argv])  # as the console script sees it
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert run(argv) == 0
    assert not [w for w in caught if "args parameter is intended" in str(w.message)]
    assert sys.argv == ["fsad", *argv]  # given back


def test_one_shot_without_a_fixed_threshold_is_refused_for_export_and_scores_without_decisions(
    tmp_path, widget, write_config, capsys
):
    config = write_config(PATCHKNN, {"root": str(widget), "category": "widget", "k_shot": 1, "image_size": 32})
    assert run(["export", "--config", config, "--output", str(tmp_path / "d")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "at least 2 normal shots" in err[0] and "threshold" in err[0]
    assert run(["export", "--config", config, "--output", str(tmp_path / "d"), "--threshold", "0.5"]) == 0
    assert json.loads((tmp_path / "d" / MANIFEST_NAME).read_text())["threshold"]["source"] == "fixed"
    assert run(["test", "--config", config]) == 0  # threshold-free metrics only
    [run_folder] = sorted((tmp_path / "runs" / "test").glob("version_*"))
    results = json.loads((run_folder / "results.json").read_text())
    assert "image_auroc" in results and "threshold" not in results
    assert run(["predict", "--config", config]) == 0  # scores, no decisions
    [_, predicted] = sorted((tmp_path / "runs" / "test").glob("version_*"))
    rows = rows_of(predicted / "predictions.csv")
    assert rows and all(r["decision"] == "" and r["score"] for r in rows)
    assert not (predicted / "threshold.json").exists()


def test_python_api_scores_files_arrays_and_tensors_alike(tmp_path, widget, write_config):
    config = write_config(PATCHKNN, {"root": str(widget), "category": "widget", "k_shot": 3, "image_size": 64})
    assert run(["export", "--config", config, "--output", str(tmp_path / "d")]) == 0
    detector = Detector.load(tmp_path / "d")
    path = widget / "widget" / "test" / "blob" / "000.png"
    array = np.array(Image.open(path).convert("RGB"))
    tensor = torch.from_numpy(array).permute(2, 0, 1).float() / 255
    result = detector.predict([str(path), array, Image.open(path), tensor])
    assert result.scores.dtype == torch.float32 and result.maps.shape == (4, 64, 64)
    np.testing.assert_allclose(result.scores.numpy(), result.scores[0].item(), atol=1e-6)
    assert result.decisions.tolist() == [True] * 4 and result.paths[1] == "<image 1>"


PROMPTAD_TINY = {
    "class_path": "fsad_lightning.methods.promptad.PromptADModule",
    "init_args": {
        "model_name": "fsad-tiny-vit", "pretrained": None, "image_size": 64, "class_name": None,
        "image_normal_prompts": 1, "pixel_normal_prompts": 1, "num_prefix_tokens": 2, "num_learnable_suffixes": 1,
        "num_suffix_tokens": 1, "memory_layers": [1, 2], "vv_layers": None, "image_epochs": None, "pixel_epochs": 1,
        "anomaly_suffixes": ["with a flaw"],
    },
}


@pytest.mark.slow
def test_a_trainable_method_predicts_a_folder_and_exports_from_its_checkpoint(tmp_path, widget, inbox, write_config, capsys):
    folder, _ = inbox
    data = {"root": str(widget), "category": "widget", "k_shot": 2, "image_size": 64, "batch_size": 8}
    config = write_config(PROMPTAD_TINY, data, trainer={"max_epochs": 1})
    assert run(["export", "--config", config, "--output", str(tmp_path / "d")]) == 2  # no learned state yet
    assert "needs --ckpt_path" in capsys.readouterr().err
    assert run(["fit", "--config", config]) == 0
    [ckpt] = sorted((tmp_path / "runs").rglob("last.ckpt"))
    assert run(["predict", "--config", config, "--ckpt_path", str(ckpt), "--data.init_args.predict_dir", str(folder)]) == 0
    [predicted] = [f for f in (tmp_path / "runs" / "test").glob("version_*") if (f / "predictions.csv").exists()]
    expected = rows_of(predicted / "predictions.csv")
    assert len(expected) == 4 and all(r["decision"] in ("normal", "anomalous") for r in expected)
    assert run(["export", "--config", config, "--ckpt_path", str(ckpt), "--output", str(tmp_path / "d")]) == 0
    manifest = json.loads((tmp_path / "d" / MANIFEST_NAME).read_text())
    assert manifest["learning_type"] == "trainable" and manifest["shots_manifest"]["k_shot"] == 2
    result = Detector.load(tmp_path / "d").predict(str(folder))
    assert result.paths == [r["path"] for r in expected]
    np.testing.assert_allclose(result.scores.numpy(), [float(r["score"]) for r in expected], atol=1e-5)


def test_winclip_detector_rebuilds_its_per_category_references_from_the_stored_shots(tmp_path, widget, write_config):
    model = {
        "class_path": "fsad_lightning.methods.winclip.WinCLIPModule",
        "init_args": {"model_name": "fsad-tiny-vit", "pretrained": None, "image_size": 64, "templates": ["a photo of a {}."]},
    }
    config = write_config(model, {"root": str(widget), "category": "widget", "k_shot": 2, "image_size": 64})
    images = widget / "widget" / "test" / "blob"
    assert run(["predict", "--config", config, "--data.init_args.predict_dir", str(images)]) == 0
    [run_folder] = sorted((tmp_path / "runs" / "test").glob("version_*"))
    expected = rows_of(run_folder / "predictions.csv")
    assert run(["export", "--config", config, "--output", str(tmp_path / "d")]) == 0
    result = Detector.load(tmp_path / "d").predict(str(images))
    np.testing.assert_allclose(result.scores.numpy(), [float(r["score"]) for r in expected], atol=1e-6)


@pytest.mark.parametrize("case", ["missing", "empty", "no_shots"])
def test_a_bad_predict_or_shots_folder_is_refused_in_one_line(tmp_path, widget, write_config, capsys, case):
    empty = tmp_path / "empty"
    (empty / "sub").mkdir(parents=True)
    (empty / "sub" / "readme.txt").write_text("no image here")
    data = {"root": str(widget), "category": "widget", "k_shot": 2, "image_size": 32}
    predict_dir, phrase = str(widget / "widget" / "test"), ""
    if case == "missing":
        predict_dir, phrase = str(tmp_path / "nowhere"), "predict_dir does not exist"
    elif case == "empty":
        predict_dir, phrase = str(empty), "holds no image files"
    else:
        data, phrase = {**data, "shots_dir": str(empty)}, f"shots_dir {empty} holds no image files"
    config = write_config(PATCHKNN, data)
    assert run(["predict", "--config", config, "--data.init_args.predict_dir", predict_dir]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and phrase in err[0], err


def test_export_replaces_an_old_detector_but_not_another_folder(tmp_path, widget, write_config, capsys):
    config = write_config(PATCHKNN, {"root": str(widget), "category": "widget", "k_shot": 2, "image_size": 32})
    target = tmp_path / "d"
    assert run(["export", "--config", config, "--output", str(target)]) == 0
    assert run(["export", "--config", config, "--output", str(target), "--threshold", "0.5"]) == 0
    assert json.loads((target / MANIFEST_NAME).read_text())["threshold"]["value"] == 0.5
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".d.")) == []  # nothing left aside
    other = tmp_path / "photos"
    other.mkdir()
    (other / "holiday.jpg").write_bytes(b"not mine to replace")
    capsys.readouterr()
    assert run(["export", "--config", config, "--output", str(other)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "holds no detector" in err[0]
    assert (other / "holiday.jpg").read_bytes() == b"not mine to replace"


def test_a_detector_keeps_a_non_square_image_size(tmp_path, widget, write_config):
    data = {"root": str(widget), "category": "widget", "k_shot": 3, "image_size": [48, 64]}
    config = write_config(PATCHKNN, data)
    assert run(["export", "--config", config, "--output", str(tmp_path / "d")]) == 0
    manifest = json.loads((tmp_path / "d" / MANIFEST_NAME).read_text())
    assert manifest["image_size"] == [48, 64] and manifest["resize_mode"] == "stretch"
    result = Detector.load(tmp_path / "d").predict([str(widget / "widget" / "test" / "blob" / "000.png")])
    assert result.maps.shape == (1, 48, 64)


@pytest.mark.parametrize("resize_mode", ["pad", "crop"])
def test_a_padded_or_cropped_detector_scores_as_fsad_predict_with_its_config(
    tmp_path, widget, inbox, write_config, resize_mode
):
    folder, _ = inbox  # 64 x 64 images and one 96 x 80: padded or cropped to [48, 64] unlike the others
    data = {"root": str(widget), "category": "widget", "k_shot": 3, "image_size": [48, 64],
            "resize_mode": resize_mode}
    config = write_config(PATCHKNN, data, name=f"{resize_mode}.yaml")
    assert run(["predict", "--config", config, "--data.init_args.predict_dir", str(folder)]) == 0
    [run_folder] = sorted((tmp_path / "runs" / "test").glob("version_*"))
    expected = rows_of(run_folder / "predictions.csv")
    assert run(["export", "--config", config, "--output", str(tmp_path / "d")]) == 0
    assert json.loads((tmp_path / "d" / MANIFEST_NAME).read_text())["resize_mode"] == resize_mode
    detector = Detector.load(tmp_path / "d", device="cpu")
    result = detector.predict(str(folder))
    assert result.paths == [r["path"] for r in expected] and result.maps.shape[1:] == (48, 64)
    np.testing.assert_allclose(result.scores.numpy(), [float(r["score"]) for r in expected], rtol=0, atol=1e-6)
    assert result.threshold == pytest.approx(float(expected[0]["threshold"]), abs=1e-6)
    # the same through `fsad predict --detector`
    out = tmp_path / "detector run"
    assert run(["predict", "--detector", str(tmp_path / "d"), "--data.init_args.predict_dir", str(folder),
                "--output", str(out)]) == 0
    np.testing.assert_allclose([float(r["score"]) for r in rows_of(out / "predictions.csv")],
                               [float(r["score"]) for r in expected], rtol=0, atol=1e-6)
    if resize_mode == "pad":  # the wide 96 x 80 image lands in a content box narrower than the frame
        assert detector.preprocess(torch.rand(3, 80, 96)).content_box.tolist() == [[0, 3, 48, 58]]
