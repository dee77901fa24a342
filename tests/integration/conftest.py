"""Fixtures of the integration tests: synthetic data and a config writer for in-process `fsad` runs."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest
import torch
import yaml
from fsad_cli import fsad_config

from fsad_lightning.data import FewShotDataModule
from fsad_lightning.data.synthetic import write_synthetic_category


@pytest.fixture
def synthetic_mvtec(tmp_path) -> Path:
    """A writable MVTec-layout root with two categories of 32x32 images (masks included)."""
    root = tmp_path / "data"
    write_synthetic_category(root, "widget", n_train=4, n_test_good=3, n_test_defect=2, size=32, seed=0)
    write_synthetic_category(root, "gadget", n_train=4, n_test_good=2, n_test_defect=2, size=32, seed=1)
    return root


@pytest.fixture
def write_config(tmp_path):
    """Write an fsad config (model / data / trainer, logging to tmp_path/runs/test) into tmp_path and
    return its path."""

    def write(model: dict, data: dict, trainer: dict | None = None, name: str = "config.yaml") -> str:
        path = tmp_path / name
        path.write_text(yaml.safe_dump(fsad_config(model, data, tmp_path / "runs", trainer)))
        return str(path)

    return write


@pytest.fixture
def score_test_split():
    """``score(cli) -> (scores [N], maps [N, H, W], categories)``: the CLI module's outputs on the whole
    test split, shots fitted from the CLI's datamodule (what `fsad test` scores, without the metrics)."""

    def score(cli) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
        module, datamodule = cli.model.eval(), cli.datamodule
        scores, maps, categories = [], [], []
        with torch.no_grad():
            module.fit_shots(datamodule.shot_batch())
            for batch in datamodule.test_dataloader():
                output = module.predict_anomaly(batch)
                scores.append(output.pred_score)
                maps.append(output.anomaly_map)
                categories += batch["category"]
        return torch.cat(scores), torch.cat(maps), categories

    return score


@pytest.fixture
def checked_config():
    """``load(path, class_path, model_class) -> config``: a shipped config, checked to name ``class_path`` and
    the FewShotDataModule, with no ``init_args`` key that the model or the datamodule does not take."""

    def load(path: Path, class_path: str, model_class: type) -> dict:
        config = yaml.safe_load(Path(path).read_text())
        assert config["model"]["class_path"] == class_path
        assert config["data"]["class_path"] == "fsad_lightning.data.FewShotDataModule"
        for section, cls in (("model", model_class), ("data", FewShotDataModule)):
            unknown = set(config[section]["init_args"]) - set(inspect.signature(cls.__init__).parameters)
            assert not unknown, f"{path}: {section} has unknown arguments {unknown}"
        return config

    return load


PATCHKNN = "fsad_lightning.methods.patchknn.PatchKNNModule"


def write_benchmark_config(
    folder: Path,
    root: Path,
    model_class: str = PATCHKNN,
    backbone: str = "tf_efficientnet_lite0",
    image_size: int = 64,
) -> Path:
    """A benchmark config of a PatchKNN-like class with random CNN weights on the data under ``root``."""
    config = folder / "patchknn_tiny.yaml"
    config.write_text(
        f"""
model:
  class_path: {model_class}
  init_args: {{backbone: {backbone}, weights: random, stages: [1, 2]}}
data:
  class_path: fsad_lightning.data.FewShotDataModule
  init_args: {{root: {root}, image_size: {image_size}, batch_size: 8}}
trainer:
  accelerator: cpu
  devices: 1
  enable_progress_bar: false
"""
    )
    return config


def _tiny_benchmark(folder: Path, categories, size: int = 64, n_train: int = 3, **config_options):
    root = folder / "data"
    for seed, category in enumerate(categories):
        write_synthetic_category(
            root, category, n_train=n_train, n_test_good=2, n_test_defect=1, size=size, seed=seed
        )
    return root, write_benchmark_config(folder, root, image_size=size, **config_options)


_tiny_benchmark.config = write_benchmark_config


@pytest.fixture(scope="session")
def tiny_benchmark():
    """``tiny_benchmark(folder, categories, size=64, n_train=3, **config) -> (data root, config)``: synthetic
    categories (``n_train`` train, 2 good and 1 defective test images each) under ``folder/data`` and a
    benchmark config for them (:func:`write_benchmark_config`); ``tiny_benchmark.config(folder, root, ...)``
    writes another config for the same data."""
    return _tiny_benchmark
