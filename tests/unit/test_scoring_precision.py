"""The shared scoring math is float32 whatever the caller's autocast state (bf16-mixed, 16-mixed)."""

import pytest
import torch

from fsad_lightning import scoring
from fsad_lightning.backbones.perceptual import PerceptualDistance
from fsad_lightning.methods.adp import losses as adp_losses
from fsad_lightning.methods.anomalysd.torch_model import fuse_scores
from fsad_lightning.methods.one_to_normal.scores import ssim_distance, triplet_score
from fsad_lightning.methods.winclip.torch_model import harmonic_window_aggregation


def _cases():
    g = torch.Generator().manual_seed(0)
    query = torch.randn(2, 20, 32, generator=g) * 3
    memory = torch.randn(50, 32, generator=g) * 3
    text = torch.randn(2, 32, generator=g)
    maps = torch.rand(2, 7, 7, generator=g) + 0.1
    images = torch.rand(2, 3, 24, 24, generator=g)
    windows = torch.rand(2, 4, generator=g) + 0.1
    window_indices = torch.tensor([[0, 1, 3, 4], [1, 2, 4, 5], [3, 4, 6, 7], [4, 5, 7, 8]])
    return {
        "min_cosine_distance": lambda: scoring.min_cosine_distance(query, memory),
        "min_euclidean_distance": lambda: scoring.min_euclidean_distance(query, memory),
        "paired_cosine_distance": lambda: scoring.paired_cosine_distance(query, query.flip(0)),
        "text_anomaly_probability": lambda: scoring.text_anomaly_probability(query, text, 100.0),
        "harmonic_mean": lambda: scoring.harmonic_mean([maps, maps.flip(0)]),
        "upsample_and_smooth": lambda: scoring.upsample_and_smooth(maps, (28, 28), 2.0),
        "ssim_distance": lambda: ssim_distance(images, images.flip(0), window_size=7),
        "triplet_score": lambda: triplet_score(maps[:, 0, 0], maps[:, 1, 1], maps[:, 2, 2]),
        "adp_normal_state_probability": lambda: adp_losses.normal_state_probability(
            query, text[0], text[1], 100.0
        ),
        "anomalysd_fuse_scores": lambda: fuse_scores(maps, maps.flip(0), 0.1),
        "winclip_harmonic_window_aggregation": lambda: harmonic_window_aggregation(windows, window_indices, 9),
    }


@pytest.mark.parametrize("name", sorted(_cases()))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_scoring_under_autocast_equals_fp32_and_returns_fp32(name, dtype):
    compute = _cases()[name]
    expected = compute()
    with torch.autocast("cpu", dtype=dtype):
        got = compute()
    assert got.dtype == torch.float32, f"{name} returned {got.dtype} under {dtype} autocast"
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)


def test_perceptual_distance_map_is_fp32_under_autocast():
    torch.manual_seed(0)
    distance = PerceptualDistance(weights="random")
    images, references = torch.rand(2, 3, 64, 64), torch.rand(2, 3, 64, 64)
    features_x, features_y = distance.features(references), distance.features(images)
    expected = distance.layer_distances(features_x, features_y)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = distance.layer_distances(features_x, features_y)
    for a, b in zip(got, expected):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


def test_euclidean_distance_of_a_memory_vector_is_exactly_zero():
    # large-norm features: the expanded ||q||^2 - 2 q.m + ||m||^2 alone leaves ~1e-2 after the square root
    memory = torch.randn(200, 384) * 20 + 5
    assert scoring.min_euclidean_distance(memory[:50], memory).abs().max() == 0
    assert scoring.min_cosine_distance(memory[:50], memory).abs().max() < 1e-6
