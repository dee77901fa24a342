"""ADPConceptModule without a trainer: the step schedule, the phase switch and the argument checks."""

import lightning
import pytest
import torch

from fsad_lightning.data.batch import CATEGORY, IMAGE, PATH
from fsad_lightning.methods.adp import ADPConceptModule
from fsad_lightning.scoring import upsample_and_smooth

TINY = dict(
    diffusion_model="fsad-tiny-sd",
    resolution=32,
    clip_model="fsad-tiny-vit-sd",
    clip_pretrained=None,
    clip_image_size=64,
    steps_per_concept=2,
    num_pseudo_anomalies=3,
    num_self_tuning_anomalies=3,
    num_inference_steps=4,
)


@pytest.fixture(scope="module")
def tiny_cache(tmp_path_factory):
    """One folder for the tiny SD of this file's modules (built on first use, then loaded)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("FSAD_CACHE_DIR", str(tmp_path_factory.mktemp("fsad_cache")))
        yield


@pytest.fixture
def module(tiny_cache):
    return ADPConceptModule(**TINY)


@pytest.fixture
def shots():
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    return {IMAGE: images, CATEGORY: ["widget", "widget"], PATH: ["a.png", "b.png"]}


def test_steps_are_reproducible_and_the_phase_switch_stores_c_n_and_resets_adam(module, shots):
    module.prepare_training(shots)
    assert module.shot_indices(["b.png", "a.png"]).tolist() == [1, 0]
    optimizer = module.build_optimizer(total_batch_size=4)
    indices = torch.tensor([0, 1])
    first, again = module.training_losses(indices, 0), module.training_losses(indices, 0)
    torch.testing.assert_close(first["loss"], again["loss"])  # every draw is seeded by (seed, step)
    assert not torch.equal(first["loss"], module.training_losses(indices, 1)["loss"])
    first["loss"].backward()
    optimizer.step()
    assert optimizer.state  # Adam moments of step 1

    with pytest.raises(RuntimeError, match="start_anomaly_phase"):
        module.training_losses(indices, 2)
    module.start_anomaly_phase(optimizer)
    assert bool(module.model.normal_concept_learned) and not optimizer.state
    torch.testing.assert_close(module.model.normal_concept, module.model.concept_vector().detach())
    assert module.model.pseudo_anomalies.shape == (3, 3, 32, 32)
    stored = module.model.normal_concept.clone()
    module.start_anomaly_phase(optimizer)  # idempotent: c_n* is not overwritten
    assert torch.equal(module.model.normal_concept, stored)
    losses = module.training_losses(indices, 2)
    assert torch.isfinite(losses["p_normal_pseudo"]) and losses["repel"] >= 0

    with pytest.raises(RuntimeError, match="not among the shots"):
        module.shot_indices(["c.png"])


def test_the_default_learning_rate_is_the_papers_5e4_and_scaling_is_an_option(tiny_cache):
    unscaled = ADPConceptModule(**TINY)
    assert unscaled.hparams.scale_lr is False
    assert unscaled.build_optimizer(total_batch_size=4).param_groups[0]["lr"] == pytest.approx(5e-4)
    scaled = ADPConceptModule(**TINY, scale_lr=True)  # LDM's scale_lr: x the total batch size
    assert scaled.build_optimizer(total_batch_size=4).param_groups[0]["lr"] == pytest.approx(2e-3)


def test_the_anomaly_map_covers_the_centre_crop_clip_saw(tiny_cache):
    module = ADPConceptModule(**TINY, sigma=0.0)
    grid = torch.rand(2, 4, 4, generator=torch.Generator().manual_seed(3))
    square = module.anomaly_map(grid, 64, 64, None)
    wide = module.anomaly_map(grid, 64, 64, torch.tensor([[100, 200], [100, 100]]))  # a 2 : 1 source
    torch.testing.assert_close(wide[1], square[1])  # square sources: the whole image
    inside = upsample_and_smooth(grid[:1], (64, 32), sigma=0.0)[0]  # the crop: columns 16-47 of 64
    torch.testing.assert_close(wide[0, :, 16:48], inside)
    torch.testing.assert_close(wide[0, :, :16], inside[:, :1].expand(64, 16))  # edge values outside
    torch.testing.assert_close(wide[0, :, 48:], inside[:, -1:].expand(64, 16))


def test_memory_defaults_checkpointing_on_and_frozen_backbones_in_the_trainer_precision(tiny_cache, shots):
    module = ADPConceptModule(**TINY)
    assert module.hparams.gradient_checkpointing and module.model.diffusion.unet.is_gradient_checkpointing
    assert module.hparams.diffusion_dtype is None and module.hparams.clip_precision is None
    assert module.model.diffusion.vae_batch_size == 4  # VAE slicing, as One-to-Normal's
    module.trainer = lightning.Trainer(accelerator="cpu", precision="bf16-mixed", logger=False)
    module.cast_frozen_backbones()
    frozen = [p for p in module.parameters() if not p.requires_grad and p.is_floating_point()]
    assert frozen and {p.dtype for p in frozen} == {torch.bfloat16}  # SD (UNet, VAE, text encoder) and CLIP
    assert {p.dtype for p in module.model.clip.parameters()} == {torch.bfloat16}
    assert module.model.concept_vector().dtype == torch.float32  # the learned embedding stays fp32
    with module.trainer_precision():
        module.prepare_training(shots)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # what Lightning wraps training_step in
        losses = module.training_losses(torch.tensor([0, 1]), 0)
    losses["loss"].backward()
    grad = module.model.trainable_parameters()[0].grad
    assert grad.dtype == torch.float32 and torch.isfinite(grad).all() and grad.abs().sum() > 0

    explicit = ADPConceptModule(**TINY, diffusion_dtype="float32", clip_precision="fp32")
    explicit.trainer = lightning.Trainer(accelerator="cpu", precision="bf16-mixed", logger=False)
    explicit.cast_frozen_backbones()  # an explicit dtype wins over the trainer's
    assert {p.dtype for p in explicit.parameters() if p.is_floating_point()} == {torch.float32}


def test_test_time_needs_both_concepts(module, shots):
    with pytest.raises(RuntimeError, match="normal-aware concept"):
        module.fit_shots(shots)


@pytest.mark.parametrize(
    ("override", "match"),
    [
        ({"steps_per_concept": 0}, "steps_per_concept"),
        ({"strength": 1.5}, "strength"),
        ({"margin": -0.1}, "margin"),
        ({"crop_scale": [0.5]}, "crop_scale"),
        ({"class_name": " "}, "class_name"),
    ],
)
def test_bad_arguments_fail_before_any_model_is_loaded(override, match):
    with pytest.raises(ValueError, match=match):
        ADPConceptModule(**{**TINY, **override})
