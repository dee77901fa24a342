"""WinCLIP / WinCLIP+ math and the plain nn.Module on the tiny CLIP."""

import pytest
import torch

from fsad_lightning.backbones.clip import load_clip, window_masks
from fsad_lightning.methods.winclip.torch_model import (
    WinCLIPModel,
    harmonic_window_aggregation,
    visual_association_score,
)
from fsad_lightning.scoring import harmonic_mean, text_anomaly_probability


def test_harmonic_window_aggregation_matches_per_patch_harmonic_mean():
    grid, k = (4, 5), 2
    indices = window_masks(grid, k)
    scores = torch.rand(3, indices.shape[0], generator=torch.Generator().manual_seed(0)) + 0.05
    out = harmonic_window_aggregation(scores, indices, grid[0] * grid[1])
    assert out.shape == (3, 20)
    for patch in range(20):
        covering = [w for w in range(indices.shape[0]) if patch in indices[w].tolist()]
        expected = harmonic_mean([scores[:, w] for w in covering])
        torch.testing.assert_close(out[:, patch], expected)
    # a constant score stays constant; a zero window zeroes exactly the patches it covers
    torch.testing.assert_close(
        harmonic_window_aggregation(torch.full((1, 12), 0.3), indices, 20), torch.full((1, 20), 0.3)
    )
    zeroed = scores.clone()
    zeroed[0, 0] = 0.0
    out = harmonic_window_aggregation(zeroed, indices, 20)
    assert torch.equal(out[0] == 0, torch.isin(torch.arange(20), indices[0]))
    with pytest.raises(ValueError, match="windows"):
        harmonic_window_aggregation(scores[:, :5], indices, 20)


def test_visual_association_score_is_half_the_min_cosine_distance():
    memory = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    query = torch.tensor([[2.0, 0.0], [-1.0, 0.0], [1.0, 1.0]])
    expected = torch.tensor([0.0, 0.5, 0.5 * (1 - 2**-0.5)])
    torch.testing.assert_close(visual_association_score(query, memory), expected)


@pytest.fixture(scope="module")
def winclip() -> WinCLIPModel:
    torch.manual_seed(0)
    backbone = load_clip("fsad-tiny-vit", pretrained=None)
    return WinCLIPModel(
        backbone, window_sizes=(2, 3), templates=("a photo of a {}.", "a close-up photo of the {}.")
    )


def test_zero_shot_scores_and_map(winclip):
    winclip.reset_reference()
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    out = winclip(images, ["widget", "widget"])
    assert out.pred_score.shape == (2,) and out.grid_map.shape == (2, 8, 8)
    assert out.few_shot_map is None
    assert ((out.pred_score >= 0) & (out.pred_score <= 1)).all()
    assert ((out.grid_map >= 0) & (out.grid_map <= 1)).all()
    # the map is the mean of the image scale (broadcast image score) and the window scales
    features = winclip.extract(images)
    text = winclip.text_features("widget")
    windows = [
        harmonic_window_aggregation(text_anomaly_probability(e, text), i, 64)
        for e, i in zip(features.window_embeddings, features.window_indices)
    ]
    expected = (out.pred_score.view(2, 1) + windows[0] + windows[1]) / 3
    torch.testing.assert_close(out.grid_map, expected.view(2, 8, 8))
    # per-image class names give per-image text features
    mixed = winclip(images, ["widget", "gadget"])
    torch.testing.assert_close(mixed.pred_score[0], out.pred_score[0])
    assert mixed.pred_score[1] != out.pred_score[1]
    with pytest.raises(ValueError, match="class names"):
        winclip(images, ["widget"])


def test_few_shot_reference_memory(winclip):
    generator = torch.Generator().manual_seed(3)
    shots = torch.rand(2, 3, 64, 64, generator=generator)
    winclip.fit_reference(shots, "widget")
    assert winclip.has_reference
    memory = winclip.references["widget"]
    assert memory.patch.shape == (2 * 64, winclip.backbone.width)
    assert [tuple(m.shape) for m in memory.windows] == [(2 * 49, 32), (2 * 36, 32)]

    foreign = torch.rand(1, 3, 64, 64, generator=generator)
    out = winclip(torch.cat([shots[:1], foreign]), ["widget", "widget"])
    # a shot is its own nearest neighbour at every scale: its vision map is zero
    assert out.few_shot_map[0].abs().max() < 1e-5
    assert out.few_shot_map[1].min() > 0
    torch.testing.assert_close(out.grid_map, 0.5 * (out.zero_shot_map + out.few_shot_map))
    torch.testing.assert_close(
        out.pred_score, 0.5 * (out.zero_shot_score + out.few_shot_map.flatten(1).amax(1))
    )
    assert out.pred_score[1] > out.pred_score[0] - out.zero_shot_score[0] + out.zero_shot_score[1] - 1e-6

    with pytest.raises(ValueError, match="no reference shots for category 'gadget'"):
        winclip(foreign, ["gadget"])
    winclip.reset_reference()
    assert not winclip.has_reference


def test_bad_window_sizes_and_prompts_fail_at_construction():
    backbone = load_clip("fsad-tiny-vit", pretrained=None)
    with pytest.raises(ValueError, match="window size 9"):
        WinCLIPModel(backbone, window_sizes=(2, 9))
    with pytest.raises(ValueError, match="exactly one"):
        WinCLIPModel(backbone, templates=("a photo.",))
