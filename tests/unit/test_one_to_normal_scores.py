"""One-to-Normal eq. 2-7 on hand-made tensors."""

import pytest
import torch

from fsad_lightning.methods.one_to_normal.scores import (
    branch_anomaly_map,
    level_averaged_max,
    normal_pool_distance_grids,
    normal_pool_score,
    personalized_distance_grids,
    personalized_score,
    select_personalized,
    ssim_distance,
    text_score,
    triplet_anomaly_map,
    triplet_score,
)


def _unit(*values):
    return torch.tensor(values, dtype=torch.float32)


def test_personalized_score_eq4_max_over_grid_mean_over_levels():
    # level 1: a 1x2 grid, cell 0 identical (distance 0), cell 1 orthogonal (distance 1)
    q1 = torch.stack([_unit(1, 0), _unit(0, 1)]).reshape(1, 1, 2, 2)
    p1 = torch.stack([_unit(1, 0), _unit(1, 0)]).reshape(1, 1, 2, 2)
    # level 2: a 1x1 grid at 60 degrees: distance 1 - cos(60) = 0.5
    q2 = _unit(1, 0, 0).reshape(1, 1, 1, 3)
    p2 = _unit(0.5, 3**0.5 / 2, 0).reshape(1, 1, 1, 3)
    grids = personalized_distance_grids([q1, q2], [p1, p2])
    assert torch.allclose(grids[0], torch.tensor([[[0.0, 1.0]]]), atol=1e-6)
    assert torch.allclose(personalized_score([q1, q2], [p1, p2]), torch.tensor([(1.0 + 0.5) / 2]), atol=1e-6)


def test_normal_pool_score_eq5_takes_nearest_memory_patch():
    query = torch.stack([_unit(1, 0), _unit(0, 1)]).reshape(1, 1, 2, 2)
    # the bank holds (1, 0) and a vector at 60 degrees from (0, 1): nearest distances 0 and 0.5
    memory = torch.stack([_unit(1, 0), _unit(3**0.5 / 2, 0.5)])
    grids = normal_pool_distance_grids([query], [memory], chunk_size=1)
    assert torch.allclose(grids[0], torch.tensor([[[0.0, 0.5]]]), atol=1e-6)
    assert torch.allclose(normal_pool_score([query, query], [memory, memory]), torch.tensor([0.5]), atol=1e-6)


def test_level_averaged_max_is_per_image():
    grids = [torch.tensor([[[0.1, 0.9]], [[0.2, 0.3]]]), torch.tensor([[[0.5]], [[0.7]]])]
    assert torch.allclose(level_averaged_max(grids), torch.tensor([(0.9 + 0.5) / 2, (0.3 + 0.7) / 2]))


def test_text_score_eq6_is_the_anomalous_softmax_probability():
    text = torch.stack([_unit(1, 0), _unit(0, 1)])
    image = torch.stack([_unit(1, 0), _unit(0, 1), _unit(1, 1)])
    scores = text_score(image, text, temperature=1.0)
    expected_first = torch.softmax(torch.tensor([1.0, 0.0]), 0)[1]
    assert torch.allclose(
        scores, torch.stack([expected_first, 1 - expected_first, torch.tensor(0.5)]), atol=1e-6
    )
    with pytest.raises(ValueError, match=r"\[B, d\]"):
        text_score(image[0], text)


def test_triplet_score_eq7_weights_and_switches():
    s_p, s_n, s_t = torch.tensor([0.2]), torch.tensor([0.4]), torch.tensor([0.8])
    assert torch.allclose(triplet_score(s_p, s_n, s_t), torch.tensor([0.2 + 0.4 + 0.5 * 0.8]))
    assert torch.allclose(triplet_score(s_p, s_n, s_t, alpha=2.0, beta=0.0), torch.tensor([1.0]))
    assert torch.allclose(triplet_score(None, s_n, None), s_n)
    with pytest.raises(ValueError, match="switched off"):
        triplet_score(None, None, None)


def test_ssim_selection_eq2_picks_the_closest_reconstruction():
    generator = torch.Generator().manual_seed(0)
    query = torch.rand(2, 3, 32, 32, generator=generator)
    noisy = (query + 0.3 * torch.randn(2, 3, 32, 32, generator=generator)).clamp(0, 1)
    slightly = (query + 0.02 * torch.randn(2, 3, 32, 32, generator=generator)).clamp(0, 1)
    other = torch.rand(2, 3, 32, 32, generator=generator)
    # the closest reconstruction sits at a different prompt position for each query
    recon = torch.stack(
        [torch.stack([noisy[0], slightly[0], other[0]]), torch.stack([other[1], noisy[1], slightly[1]])]
    )
    personalized, index, losses = select_personalized(query, recon)
    assert index.tolist() == [1, 2]
    assert torch.equal(personalized[0], slightly[0]) and torch.equal(personalized[1], slightly[1])
    assert losses.shape == (2, 3)
    assert float(ssim_distance(query, query).abs().max()) < 1e-4


def test_selection_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="reconstructions"):
        select_personalized(torch.rand(2, 3, 8, 8), torch.rand(2, 3, 8, 8))


def test_anomaly_maps_come_from_both_image_branches():
    grid = torch.zeros(1, 4, 4)
    grid[0, 1, 2] = 1.0
    map_p = branch_anomaly_map([grid, grid[:, :2, :2]], 16, sigma=0.0)
    assert map_p.shape == (1, 16, 16)
    combined = triplet_anomaly_map([grid], [grid], 16, alpha=0.5, sigma=1.0)
    alone = triplet_anomaly_map([grid], None, 16, sigma=1.0)
    assert torch.allclose(combined, 1.5 * alone, atol=1e-6)
    peak = int(combined[0].flatten().argmax())
    assert (peak // 16) // 4 == 1 and (peak % 16) // 4 == 2
    assert triplet_anomaly_map(None, None, 16) is None


def test_level_count_mismatch_is_an_error():
    q = torch.rand(1, 2, 2, 4)
    with pytest.raises(ValueError, match="feature levels"):
        personalized_distance_grids([q, q], [q])
    with pytest.raises(ValueError, match=r"\[B, h, w, C\]"):
        personalized_distance_grids([q[0]], [q[0]])
