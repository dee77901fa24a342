"""AnomalySD on the tiny offline twins: the two fine-tuning phases, per-category inference state, batching
and the zero-shot mode."""

import pytest
import torch

from fsad_lightning.backbones.sampling import path_key
from fsad_lightning.methods.anomalysd import InpaintFinetuneModule

TINY = dict(
    diffusion_model="fsad-tiny-sd-inpaint",
    resolution=32,
    unet_epochs=2,
    decoder_epochs=1,
    num_inference_steps=5,  # int(0.4 x 5) = 2 denoising steps
    scales=[1, 2],
    inpaint_batch_size=4,  # several chunks per batch
    prototype_backbone="tf_efficientnet_lite0",
    prototype_weights="random",
    perceptual_weights="random",
)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    with pytest.MonkeyPatch.context() as patch:
        folder = tmp_path_factory.mktemp("fsad_cache")
        patch.setenv("FSAD_CACHE_DIR", str(folder))  # the tiny SD is built there
        yield folder


@pytest.fixture(scope="module")
def module(cache_dir):
    torch.manual_seed(0)
    return InpaintFinetuneModule(**TINY)


def _images(n, size=64, seed=0):
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _shots():
    return {"image": _images(4, seed=1), "category": ["widget", "widget", "gadget", "gadget"]}


def test_each_phase_trains_only_its_own_parameters(module):
    model = module.model
    assert [module.phase(e) for e in range(3)] == ["unet", "unet", "decoder"]
    unet, decoder = model.unet_parameters(), model.decoder_parameters()
    assert unet and decoder and all(p.dtype == torch.float32 for p in unet + decoder)
    names = {n for n, p in module.named_parameters() if p.requires_grad}
    # the paper's default (Table 3, "epsilon_theta fine-tuned"): every UNet weight learns
    assert {f"model.diffusion.unet.{n}" for n, _ in model.diffusion.unet.named_parameters()} <= names
    assert any(n.startswith("model.diffusion.vae.decoder.") for n in names)  # the whole decoder
    assert not any(n.startswith(("model.diffusion.vae.encoder.", "model.diffusion.text_encoder.")) for n in names)
    model.prepare_prompts(["widget", "gadget"])
    model.train()
    generator = torch.Generator().manual_seed(0)
    images, categories = _images(2), ["widget", "gadget"]
    for step in ("unet", "decoder"):
        module.zero_grad(set_to_none=True)
        if step == "unet":  # eq. 8
            loss = model.inpainting_loss(images, categories, generator)
        else:  # eq. 9-10
            loss = model.decoder_loss(images, generator)["loss"]
        assert torch.isfinite(loss) and loss > 0
        loss.backward()
        trained, untouched = (unet, decoder) if step == "unet" else (decoder, unet)
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in trained)
        assert all(p.grad is None for p in untouched)
    module.zero_grad(set_to_none=True)
    model.eval()
    optimizer = module.configure_optimizers()
    assert [g["name"] for g in optimizer.param_groups] == ["unet", "decoder"]
    assert all(g["lr"] == 1e-4 for g in optimizer.param_groups)


def test_lora_is_the_light_option_and_trains_conv_in(cache_dir):
    light = InpaintFinetuneModule(**{**TINY, "unet_finetune": "lora", "lora_rank": 2, "lora_alpha": 2.0})
    unet = light.model.diffusion.unet
    trained = {n for n, p in unet.named_parameters() if p.requires_grad}
    # conv_in reads the mask and the masked-image latents: it learns whole, the attention through adapters
    assert {"conv_in.weight", "conv_in.bias"} <= trained
    assert all(".lora_" in n for n in trained - {"conv_in.weight", "conv_in.bias"})
    assert all(p.dtype == torch.float32 for p in light.model.unet_parameters())
    base = sum(p.numel() for n, p in unet.named_parameters() if ".lora_" not in n)
    assert sum(p.numel() for p in light.model.unet_parameters()) < base / 2


def test_shots_give_per_category_prompts_and_rotated_prototype_banks(module):
    model = module.model.eval()
    module.fit_shots(_shots())
    assert set(model.prompt_embeds) >= {"widget", "gadget"}
    assert model.prompt_embeds["widget"].shape[0] == len(model.prompts_for("widget"))  # T_c, averaged later
    conditions = model.condition_embeds(["widget", "gadget"])
    assert torch.allclose(conditions[0], model.prompt_embeds["widget"].mean(dim=0))
    # eq. 13: 2 shots x 4 rotations x (32 / 8)^2 positions of the stride-8 stage per category
    for bank in model.prototype_banks.values():
        assert bank.shape[0] == 2 * 4 * 4 * 4
    shot = torch.nn.functional.interpolate(_shots()["image"][:1], size=32, mode="bilinear", antialias=True)
    assert model.error_maps(shot, ["widget"]).abs().max() < 1e-3  # a shot is in its own bank (eq. 14)
    assert model.error_maps(shot, ["gadget"]).max() > 1e-2


def test_scores_do_not_depend_on_batching_and_lambda_is_per_category(module):
    model = module.model.eval()
    module.fit_shots(_shots())
    queries = _images(2, seed=5)
    batch = {"image": queries, "category": ["widget", "gadget"], "path": ["w/0.png", "g/0.png"]}
    together = module.predict_anomaly(batch)
    assert together.pred_score.shape == (2,) and together.anomaly_map.shape == (2, 64, 64)
    assert model.inpaintings_per_query() == 1 + 4 + 1
    for i in range(2):
        alone = module.predict_anomaly({key: value[i : i + 1] for key, value in batch.items()})
        assert torch.allclose(alone.anomaly_map, together.anomaly_map[i : i + 1], atol=1e-5)
    assert torch.equal(together.pred_score, together.anomaly_map.flatten(1).max(dim=1).values)
    detail = model(queries, ["widget", "gadget"], [path_key(p) for p in batch["path"]])
    assert detail.scale_maps.shape == (2, 2, 32, 32) and detail.s_pg.shape == (2, 32, 32)
    assert ((detail.s_pg > 0) <= detail.prototype_mask[:, 0].bool()).all()  # eq. 20: S_pg lives in M^(p)
    model.noise_strength_per_category = {"gadget": 0.8}
    try:
        changed = module.predict_anomaly(batch)
    finally:
        model.noise_strength_per_category = {}
    assert torch.allclose(changed.anomaly_map[0], together.anomaly_map[0], atol=1e-5)  # widget: lambda 0.4
    assert not torch.allclose(changed.anomaly_map[1], together.anomaly_map[1])  # gadget: lambda 0.8


def test_zero_shot_is_training_free_without_prototype_mask(cache_dir):
    zero = InpaintFinetuneModule(**{**TINY, "zero_shot": True})
    assert zero.learning_type == "training_free" and InpaintFinetuneModule.learning_type == "trainable"
    assert not any(p.requires_grad for p in zero.parameters())
    assert zero.model.prototype_encoder is None and zero.configure_optimizers() is None
    assert zero.model.inpaintings_per_query() == 5
    zero.fit_shots(_shots())
    output = zero.predict_anomaly({"image": _images(1), "category": ["widget"], "path": ["q.png"]})
    assert torch.isfinite(output.anomaly_map).all()


@pytest.mark.parametrize(
    "override, message",
    [
        ({"zero_shot": True, "use_prototype_mask": True}, "no prototype-guided mask"),
        ({"unet_finetune": "none"}, "unet_epochs must be 0"),
        ({"unet_epochs": 0, "decoder_epochs": 0}, "nothing to fine-tune"),
        ({"prototype_stages": [2]}, "two stages"),
        ({"diffusion_model": "fsad-tiny-sd"}, "inpaint is needed"),
        ({"scales": [1, 1]}, "scales"),
        ({"scales": [], "use_prototype_mask": False}, "no mask left"),
        ({"threshold_rule": "mean"}, "threshold_rule"),
    ],
)
def test_bad_configuration_is_a_clear_error(cache_dir, override, message):
    with pytest.raises(ValueError, match=message):
        InpaintFinetuneModule(**{**TINY, **override})
