"""`fsad fit` then `fsad test --ckpt_path` with PromptAD: the checkpoint restores both learned prompt sets.

Tiny offline CLIP (random weights), a synthetic MVTec-layout category at 64 px, 2 shots, 3 epochs (the
image-level set trains all 3, the pixel-level set the first).
"""

import inspect
import json
from pathlib import Path

import pytest
import torch

from fsad_lightning.commands.lightning_cli import run_cli
from fsad_lightning.data.synthetic import write_synthetic_category
from fsad_lightning.methods.promptad import PromptADModule

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
CONFIG = str(CONFIGS / "promptad_tiny.yaml")
PROMPT_KEYS = {
    f"model.{prompt_set}_prompts.{name}"
    for prompt_set in ("image", "pixel")
    for name in ("normal_prefix", "anomaly_suffix")
}


@pytest.mark.slow
def test_fit_then_test_from_checkpoint_reproduces_the_scores(tmp_path, monkeypatch, score_test_split):
    monkeypatch.chdir(tmp_path)  # the CLI logs to ./runs
    write_synthetic_category(tmp_path / "data", "widget", n_train=4, n_test_good=2, n_test_defect=2, size=64)
    data_args = [
        f"--data.init_args.root={tmp_path / 'data'}",
        "--data.init_args.dataset=folder",
        "--data.init_args.category=widget",
        # = the model's CLIP image_size: Lightning's logger refuses module and datamodule hparams that share
        # a name with different values
        "--data.init_args.image_size=64",
        "--data.init_args.batch_size=8",
        "--model.init_args.class_name=null",
        '--model.init_args.anomaly_suffixes=["with flaw", "with a crack", "with a stain"]',
    ]
    fit = run_cli(["fit", "--config", CONFIG, "--trainer.max_epochs=3", "--trainer.enable_progress_bar=false",
                   *data_args])
    assert int(fit.model.trained_epochs) == 3
    checkpoints = sorted(tmp_path.glob("runs/**/*.ckpt"))
    assert len(checkpoints) == 1, checkpoints
    stored = torch.load(checkpoints[0], map_location="cpu", weights_only=False)
    # learned state only: both sets' prompt vectors and the epoch counter, never the frozen CLIP
    assert set(stored["state_dict"]) == PROMPT_KEYS | {"trained_epochs"}
    assert stored["state_dict"]["model.image_prompts.normal_prefix"].shape[0] == 3  # N of each set
    assert stored["state_dict"]["model.pixel_prompts.normal_prefix"].shape[0] == 1
    fitted_scores, fitted_maps, _ = score_test_split(fit)

    test = run_cli(["test", "--config", CONFIG, "--ckpt_path", str(checkpoints[0]),
                    "--trainer.enable_progress_bar=false", *data_args])
    learned = dict(test.model.named_parameters())
    for key in PROMPT_KEYS:
        assert torch.equal(learned[key], stored["state_dict"][key])
    # training moved both sets away from their initialisation (so restoring them is what matters)
    torch.manual_seed(0)  # the CLI's seed_everything default
    fresh = PromptADModule(model_name="fsad-tiny-vit", pretrained=None, image_size=64, memory_layers=[1, 2])
    for key in PROMPT_KEYS:
        assert not torch.allclose(dict(fresh.named_parameters())[key], stored["state_dict"][key]), key
    results = json.loads(next(tmp_path.glob("runs/**/results.json")).read_text())
    for metric in ("image_auroc", "pixel_auroc", "pixel_aupro"):
        assert 0.0 <= results[metric] <= 1.0
    restored_scores, restored_maps, _ = score_test_split(test)
    assert torch.allclose(restored_scores, fitted_scores, atol=1e-6)
    assert torch.allclose(restored_maps, fitted_maps, atol=1e-6)


@pytest.mark.parametrize("name", ["mvtec", "visa", "tiny"])
def test_configs_name_real_arguments_and_the_official_settings(name, checked_config):
    config = checked_config(CONFIGS / f"promptad_{name}.yaml", "fsad_lightning.methods.promptad.PromptADModule",
                            PromptADModule)
    if name != "tiny":  # the paper configs spell out the defaults, i.e. the official settings
        # (tests/unit/test_promptad_fidelity.py pins the defaults); vv_layers 12 = null = every block
        args = config["model"]["init_args"]
        defaults = {k: p.default for k, p in inspect.signature(PromptADModule).parameters.items()}
        for key in set(args) & set(defaults) - {"vv_layers"}:
            assert args[key] == defaults[key], key
        assert args["vv_layers"] == 12 and defaults["vv_layers"] is None
        assert config["trainer"]["max_epochs"] == 100  # = image_epochs (null); pixel_epochs 1
