"""CLIPBackbone on the tiny offline twin: image branches, VV branch, windows, text."""

import pytest
import torch
import torch.nn.functional as F

from fsad_lightning.backbones.clip import CLIPBackbone, load_clip, window_masks
from fsad_lightning.prompts import compose_prompts


@pytest.fixture(scope="module")
def tiny() -> CLIPBackbone:
    torch.manual_seed(0)
    return load_clip("fsad-tiny-vit", pretrained=None)


@pytest.fixture
def images() -> torch.Tensor:
    return torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))


def test_original_branch_global_embedding_equals_open_clip(tiny, images):
    features = tiny.encode_image(images, layers=(1, -1), vv_layers=2, window_sizes=(2,))
    reference = tiny.model.encode_image(tiny.preprocess(images))
    assert features.global_embedding.shape == (2, tiny.embed_dim)
    torch.testing.assert_close(features.global_embedding, reference, atol=1e-5, rtol=0)


def test_patch_tokens_of_chosen_layers(tiny, images):
    raw = tiny.encode_image(images, layers=(0, -1))
    n = 8 * 8
    assert raw.layers == (0, tiny.num_layers - 1)
    assert raw.grid_size == (8, 8)
    assert [tuple(t.shape) for t in raw.patch_tokens] == [(2, n, tiny.width)] * 2
    assert not torch.allclose(raw.patch_tokens[0], raw.patch_tokens[1])
    projected = tiny.encode_image(images, layers=(-1,), project_patches=True)
    assert projected.patch_tokens[0].shape == (2, n, tiny.embed_dim)
    torch.testing.assert_close(projected.patch_tokens[0], tiny.project(raw.patch_tokens[1]))
    with pytest.raises(ValueError, match="out of range"):
        tiny.encode_image(images, layers=(tiny.num_layers,))


def test_vv_branch_shape_differs_and_leaves_original_branch_alone(tiny, images):
    plain = tiny.encode_image(images, layers=(-1,), project_patches=True)
    assert plain.vv_patch_tokens is None
    surgery = tiny.encode_image(images, layers=(-1,), vv_layers=2, project_patches=True)
    assert surgery.vv_patch_tokens.shape == (2, 64, tiny.embed_dim)
    assert torch.isfinite(surgery.vv_patch_tokens).all()
    assert (surgery.vv_patch_tokens - surgery.patch_tokens[0]).abs().max() > 1e-3
    torch.testing.assert_close(surgery.global_embedding, plain.global_embedding)
    torch.testing.assert_close(surgery.patch_tokens[0], plain.patch_tokens[0])
    deeper = tiny.encode_image(images, vv_layers=tiny.num_layers)
    assert (deeper.vv_patch_tokens - surgery.vv_patch_tokens).abs().max() > 1e-4
    with pytest.raises(ValueError, match="vv_layers"):
        tiny.encode_image(images, vv_layers=tiny.num_layers + 1)


def test_patch_tokens_after_the_next_attention_leave_the_rest_alone(tiny, images):
    plain = tiny.encode_image(images, layers=(1, -1), vv_layers=2)
    tapped = tiny.encode_image(images, layers=(1, -1), vv_layers=2, patch_tokens_from="after_next_attention")
    assert tapped.patch_tokens_from == "after_next_attention" and plain.patch_tokens_from == "block_output"
    # the original stream, the VV branch and the last block's tokens are exactly those of the plain pass
    assert torch.equal(tapped.global_embedding, plain.global_embedding)
    assert torch.equal(tapped.vv_patch_tokens, plain.vv_patch_tokens)
    assert torch.equal(tapped.patch_tokens[1], plain.patch_tokens[1])
    assert (tapped.patch_tokens[0] - plain.patch_tokens[0]).abs().max() > 1e-3
    with pytest.raises(ValueError, match="patch_tokens_from"):
        tiny.encode_image(images, layers=(1,), patch_tokens_from="hooks")


def test_resizing_and_positional_embedding_interpolation(tiny):
    odd = tiny.encode_image(torch.rand(1, 3, 100, 100), layers=(-1,))
    assert odd.patch_tokens[0].shape == (1, 64, tiny.width)
    larger = load_clip("fsad-tiny-vit", pretrained=None, image_size=96)
    features = larger.encode_image(torch.rand(1, 3, 96, 96), layers=(-1,), window_sizes=(3,))
    assert features.grid_size == (12, 12)
    assert features.patch_tokens[0].shape == (1, 144, larger.width)
    assert features.window_embeddings[0].shape == (1, 100, larger.embed_dim)
    with pytest.raises(ValueError, match="multiple of the patch size"):
        load_clip("fsad-tiny-vit", pretrained=None, image_size=60)
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        tiny.encode_image(torch.rand(3, 64, 64))


@pytest.mark.parametrize("grid", [(8, 8), (5, 7)])
@pytest.mark.parametrize("k", [1, 2, 3])
def test_window_masks_cover_every_patch_with_contiguous_windows(grid, k):
    h, w = grid
    masks = window_masks(grid, k)
    assert masks.shape == ((h - k + 1) * (w - k + 1), k * k)
    assert torch.equal(torch.unique(masks), torch.arange(h * w))  # every patch is in some window
    rows, cols = masks // w, masks % w
    assert torch.equal(rows.max(1).values - rows.min(1).values, torch.full((masks.shape[0],), k - 1))
    assert torch.equal(cols.max(1).values - cols.min(1).values, torch.full((masks.shape[0],), k - 1))
    assert all(len(set(row.tolist())) == k * k for row in masks)
    with pytest.raises(ValueError, match="does not fit"):
        window_masks(grid, min(grid) + 1)


def test_window_embeddings(tiny, images):
    features = tiny.encode_image(images, window_sizes=(2, 3, 8), window_batch_size=16)
    assert features.window_sizes == (2, 3, 8)
    assert [tuple(e.shape) for e in features.window_embeddings] == [(2, 49, 32), (2, 36, 32), (2, 1, 32)]
    assert [tuple(i.shape) for i in features.window_indices] == [(49, 4), (36, 9), (1, 64)]
    # a window covering the whole grid keeps every token: it is the image itself
    torch.testing.assert_close(
        features.window_embeddings[2][:, 0], features.global_embedding, atol=1e-5, rtol=0
    )
    # a window only sees its own patches: changing pixels outside window 0 leaves it unchanged
    edited = images.clone()
    edited[:, :, 32:, 32:] = 0.5
    small, _ = tiny.encode_windows(edited, (2,))
    torch.testing.assert_close(small[0][:, 0], features.window_embeddings[0][:, 0], atol=1e-5, rtol=0)
    assert (small[0][:, -1] - features.window_embeddings[0][:, -1]).abs().max() > 1e-4


def test_text_from_token_embeddings_equals_encode_text(tiny):
    sentences = ["a photo of a widget.", "a blurry photo of the damaged widget with a scratch."]
    tokens = tiny.tokenize(sentences)
    assert tokens.token_ids.shape == (2, 77)
    assert tokens.token_embeddings.shape == (2, 77, tiny.text_width)
    direct = tiny.encode_text(sentences)
    assert direct.shape == (2, tiny.embed_dim)
    torch.testing.assert_close(direct.norm(dim=-1), torch.ones(2))
    torch.testing.assert_close(tiny.encode_text_embeddings(tokens.token_embeddings, tokens.eot_index), direct)
    # learnable context (CoOp style): gradients reach the inputs, never the frozen weights
    context = tokens.token_embeddings.detach().clone().requires_grad_(True)
    tiny.encode_text_embeddings(context, tokens.eot_index).sum().backward()
    assert context.grad is not None and context.grad.abs().sum() > 0
    assert all(p.grad is None for p in tiny.parameters())
    with pytest.raises(ValueError, match="token_embeddings"):
        tiny.encode_text_embeddings(torch.zeros(2, 77, 3), tokens.eot_index)


def test_prompt_ensemble_and_text_features(tiny):
    states, templates = ["{}", "flawless {}"], ["a photo of a {}.", "a dark photo of the {}."]
    prototype = tiny.prompt_ensemble(states, templates, "metal nut")
    assert prototype.shape == (tiny.embed_dim,)
    torch.testing.assert_close(prototype.norm(), torch.tensor(1.0))
    manual = F.normalize(tiny.encode_text(compose_prompts(states, templates, "metal nut")).mean(0), dim=0)
    torch.testing.assert_close(prototype, manual)
    pair = tiny.text_features_for(states, ["damaged {}"], templates, "metal nut")
    assert pair.shape == (2, tiny.embed_dim)
    torch.testing.assert_close(pair[0], prototype)
    torch.testing.assert_close(pair.norm(dim=-1), torch.ones(2))


def test_backbone_is_frozen(tiny):
    assert not any(p.requires_grad for p in tiny.parameters())
    tiny.train()
    assert not tiny.training and not tiny.model.training
