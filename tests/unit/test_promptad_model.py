"""PromptADModel / PromptADModule with the tiny offline CLIP twin (random weights, no download)."""

import lightning
import pytest
import torch

from fsad_lightning.data import FewShotDataModule
from fsad_lightning.data.batch import CATEGORY, IMAGE
from fsad_lightning.methods.promptad import PromptADModel, PromptADModule
from fsad_lightning.methods.promptad.prompts import GENERIC_ANOMALY_SUFFIXES

TINY = dict(clip_model="fsad-tiny-vit", clip_pretrained=None, image_size=64, memory_layers=(1, 2))
TINY_MODULE = dict(model_name="fsad-tiny-vit", pretrained=None, image_size=64, memory_layers=[1, 2])
IMAGE_KEYS = {"image_prompts.normal_prefix", "image_prompts.anomaly_suffix"}
PIXEL_KEYS = {"pixel_prompts.normal_prefix", "pixel_prompts.anomaly_suffix"}


@pytest.fixture(scope="module")
def tiny_model() -> PromptADModel:
    torch.manual_seed(0)
    model = PromptADModel(**TINY)
    model.set_class_name("metal nut", "metal_nut")
    return model


@pytest.mark.parametrize(("prompt_set", "n"), [("image", 3), ("pixel", 1)])
def test_prompts_carry_the_learnable_vectors_where_the_layout_says(tiny_model, prompt_set, n):
    learner = tiny_model.prompt_learner(prompt_set)
    layout = learner.layout
    m, lap = layout.num_manual, layout.num_learnable
    assert (layout.num_normal, m, lap) == (n, n * len(GENERIC_ANOMALY_SUFFIXES), n * 4)
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


@pytest.mark.parametrize(
    ("prompt_sets", "trained"),
    [(("image", "pixel"), IMAGE_KEYS | PIXEL_KEYS), (("image",), IMAGE_KEYS), (("pixel",), PIXEL_KEYS)],
)
def test_each_prompt_set_gets_gradients_from_its_own_losses_only(tiny_model, prompt_sets, trained):
    tiny_model.zero_grad(set_to_none=True)
    losses = tiny_model.compute_losses(torch.rand(2, 3, 48, 48), prompt_sets)
    names = {f"{loss}_{s}" for s in prompt_sets for loss in ("clip", "ema", "align")}
    assert set(losses) == names | {"loss"}
    losses["loss"].backward()
    assert {name for name, p in tiny_model.named_parameters() if p.requires_grad} == IMAGE_KEYS | PIXEL_KEYS
    for name, parameter in tiny_model.named_parameters():
        if name in trained:
            assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name
        else:
            assert parameter.grad is None, name
    tiny_model.zero_grad(set_to_none=True)
    with pytest.raises(ValueError, match="prompt_sets"):
        tiny_model.compute_losses(torch.rand(1, 3, 48, 48), ("global",))


def test_scores_and_maps_at_map_size(tiny_model):
    tiny_model.fit_memory(torch.rand(2, 3, 48, 48))
    assert tiny_model.memory_bank.shape == (2, 2 * 64, 64)  # two blocks, 2 shots x 8x8 patches, width 64
    tiny_model.freeze_text_prototypes()
    scores, maps = tiny_model(torch.rand(3, 3, 48, 48))
    assert scores.shape == (3,) and maps.shape == (3, 400, 400)  # the official 400 px maps
    for values in (scores, maps):  # 1 / (1/a + 1/b) of two values in [0, 1] lies in [0, 0.5]
        assert torch.isfinite(values).all() and values.min() >= 0 and values.max() <= 0.5
    image_sized = PromptADModel(**TINY, map_size=None, backbone=tiny_model.backbone)
    image_sized.set_class_name("metal nut")
    image_sized.memory_bank = tiny_model.memory_bank
    assert image_sized(torch.rand(1, 3, 48, 48))[1].shape == (1, 48, 48)


def test_ablation_switches_change_the_prompts_and_the_score_path():
    torch.manual_seed(0)
    model = PromptADModel(
        **TINY, semantic_concatenation=False, explicit_anomaly_margin=False, vision_guided=False
    )
    model.set_class_name("widget")
    for prompt_set, n in (("image", 3), ("pixel", 1)):
        layout = model.prompt_learner(prompt_set).layout
        assert (layout.num_manual, layout.num_learnable, layout.num_independent) == (0, 0, n)
        assert model.prompt_learner(prompt_set).anomaly_suffix is None
    losses = model.compute_losses(torch.rand(2, 3, 48, 48))
    assert set(losses) == {"clip_image", "clip_pixel", "loss"}
    scores, maps = model(torch.rand(2, 3, 48, 48))  # no memory needed without VAD
    assert maps.shape == (2, 400, 400) and scores.min() >= 0 and scores.max() <= 1


def test_bad_settings_fail_with_clear_errors(tiny_model):
    model = PromptADModel(**TINY, backbone=tiny_model.backbone)  # a fresh model on the loaded CLIP
    for settings, message in (
        ({"memory_layers": (1, 9)}, "memory_layers"),
        ({"vv_layers": 0}, "vv_layers"),
        ({"vv_layers": 5}, "vv_layers"),
        ({"memory_tokens": "hooks"}, "memory_tokens"),
        ({"map_size": 0}, "map_size"),
    ):
        with pytest.raises(ValueError, match=message):
            PromptADModel(**{**TINY, **settings}, backbone=model.backbone)
    with pytest.raises(RuntimeError, match="fit_memory"):
        model.set_class_name("widget")
        model(torch.rand(1, 3, 48, 48))
    with pytest.raises(ValueError, match="pixel_epochs"):
        PromptADModule(**TINY_MODULE, pixel_epochs=0)


def test_each_prompt_set_has_its_own_epochs_and_cosine_schedule():
    module = PromptADModule(**TINY_MODULE)
    # the official runs: image level 100 epochs, pixel level 1
    assert module.prompt_epochs(100) == {"image": 100, "pixel": 1}
    with pytest.raises(ValueError, match="max_epochs"):
        PromptADModule(**TINY_MODULE, image_epochs=100).prompt_epochs(50)  # a set longer than the run
    with pytest.raises(ValueError, match="max_epochs"):
        PromptADModule(**TINY_MODULE, image_epochs=10, pixel_epochs=2).prompt_epochs(20)  # idle epochs
    with pytest.raises(ValueError, match="max_epochs"):
        module.prompt_epochs(None)
    epochs = {"image": 5, "pixel": 2}
    active = [module.active_prompt_sets(e, epochs) for e in range(5)]
    assert active == [("image", "pixel")] * 2 + [("image",)] * 3
    optimizer, scheduler = module.build_optimizer(epochs)
    assert [group["name"] for group in optimizer.param_groups] == ["image_prompts", "pixel_prompts"]
    reference = {}
    for name, count in epochs.items():  # the official CosineAnnealingLR(T_max=epochs, eta_min), per epoch
        sgd = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.002)
        cosine = torch.optim.lr_scheduler.CosineAnnealingLR(sgd, T_max=count, eta_min=1e-5)
        reference[name] = []
        for _ in range(count):
            reference[name].append(sgd.param_groups[0]["lr"])
            sgd.step()
            cosine.step()
    ours = {"image": [], "pixel": []}
    for _ in range(5):
        for name, group in zip(("image", "pixel"), optimizer.param_groups):
            ours[name].append(group["lr"])
        optimizer.step()
        scheduler.step()
    assert ours["image"] == pytest.approx(reference["image"], rel=1e-9)
    assert ours["pixel"][:2] == pytest.approx(reference["pixel"], rel=1e-9)


def test_one_fit_trains_the_pixel_set_for_its_epochs_and_the_image_set_for_all(synthetic_root):
    """`fsad fit`'s loop (a Lightning Trainer) with pixel_epochs = 1 over 3 epochs: the pixel prompts change in
    the first epoch only, the image prompts in every epoch."""
    torch.manual_seed(0)
    module = PromptADModule(**TINY_MODULE, anomaly_suffixes=["with flaw", "with a crack"])
    snapshots = []

    def learned(pl_module):
        return {k: v.detach().clone() for k, v in pl_module.model.named_parameters() if v.requires_grad}

    class Snapshot(lightning.Callback):
        def on_train_epoch_end(self, trainer, pl_module):
            snapshots.append(learned(pl_module))

    start = learned(module)
    datamodule = FewShotDataModule(str(synthetic_root), "widget", k_shot=2, image_size=32)
    trainer = lightning.Trainer(
        accelerator="cpu", max_epochs=3, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, callbacks=[Snapshot()],
    )
    trainer.fit(module, datamodule=datamodule)
    assert len(snapshots) == 3 and int(module.trained_epochs) == 3
    for before, after, pixel_trains in zip([start, *snapshots[:2]], snapshots, (True, False, False)):
        for key in PIXEL_KEYS:
            assert torch.equal(before[key], after[key]) is not pixel_trains, key
        for key in IMAGE_KEYS:
            assert not torch.equal(before[key], after[key]), key


def test_loss_falls_on_a_synthetic_category(synthetic_root):
    torch.manual_seed(0)
    module = PromptADModule(**TINY_MODULE, anomaly_suffixes=["with flaw", "with a crack", "with a stain"])
    datamodule = FewShotDataModule(str(synthetic_root), "widget", k_shot=2, image_size=32)
    shots = datamodule.shot_batch()
    optimizer, _ = module.build_optimizer({"image": 8, "pixel": 8})  # the paper's SGD (lr 0.002, momentum 0.9)
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
        module.prepare_prompts({IMAGE: shots[IMAGE], CATEGORY: ["widget", "gadget"]})
