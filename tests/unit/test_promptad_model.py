"""PromptADModel / PromptADModule with the tiny offline CLIP twin (random weights, no download)."""

import pytest
import torch

from fsad_lightning.data import FewShotDataModule
from fsad_lightning.data.batch import CATEGORY, IMAGE
from fsad_lightning.methods.promptad import PromptADModel, PromptADModule
from fsad_lightning.methods.promptad.prompts import GENERIC_ANOMALY_SUFFIXES

TINY = dict(
    clip_model="fsad-tiny-vit", clip_pretrained=None, image_size=64, memory_layers=(1, 2), vv_layers=2
)


@pytest.fixture(scope="module")
def tiny_model() -> PromptADModel:
    torch.manual_seed(0)
    model = PromptADModel(**TINY)
    model.set_class_name("metal nut", "metal_nut")
    return model


def test_prompts_carry_the_learnable_vectors_where_the_layout_says(tiny_model):
    learner = tiny_model.prompt_learner
    layout = learner.layout
    n, m, lap = layout.num_normal, layout.num_manual, layout.num_learnable
    assert (n, m, lap) == (3, 3 * len(GENERIC_ANOMALY_SUFFIXES), 3 * 4)
    # default manual suffixes: the generic list, whatever the category's defect folders are
    assert layout.sentences[n : n + len(GENERIC_ANOMALY_SUFFIXES)] == [
        f"X X X X metal nut {suffix}." for suffix in GENERIC_ANOMALY_SUFFIXES
    ]
    embeddings = learner()
    frozen = tiny_model.backbone.tokenize(layout.sentences).token_embeddings[:, : embeddings.shape[1]]
    for row in range(layout.num_prompts):
        prefix = int(layout.prefix_index[row])
        assert torch.equal(embeddings[row, 1:5], learner.normal_prefix[prefix])
        suffix = int(layout.suffix_index[row])
        if suffix >= 0:
            start = layout.suffix_start
            assert torch.equal(embeddings[row, start], learner.anomaly_suffix[suffix, 0])
            assert torch.equal(embeddings[row, start + 1 :], frozen[row, start + 1 :])
        assert torch.equal(embeddings[row, 0], frozen[row, 0])
        assert torch.equal(embeddings[row, 5 : layout.suffix_start], frozen[row, 5 : layout.suffix_start])
    # cutting the padding after the last end-of-text token leaves the features unchanged
    full = tiny_model.backbone.tokenize(layout.sentences)
    full_embeddings = full.token_embeddings.clone()
    full_embeddings[:, : embeddings.shape[1]] = embeddings.detach()
    with torch.no_grad():
        reference = tiny_model.backbone.encode_text_embeddings(full_embeddings, full.eot_index)
        ours = tiny_model.backbone.encode_text_embeddings(embeddings, learner.eot_index)
    assert torch.allclose(ours, reference, atol=1e-5)


def test_gradients_reach_only_the_prompt_parameters(tiny_model):
    tiny_model.zero_grad(set_to_none=True)
    losses = tiny_model.compute_losses(torch.rand(2, 3, 48, 48))
    assert {"clip_image", "clip_pixel", "ema_image", "ema_pixel", "align", "loss"} <= set(losses)
    losses["loss"].backward()
    trainable = {name for name, p in tiny_model.named_parameters() if p.requires_grad}
    assert trainable == {"prompt_learner.normal_prefix", "prompt_learner.anomaly_suffix"}
    for name, parameter in tiny_model.named_parameters():
        if name in trainable:
            assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name
        else:
            assert parameter.grad is None, name
    tiny_model.zero_grad(set_to_none=True)


def test_fused_scores_and_maps_lie_in_unit_interval(tiny_model):
    tiny_model.fit_memory(torch.rand(2, 3, 48, 48))
    assert tiny_model.memory_bank.shape == (2, 2 * 64, 64)  # two blocks, 2 shots x 8x8 patches, width 64
    tiny_model.freeze_text_prototypes()
    scores, maps = tiny_model(torch.rand(3, 3, 48, 48))
    assert scores.shape == (3,) and maps.shape == (3, 48, 48)
    for values in (scores, maps):
        assert torch.isfinite(values).all() and values.min() >= 0 and values.max() <= 1


def test_ablation_switches_change_the_prompts_and_the_score_path():
    torch.manual_seed(0)
    model = PromptADModel(
        **TINY, semantic_concatenation=False, explicit_anomaly_margin=False, vision_guided=False
    )
    model.set_class_name("widget")
    layout = model.prompt_learner.layout
    assert (layout.num_manual, layout.num_learnable, layout.num_independent) == (0, 0, 3)
    assert model.prompt_learner.anomaly_suffix is None
    losses = model.compute_losses(torch.rand(2, 3, 48, 48))
    assert set(losses) == {"clip_image", "clip_pixel", "loss"}
    scores, maps = model(torch.rand(2, 3, 48, 48))  # no memory needed without VAD
    assert maps.shape == (2, 48, 48) and scores.min() >= 0 and scores.max() <= 1


def test_bad_settings_fail_with_clear_errors(tiny_model):
    model = PromptADModel(**TINY, backbone=tiny_model.backbone)  # a fresh model on the loaded CLIP
    with pytest.raises(ValueError, match="memory_layers"):
        PromptADModel(**{**TINY, "memory_layers": (1, 9)}, backbone=model.backbone)
    with pytest.raises(ValueError, match="vv_layers"):
        PromptADModel(**{**TINY, "vv_layers": 0}, backbone=model.backbone)
    with pytest.raises(RuntimeError, match="fit_memory"):
        model.set_class_name("widget")
        model(torch.rand(1, 3, 48, 48))


def test_loss_falls_on_a_synthetic_category(synthetic_root):
    torch.manual_seed(0)
    module = PromptADModule(
        model_name="fsad-tiny-vit", pretrained=None, image_size=64, memory_layers=[1, 2], vv_layers=2,
        anomaly_suffixes=["with flaw", "with a crack", "with a stain"],
    )
    datamodule = FewShotDataModule(str(synthetic_root), "widget", k_shot=2, image_size=32)
    shots = datamodule.shot_batch()
    optimizer, _ = module.build_optimizer(total_steps=8)  # the paper's SGD (lr 0.002, momentum 0.9)
    history = []
    for _ in range(8):
        module.prepare_prompts(shots)
        loss = module.model.compute_losses(shots[IMAGE])["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        history.append(float(loss.detach()))
    assert history[-1] < history[0]
    assert sum(history[-3:]) < sum(history[:3])
    # prompts are learned for one object: shots of two categories are refused
    with pytest.raises(ValueError, match="one object"):
        module.training_step({IMAGE: shots[IMAGE], CATEGORY: ["widget", "gadget"]}, 0)
