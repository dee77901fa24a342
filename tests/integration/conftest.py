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
