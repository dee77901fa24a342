"""`fsad` under faults and mix-ups: no silently wrong result, no lost fit, every failure one line.

Checkpoint mix-ups (another method, other fitted settings, a regenerated dataset), unreadable
checkpoints, a kill -9 during a fit and its resume, a full disk while writing results or overlays, an
unwritable output folder, two runs aimed at one run folder, errors in DataLoader workers and broken YAML.
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from fsad_cli import exit_status as run
from fsad_cli import fsad_config
from lightning.pytorch.loggers import CSVLogger
from PIL import Image

from fsad_lightning.commands.lightning_cli import run_cli
from fsad_lightning.data.synthetic import write_synthetic_category

REPO = Path(__file__).resolve().parents[2]
PATCHKNN = {
    "class_path": "fsad_lightning.methods.patchknn.PatchKNNModule",
    "init_args": {"backbone": "tf_efficientnet_lite0", "weights": "random", "sigma": 1.0},
}
PROMPTAD = {
    "class_path": "fsad_lightning.methods.promptad.PromptADModule",
    "init_args": {
        "model_name": "fsad-tiny-vit",
        "pretrained": None,
        "image_size": 64,
        "class_name": "widget",
        "anomaly_suffixes": ["with flaw", "with a crack"],
        "image_normal_prompts": 3,
        "memory_layers": [1, 2],
        "map_size": None,  # maps at the 64 px images
    },
}


def error_line(capsys) -> str:
    """The one ``fsad: error:`` line on stderr (and that there is one only)."""
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("fsad: error:")]
    assert len(lines) == 1, lines
    return lines[0]


def write_yaml(path: Path, model: dict, data: dict, runs: Path, trainer: dict | None = None) -> str:
    path.write_text(yaml.safe_dump(fsad_config(model, data, runs, trainer)))
    return str(path)


@pytest.fixture(scope="module")
def promptad_fit(tmp_path_factory):
    """A 1-epoch tiny PromptAD fit on a synthetic category: (data root, config, its last.ckpt)."""
    folder = tmp_path_factory.mktemp("promptad_fit")
    write_synthetic_category(folder / "data", "widget", n_train=4, n_test_good=2, n_test_defect=2, size=32)
    data = {"root": str(folder / "data"), "category": "widget", "k_shot": 2, "image_size": 64}
    config = write_yaml(folder / "promptad.yaml", PROMPTAD, data, folder / "runs", {"max_epochs": 1})
    assert run(["fit", "--config", config]) == 0
    [checkpoint] = (folder / "runs").rglob("*.ckpt")
    return folder / "data", config, str(checkpoint)


def test_a_checkpoint_never_replaces_the_configured_method(
    promptad_fit, synthetic_mvtec, write_config, tmp_path, capsys
):
    root, _, promptad_checkpoint = promptad_fit
    patchknn = write_config(
        PATCHKNN, {"root": str(root), "category": "widget", "k_shot": 2, "image_size": 64}
    )
    # before: LightningCLI loaded the checkpoint's hyper-parameters over the config and ran PromptAD
    assert run(["test", "--config", patchknn, "--ckpt_path", promptad_checkpoint]) == 2
    assert error_line(capsys) == (
        f"fsad: error: checkpoint {promptad_checkpoint} was written by PromptADModule but the config runs "
        "PatchKNNModule: give the config of that method, or a checkpoint of this one"
    )
    assert not list((tmp_path / "runs").rglob("*"))  # refused before anything was written
    # and the other way round: a PatchKNN fit's checkpoint given to a PromptAD config
    assert run(["fit", "--config", patchknn]) == 0
    [patchknn_checkpoint] = (tmp_path / "runs").rglob("*.ckpt")
    promptad = write_config(
        PROMPTAD,
        {"root": str(root), "category": "widget", "k_shot": 2, "image_size": 64},
        name="promptad.yaml",
    )
    assert run(["test", "--config", promptad, "--ckpt_path", str(patchknn_checkpoint)]) == 2
    assert "was written by PatchKNNModule but the config runs PromptADModule" in error_line(capsys)
    assert not list((tmp_path / "runs").rglob("results.json"))


def test_fitted_settings_must_match_and_scoring_settings_follow_the_config(promptad_fit, tmp_path, capsys):
    root, config, checkpoint = promptad_fit
    # before: the checkpoint's 3 prompts silently replaced the configured 5
    assert (
        run(
            [
                "test",
                "--config",
                config,
                "--ckpt_path",
                checkpoint,
                "--model.init_args.image_normal_prompts=5",
            ]
        )
        == 2
    )
    assert (
        f"checkpoint {checkpoint} was fitted with image_normal_prompts=3 but the config sets image_normal_prompts=5"
        in error_line(capsys)
    )
    # a scoring-only setting is the config's (before: the checkpoint's sigma=4 won)
    logger = f"--trainer.logger.init_args.save_dir={tmp_path / 'runs'}"
    cli = run_cli(
        ["test", "--config", config, "--ckpt_path", checkpoint, "--model.init_args.sigma=2.0", logger]
    )
    assert cli.model.hparams.sigma == 2.0 and cli.model.model.sigma == 2.0
    [saved] = (tmp_path / "runs").rglob("config.yaml")
    assert yaml.safe_load(saved.read_text())["model"]["init_args"]["sigma"] == 2.0
    assert json.loads(next((tmp_path / "runs").rglob("results.json")).read_text())["checkpoint"] == checkpoint


def test_a_checkpoint_of_a_regenerated_dataset_is_refused(synthetic_mvtec, write_config, tmp_path, capsys):
    config = write_config(
        PATCHKNN, {"root": str(synthetic_mvtec), "category": "widget", "k_shot": 2, "image_size": 32}
    )
    assert run(["fit", "--config", config]) == 0
    [checkpoint] = (tmp_path / "runs").rglob("*.ckpt")
    fitted = torch.load(checkpoint, weights_only=False)["fsad_manifest"]
    # the same file names, other images: the dataset was regenerated
    shot = synthetic_mvtec / fitted["files"][0]
    Image.new("RGB", (32, 32), (200, 10, 10)).save(shot)
    assert run(["test", "--config", config, "--ckpt_path", str(checkpoint)]) == 2
    line = error_line(capsys)
    assert (
        f"was fitted on dataset version {fitted['dataset_version']} but {synthetic_mvtec} is version" in line
    )
    assert not list((tmp_path / "runs").rglob("results.json"))


def test_missing_checkpoints_are_one_line(promptad_fit, tmp_path, capsys):
    _, config, checkpoint = promptad_fit
    logger = f"--trainer.logger.init_args.save_dir={tmp_path / 'runs'}"
    # before: a 54-line RuntimeError traceback
    assert run(["test", "--config", config, logger]) == 2
    assert error_line(capsys) == (
        "fsad: error: PromptADModule learns its state in `fsad fit`: `fsad test` needs --ckpt_path (the fit's "
        "checkpoints/last.ckpt, or `last` for the newest fit's)"
    )
    # before: fit trained from scratch (exit 0) and test raised
    for command in ("fit", "test"):
        assert run([command, "--config", config, "--ckpt_path", "last", logger]) == 2
        line = error_line(capsys)
        assert (
            line.startswith("fsad: error: --ckpt_path last: no last.ckpt at ")
            and str(tmp_path / "runs") in line
        )
    assert not list((tmp_path / "runs").rglob("*.*"))
    assert Path(checkpoint).name == "last.ckpt"  # a trainable fit keeps one file, saved periodically


def test_unreadable_checkpoint_files_are_one_line(synthetic_mvtec, write_config, tmp_path, capsys):
    config = write_config(
        PATCHKNN, {"root": str(synthetic_mvtec), "category": "widget", "k_shot": 2, "image_size": 32}
    )
    assert run(["fit", "--config", config]) == 0
    [fitted] = (tmp_path / "runs").rglob("*.ckpt")
    cases = {  # before: EOFError, a zip-reader RuntimeError and an IndexError, as tracebacks
        "empty": (b"", "is empty (0 bytes)"),
        "truncated": (fitted.read_bytes()[:1000], "is truncated or corrupt"),
        "yaml": (Path(config).read_bytes(), "is not a PyTorch checkpoint"),
    }
    for kind, (content, expected) in cases.items():
        checkpoint = tmp_path / f"{kind}.ckpt"
        checkpoint.write_bytes(content)
        assert run(["test", "--config", config, "--ckpt_path", str(checkpoint)]) == 2
        line = error_line(capsys)
        assert str(checkpoint) in line and expected in line, line
    assert len(list((tmp_path / "runs").glob("*/version_*"))) == 1  # only the fit's folder


def test_a_too_small_image_size_is_refused_up_front(synthetic_mvtec, write_config, tmp_path, capsys):
    config = write_config(
        PATCHKNN, {"root": str(synthetic_mvtec), "category": "widget", "k_shot": 2, "image_size": 4}
    )
    # before: an F.pad RuntimeError from the smoothing, after the run folder was written
    assert run(["test", "--config", config]) == 2
    assert error_line(capsys) == (
        "fsad: error: data.image_size=4 is too small for PatchKNNModule: it needs at least 5 px (its anomaly-map "
        "smoothing (sigma=1) reflects 4 px at each border)"
    )
    assert not (tmp_path / "runs").exists()


def test_a_read_only_output_folder_and_a_full_disk_are_one_line(
    synthetic_mvtec, write_config, tmp_path, capsys, monkeypatch
):
    config = write_config(
        PATCHKNN, {"root": str(synthetic_mvtec), "category": "widget", "k_shot": 2, "image_size": 32}
    )
    runs = str(tmp_path / "runs")
    real_mkdir, real_replace = os.mkdir, os.replace

    def read_only(path, *args, **kwargs):
        if str(path).startswith(runs):
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        return real_mkdir(path, *args, **kwargs)

    monkeypatch.setattr(os, "mkdir", read_only)
    assert run(["test", "--config", config]) == 2
    assert (
        error_line(capsys)
        == f"fsad: error: [Errno 30] cannot create the run folder {runs}/test: Read-only file system"
    )
    monkeypatch.setattr(os, "mkdir", real_mkdir)

    def full_disk(source, destination):
        if str(destination).endswith("results.json"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_replace(source, destination)

    monkeypatch.setattr(os, "replace", full_disk)
    assert run(["test", "--config", config]) == 2
    [folder] = (tmp_path / "runs" / "test").glob("version_*")
    assert (
        error_line(capsys)
        == f"fsad: error: [Errno 28] cannot write {folder}/results.json: No space left on device"
    )
    assert not list(folder.glob("results.*")) and not list(folder.glob(".*.tmp"))  # nothing half-written


def test_results_are_written_before_overlays(synthetic_mvtec, write_config, tmp_path, capsys, monkeypatch):
    from fsad_lightning.callbacks import visualizer

    config = write_config(
        PATCHKNN,
        {"root": str(synthetic_mvtec), "category": "widget", "k_shot": 2, "image_size": 32},
        {"callbacks": [{"class_path": "fsad_lightning.callbacks.visualizer.Visualizer"}]},
    )
    written = []

    def full_disk_after_two(image, path):
        if len(written) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        written.append(path)

    monkeypatch.setattr(visualizer, "save_png", full_disk_after_two)
    # before: a traceback, and results.json / .csv / .md were never written
    assert run(["test", "--config", config]) == 2
    [folder] = (tmp_path / "runs" / "test").glob("version_*")
    assert all((folder / f"results.{ext}").is_file() for ext in ("json", "csv", "md"))
    assert error_line(capsys) == (
        f"fsad: error: [Errno 28] overlay images not written: 5 of 7 overlays and worst_cases.png in "
        f"{folder}/images (No space left on device); results.json / .csv / .md are written in {folder}"
    )


def test_two_runs_never_write_into_one_folder(synthetic_mvtec, write_config, tmp_path, capsys, monkeypatch):
    config = write_config(
        PATCHKNN, {"root": str(synthetic_mvtec), "category": "widget", "k_shot": 2, "image_size": 32}
    )
    mine = "--trainer.logger.init_args.version=mine"
    assert run(["test", "--config", config, mine]) == 0
    before = (tmp_path / "runs" / "test" / "mine" / "results.json").read_text()
    # before: the second run overwrote the first one's results
    assert run(["test", "--config", config, mine, "--data.init_args.seed=1"]) == 2
    assert error_line(capsys).startswith(
        f"fsad: error: run folder {tmp_path}/runs/test/mine already holds a run"
    )
    assert (tmp_path / "runs" / "test" / "mine" / "results.json").read_text() == before
    # two runs started together both see no version_0 yet (before: both wrote into it)
    monkeypatch.setattr(CSVLogger, "_get_next_version", lambda self: 0)
    assert run(["test", "--config", config]) == 0
    assert run(["test", "--config", config, "--data.init_args.seed=1"]) == 0
    seeds = sorted(
        json.loads(p.read_text())["seed"] for p in (tmp_path / "runs" / "test").glob("version_*/results.json")
    )
    assert seeds == [0, 1]


def test_an_error_in_a_dataloader_worker_names_the_file(synthetic_mvtec, write_config, tmp_path, capsys):
    (synthetic_mvtec / "widget" / "test" / "scratch" / "000.png").write_bytes(b"not a png")
    config = write_config(
        PATCHKNN,
        {"root": str(synthetic_mvtec), "category": "widget", "k_shot": 2, "image_size": 32, "num_workers": 1},
    )
    # before: "Caught ValueError in DataLoader worker process 0."
    assert run(["test", "--config", config]) == 2
    line = error_line(capsys)
    assert "widget/test/scratch/000.png" in line and "DataLoader worker" not in line, line


def test_broken_yaml_names_the_config_file(tmp_path, capsys):
    broken = tmp_path / "broken.yaml"
    broken.write_text(
        "model:\n  class_path: fsad_lightning.methods.patchknn.PatchKNNModule\n  init_args: [1,\n"
    )
    assert run(["test", "--config", str(broken)]) == 2
    assert error_line(capsys).startswith(
        f"fsad: error: config {broken} has a YAML syntax error at line 4, column 1:"
    )
    empty = tmp_path / "empty.yaml"
    empty.write_text("# model: to do\n\n")
    assert run(["fit", "--config", str(empty)]) == 2
    assert error_line(capsys) == (
        f"fsad: error: config {empty} is empty (or holds only comments): a config maps sections such as model, "
        "data, trainer"
    )


KILLER = '''
import os, signal
from lightning.pytorch import Callback

class KillAt(Callback):
    """kill -9 of the run's own process when the fit reaches `step`."""
    def __init__(self, step: int):
        self.step = step
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)
'''


@pytest.mark.slow
def test_a_fit_killed_mid_way_resumes_to_the_uninterrupted_state(tmp_path):
    """kill -9 at step 7 of 8 (last.ckpt saved at step 6, mid-way through epoch 2 of 2), `fsad fit --ckpt_path last`:
    the learned prompts, momentum and schedule equal those of a fit that was never interrupted."""
    write_synthetic_category(tmp_path / "data", "widget", n_train=4, n_test_good=2, n_test_defect=2, size=32)
    data = {
        "root": str(tmp_path / "data"),
        "category": "widget",
        "k_shot": 2,
        "image_size": 64,
        "train_batch_size": 1,
        "train_repeats": 2,
        "augment": True,
    }  # 4 steps an epoch
    periodic = {
        "class_path": "fsad_lightning.callbacks.checkpoints.PeriodicLastCheckpoint",
        "init_args": {"every_n_train_steps": 3},
    }
    trainer = {"max_epochs": 2, "callbacks": [periodic]}
    config = write_yaml(tmp_path / "fit.yaml", PROMPTAD, data, tmp_path / "runs", trainer)
    (tmp_path / "killer.py").write_text(KILLER)
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([str(tmp_path), str(REPO), os.environ.get("PYTHONPATH", "")]),
    }
    fsad = [sys.executable, "-m", "fsad_lightning.commands", "fit", "--config", config]
    killed = subprocess.run(
        [*fsad, "--trainer.callbacks+=killer.KillAt", "--trainer.callbacks.init_args.step=7"],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert killed.returncode == -9, killed.stderr[-2000:]
    last = tmp_path / "runs" / "test" / "version_0" / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=False)["global_step"] == 6
    resumed = subprocess.run(
        [*fsad, "--ckpt_path", "last"], env=env, capture_output=True, text=True, timeout=600
    )
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert sorted(p.name for p in (tmp_path / "runs" / "test").iterdir()) == ["version_0"]  # it went on there

    uninterrupted = write_yaml(tmp_path / "full.yaml", PROMPTAD, data, tmp_path / "full", trainer)
    assert run(["fit", "--config", uninterrupted]) == 0
    expected = torch.load(next((tmp_path / "full").rglob("last.ckpt")), weights_only=False)
    final = torch.load(last, weights_only=False)
    assert final["global_step"] == expected["global_step"] == 8
    assert final["lr_schedulers"] == expected["lr_schedulers"]
    assert set(final["state_dict"]) == set(expected["state_dict"])
    for key, value in expected["state_dict"].items():
        assert torch.allclose(final["state_dict"][key].float(), value.float(), atol=1e-6, rtol=0), key
    [momentum] = [s["momentum_buffer"] for s in final["optimizer_states"][0]["state"].values()][:1]
    [reference] = [s["momentum_buffer"] for s in expected["optimizer_states"][0]["state"].values()][:1]
    assert torch.allclose(momentum, reference, atol=1e-6, rtol=0)
