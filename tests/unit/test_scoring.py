import math

import pytest
import torch

from fsad_lightning import scoring


def test_min_cosine_distance_matches_brute_force_across_chunks():
    query = torch.randn(3, 50, 8)
    memory = torch.randn(37, 8)
    expected = (1 - torch.nn.functional.cosine_similarity(query.unsqueeze(2), memory, dim=-1)).min(dim=-1).values
    got = scoring.min_cosine_distance(query, memory, chunk_size=7)
    assert got.shape == (3, 50)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_min_euclidean_distance_matches_cdist_and_is_zero_on_memory():
    query = torch.randn(2, 10, 5)
    memory = torch.randn(13, 5)
    expected = torch.cdist(query, memory.unsqueeze(0).expand(2, -1, -1)).min(dim=-1).values
    torch.testing.assert_close(scoring.min_euclidean_distance(query, memory, chunk_size=3), expected, atol=1e-4, rtol=0)
    assert scoring.min_euclidean_distance(memory[:4], memory).abs().max() < 1e-3


def test_memory_checks_name_the_problem():
    with pytest.raises(ValueError, match="non-empty"):
        scoring.min_cosine_distance(torch.randn(2, 4), torch.empty(0, 4))
    with pytest.raises(ValueError, match="channels"):
        scoring.min_euclidean_distance(torch.randn(2, 4), torch.randn(3, 5))


def test_paired_cosine_distance():
    a = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    b = torch.tensor([[2.0, 0.0], [1.0, 0.0]])
    torch.testing.assert_close(scoring.paired_cosine_distance(a, b), torch.tensor([0.0, 1.0]))


def test_text_anomaly_probability_prefers_the_closer_prompt():
    text = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    image = torch.tensor([[0.9, 0.1], [0.1, 0.9], [1.0, 1.0]])
    prob = scoring.text_anomaly_probability(image, text, temperature=100.0)
    assert prob[0] < 0.01 and prob[1] > 0.99 and abs(prob[2] - 0.5) < 1e-6


def test_harmonic_mean_values_and_zeros():
    a = torch.tensor([1.0, 2.0, 0.0])
    b = torch.tensor([1.0, 6.0, 5.0])
    out = scoring.harmonic_mean([a, b])
    torch.testing.assert_close(out, torch.tensor([1.0, 3.0, 0.0]))
    assert torch.isfinite(out).all()
    with pytest.raises(ValueError):
        scoring.harmonic_mean([torch.tensor([-1.0])])


def test_upsample_and_smooth_shape_and_mass():
    grid = torch.zeros(2, 4, 4)
    grid[0, 1, 1] = 1.0
    out = scoring.upsample_and_smooth(grid, 32, sigma=4.0)
    assert out.shape == (2, 32, 32)
    assert out[1].abs().max() == 0
    # blurring spreads the peak but keeps its location
    peak = divmod(int(out[0].argmax()), 32)
    assert abs(peak[0] - 11.5) <= 4 and abs(peak[1] - 11.5) <= 4
    assert scoring.gaussian_kernel_size(4.0) == 33 and scoring.gaussian_kernel_size(0.5) % 2 == 1
    no_blur = scoring.upsample_and_smooth(grid, 8, sigma=0)
    assert math.isclose(float(no_blur.max()), 1.0, rel_tol=1e-6) or float(no_blur.max()) <= 1.0


def test_patch_grid():
    tokens = torch.arange(2 * 9 * 3, dtype=torch.float32).reshape(2, 9, 3)
    grid = scoring.patch_grid(tokens)
    assert grid.shape == (2, 3, 3, 3)
    assert grid[1, 2, 0, 1] == tokens[1, 1, 2]
    with pytest.raises(ValueError, match="square"):
        scoring.patch_grid(torch.zeros(1, 8, 3))
