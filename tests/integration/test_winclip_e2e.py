"""WinCLIP / WinCLIP+ end to end: synthetic MVTec-layout data, the tiny CLIP, Lightning test and predict."""

import math
from pathlib import Path

import lightning
import pytest
import torch

from fsad_lightning.data import FewShotDataModule
from fsad_lightning.data.synthetic import write_synthetic_category
from fsad_lightning.methods.winclip import WinCLIPModule

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
#: one template keeps the text work small; the full WinCLIP lists are covered by tests/unit/test_prompts.py
TINY = dict(model_name="fsad-tiny-vit", pretrained=None, image_size=64, templates=["a photo of a {}."])


@pytest.fixture(scope="module")
def widget_root(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("synthetic")
    write_synthetic_category(root, "widget", n_train=4, n_test_good=3, n_test_defect=2, size=64)
    return str(root)


def _trainer() -> lightning.Trainer:
    return lightning.Trainer(
        accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False,
    )


@pytest.mark.parametrize("zero_shot", [False, True])
def test_winclip_test_and_predict_on_synthetic_category(widget_root, zero_shot):
    module = WinCLIPModule(**TINY, zero_shot=zero_shot)
    datamodule = FewShotDataModule(root=widget_root, category="widget", k_shot=2, image_size=64, batch_size=8)
    trainer = _trainer()
    trainer.test(module, datamodule=datamodule)

    results = module.test_results
    assert "image_auroc" in results and math.isfinite(results["image_auroc"])
    assert module.model.has_reference is not zero_shot
    if zero_shot:
        return
    assert sorted(module.model.references) == ["widget"]
    predictions = trainer.predict(module, datamodule=datamodule)
    scores = torch.cat([p["pred_score"] for p in predictions])
    maps = torch.cat([p["anomaly_map"] for p in predictions])
    assert scores.shape == (3 + 2 * 2,) and torch.isfinite(scores).all()
    assert maps.shape == (7, 64, 64) and torch.isfinite(maps).all()


def test_prompt_name_and_missing_category():
    module = WinCLIPModule(**TINY)
    assert module.prompt_name("metal_nut") == "metal nut"
    named = WinCLIPModule(**TINY, class_name="solar cell")
    assert named.prompt_name("mono") == "solar cell"
    output = named.predict_anomaly({"image": torch.rand(2, 3, 48, 48)})  # no category field: the override
    assert output.pred_score.shape == (2,) and output.anomaly_map.shape == (2, 48, 48)
    with pytest.raises(ValueError, match="class_name"):
        module.predict_anomaly({"image": torch.rand(1, 3, 64, 64)})


@pytest.mark.parametrize("name", ["winclip_mvtec.yaml", "winclip_visa.yaml", "winclip_tiny.yaml"])
def test_configs_name_real_arguments(name, checked_config):
    config = checked_config(CONFIGS / name, "fsad_lightning.methods.winclip.WinCLIPModule", WinCLIPModule)
    if name != "winclip_tiny.yaml":  # real configs name real weights and the paper's setting
        args = config["model"]["init_args"]
        assert (args["model_name"], args["pretrained"], args["image_size"]) == (
            "ViT-B-16-plus-240", "laion400m_e31", 240,
        )


def test_tiny_config_builds_through_the_cli(widget_root, tmp_path):
    from fsad_lightning.commands.lightning_cli import FSADCLI

    cli = FSADCLI(
        args=[
            "--config", str(CONFIGS / "winclip_tiny.yaml"),
            "--data.init_args.dataset", "folder",
            "--data.init_args.root", widget_root,
            "--data.init_args.category", "widget",
            "--trainer.default_root_dir", str(tmp_path),
        ],
        run=False,
    )
    assert isinstance(cli.model, WinCLIPModule)
    assert cli.model.model.backbone.model_name == "fsad-tiny-vit" and cli.model.class_name == "solar cell"
