"""One-to-Normal on the tiny offline twins: personalization, DreamBooth fit, branches, learned state."""

import json

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
    for strength in (0.0, 0.0004):  # round(0.0004 x 1000) = timestep 0: no denoising step
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


def test_personalization_in_slices_matches_one_pass(module, monkeypatch):
    """vae_batch_size and personalization_batch_size bound memory and change no pixel."""
    model = module.model
    model.prepare_prompts("widget")
    model.personalization = SamplingSettings(0.3, 10, 2.0)
    queries = _images(3, seed=6)
    one_pass, index, losses = model.personalize(queries, [4, 5, 6])
    monkeypatch.setattr(model.diffusion, "vae_batch_size", 1)
    monkeypatch.setattr(model, "personalization_batch_size", 2)  # 9 pairs in chunks of 2
    sliced, sliced_index, sliced_losses = model.personalize(queries, [4, 5, 6])
    torch.testing.assert_close(sliced, one_pass, rtol=0, atol=1e-5)
    assert torch.equal(sliced_index, index)
    torch.testing.assert_close(sliced_losses, losses, rtol=0, atol=1e-5)


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


def test_prior_preservation_class_prompt_reads_visa_names_as_english(module, tmp_path, monkeypatch):
    monkeypatch.setitem(module.hparams, "cache_dir", str(tmp_path))
    monkeypatch.setitem(module.hparams, "num_class_images", 1)
    images = module.class_images("pcb1")
    assert images.shape == (1, 3, 32, 32)
    (marker,) = tmp_path.glob("*/pool.json")
    assert json.loads(marker.read_text())["prompts"] == ["a photo of printed circuit board"]
    prompts = module.model.prompts
    with torch.no_grad():
        expected = module.model.diffusion.encode_prompt(["a photo of printed circuit board"])
    torch.testing.assert_close(prompts.class_embeds, expected)
    assert prompts.class_name == "printed circuit board"
    assert all("printed circuit board" in p for p in prompts.personalization_prompts)


def test_fit_makes_class_images_in_the_trainer_precision_and_parks_the_image_encoders(
    tmp_path, monkeypatch, autocast_while_sampling
):
    """Under bf16-mixed the class images are sampled under the trainer's autocast (on_fit_start runs outside
    the Lightning steps); CLIP and the CNN leave the GPU while the UNet trains and come back for test."""
    from lightning import Trainer

    from fsad_lightning.data import FewShotDataModule
    from fsad_lightning.data.synthetic import write_synthetic_category

    monkeypatch.setenv("FSAD_CACHE_DIR", str(tmp_path / "fsad_cache"))
    write_synthetic_category(tmp_path / "data", "widget", n_train=2, n_test_good=1, n_test_defect=1, size=64)
    module = DreamBoothNormalModule(**TINY)
    moves = []
    move = module.model.move_image_encoders
    monkeypatch.setattr(
        module.model, "move_image_encoders", lambda device: moves.append(str(device)) or move(device)
    )
    moves_seen_in_training = []
    step = module.training_step
    monkeypatch.setattr(
        module, "training_step", lambda *a: moves_seen_in_training.append(list(moves)) or step(*a)
    )
    datamodule = FewShotDataModule(
        root=str(tmp_path / "data"), category="widget", k_shot=2, image_size=64, augment=True
    )
    trainer = Trainer(
        accelerator="cpu", precision="bf16-mixed", max_steps=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False,
    )
    trainer.fit(module, datamodule=datamodule)
    assert autocast_while_sampling == [True]  # the one txt2img call of the 2 class images
    assert moves_seen_in_training == [["cpu"]]
    assert moves == ["cpu", str(module.device)]
