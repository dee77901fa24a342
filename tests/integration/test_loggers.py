"""Loggers offline: W&B (metrics, config, manifest artifact, overlays) through ``fsad benchmark``, and
TensorBoard through ``fsad test``. WANDB_MODE=offline comes from tests/conftest.py."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from PIL import Image

from fsad_lightning.callbacks.visualizer import MIN_PANEL_SIZE
from fsad_lightning.commands.benchmark import benchmark_main
from fsad_lightning.commands.lightning_cli import run_cli
from fsad_lightning.data.synthetic import write_synthetic_category

REPO = Path(__file__).resolve().parents[2]
SIZE = 64


@pytest.fixture(autouse=True)
def _fsad_argv(monkeypatch):
    """In-process ``fsad`` calls see a bare command line (LightningCLI warns about pytest's own arguments)."""
    monkeypatch.setattr(sys, "argv", sys.argv[:1])


@pytest.fixture(scope="module")
def base_config(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("loggers")
    root = folder / "data"
    write_synthetic_category(root, "alpha", n_train=2, n_test_good=2, n_test_defect=1, size=SIZE, seed=0)
    config = folder / "patchknn.yaml"
    config.write_text(
        f"""
model:
  class_path: fsad_lightning.methods.patchknn.PatchKNNModule
  init_args: {{backbone: tf_efficientnet_lite0, weights: random, stages: [1, 2]}}
data:
  class_path: fsad_lightning.data.FewShotDataModule
  init_args: {{root: {root}, category: alpha, k_shot: 1, image_size: {SIZE}, batch_size: 8}}
trainer:
  accelerator: cpu
  devices: 1
  enable_progress_bar: false
"""
    )
    return config


def _offline_run(folder: Path) -> tuple[Path, bytes]:
    runs = sorted((folder / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, f"expected one offline W&B run under {folder}, found {runs}"
    records = list(runs[0].glob("run-*.wandb"))
    assert len(records) == 1
    return runs[0], records[0].read_bytes()


def test_wandb_logger_by_config_logs_metrics_config_manifest_and_overlays(base_config, tmp_path):
    logger_config = tmp_path / "wandb.yaml"
    logger_config.write_text(
        "trainer:\n  logger:\n    class_path: lightning.pytorch.loggers.WandbLogger\n"
        "    init_args: {project: fsad-tests}\n"
    )
    output = tmp_path / "bench"
    benchmark_main(
        [
            "--config",
            str(base_config),
            "--config",
            str(logger_config),
            "--config",
            str(REPO / "callbacks" / "visualize.yaml"),
            "--shots",
            "1",
            "--seeds",
            "0",
            "--output",
            str(output),
            "--wandb",
        ]
    )
    import wandb

    wandb.teardown()  # stop the W&B service, so its offline run files are flushed before they are read
    run_folder = output / "runs" / "alpha" / "k1" / "s0"
    results = json.loads((run_folder / "results.json").read_text())
    assert 0.0 <= results["image_auroc"] <= 1.0

    # the per-run W&B run lives in the run folder: metrics, resolved config, manifest (config + artifact)
    offline, records = _offline_run(run_folder)
    for key in (
        b"image_auroc",
        b"pixel_aupro",
        b"fsad_config",
        b"tf_efficientnet_lite0",
        b"manifest-alpha-k1-s0",
    ):
        assert key in records, key
    # the overlays and the worst-case sheet as wandb.Image media, and as PNGs in the run folder
    media = sorted((offline / "files" / "media" / "images" / "test").glob("*.png"))
    assert sum(p.name.startswith("overlays") for p in media) == 4  # every test image (max_images: null)
    assert sum(p.name.startswith("worst_cases") for p in media) == 1
    overlays = sorted((run_folder / "images" / "alpha").rglob("*.png"))
    assert len(overlays) == 4
    for path in overlays:
        with Image.open(path) as image:
            # three panels upscaled to MIN_PANEL_SIZE under a title and labels, beside a colour bar
            assert (
                image.format == "PNG" and image.width > 3 * MIN_PANEL_SIZE and image.height > MIN_PANEL_SIZE
            )
    assert (run_folder / "images" / "worst_cases.png").is_file()

    # --wandb: the benchmark's mean row in a W&B run of its own
    _, summary = _offline_run(output)
    assert b"benchmark/k1/image_auroc" in summary and b"table/data" in summary


def test_tensorboard_logger(base_config, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_cli(
        [
            "test",
            "--config",
            str(base_config),
            "--trainer.logger=lightning.pytorch.loggers.TensorBoardLogger",
            f"--trainer.logger.init_args.save_dir={tmp_path}",
            "--trainer.logger.init_args.name=tb",
            "--trainer.logger.init_args.version=v0",
        ]
    )
    log_dir = tmp_path / "tb" / "v0"
    assert (log_dir / "results.json").is_file() and (log_dir / "manifest.json").is_file()
    events = EventAccumulator(str(log_dir))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"image_auroc", "pixel_auroc"} <= tags
    measured = json.loads((log_dir / "results.json").read_text())["image_auroc"]
    assert events.Scalars("image_auroc")[-1].value == pytest.approx(measured, abs=1e-6)
