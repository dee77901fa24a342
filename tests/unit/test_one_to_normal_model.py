"""One-to-Normal on the tiny offline twins: personalization, DreamBooth fit, branches, learned state."""

import pytest
import torch

from fsad_lightning.backbones.sampling import SamplingSettings, path_key
from fsad_lightning.data.batch import CATEGORY, IMAGE, PATH
from fsad_lightning.methods.one_to_normal import DreamBoothNormalModule

TINY = dict(
    diffusion_model="fsad-tiny-sd",
    resolution=32,
    num_class_images=2,
    class_inference_steps=2,
    num_inference_steps=10,
    guidance_scale=1.0,
    pool_size=4,
    pool_inference_steps=2,
    image_encoder="cnn",
    cnn_backbone="tf_efficientnet_lite0",
    cnn_stages=[2, 3],
    cnn_weights="random",
    clip_model="fsad-tiny-vit",
    clip_pretrained=None,
    clip_image_size=64,
)


@pytest.fixture(scope="module")
def module(tmp_path_factory):
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(
            "FSAD_CACHE_DIR", str(tmp_path_factory.mktemp("fsad_cache"))
        )  # the tiny SD is built there
        torch.manual_seed(0)
        yield DreamBoothNormalModule(**TINY)


def _images(n, size=64, seed=0):
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def test_personalization_keeps_the_query_as_t_goes_to_zero(module):
    model = module.model
    model.prepare_prompts("widget")
    queries = _images(2)
    for strength in (0.0, 0.05):  # 0.05 x 10 steps leaves no denoising step
        model.personalization = SamplingSettings(strength, 10, 1.0)
        personalized, index, losses = model.personalize(queries, [1, 2])
        assert torch.equal(personalized, queries)
        assert index.tolist() == [0, 0] and losses.shape == (2, 3)


def test_personalization_tries_every_prompt_and_ignores_batching(module):
    model = module.model
    model.prepare_prompts("widget")
    model.personalization = SamplingSettings(0.3, 10, 1.0)
    queries = _images(3)
    keys = [path_key(f"q{i}.png") for i in range(3)]
    personalized, index, losses = model.personalize(queries, keys)
    assert personalized.shape == queries.shape and losses.shape == (3, 3)
    assert torch.equal(index, losses.argmin(dim=1))
    assert not torch.equal(personalized, queries)
    alone, _, alone_losses = model.personalize(queries[1:2], keys[1:2])
    assert torch.allclose(alone[0], personalized[1], atol=1e-4)
    assert torch.allclose(alone_losses[0], losses[1], atol=1e-4)


def test_dreambooth_fit_lowers_the_diffusion_loss_and_trains_lora_only(module):
    model = module.model
    model.prepare_prompts("widget")
    model.set_class_latents(_images(2, size=32, seed=1))
    trainable = model.trainable_parameters()
    assert trainable and all(p.requires_grad for p in trainable)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert all(".lora_" in n and "diffusion.unet." in n for n in names)
    shots = _images(2, size=32, seed=2)
    unet_input = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(3))

    def unet_output():
        with torch.no_grad():
            return model.diffusion.unet(
                unet_input, 500, encoder_hidden_states=model.prompts.instance_embeds
            ).sample

    def evaluate():
        with torch.no_grad():
            return float(model.dreambooth_loss(shots, 1.0, torch.Generator().manual_seed(7))["loss"])

    base_output = unet_output()
    before = evaluate()
    optimizer = torch.optim.AdamW(trainable, lr=5e-3)
    generator = torch.Generator().manual_seed(11)
    for _ in range(12):
        losses = model.dreambooth_loss(shots, 1.0, generator)
        optimizer.zero_grad()
        losses["loss"].backward()
        optimizer.step()
    assert set(losses) == {"loss", "instance_loss", "prior_loss"}
    assert evaluate() < before
    # the base model (adapters off, as for the class images) is untouched by the fit
    assert not torch.allclose(unet_output(), base_output)
    with model.base_model():
        assert torch.allclose(unet_output(), base_output, atol=1e-6)
    # checkpoints keep the adapters (and the epoch counter), never a frozen weight
    checkpoint = {"state_dict": module.state_dict()}
    module.on_save_checkpoint(checkpoint)
    kept = set(checkpoint["state_dict"])
    assert kept == {f"model.{n}" for n in names} | {"trained_epochs"}


def test_branches_switch_scores_and_maps(module):
    model = module.model
    model.prepare_prompts("widget")
    model.personalization = SamplingSettings(0.3, 10, 1.0)
    model.fit_pool(_images(3, seed=4))
    queries = _images(2, seed=5)
    keys = [1, 2]
    full = model(queries, keys)
    assert full.pred_score.shape == (2,) and full.anomaly_map.shape == (2, 64, 64)
    assert torch.allclose(full.pred_score, full.s_p + model.alpha * full.s_n + model.beta * full.s_text)
    assert ((full.s_text >= 0) & (full.s_text <= 1)).all()
    try:
        model.use_personalized, model.use_pool = False, False
        text_only = model(queries, keys)
        assert text_only.anomaly_map is None and text_only.s_p is None
        assert torch.allclose(text_only.pred_score, model.beta * full.s_text, atol=1e-5)
        model.use_pool, model.use_text = True, False
        pool_only = model(queries, keys)
        assert torch.allclose(pool_only.pred_score, full.s_n, atol=1e-5)
        # a normal pool image scores (close to) zero against a bank that contains it
        assert float(model(_images(3, seed=4)[:1], [0]).pred_score) < 1e-4
    finally:
        model.use_personalized = model.use_pool = model.use_text = True


def test_one_category_per_model(module):
    batch = {IMAGE: _images(2), CATEGORY: ["a", "b"], PATH: ["x", "y"]}
    with pytest.raises(ValueError, match=r"one customized diffusion model per category"):
        module.predict_anomaly(batch)


@pytest.mark.parametrize(
    "override, message",
    [
        ({"use_personalized": False, "use_pool": False, "use_text": False}, "enable at least one branch"),
        ({"strength": 1.5}, "strength must be in"),
        ({"pool_size": 0}, "pool_size must be"),
        ({"diffusion_model": "/no/such/sd"}, "diffusion_model"),
    ],
)
def test_bad_configuration_is_a_clear_error(override, message):
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        DreamBoothNormalModule(**{**TINY, **override})
