"""PromptAD as its official code computes it (FuNz-0/PromptAD), recomputed by hand on the tiny CLIP twin.

Each test rebuilds one quantity from the open_clip block modules / the formulas, independently of
``CLIPBackbone.encode_image``'s loop: the VV dual path on every block, the vision-memory tokens, the two
prompt sets' losses and prototypes, the 400 px blurred maps and eq. 18's image score, the temperature.
"""

import inspect
import math

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F
from scipy.ndimage import gaussian_filter

from fsad_lightning.methods.promptad import PromptADModel, PromptADModule

TINY = dict(clip_model="fsad-tiny-vit", clip_pretrained=None, image_size=64, memory_layers=(1, 2))


@pytest.fixture(scope="module")
def model() -> PromptADModel:
    torch.manual_seed(0)
    model = PromptADModel(**TINY)  # every other setting at its default
    model.set_class_name("widget")
    return model


@pytest.fixture
def images() -> torch.Tensor:
    return torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(3))


def _tokens(model, images):
    backbone = model.backbone
    return backbone.embed_patches(backbone.preprocess(images)), backbone.visual.transformer.resblocks


def _attention(block, x):
    """The block's own (original-path) attention update of ``x``, through nn.MultiheadAttention."""
    hidden = block.ln_1(x)
    return block.attn(hidden, hidden, hidden, need_weights=False)[0]


def _vv_attention(block, x):
    """Value-value attention from ln_1(x): softmax(v v^T / sqrt(d)) v per head, then the out-projection."""
    attn, hidden = block.attn, block.ln_1(x)
    b, length, width = hidden.shape
    heads = attn.num_heads
    v = F.linear(hidden, attn.in_proj_weight[2 * width :], attn.in_proj_bias[2 * width :])
    v = v.reshape(b, length, heads, width // heads).transpose(1, 2)
    weights = (v @ v.transpose(-1, -2) / math.sqrt(width // heads)).softmax(dim=-1)
    out = (weights @ v).transpose(1, 2).reshape(b, length, width)
    return attn.out_proj(out)


def test_vv_branch_runs_on_every_block_as_the_official_dual_path(model, images):
    """Official V2VTransformer: both paths' attention from ln_1 of the ORIGINAL stream, the VV stream adds
    its attention update and skips the MLP, on all blocks; the class token from the original path."""
    assert model.vv_layers == model.backbone.num_layers == 4
    x, blocks = _tokens(model, images)
    x_ori, x_vv = x, x
    with torch.no_grad():
        for block in blocks:
            x_vv = x_vv + _vv_attention(block, x_ori)
            x_ori = x_ori + _attention(block, x_ori)
            x_ori = x_ori + block.mlp(block.ln_2(x_ori))
        x_vv = torch.cat([x_ori[:, :1], x_vv[:, 1:]], dim=1)
        expected = model.backbone.visual.ln_post(x_vv) @ model.backbone.visual.proj
        ours = model.backbone.encode_image(images, vv_layers=model.vv_layers)
    torch.testing.assert_close(ours.vv_patch_tokens, expected[:, 1:], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours.global_embedding, expected[:, 0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("memory_tokens", ["after_next_attention", "block_output"])
def test_vision_memory_tokens_by_hand(model, images, memory_tokens):
    """Official hooks on blocks l keep a view that block l + 1 updates in place: block-l output + the
    attention update of block l + 1 (raw width). ``block_output``: the plain block outputs."""
    reader = PromptADModel(**TINY, memory_tokens=memory_tokens, backbone=model.backbone)
    x, blocks = _tokens(model, images)
    outputs, after_attention = [], []
    with torch.no_grad():
        for block in blocks:
            after_attention.append(x + _attention(block, x))
            x = after_attention[-1] + block.mlp(block.ln_2(after_attention[-1]))
            outputs.append(x)
        reader.fit_memory(images)
    for index, layer in enumerate(reader.memory_layers):  # (1, 2): blocks 2 and 3 of the 4
        source = after_attention[layer + 1] if memory_tokens == "after_next_attention" else outputs[layer]
        expected = source[:, 1:].reshape(-1, source.shape[-1])
        assert reader.memory_bank[index].shape == (2 * 64, model.backbone.width)
        torch.testing.assert_close(reader.memory_bank[index], expected, atol=1e-5, rtol=1e-5)
    assert (after_attention[2] - outputs[1]).abs().max() > 1e-3  # the two readings differ
    # the last block has no next block: its tokens are its output either way
    last = model.backbone.encode_image(images, layers=(-1,), patch_tokens_from="after_next_attention")
    torch.testing.assert_close(last.patch_tokens[0], outputs[-1][:, 1:], atol=1e-5, rtol=1e-5)


def _upsampled_peak(grid_map):
    """``max_ij`` of a grid map bilinearly upsampled to 400 x 400 (the official eq. 18 input)."""
    up = F.interpolate(grid_map[:, None], size=(400, 400), mode="bilinear", align_corners=False)
    return up.flatten(1).amax(dim=1)


def _features_by_hand(model, prompt_set):
    learner = model.prompt_learner(prompt_set)
    raw = model.backbone.encode_text_embeddings(learner(), learner.eot_index, normalize=False)
    groups = learner.layout.group_slices()
    normal, anomaly = raw[groups["normal"]], raw[groups["manual"].start :]
    return raw, groups, F.normalize(normal.mean(0), dim=-1), F.normalize(anomaly.mean(0), dim=-1), anomaly


@pytest.mark.parametrize("temperature", [None, 4.6052])
def test_each_prompt_set_trains_on_its_own_features_with_official_prototypes(model, images, temperature):
    """Image set: global features only; pixel set: VV patch features only. Prototypes: mean of the
    unnormalised text features, normalised. ``temperature: 4.6052`` is the logit multiplier itself."""
    model = PromptADModel(**TINY, temperature=temperature, backbone=model.backbone)
    model.set_class_name("widget")
    scale = 4.6052 if temperature is not None else float(model.backbone.model.logit_scale.exp())
    assert float(model.logit_scale) == pytest.approx(scale)
    losses = model.compute_losses(images)
    with torch.no_grad():
        visual = model.backbone.encode_image(images, vv_layers=4)
        features = {"image": visual.global_embedding, "pixel": visual.vv_patch_tokens.reshape(-1, 32)}
        for prompt_set, z in features.items():
            raw, groups, w_n, w_a, anomaly = _features_by_hand(model, prompt_set)
            zn = F.normalize(z, dim=-1)
            logits = scale * zn @ torch.cat([w_n[None], F.normalize(anomaly, dim=-1)]).T
            clip = -logits.log_softmax(dim=-1)[:, 0].mean()
            ema = F.relu((zn - w_n).norm(dim=-1) - (zn - w_a).norm(dim=-1)).mean()
            w_m = F.normalize(raw[groups["manual"]].mean(0), dim=-1)
            w_l = F.normalize(raw[groups["learnable"]].mean(0), dim=-1)
            align = 0.001 * (w_m - w_l).pow(2).sum()
            torch.testing.assert_close(losses[f"clip_{prompt_set}"], clip, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(losses[f"ema_{prompt_set}"], ema, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(losses[f"align_{prompt_set}"], align, atol=1e-7, rtol=1e-5)
        image_protos, pixel_protos = model.freeze_text_prototypes()
        for protos, prompt_set in ((image_protos, "image"), (pixel_protos, "pixel")):
            _, _, w_n, w_a, _ = _features_by_hand(model, prompt_set)
            torch.testing.assert_close(protos, torch.stack([w_n, w_a]), atol=1e-6, rtol=1e-5)
        # the scores use the same multiplier: S_t with the image set
        model.fit_memory(images)
        scores, _ = model(images)
        s_t = (scale * F.normalize(visual.global_embedding, dim=-1) @ image_protos.T).softmax(-1)[:, 1]
        memory = model.backbone.encode_image(images, layers=(1, 2), patch_tokens_from="after_next_attention")
        peak = _upsampled_peak(model.vision_guided_map(memory.patch_tokens, (8, 8)))
        torch.testing.assert_close(scores, 1.0 / (1.0 / peak + 1.0 / s_t), atol=1e-6, rtol=1e-5)


def test_maps_fuse_on_the_grid_then_upsample_to_400_and_blur_there(model, images):
    """Eq. 17 on the patch grid with M_t of the pixel set, bilinear to 400 x 400, Gaussian sigma = 4 at 400
    px (scipy's filter as the official code, compared away from the border where the padding differs);
    eq. 18 with the max of the unblurred, upsampled M_v."""
    with torch.no_grad():
        model.fit_memory(images[:1])
        image_protos, pixel_protos = model.freeze_text_prototypes()
        scores, maps = model(images)
        visual = model.backbone.encode_image(
            images, layers=(1, 2), vv_layers=4, patch_tokens_from="after_next_attention"
        )
        scale = float(model.logit_scale)
        m_t = (scale * F.normalize(visual.vv_patch_tokens, dim=-1) @ pixel_protos.T).softmax(-1)[..., 1]
        m_t = m_t.reshape(2, 8, 8)
        m_v = model.vision_guided_map(visual.patch_tokens, (8, 8))
        fused = 1.0 / (1.0 / m_v + 1.0 / m_t)
        up = F.interpolate(fused[:, None], size=(400, 400), mode="bilinear", align_corners=False)[:, 0]
        s_t = (scale * F.normalize(visual.global_embedding, dim=-1) @ image_protos.T).softmax(-1)[:, 1]
        peak = _upsampled_peak(m_v)
    assert maps.shape == (2, 400, 400)
    for i in range(2):
        blurred = gaussian_filter(up[i].double().numpy(), sigma=4)
        np.testing.assert_allclose(maps[i, 16:-16, 16:-16].numpy(), blurred[16:-16, 16:-16], atol=1e-6, rtol=0)
    torch.testing.assert_close(scores, 1.0 / (1.0 / peak + 1.0 / s_t), atol=1e-6, rtol=1e-5)
    # the image score does not use the pixel set's prototypes, nor the map the image set's
    assert not torch.allclose(image_protos, pixel_protos)


#: the official settings (train_cls.py / train_seg.py / model.py) as PromptADModule arguments
OFFICIAL = {
    "pretrained": "laion400m_e32", "vv_layers": None, "memory_layers": [2, 7],
    "memory_tokens": "after_next_attention", "image_normal_prompts": 3, "pixel_normal_prompts": 1,
    "image_epochs": None, "pixel_epochs": 1, "map_size": 400, "sigma": 4.0, "temperature": None,
}


def test_defaults_are_the_official_settings():
    """All-block VV, memory blocks 3 and 8 with the official hook semantics, two prompt sets (N = 3 / 1,
    trainer.max_epochs / 1 epochs), 400 px maps, laion400m_e32 (which open_clip knows for ViT-B-16+)."""
    defaults = {k: p.default for k, p in inspect.signature(PromptADModule).parameters.items()}
    assert {k: defaults[k] for k in OFFICIAL} == OFFICIAL
    assert "laion400m_e32" in open_clip.list_pretrained_tags_by_model("ViT-B-16-plus-240")
