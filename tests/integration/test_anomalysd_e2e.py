"""AnomalySD end to end, multi-class: `fsad fit` on the shots of two synthetic categories in one run (UNet
LoRA phase, then decoder phase), `fsad test --ckpt_path` reproducing the scores, and the zero-shot mode
tested without a fit. Offline tiny twins (configs/anomalysd_tiny.yaml) at 32 px, scales [1, 2], one
denoising step."""

import json
from pathlib import Path

import pytest
import torch

from fsad_lightning.backbones.diffusion_zoo import load_diffusion_model
from fsad_lightning.commands.lightning_cli import run_cli
from fsad_lightning.methods.anomalysd import InpaintFinetuneModule
from fsad_lightning.methods.anomalysd import module as anomalysd_module

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
CONFIG = str(CONFIGS / "anomalysd_tiny.yaml")
DECODER_PREFIXES = ("model.diffusion.vae.decoder.", "model.diffusion.vae.post_quant_conv.")


@pytest.fixture
def common_args(synthetic_mvtec, tmp_path, monkeypatch):
    monkeypatch.setenv("FSAD_CACHE_DIR", str(tmp_path / "fsad_cache"))  # where the tiny SD is built
    monkeypatch.chdir(tmp_path)  # the CLI logs to ./runs
    return [
        "--config",
        CONFIG,
        f"--data.init_args.root={synthetic_mvtec}",
        "--data.init_args.dataset=folder",
        "--data.init_args.category=all",
        "--data.init_args.k_shot=2",
        "--data.init_args.image_size=32",
        "--data.init_args.batch_size=8",
        "--model.init_args.class_names=null",
        "--model.init_args.num_inference_steps=4",  # int(0.4 x 4) = 1 denoising step
        "--model.init_args.scales=[1, 2]",
        "--model.init_args.prototype_weights=random",
        "--trainer.enable_progress_bar=false",
    ]


@pytest.mark.slow
def test_multiclass_fit_then_test_from_checkpoint(common_args, tmp_path, score_test_split):
    fit = run_cli(["fit", *common_args])
    assert int(fit.model.trained_epochs) == 3  # 2 UNet epochs + 1 decoder epoch
    assert fit.datamodule.categories == ["gadget", "widget"]
    checkpoints = sorted(tmp_path.glob("runs/**/last.ckpt"))
    assert len(checkpoints) == 1, checkpoints
    state = torch.load(checkpoints[0], map_location="cpu", weights_only=False)["state_dict"]
    # learned state only: the UNet's LoRA adapters and conv_in (the light option), the decoder, the epochs
    lora = {k for k in state if k.startswith("model.diffusion.unet.") and ".lora_" in k}
    conv_in = {"model.diffusion.unet.conv_in.weight", "model.diffusion.unet.conv_in.bias"}
    decoder = {k for k in state if k.startswith(DECODER_PREFIXES)}
    assert lora and decoder and set(state) == lora | conv_in | decoder | {"trained_epochs"}
    # both phases trained: LoRA B moved from zero (UNet phase) and the decoder from its weights (decoder phase)
    assert any(state[k].abs().sum() > 0 for k in lora if ".lora_B." in k)
    base_decoder = load_diffusion_model("fsad-tiny-sd-inpaint", "inpaint").vae.state_dict()
    assert any(
        not torch.equal(state[k], base_decoder[k[len("model.diffusion.vae."):]]) for k in decoder
    )
    fitted_scores, fitted_maps, categories = score_test_split(fit)
    assert set(categories) == {"gadget", "widget"}  # one model scores every category
    assert set(fit.model.model.prototype_banks) == {"gadget", "widget"}

    test = run_cli(["test", *common_args, "--ckpt_path", str(checkpoints[0])])
    results = json.loads(next(tmp_path.glob("runs/**/results.json")).read_text())
    for metric in ("image_auroc", "pixel_auroc", "pixel_aupro"):
        assert 0.0 <= results[metric] <= 1.0
    assert set(results["per_category"]) == {"gadget", "widget"}  # one model, results per category
    restored = dict(test.model.named_parameters())
    for key in sorted(lora)[:3] + sorted(decoder)[:3]:
        assert torch.equal(restored[key], state[key])
    restored_scores, restored_maps, _ = score_test_split(test)
    assert torch.isfinite(restored_scores).all()
    assert torch.allclose(restored_scores, fitted_scores, atol=1e-5)
    assert torch.allclose(restored_maps, fitted_maps, atol=1e-5)


@pytest.mark.slow
def test_zero_shot_tests_without_fit_and_a_wrong_schedule_fails(common_args, tmp_path):
    fit = run_cli(["fit", *common_args, "--model.init_args.zero_shot=true"])  # e.g. from `fsad benchmark`
    assert int(fit.model.trained_epochs) == 0 and fit.trainer.global_step == 0  # nothing to learn: stops at once
    test = run_cli(["test", *common_args, "--model.init_args.zero_shot=true"])
    assert test.model.learning_type == "training_free" and not any(p.requires_grad for p in test.model.parameters())
    assert test.model.model.prototype_encoder is None  # no shots in the 0-shot setting
    assert 0.0 <= test.model.test_results["image_auroc"] <= 1.0
    with pytest.raises(ValueError, match="max_epochs to 3"):
        run_cli(["fit", *common_args, "--trainer.max_epochs=2"])


@pytest.mark.parametrize("name", ["mvtec", "visa", "tiny"])
def test_configs_name_real_arguments(name, checked_config):
    config = checked_config(
        CONFIGS / f"anomalysd_{name}.yaml", "fsad_lightning.methods.anomalysd.InpaintFinetuneModule", InpaintFinetuneModule
    )
    model, data = config["model"]["init_args"], config["data"]["init_args"]
    assert config["trainer"]["max_epochs"] == model["unet_epochs"] + model["decoder_epochs"]
    if name != "tiny":  # the paper's settings (§4, §5.1)
        assert (model["resolution"], data["image_size"], data["train_batch_size"]) == (512, 512, 8)
        assert (model["unet_epochs"], model["decoder_epochs"], model["learning_rate"]) == (4000, 200, 1e-4)
        assert (model["lpips_weight"], model["alpha"], model["sigma"]) == (0.1, 0.1, 4.0)
        assert model["iou_thresholds"] == [0.0, 0.2, 0.5] and model["scales"] == [1, 2, 4, 8]
        assert (model["num_inference_steps"], model["prototype_backbone"]) == (50, "tf_efficientnet_b6")
        assert data["category"] == "all" and data["augment"] is True
        assert model["unet_finetune"] == "full"  # Table 3: the whole denoising network is fine-tuned
        # one lambda for every category: per-category values would have to come from held-out normals
        assert model["noise_strength"] == 0.4 and not model["noise_strength_per_category"]
        guidance = " ".join(anomalysd_module.__doc__.split())  # how per-category values may be chosen
        assert "held-out split of *normal* images" in guidance and "never ``test/``" in guidance
        assert model["threshold_rule"] == "otsu" and model["diffusion_dtype"] is None
        assert (model["inpaint_batch_size"], model["vae_batch_size"]) == (32, 8)
