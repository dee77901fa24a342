"""ADP's model on the offline tiny twins (32 px SD, 64 px CLIP sharing its 32-wide text space)."""

from collections import Counter

import pytest
import torch

from fsad_lightning.backbones.clip import load_clip, openclip_crop_boxes, openclip_view
from fsad_lightning.backbones.diffusion import StableDiffusion
from fsad_lightning.backbones.sampling import SamplingSettings, reference_prompt_pairs
from fsad_lightning.backbones.tiny import tiny_stable_diffusion_components
from fsad_lightning.methods.adp.concepts import (
    encode_concept_sentences,
    state_sentences,
    tokenize_concept_sentences,
)
from fsad_lightning.methods.adp.torch_model import (
    CONCEPT_TOKEN,
    SDEDIT_PROMPT_ORDER,
    ADPModel,
    random_resized_crop,
)
from fsad_lightning.prompts import ADP_TEMPLATES

LEARNED = ("new_embeddings", "token_ids", "normal_concept", "normal_concept_learned")


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def clip():
    return load_clip("fsad-tiny-vit-sd", pretrained=None, image_size=64)


@pytest.fixture
def model(clip):
    """A fresh ADP model (the concept token is added to a private tiny SD)."""
    diffusion = StableDiffusion(**tiny_stable_diffusion_components(seed=0))
    return ADPModel(diffusion, clip, resolution=32)


@pytest.fixture(scope="module")
def shots():
    return torch.rand(2, 3, 64, 64, generator=_generator(1))


def test_the_concept_starts_at_object_and_is_the_only_fp32_trainable_parameter(model):
    diffusion = model.diffusion
    object_id = diffusion.tokenizer("object", add_special_tokens=False).input_ids[0]
    base = model.token_embedding.base.weight
    assert torch.equal(model.concept_vector(), base[object_id].float())
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert len(trainable) == 1 and trainable[0].endswith("new_embeddings")
    assert model.trainable_parameters()[0].dtype == torch.float32
    assert model.diffusion_prompts(torch.tensor([0, 1])) == [
        f"a photo of a flawless {CONCEPT_TOKEN}",
        f"a rendering of a flawless {CONCEPT_TOKEN}",
    ]


def test_both_concept_steps_change_only_the_new_token_embedding(model, shots):
    before = {k: v.clone() for k, v in model.state_dict().items() if not k.endswith(LEARNED)}
    initial = model.concept_vector().detach().clone()
    optimizer = torch.optim.AdamW(model.trainable_parameters(), lr=5e-2, weight_decay=0.01)
    model.set_training_shots(shots)
    views, templates = torch.tensor([0, 3]), torch.tensor([0, 5])

    def step(seed, **pseudo):
        optimizer.zero_grad()
        losses = model.concept_learning_loss(views, templates, 0.003, _generator(seed), **pseudo)
        losses["loss"].backward()
        optimizer.step()
        return losses

    for seed in range(2):  # step 1, eq. 3
        step(seed)
    model.store_normal_concept()
    optimizer.state.clear()
    normal = model.normal_concept.clone()
    model.set_pseudo_anomalies(torch.rand(3, 3, 32, 32, generator=_generator(2)))
    for seed in range(2, 4):  # step 2, eq. 4 (margin 0 so the repel term acts on random features)
        features = model.pseudo_anomaly_features(2, _generator(seed))
        losses = step(seed, pseudo_features=features, pseudo_templates=torch.tensor([1, 2]), margin=0.0)
        assert losses["repel"] > 0

    assert bool(model.normal_concept_learned)
    assert not torch.equal(normal, initial)  # c_n* moved from "object"
    assert not torch.equal(model.concept_vector().detach(), normal)  # c_a* moved from c_n*
    after = {k: v for k, v in model.state_dict().items() if not k.endswith(LEARNED)}
    assert after.keys() == before.keys()
    for part in (
        "diffusion.unet.",
        "diffusion.vae.",
        "token_embedding.base.weight",
        "reference_association.backbone.",
    ):
        assert any(part in k for k in before), part
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert changed == []  # UNet, VAE, text encoder, the base token table and CLIP: bit-identical


def test_the_repel_term_weighs_the_L_pseudo_anomalies_against_the_K_shots(model, shots):
    """Eq. 4 in the model's loss: with margin 0 the hinge is P itself, so repel = alpha * (L / K) * mean P."""
    model.set_training_shots(shots)  # K = 2
    model.set_pseudo_anomalies(torch.rand(6, 3, 32, 32, generator=_generator(2)))  # L = 6
    features = model.pseudo_anomaly_features(2, _generator(3))
    losses = model.concept_learning_loss(
        torch.tensor([0, 1]), torch.tensor([0, 1]), 0.002, _generator(4),
        pseudo_features=features, pseudo_templates=torch.tensor([2, 3]), margin=0.0,
    )
    expected = 0.002 * (6 / 2) * losses["p_normal_pseudo"]
    torch.testing.assert_close(losses["repel"], expected.to(losses["repel"]))
    assert losses["alignment"].item() == pytest.approx(-0.002 * losses["p_normal_shots"].item(), rel=1e-5)


def test_clip_guidance_reaches_the_concept_through_clips_text_encoder(model, shots):
    model.set_training_shots(shots)
    concept = model.trainable_parameters()[0]
    normal_text, anomalous_text = model.state_text_features(model.concept_vector(), torch.tensor([0, 4, 0]))
    assert normal_text.shape == (3, 32) and torch.equal(normal_text[0], normal_text[2])
    probability = (normal_text * model.shot_clip_features[:3]).sum()
    probability.backward()
    assert concept.grad is not None and concept.grad.abs().sum() > 0


def test_concept_in_clip_equals_the_plain_sentence_for_the_placeholders_own_embedding(clip):
    sentences = state_sentences("flawless {}", ADP_TEMPLATES[:4], "*")
    tokenized = tokenize_concept_sentences(clip, sentences)
    assert tokenized.token_embeddings.shape[1] < 77  # cut after the longest sentence's end-of-text token
    object_row = clip.tokenize(["object"]).token_embeddings[0, 1]
    spliced = encode_concept_sentences(clip, tokenized, object_row)
    plain = clip.encode_text(state_sentences("flawless {}", ADP_TEMPLATES[:4], "object"))
    torch.testing.assert_close(spliced, plain, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="exactly once"):
        tokenize_concept_sentences(clip, ["a photo of a flawless object", "a * and a *"])


def test_text_width_mismatch_fails_in_one_line_naming_both_keys():
    diffusion = StableDiffusion(**tiny_stable_diffusion_components(seed=0))
    wide_clip = load_clip("fsad-tiny-vit", pretrained=None, image_size=64)  # text width 64
    with pytest.raises(ValueError) as info:
        ADPModel(diffusion, wide_clip, resolution=32)
    message = str(info.value)
    assert "\n" not in message and "`diffusion_model`" in message and "`clip_model`" in message


def test_random_resized_crop_is_seeded_and_full_scale_keeps_the_image():
    images = torch.rand(3, 3, 32, 32, generator=_generator(3))
    a = random_resized_crop(images, 16, (0.5, 1.0), _generator(4))
    b = random_resized_crop(images, 16, (0.5, 1.0), _generator(4))
    assert a.shape == (3, 3, 16, 16) and torch.equal(a, b)
    assert not torch.equal(a, random_resized_crop(images, 16, (0.5, 1.0), _generator(5)))
    whole = random_resized_crop(images, 32, (1.0, 1.0), _generator(4), ratio=(1.0, 1.0))
    torch.testing.assert_close(whole, images)
    with pytest.raises(ValueError, match="crop scale"):
        random_resized_crop(images, 16, (0.0, 1.0), _generator(4))


def test_sdedit_image_depends_only_on_its_index(model, shots):
    latents = model.encode_latents(shots)
    settings = SamplingSettings(strength=0.5, num_inference_steps=4, guidance_scale=7.5)
    prompts = ["a photo with damage", "a photo of an object with damage"]
    together = model.sdedit(latents, prompts, [0, 1, 2], settings, seed=0)
    alone = model.sdedit(latents, prompts, [2], settings, seed=0)
    assert together.shape == (3, 3, 32, 32)
    torch.testing.assert_close(together[2:], alone, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(together[0], together[2])  # same shot, other prompt and noise


@pytest.mark.parametrize("num_shots", range(1, 17))
def test_sdedit_prompts_alternate_so_each_prompt_and_each_shot_get_equal_shares(num_shots):
    """20 pseudo-anomalies of K = 1-16 shots under ADP's two prompts: 10 per prompt, every shot within
    one image of every other, and each shot's images split between the prompts (within one)."""
    refs, prompts = reference_prompt_pairs(range(20), num_shots, 2, SDEDIT_PROMPT_ORDER)
    assert Counter(prompts) == {0: 10, 1: 10}
    per_shot = Counter(refs)
    assert set(per_shot) == set(range(num_shots)) and max(per_shot.values()) - min(per_shot.values()) <= 1
    for shot in range(num_shots):
        mine = Counter(p for r, p in zip(refs, prompts) if r == shot)
        assert abs(mine[0] - mine[1]) <= 1, (shot, mine)


def test_sdedit_uses_the_alternating_prompt_of_each_index(model, shots):
    latents = model.encode_latents(shots)
    settings = SamplingSettings(strength=0.5, num_inference_steps=4, guidance_scale=7.5)
    prompts = ["a photo with damage", "a photo of an object with damage"]
    image = model.sdedit(latents, prompts, [1], settings, seed=0)  # shot 1 under prompt (1 + 0) mod 2 = 1
    alone = model.sdedit(latents[1:], prompts[1:], [1], settings, seed=0)  # the same pair, same seed
    torch.testing.assert_close(image, alone, atol=1e-5, rtol=1e-5)


def test_openclip_preprocessing_crops_the_centre_instead_of_squashing(model, clip):
    """Appendix B: OpenCLIP's pipeline, shortest side to 224 then centre crop (tiny CLIP: 64 px)."""
    wide = torch.rand(1, 3, 64, 96, generator=_generator(8))
    model.set_training_shots(wide)
    centre = clip.encode_image(wide[..., 16:80]).global_embedding  # the centred 64 x 64 square
    torch.testing.assert_close(model.shot_clip_features[:1], centre)
    squashed = clip.encode_image(wide).global_embedding  # the whole image resized to 64 x 64
    assert not torch.allclose(model.shot_clip_features[:1], squashed, atol=1e-3)
    # a square batch image resized from a 1000 x 1500 source: the source's centred square, un-squashed
    assert openclip_crop_boxes(512, 512, torch.tensor([[1000, 1500], [900, 900]])) == [
        (0, 85, 512, 341),
        (0, 0, 512, 512),
    ]
    square = torch.rand(2, 3, 96, 96, generator=_generator(9))
    view = openclip_view(square, 64, torch.tensor([[100, 150], [150, 100]]))
    assert view.shape == (2, 3, 64, 64)
    def resized(crop):
        return torch.nn.functional.interpolate(crop, size=(64, 64), mode="bicubic", antialias=True).clamp(0, 1)

    torch.testing.assert_close(view[:1], resized(square[:1, :, :, 16:80]))  # the source's centre, 96 x 64
    torch.testing.assert_close(view[1:], resized(square[1:, :, 16:80, :]))


def test_self_tuning_pseudo_anomalies_get_the_random_resized_crop_of_section_4b(model, shots, monkeypatch):
    model.store_normal_concept()
    pseudo = torch.rand(4, 3, 32, 32, generator=_generator(6))
    seen = []
    encode = model.clip.encode_image

    def recording(images, **kwargs):
        seen.append(images)
        return encode(images, **kwargs)

    monkeypatch.setattr(model.clip, "encode_image", recording)
    first = model.self_tune(shots, pseudo, generator=_generator(5))
    expected = random_resized_crop(pseudo, model.clip.image_size, model.crop_scale, _generator(5))
    torch.testing.assert_close(seen[1], expected)  # shots first, then the cropped pseudo-anomalies
    again = model.self_tune(shots, pseudo, generator=_generator(5))
    torch.testing.assert_close(first.weights, again.weights)  # seeded
    model.self_tune(shots, pseudo, generator=_generator(6))
    assert not torch.equal(seen[5], seen[3])  # other draws, other crops


def test_self_tuning_and_scores(model, shots):
    with pytest.raises(RuntimeError, match="c_n"):
        model.self_tune(shots, shots)
    model.store_normal_concept()
    result = model.self_tune(shots, torch.rand(4, 3, 32, 32, generator=_generator(6)), label="widget")
    assert result.names == ["normal-aware concept", "anomaly-aware concept", "label 'widget'"]
    assert result.weights.shape == (3,) and ((result.weights >= 0) & (result.weights <= 2)).all()
    assert result.prototypes.shape == (2, 32)
    model.fit_reference(shots, "widget")
    queries = torch.cat([shots[:1], torch.rand(1, 3, 64, 64, generator=_generator(7))])
    output = model(queries, "widget")
    assert output.grid_map.shape == (2, 8, 8)
    # eq. 10 with the shot itself as a query: its reference-association map is zero
    assert output.vision_score[0].item() == pytest.approx(0.0, abs=1e-5)
    torch.testing.assert_close(output.pred_score, 0.5 * (output.concept_score + output.vision_score))
    with pytest.raises(RuntimeError, match="reference memory"):
        model(queries, "gadget")
