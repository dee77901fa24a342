"""ADP's equations on hand-made features: eq. 1/3 (CLIP guidance), eq. 4 (hinge), eq. 5-6, eq. 10."""

import math

import pytest
import torch

from fsad_lightning.methods.adp.losses import (
    importance_weight,
    normal_alignment_loss,
    normal_state_probability,
    reference_associated_score,
    repel_loss,
    weighted_prototypes,
)

E1, E2, E3 = torch.eye(3)


def test_normal_state_probability_is_the_two_way_clip_softmax():
    # cos(f, g_n) = 1, cos(f, g_a) = 0 at 1 / tau = 2: P = e^2 / (e^2 + e^0)
    p = normal_state_probability(E1, E1, E2, temperature=2.0)
    assert p.item() == pytest.approx(math.exp(2) / (math.exp(2) + 1.0), rel=1e-6)
    # cosine similarity: the scale of any feature does not matter
    assert normal_state_probability(5 * E1, 0.1 * E1, 3 * E2, 2.0).item() == pytest.approx(p.item(), rel=1e-6)
    # an image between the two prompts is undecided; one closer to g_a is more likely anomalous
    assert normal_state_probability(E1 + E2, E1, E2, 100.0).item() == pytest.approx(0.5, abs=1e-6)
    assert normal_state_probability(E1 + 2 * E2, E1, E2, 1.0).item() < 0.5
    # per-sample text pairs broadcast against a batch of images
    images = torch.stack([E1, E2])
    per_sample = normal_state_probability(images, torch.stack([E1, E2]), torch.stack([E2, E1]), 2.0)
    torch.testing.assert_close(per_sample, p.repeat(2))


def test_clip_guidance_term_of_eq3_pulls_the_normal_prompt_towards_the_shots():
    alpha = 0.003
    normal_text = torch.nn.Parameter(torch.tensor([[1.0, 1.0, 0.0]]))
    anomalous_text = E2.unsqueeze(0)
    p = normal_state_probability(E1.unsqueeze(0), normal_text, anomalous_text, temperature=10.0)
    loss = normal_alignment_loss(p, alpha)
    assert loss.item() == pytest.approx(-alpha * p.item(), rel=1e-6)
    loss.backward()
    # gradient descent moves g(T(S_n(c))) towards the shot's embedding e1 (and away from e2)
    step = -normal_text.grad[0]
    assert step[0] > 0 and step[1] < 0
    # the term is a batch mean over the shots: sum_i alpha * P_i / K
    probabilities = torch.tensor([0.2, 0.6, 1.0])
    assert normal_alignment_loss(probabilities, alpha).item() == pytest.approx(-alpha * 0.6)


def test_repel_hinge_is_zero_below_the_margin():
    gamma, alpha = 0.8, 0.002
    below = torch.tensor([0.0, 0.3, 0.79, 0.8], requires_grad=True)
    loss = repel_loss(below, gamma, alpha, num_pseudo_anomalies=4, num_shots=4)
    assert loss.item() == 0.0
    loss.backward()
    assert torch.equal(below.grad, torch.zeros(4))  # no push once CLIP no longer finds them normal

    mixed = torch.tensor([0.9, 1.0, 0.5, 0.2], requires_grad=True)
    loss = repel_loss(mixed, gamma, alpha, num_pseudo_anomalies=4, num_shots=4)
    assert loss.item() == pytest.approx(alpha * (0.1 + 0.2) / 4)
    loss.backward()
    torch.testing.assert_close(mixed.grad, torch.tensor([alpha / 4, alpha / 4, 0.0, 0.0]))


@pytest.mark.parametrize(("num_pseudo", "num_shots"), [(20, 4), (20, 16), (4, 4), (3, 8)])
def test_repel_and_attraction_keep_eq4s_L_to_K_ratio(num_pseudo, num_shots):
    """Eq. 4: alpha * sum over the L pseudo-anomalies against alpha * sum over the K shots. Every image
    equally far from its target (P = 1, margin 0) must weigh the same, so the terms are in ratio L : K."""
    alpha, batch = 0.002, 4  # a step draws 4 images of each set, whatever L and K are
    shots = torch.ones(batch, requires_grad=True)
    pseudo = torch.ones(batch, requires_grad=True)
    attraction = normal_alignment_loss(shots, alpha)
    repel = repel_loss(pseudo, 0.0, alpha, num_pseudo_anomalies=num_pseudo, num_shots=num_shots)
    assert repel.item() / -attraction.item() == pytest.approx(num_pseudo / num_shots)
    (repel - attraction).backward()  # per-image gradients in the same ratio
    torch.testing.assert_close(pseudo.grad / shots.grad, torch.full((batch,), num_pseudo / num_shots))
    with pytest.raises(ValueError, match="L=0"):
        repel_loss(pseudo, 0.0, alpha, num_pseudo_anomalies=0, num_shots=num_shots)


def test_importance_weight_on_a_toy_case():
    # eq. 5 by hand: mean P(S_n | shots) + mean P(S_a | pseudo-anomalies)
    weight = importance_weight(torch.tensor([0.9, 0.7]), torch.tensor([0.6, 0.2, 0.4]))
    assert weight.item() == pytest.approx(0.8 + 0.4)

    # a concept whose prompts separate shots (near e1) from pseudo-anomalies (near e2) gets a weight near 2,
    # the same concept with swapped states near 0, an uninformative one exactly 1
    shots = torch.stack([E1 + 0.1 * E3, E1 - 0.1 * E3])
    pseudo = torch.stack([E2 + 0.1 * E3, E2, E2 - 0.2 * E3])

    def w(normal, anomalous):
        p_shots = normal_state_probability(shots, normal, anomalous, 100.0)
        p_pseudo = normal_state_probability(pseudo, normal, anomalous, 100.0)
        return importance_weight(p_shots, 1.0 - p_pseudo).item()

    assert w(E1, E2) == pytest.approx(2.0, abs=1e-4)
    assert w(E2, E1) == pytest.approx(0.0, abs=1e-4)
    assert w(E3, E3) == pytest.approx(1.0, abs=1e-6)
    with pytest.raises(ValueError, match="at least one"):
        importance_weight(torch.tensor([]), torch.tensor([0.5]))


def test_weighted_prototypes_mix_concepts_by_weight_and_average_templates():
    # 2 concepts x 2 templates x 3 dims
    normal = torch.stack([torch.stack([E1, E2]), torch.stack([E3, E3])])
    anomalous = -normal
    prototypes = weighted_prototypes(torch.tensor([1.0, 3.0]), normal, anomalous)
    # p_n = mean_T (1 * g_1(T) + 3 * g_2(T)) / 4 = ((e1 + e2) / 2 + 3 e3) / 4
    expected_normal = ((E1 + E2) / 2 + 3 * E3) / 4
    torch.testing.assert_close(prototypes, torch.stack([expected_normal, -expected_normal]))
    # equal weights: the plain average; the scale of the weights does not matter
    torch.testing.assert_close(
        weighted_prototypes(torch.tensor([2.0, 2.0]), normal, anomalous),
        weighted_prototypes(torch.tensor([0.5, 0.5]), normal, anomalous),
    )
    with pytest.raises(ValueError, match="positive sum"):
        weighted_prototypes(torch.zeros(2), normal, anomalous)
    with pytest.raises(ValueError, match="one weight per concept"):
        weighted_prototypes(torch.ones(3), normal, anomalous)


def test_reference_associated_score_averages_the_concept_score_and_the_map_maximum():
    concept = torch.tensor([0.2, 0.9])
    maps = torch.tensor([[[0.1, 0.4], [0.0, 0.2]], [[0.3, 0.3], [0.1, 0.0]]])
    torch.testing.assert_close(reference_associated_score(concept, maps), torch.tensor([0.3, 0.6]))
