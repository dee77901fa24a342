"""`fsad fit` then `fsad test --ckpt_path` with PromptAD: the checkpoint restores the learned prompts.

Tiny offline CLIP (random weights), a synthetic MVTec-layout category at 64 px, 2 shots, 3 epochs.
"""

import json
from pathlib import Path

import pytest
import torch

from fsad_lightning.commands.lightning_cli import run_cli
from fsad_lightning.data.synthetic import write_synthetic_category
from fsad_lightning.methods.promptad import PromptADModule

CONFIG = str(Path(__file__).resolve().parents[2] / "configs" / "promptad_tiny.yaml")
PROMPT_KEYS = {"model.prompt_learner.normal_prefix", "model.prompt_learner.anomaly_suffix"}


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
    # learned state only: the prompt vectors and the epoch counter, never the frozen CLIP
    assert set(stored["state_dict"]) == PROMPT_KEYS | {"trained_epochs"}
    fitted_scores, fitted_maps, _ = score_test_split(fit)

    test = run_cli(["test", "--config", CONFIG, "--ckpt_path", str(checkpoints[0]),
                    "--trainer.enable_progress_bar=false", *data_args])
    learned = dict(test.model.named_parameters())
    for key in PROMPT_KEYS:
        assert torch.equal(learned[key], stored["state_dict"][key])
    # training moved the prompts away from their initialisation (so restoring them is what matters)
    torch.manual_seed(0)  # the CLI's seed_everything default
    fresh = PromptADModule(model_name="fsad-tiny-vit", pretrained=None, image_size=64, memory_layers=[1, 2],
                           vv_layers=2)
    key = "model.prompt_learner.normal_prefix"
    assert not torch.allclose(dict(fresh.named_parameters())[key], stored["state_dict"][key])
    results = json.loads(next(tmp_path.glob("runs/**/results.json")).read_text())
    for metric in ("image_auroc", "pixel_auroc", "pixel_aupro"):
        assert 0.0 <= results[metric] <= 1.0
    restored_scores, restored_maps, _ = score_test_split(test)
    assert torch.allclose(restored_scores, fitted_scores, atol=1e-6)
    assert torch.allclose(restored_maps, fitted_maps, atol=1e-6)
