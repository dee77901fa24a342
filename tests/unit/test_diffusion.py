"""The Stable Diffusion backbone on the offline tiny twin: sampling, losses, LoRA, textual inversion."""

import os

import pytest
import torch

from fsad_lightning.backbones.diffusion import (
    StableDiffusion,
    TrainableTokenEmbedding,
    add_token,
    add_unet_lora,
    average_prompt_embeds,
    img2img_timesteps,
    load_lora,
    load_stable_diffusion,
    lora_state_dict,
    make_scheduler,
    noise_prediction_loss,
    save_lora,
    set_gradient_checkpointing,
)
from fsad_lightning.backbones.tiny import build_tiny_stable_diffusion, tiny_stable_diffusion_components

SIZE = 16  # pixels; the tiny VAE's scale factor is 2, so latents are 8 x 8


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def sd(tmp_path_factory):
    path = build_tiny_stable_diffusion(tmp_path_factory.getbasetemp() / "tiny_sd_txt2img")
    return load_stable_diffusion(path)


@pytest.fixture(scope="module")
def sd_inpaint(tmp_path_factory):
    path = build_tiny_stable_diffusion(tmp_path_factory.getbasetemp() / "tiny_sd_inpaint", kind="inpaint")
    return load_stable_diffusion(path, kind="inpaint")


@pytest.fixture
def fresh_sd():
    """A private copy (built in memory, same weights as the saved twin) for tests that add parameters."""
    return StableDiffusion(**tiny_stable_diffusion_components(seed=0))


@pytest.fixture(scope="module")
def images():
    return torch.rand(2, 3, SIZE, SIZE, generator=_generator(1))


@pytest.fixture(scope="module")
def prompts(sd):
    with torch.no_grad():
        return sd.encode_prompt(["a photo of a flawless bottle", "a photo of a bottle"])


# ---------------------------------------------------------------------------------------- loading errors
def test_missing_hub_model_fails_with_one_line_naming_id_and_config_key():
    with pytest.raises(FileNotFoundError) as info:
        load_stable_diffusion("fsad-test/no-such-model", config_key="pretrained_model")
    message = str(info.value)
    assert "\n" not in message
    assert "fsad-test/no-such-model" in message and "`pretrained_model`" in message
    assert "unreachable" in message


def test_local_folder_without_model_index_or_subfolder(tmp_path):
    with pytest.raises(FileNotFoundError, match="model_index.json") as info:
        load_stable_diffusion(str(tmp_path), config_key="model")
    assert "\n" not in str(info.value) and str(tmp_path) in str(info.value) and "`model`" in str(info.value)
    (tmp_path / "model_index.json").write_text("{}")
    (tmp_path / "unet").mkdir()
    with pytest.raises(FileNotFoundError, match="vae"):
        load_stable_diffusion(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_stable_diffusion(str(tmp_path / "absent"))


# ---------------------------------------------------------------------------------------- prompts and VAE
def test_prompt_embeddings_and_ensemble(sd, prompts):
    assert prompts.shape == (2, 77, 32)
    mean = average_prompt_embeds(prompts)
    assert mean.shape == (1, 77, 32)
    torch.testing.assert_close(mean[0], (prompts[0] + prompts[1]) / 2)
    with torch.no_grad():
        torch.testing.assert_close(
            sd.encode_prompt_ensemble(["a photo of a flawless bottle", "a photo of a bottle"]), mean
        )
        assert sd.unconditional_embeds().shape == (1, 77, 32)
    with pytest.raises(ValueError):
        sd.encode_prompt("not a list")


def test_encode_decode_shapes_range_and_sampling(sd, images):
    with torch.no_grad():
        latents = sd.encode_images(images)
        decoded = sd.decode_latents(latents)
        sample_a = sd.encode_images(images, generator=_generator(0), sample=True)
        sample_b = sd.encode_images(images, generator=_generator(0), sample=True)
    assert latents.shape == (2, 4, SIZE // 2, SIZE // 2)
    assert decoded.shape == images.shape and decoded.min() >= 0 and decoded.max() <= 1
    assert torch.equal(sample_a, sample_b) and not torch.equal(sample_a, latents)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        sd.encode_images(images * 255)
    with pytest.raises(ValueError, match="multiple"):
        sd.encode_images(images[..., :15, :15])


# ---------------------------------------------------------------------------------------- img2img / txt2img
def test_img2img_strength_zero_is_the_vae_reconstruction(sd, images, prompts):
    with torch.no_grad():
        reconstruction = sd.decode_latents(sd.encode_images(images))
    out = sd.img2img(images, prompts, strength=0.0, num_inference_steps=4)
    torch.testing.assert_close(out, reconstruction)
    # a noise ratio that rounds to timestep 0 leaves nothing to denoise either
    torch.testing.assert_close(
        sd.img2img(images, prompts, strength=0.0004, num_inference_steps=4), reconstruction
    )
    edited = sd.img2img(images, prompts, strength=0.5, num_inference_steps=4, generator=_generator(0))
    assert edited.shape == images.shape and not torch.allclose(edited, reconstruction)
    with pytest.raises(ValueError, match="strength"):
        sd.img2img(images, prompts, strength=1.5)


def test_img2img_matches_the_diffusers_pipeline_and_reuses_latents(sd, images, prompts):
    """Noise, guidance, DDIM steps and decode as diffusers' pipeline runs them on the same timesteps: the
    pipeline gets the explicit schedule (500, 250 for strength 0.5 of 4 steps) as custom timesteps and
    strength 1, which noises the latents at the first of them."""
    from diffusers import DDIMScheduler, StableDiffusionImg2ImgPipeline

    class ExplicitDDIM(DDIMScheduler):  # DDIM with the custom timesteps the pipeline can pass
        def set_timesteps(self, num_inference_steps=None, device=None, timesteps=None):
            super().set_timesteps(4, device=device)  # the stride T // 4 of the full schedule
            self.timesteps = torch.tensor(timesteps, device=device)

    with torch.no_grad():
        latents = sd.encode_images(images)
        negative = sd.unconditional_embeds().expand(2, -1, -1)
    ours = sd.img2img(
        None,
        prompts,
        strength=0.5,
        num_inference_steps=4,
        guidance_scale=3.0,
        generator=_generator(3),
        latents=latents,
    )
    again = sd.img2img(
        images, prompts, strength=0.5, num_inference_steps=4, guidance_scale=3.0, generator=_generator(3)
    )
    torch.testing.assert_close(ours, again)
    pipeline = StableDiffusionImg2ImgPipeline(
        vae=sd.vae,
        text_encoder=sd.text_encoder,
        tokenizer=sd.tokenizer,
        unet=sd.unet,
        scheduler=ExplicitDDIM.from_config(sd.scheduler.config),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipeline.set_progress_bar_config(disable=True)
    reference = pipeline(
        image=latents,
        prompt_embeds=prompts,
        negative_prompt_embeds=negative,
        strength=1.0,
        timesteps=img2img_timesteps(1000, 4, 0.5),
        guidance_scale=3.0,
        generator=_generator(3),
        output_type="pt",
    ).images
    torch.testing.assert_close(ours, reference, atol=1e-4, rtol=1e-4)


#: Stable Diffusion 1.5's published scheduler/scheduler_config.json (diffusers format)
SD15_SCHEDULER_CONFIG = {
    "_class_name": "PNDMScheduler",
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
    "clip_sample": False,
}


@pytest.mark.parametrize("scheduler", ["DDIMScheduler", "DDPMScheduler", "EulerDiscreteScheduler"])
def test_img2img_starts_at_the_noise_ratio_whatever_the_step_count(scheduler):
    """One-to-Normal's t (0.3) and ADP's SDEdit strength (0.5) are noise ratios: the first timestep the
    UNet sees is within 10 of strength x 1000 for 10 to 50 steps (SD 1.5's leading spacing kept the last
    int(0.3 x 20) = 6 of 20 steps and started at 251), the latents are noised to that timestep, and the
    schedule steps down evenly to the clean image."""
    components = tiny_stable_diffusion_components(seed=0)
    components["scheduler"] = make_scheduler(scheduler, SD15_SCHEDULER_CONFIG)
    model = StableDiffusion(**components)
    seen: list[float] = []
    model.unet.register_forward_pre_hook(lambda module, args: seen.append(float(args[1])))
    noised_at: list[float] = []
    add_noise = model.scheduler.add_noise
    model.scheduler.add_noise = lambda x, noise, t: noised_at.append(float(t[0])) or add_noise(x, noise, t)
    with torch.no_grad():
        prompt = model.encode_prompt(["a photo of a bottle"])
    images = torch.rand(1, 3, SIZE, SIZE, generator=_generator(0))
    for strength in (0.3, 0.5):
        for steps in (10, 20, 30, 50):
            seen.clear()
            noised_at.clear()
            model.img2img(images, prompt, strength, steps, guidance_scale=1.0, generator=_generator(1))
            assert abs(seen[0] - strength * 1000) <= 10, (strength, steps, seen[0])
            assert noised_at == [seen[0]]
            gaps = {round(a - b) for a, b in zip(seen, seen[1:])}
            assert gaps == {1000 // steps} and 0 < seen[-1] <= 1000 // steps


def test_img2img_refuses_a_scheduler_that_cannot_start_at_the_noise_ratio(images, prompts):
    components = tiny_stable_diffusion_components(seed=0)
    components["scheduler"] = make_scheduler("PNDMScheduler", SD15_SCHEDULER_CONFIG)
    with pytest.raises(ValueError, match="PNDMScheduler cannot do: use scheduler DDIMScheduler"):
        StableDiffusion(**components).img2img(images, prompts, 0.3, 20)


def test_vae_slices_give_the_one_pass_result(fresh_sd, images):
    batch = torch.cat([images, images.flip(-1), images.flip(-2)])  # 6 images
    with torch.no_grad():
        latents = fresh_sd.encode_images(batch)
        sampled = fresh_sd.encode_images(batch, generator=_generator(4), sample=True)
        decoded = fresh_sd.decode_latents(latents)
        fresh_sd.set_vae_batch_size(4)  # slices of 4 and 2
        passes = []
        for part in (fresh_sd.vae.encoder, fresh_sd.vae.decoder):
            part.register_forward_pre_hook(lambda module, args: passes.append(args[0].shape[0]))
        torch.testing.assert_close(fresh_sd.encode_images(batch), latents, rtol=0, atol=1e-6)
        assert passes == [4, 2]
        passes.clear()
        torch.testing.assert_close(
            fresh_sd.encode_images(batch, generator=_generator(4), sample=True), sampled, rtol=0, atol=1e-6
        )
        torch.testing.assert_close(fresh_sd.decode_latents(latents), decoded, rtol=0, atol=1e-6)
        assert passes == [4, 2, 4, 2]  # the sampled encode, then the decode
    with pytest.raises(ValueError, match="vae_batch_size must be a positive integer or None"):
        StableDiffusion(**tiny_stable_diffusion_components(seed=0), vae_batch_size=0)


def test_txt2img_shape_and_determinism(sd, prompts):
    kwargs = {"num_images": 2, "height": SIZE, "width": 24, "num_inference_steps": 2, "guidance_scale": 2.0}
    first = sd.txt2img(prompts[:1], generator=_generator(0), **kwargs)
    second = sd.txt2img(prompts[:1], generator=_generator(0), **kwargs)
    other = sd.txt2img(prompts[:1], generator=_generator(1), **kwargs)
    assert first.shape == (2, 3, SIZE, 24)
    assert torch.equal(first, second) and not torch.allclose(first, other)
    # one generator per image: image i depends on its own generator only
    per_image = sd.txt2img(prompts, generator=[_generator(5), _generator(6)], **kwargs)
    alone = sd.txt2img(prompts[1:], generator=[_generator(6)], **{**kwargs, "num_images": 1})
    torch.testing.assert_close(per_image[1:], alone, atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------------------------------- inpainting
def test_inpaint_shape_paste_back_and_latent_reuse(sd_inpaint, images, prompts):
    masks = torch.zeros(3, 1, SIZE, SIZE)
    masks[0, :, :8, :8] = 1
    masks[1, :, 4:12, 4:12] = 1
    masks[2, :, :, 8:] = 1
    query = images[:1]  # one query, many masks (AnomalySD)
    out = sd_inpaint.inpaint(
        query, masks, prompts[:1], num_inference_steps=2, generator=_generator(0), paste_back=True
    )
    assert out.shape == (3, 3, SIZE, SIZE)
    keep = masks.expand(-1, 3, -1, -1) == 0
    assert torch.equal(out[keep], query.expand(3, -1, -1, -1)[keep])

    with torch.no_grad():
        image_latents = sd_inpaint.encode_images(query)
    reused = sd_inpaint.inpaint(
        query,
        masks,
        prompts[:1],
        num_inference_steps=4,
        strength=0.5,
        generator=_generator(1),
        image_latents=image_latents,
    )
    encoded = sd_inpaint.inpaint(
        query, masks, prompts[:1], num_inference_steps=4, strength=0.5, generator=_generator(1)
    )
    torch.testing.assert_close(reused, encoded)


def test_inpaint_matches_the_diffusers_pipeline(sd_inpaint, images, prompts):
    from diffusers import StableDiffusionInpaintPipeline

    masks = torch.zeros(2, 1, SIZE, SIZE)
    masks[:, :, 4:12, 2:10] = 1
    with torch.no_grad():
        condition = sd_inpaint.inpaint_conditioning(images, masks)
        negative = sd_inpaint.unconditional_embeds().expand(2, -1, -1)
    assert condition.shape == (2, 5, SIZE // 2, SIZE // 2)
    assert torch.equal(condition[:, :1], masks[:, :, ::2, ::2])  # mask first, then masked-image latents
    ours = sd_inpaint.inpaint(
        images, masks, prompts, num_inference_steps=3, guidance_scale=3.0, generator=_generator(2)
    )
    pipeline = StableDiffusionInpaintPipeline(
        vae=sd_inpaint.vae,
        text_encoder=sd_inpaint.text_encoder,
        tokenizer=sd_inpaint.tokenizer,
        unet=sd_inpaint.unet,
        scheduler=sd_inpaint.scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipeline.set_progress_bar_config(disable=True)
    reference = pipeline(
        image=images,
        mask_image=masks,
        masked_image_latents=condition[:, 1:],
        prompt_embeds=prompts,
        negative_prompt_embeds=negative,
        height=SIZE,
        width=SIZE,
        strength=1.0,
        num_inference_steps=3,
        guidance_scale=3.0,
        generator=_generator(2),
        output_type="pt",
    ).images
    torch.testing.assert_close(ours, reference, atol=1e-4, rtol=1e-4)


def test_inpaint_needs_the_inpainting_unet_and_matching_masks(sd, sd_inpaint, images, prompts):
    masks = torch.ones(2, 1, SIZE, SIZE)
    with pytest.raises(ValueError, match="kind='inpaint'"):
        sd.inpaint(images, masks, prompts, num_inference_steps=1)
    with pytest.raises(ValueError, match="masks"):
        sd_inpaint.inpaint(images, masks[..., :8], prompts, num_inference_steps=1)
    with pytest.raises(ValueError, match="inpainting model"):
        sd_inpaint.txt2img(prompts, 1, SIZE, SIZE, num_inference_steps=1)


# ---------------------------------------------------------------------------------------- training losses
def test_noise_prediction_loss_epsilon_v_prediction_and_inpaint(sd, sd_inpaint, images, prompts):
    from diffusers import DDPMScheduler

    with torch.no_grad():
        latents = sd.encode_images(images)
    timesteps, noise = torch.tensor([10, 700]), torch.randn(latents.shape, generator=_generator(0))
    epsilon = noise_prediction_loss(
        sd.unet, sd.training_scheduler, latents, prompts, timesteps=timesteps, noise=noise
    )
    v_scheduler = DDPMScheduler.from_config(sd.training_scheduler.config, prediction_type="v_prediction")
    velocity = noise_prediction_loss(sd.unet, v_scheduler, latents, prompts, timesteps=timesteps, noise=noise)
    per_sample = sd.noise_prediction_loss(latents, prompts, generator=_generator(0), reduction="none")
    assert epsilon.ndim == 0 and torch.isfinite(epsilon) and torch.isfinite(velocity)
    assert not torch.isclose(epsilon, velocity)
    assert per_sample.shape == (2,) and torch.isfinite(per_sample).all()
    assert torch.equal(
        per_sample, sd.noise_prediction_loss(latents, prompts, generator=_generator(0), reduction="none")
    )

    with torch.no_grad():
        condition = sd_inpaint.inpaint_conditioning(images, torch.ones(2, 1, SIZE, SIZE))
    inpaint_loss = sd_inpaint.noise_prediction_loss(
        latents, prompts[:1], generator=_generator(0), extra_unet_channels=condition
    )
    assert torch.isfinite(inpaint_loss)
    with pytest.raises(ValueError, match="input channels"):
        sd_inpaint.noise_prediction_loss(latents, prompts)
    with pytest.raises(ValueError, match="reduction"):
        sd.noise_prediction_loss(latents, prompts, reduction="sum")


def test_gradient_checkpointing_toggle_and_backward(fresh_sd, images):
    params = add_unet_lora(fresh_sd.unet, rank=2, alpha=2)
    set_gradient_checkpointing(fresh_sd.unet, True)
    assert fresh_sd.unet.is_gradient_checkpointing
    fresh_sd.unet.train()
    with torch.no_grad():
        latents = fresh_sd.encode_images(images)
        context = fresh_sd.encode_prompt(["a photo"])
    fresh_sd.noise_prediction_loss(latents, context, generator=_generator(0)).backward()
    assert all(p.grad is not None for p in params)
    set_gradient_checkpointing(fresh_sd.unet, False)
    assert not fresh_sd.unet.is_gradient_checkpointing


# ---------------------------------------------------------------------------------------- LoRA
def test_lora_save_load_round_trip_touches_only_the_adapter(fresh_sd, images, prompts, tmp_path):
    unet = fresh_sd.unet
    base_before = {k: v.clone() for k, v in unet.state_dict().items()}
    params = add_unet_lora(unet, rank=4, alpha=4)
    assert params and all(p.requires_grad for p in params)
    assert {id(p) for p in unet.parameters() if p.requires_grad} == {id(p) for p in params}
    with torch.no_grad():
        latents = fresh_sd.encode_images(images)
    optimizer = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1)
    for step in range(1):
        optimizer.zero_grad()
        fresh_sd.noise_prediction_loss(latents, prompts, generator=_generator(step)).backward()
        optimizer.step()
    adapter = {k: v.clone() for k, v in lora_state_dict(unet).items()}
    assert adapter and all("lora_" in k for k in adapter)

    path = save_lora(unet, tmp_path / "adapters" / "unet_lora.safetensors")
    assert os.listdir(path.parent) == ["unet_lora.safetensors"]  # no temporary file left behind
    adapter_bytes = sum(v.numel() * v.element_size() for v in adapter.values())
    unet_bytes = sum(v.numel() * v.element_size() for v in base_before.values())
    assert path.stat().st_size < adapter_bytes + 16_384 and path.stat().st_size < unet_bytes / 5

    restored = tiny_stable_diffusion_components(seed=0)["unet"]
    restored.requires_grad_(False)
    load_lora(restored, path)
    reloaded = lora_state_dict(restored)
    assert reloaded.keys() == adapter.keys()
    assert all(torch.equal(reloaded[k], adapter[k]) for k in adapter)
    for unet_state in (unet.state_dict(), restored.state_dict()):
        base_after = {k.replace(".base_layer", ""): v for k, v in unet_state.items() if "lora_" not in k}
        assert base_after.keys() == base_before.keys()
        assert all(torch.equal(base_after[k], base_before[k]) for k in base_before)
    with torch.no_grad():
        t = torch.tensor([500, 500])
        torch.testing.assert_close(restored(latents, t, prompts).sample, unet(latents, t, prompts).sample)

    with pytest.raises(FileNotFoundError, match="absent.safetensors"):
        load_lora(restored, tmp_path / "absent.safetensors")
    with pytest.raises(ValueError, match="no LoRA adapter"):
        save_lora(tiny_stable_diffusion_components(seed=0)["unet"], tmp_path / "none.safetensors")


# ---------------------------------------------------------------------------------------- textual inversion
def test_textual_inversion_changes_only_the_new_token_embedding(fresh_sd, images):
    with torch.no_grad():
        plain_before = fresh_sd.encode_prompt(["a photo of an object"])
    text_before = {k: v.clone() for k, v in fresh_sd.text_encoder.state_dict().items()}
    unet_before = {k: v.clone() for k, v in fresh_sd.unet.state_dict().items()}
    object_id = fresh_sd.tokenizer("object", add_special_tokens=False).input_ids[0]
    object_embedding = fresh_sd.text_encoder.get_input_embeddings().weight[object_id].clone()

    token_id = fresh_sd.add_token("<fsad-concept>", initializer_token="object")
    assert token_id == 49408
    assert fresh_sd.tokenizer("a photo of <fsad-concept>").input_ids[-2] == token_id
    embedding = fresh_sd.text_encoder.get_input_embeddings()
    assert isinstance(embedding, TrainableTokenEmbedding)
    assert torch.equal(embedding.embedding_of(token_id), object_embedding)

    trainable = [p for p in fresh_sd.parameters() if p.requires_grad]
    assert len(trainable) == 1 and trainable[0] is embedding.new_embeddings
    optimizer = torch.optim.AdamW(trainable, lr=5e-2, weight_decay=0.1)
    with torch.no_grad():
        latents = fresh_sd.encode_images(images)
    for step in range(2):
        optimizer.zero_grad()
        context = fresh_sd.encode_prompt(["a photo of <fsad-concept>"])
        fresh_sd.noise_prediction_loss(latents, context, generator=_generator(step)).backward()
        optimizer.step()

    assert not torch.allclose(embedding.embedding_of(token_id), object_embedding)
    text_after = {
        k.replace("token_embedding.base.", "token_embedding."): v
        for k, v in fresh_sd.text_encoder.state_dict().items()
        if "new_embeddings" not in k and not k.endswith("token_ids")
    }
    assert text_after.keys() == text_before.keys()
    assert all(torch.equal(text_after[k], text_before[k]) for k in text_before)
    assert all(torch.equal(v, unet_before[k]) for k, v in fresh_sd.unet.state_dict().items())
    with torch.no_grad():
        assert torch.equal(fresh_sd.encode_prompt(["a photo of an object"]), plain_before)


def test_add_token_rejects_bad_tokens(fresh_sd):
    add_token(fresh_sd.tokenizer, fresh_sd.text_encoder, token="<c-normal>")
    second = add_token(
        fresh_sd.tokenizer, fresh_sd.text_encoder, token="<c-anomaly>", initializer_token="damage"
    )
    ids = fresh_sd.tokenizer("<c-normal> <c-anomaly>", add_special_tokens=False).input_ids
    assert ids == [second - 1, second]
    assert fresh_sd.text_encoder.get_input_embeddings().new_embeddings.shape == (2, 32)
    with pytest.raises(ValueError, match="already"):
        add_token(fresh_sd.tokenizer, fresh_sd.text_encoder, token="<c-normal>")
    with pytest.raises(ValueError, match="single token"):
        add_token(fresh_sd.tokenizer, fresh_sd.text_encoder, token="<c-x>", initializer_token="metal nut")
    with pytest.raises(ValueError, match="lower case"):
        add_token(fresh_sd.tokenizer, fresh_sd.text_encoder, token="<Concept>")
