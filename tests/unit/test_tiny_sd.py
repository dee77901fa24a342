"""The offline tiny Stable Diffusion twin: CLIP tokenizer rebuilt from open_clip's BPE, save/load."""

import json

import pytest
import torch
from transformers import CLIPTokenizer

from fsad_lightning.backbones.diffusion import load_stable_diffusion, make_scheduler
from fsad_lightning.backbones.tiny import (
    build_tiny_stable_diffusion,
    clip_byte_symbols,
    tiny_clip_tokenizer,
    tiny_stable_diffusion_components,
)

SENTENCES = [
    "a photo of a damaged bottle.",
    "A Photo of the FLAWLESS cable, with 2 wires (3.5 mm) -- isn't it 100% ok?!",
    "café naïve über façade — 日本語のテキスト 😀 ümlaut",
    "  extra   spaces\tand\nnew lines  ",
    "<fsad-concept> screw_bag 0123456789 #hash @at $dollar",
]


@pytest.fixture(scope="module")
def tiny_sd_path(tmp_path_factory):
    # a session-wide path, so other test modules in this process hit the per-process build cache
    return build_tiny_stable_diffusion(tmp_path_factory.getbasetemp() / "tiny_sd_txt2img")


def test_byte_symbols_are_a_printable_bijection():
    table = clip_byte_symbols()
    assert sorted(table) == list(range(256)) and list(table)[:3] == [ord("!"), ord('"'), ord("#")]
    assert len(set(table.values())) == 256
    assert all(not symbol.isspace() and symbol.isprintable() for symbol in table.values())
    assert table[ord("a")] == "a" and table[ord(" ")] == chr(256 + 32)


def test_tokenizer_ids_equal_open_clip():
    import open_clip
    from open_clip.tokenizer import SimpleTokenizer

    tokenizer = tiny_clip_tokenizer()
    assert len(tokenizer) == 49408
    assert tokenizer.bos_token_id == 49406 and tokenizer.eos_token_id == 49407
    reference = SimpleTokenizer()
    padded = open_clip.get_tokenizer("ViT-B-32")(SENTENCES)
    for sentence, row in zip(SENTENCES, padded):
        ours = tokenizer(sentence).input_ids
        expected = [reference.sot_token_id, *reference.encode(sentence), reference.eot_token_id]
        assert ours == expected, sentence
        # the padded open_clip rows hold the same ids before their zero padding
        assert row[: len(ours)].tolist() == ours
        assert int(row[len(ours) :].abs().sum()) == 0


def test_tokenizer_save_dir_has_the_hub_layout(tmp_path):
    tokenizer = tiny_clip_tokenizer(save_dir=tmp_path)
    merges = (tmp_path / "merges.txt").read_text(encoding="utf-8").splitlines()
    vocab = json.loads((tmp_path / "vocab.json").read_text(encoding="utf-8"))
    assert merges[0].startswith("#version") and len(merges) == 1 + 48894
    assert len(vocab) == 49408 and vocab["<|endoftext|>"] == 49407
    reloaded = CLIPTokenizer.from_pretrained(tmp_path)
    assert reloaded.model_max_length == 77
    for sentence in SENTENCES:
        assert reloaded(sentence).input_ids == tokenizer(sentence).input_ids


def test_tiny_sd_round_trip_through_load_stable_diffusion(tiny_sd_path):
    from pathlib import Path

    folder = Path(tiny_sd_path)
    assert (folder / "model_index.json").is_file()
    for name in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        assert (folder / name).is_dir(), name

    sd = load_stable_diffusion(tiny_sd_path)
    reference = tiny_stable_diffusion_components(kind="txt2img", seed=0)
    for name in ("unet", "vae", "text_encoder"):
        loaded, built = getattr(sd, name).state_dict(), reference[name].state_dict()
        assert loaded.keys() == built.keys()
        assert all(torch.equal(loaded[k], built[k]) for k in built), name
    assert type(sd.scheduler).__name__ == "DDIMScheduler"
    assert sd.vae_scale_factor == 2 and sd.latent_channels == 4 and not sd.is_inpainting
    assert sd.tokenizer("a photo").input_ids == reference["tokenizer"]("a photo").input_ids
    assert not any(p.requires_grad for p in sd.parameters())

    # another sampler keeps the model's noise schedule
    euler = load_stable_diffusion(tiny_sd_path, scheduler="EulerDiscreteScheduler")
    assert type(euler.scheduler).__name__ == "EulerDiscreteScheduler"
    assert euler.scheduler.config.beta_schedule == sd.scheduler.config.beta_schedule
    with pytest.raises(ValueError, match="NotAScheduler"):
        make_scheduler("NotAScheduler", sd.scheduler.config)
    with pytest.raises(ValueError, match="kind='inpaint'"):
        load_stable_diffusion(tiny_sd_path, kind="inpaint")


def test_build_is_cached_seeded_and_leaves_the_global_rng_alone(tiny_sd_path):
    from pathlib import Path

    stamp = (Path(tiny_sd_path) / "unet").stat().st_mtime_ns
    state = torch.random.get_rng_state()
    assert build_tiny_stable_diffusion(tiny_sd_path) == tiny_sd_path
    assert (Path(tiny_sd_path) / "unet").stat().st_mtime_ns == stamp
    other = tiny_stable_diffusion_components(seed=1)["unet"].state_dict()
    same = tiny_stable_diffusion_components(seed=0)["unet"].state_dict()
    assert torch.equal(torch.random.get_rng_state(), state)
    assert not torch.equal(other["conv_in.weight"], same["conv_in.weight"])


def test_inpainting_twin_has_a_nine_channel_unet(tmp_path_factory):
    path = build_tiny_stable_diffusion(tmp_path_factory.getbasetemp() / "tiny_sd_inpaint", kind="inpaint")
    sd = load_stable_diffusion(path, kind="inpaint")
    assert sd.unet.config.in_channels == 9 and sd.is_inpainting
    index = json.loads((tmp_path_factory.getbasetemp() / "tiny_sd_inpaint" / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionInpaintPipeline"
    with pytest.raises(ValueError, match="kind"):
        tiny_stable_diffusion_components(kind="depth")


def test_schedulers_of_latent_models_never_clip_the_latents():
    # SD 1.5's published scheduler config (a PNDM config without clip_sample) read by DDIM / DDPM
    sd15 = {
        "_class_name": "PNDMScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear",
        "beta_start": 0.00085, "num_train_timesteps": 1000, "set_alpha_to_one": False, "skip_prk_steps": True,
        "steps_offset": 1, "trained_betas": None,
    }
    for name in ("DDIMScheduler", "DDPMScheduler"):
        assert make_scheduler(name, sd15).config.clip_sample is False, name
    # an explicit setting in the model's config is kept
    assert make_scheduler("DDIMScheduler", {**sd15, "clip_sample": True}).config.clip_sample is True
    assert "clip_sample" not in make_scheduler("EulerDiscreteScheduler", sd15).config
