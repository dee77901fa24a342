"""PromptAD losses (eq. 12-15) and prompt layouts (eq. 9-11) on hand-made tensors."""

import math

import pytest
import torch
import torch.nn.functional as F

from fsad_lightning.methods.promptad.losses import (
    alignment_loss,
    anomaly_prototype,
    clip_contrastive_loss,
    explicit_anomaly_margin_loss,
    feature_prototype,
)
from fsad_lightning.methods.promptad.prompts import (
    GENERIC_ANOMALY_SUFFIXES,
    build_prompt_layout,
    resolve_anomaly_suffixes,
)

E1, E2, E3 = torch.eye(3)


def test_prototypes_normalise_the_mean_of_the_unnormalised_features():
    # official: mean of the raw text features, then L2-normalised (a longer feature weighs more)
    proto = feature_prototype(torch.stack([2 * E1, 5 * E2]))
    assert torch.allclose(proto, torch.tensor([1.0, 2.5, 0.0]) / math.sqrt(7.25))
    # eq. 14: every row of both groups counts once
    proto_a = anomaly_prototype(torch.stack([E1, E1, E1]), E2.unsqueeze(0))
    assert torch.allclose(proto_a, torch.tensor([0.75, 0.25, 0.0]) / math.sqrt(0.625))
    assert torch.allclose(anomaly_prototype(None, E3.unsqueeze(0)), E3)
    with pytest.raises(ValueError, match="manual or learnable"):
        anomaly_prototype(None, None)


def test_clip_loss_matches_softmax_by_hand_and_rewards_the_normal_prototype():
    z = torch.stack([E1, E1 + 0.5 * E2])
    anomalies = torch.stack([E2, E3])
    loss = clip_contrastive_loss(z, E1, anomalies, logit_scale=10.0)
    zn = F.normalize(z, dim=-1)
    expected = 0.0
    for row in zn:
        logits = 10.0 * torch.stack([row @ E1, row @ E2, row @ E3])
        expected += -torch.log_softmax(logits, dim=0)[0] / 2
    assert torch.allclose(loss, expected)
    # swapping the roles (the normal prototype is now far from z) must cost more
    assert clip_contrastive_loss(z, E3, torch.stack([E1, E2]), 10.0) > loss
    # without negatives the loss is log(1) = 0 (the degenerate one-class CoOp)
    assert clip_contrastive_loss(z, E1, torch.empty(0, 3), 10.0).abs() < 1e-6


def test_eam_is_zero_when_the_normal_prototype_is_closer_and_positive_otherwise():
    z = torch.stack([E1, E1 + 0.2 * E2])
    assert explicit_anomaly_margin_loss(z, normal_prototype=E1, anomaly_prototype=E2) == 0
    loss = explicit_anomaly_margin_loss(z, normal_prototype=E2, anomaly_prototype=E1)
    assert loss > 0
    # value by hand for the first feature: d(e1, e2) - d(e1, e1) = sqrt(2); features are normalised first
    single = explicit_anomaly_margin_loss(3 * E1.unsqueeze(0), normal_prototype=5 * E2, anomaly_prototype=E1)
    assert math.isclose(float(single), math.sqrt(2), rel_tol=1e-6)
    # a margin turns an exact tie into a positive loss
    tie = explicit_anomaly_margin_loss(E3.unsqueeze(0), E1, E2, margin=0.1)
    assert math.isclose(float(tie), 0.1, rel_tol=1e-6)


def test_alignment_loss_is_lambda_times_squared_distance_of_normalised_means():
    manual = torch.stack([E1, E1])
    learnable = torch.stack([E2, 3 * E2])
    assert math.isclose(float(alignment_loss(manual, learnable, weight=0.001)), 0.002, rel_tol=1e-6)
    assert alignment_loss(manual, 4 * manual, weight=1.0) < 1e-12
    # eq. 15: the means are of the unnormalised features, normalised afterwards
    mixed = torch.stack([E1, 3 * E2])  # mean [0.5, 1.5, 0] -> [1, 3, 0] / sqrt(10)
    expected = (torch.tensor([1.0, 3.0, 0.0]) / math.sqrt(10) - E2).pow(2).sum()
    assert math.isclose(float(alignment_loss(mixed, learnable, weight=1.0)), float(expected), rel_tol=1e-6)


def test_losses_reject_bad_shapes():
    with pytest.raises(ValueError, match="visual_features"):
        clip_contrastive_loss(E1, E1, torch.stack([E2]), 1.0)
    with pytest.raises(ValueError, match="anomaly_features"):
        clip_contrastive_loss(E1.unsqueeze(0), E1, torch.ones(2, 4), 1.0)
    with pytest.raises(ValueError, match="normal_prototype"):
        explicit_anomaly_margin_loss(E1.unsqueeze(0), torch.ones(4), E2)


# ---------------------------------------------------------------------------------------- prompts (eq. 9-11)
WORDS = {"x": 5, ".": 6, "bottle": 7, "metal": 8, "nut": 9, "with": 10, "a": 11, "crack": 12, "flaw": 13}
SOT, EOT = 1, 2


def fake_encode(text: str) -> list[int]:
    return [WORDS[w] for w in text.replace(".", " . ").lower().split()]


def test_layout_rows_share_prefixes_and_suffixes_as_the_paper_says():
    layout = build_prompt_layout(
        fake_encode,
        SOT,
        EOT,
        context_length=16,
        class_name="metal nut",
        num_normal_prompts=2,
        num_prefix_tokens=3,
        anomaly_suffixes=["with a crack", "with flaw"],
        num_learnable_suffixes=3,
        num_suffix_tokens=2,
    )
    assert (layout.num_normal, layout.num_manual, layout.num_learnable, layout.num_independent) == (
        2,
        4,
        6,
        0,
    )
    assert layout.tokens.shape == (12, 16)
    x = WORDS["x"]
    # eq. 9: [SOT] X X X metal nut . [EOT]
    assert layout.tokens[0, :8].tolist() == [SOT, x, x, x, 8, 9, 6, EOT]
    # eq. 10: prefix-major, row N + i*M + m
    assert layout.tokens[2 + 1 * 2 + 0, :11].tolist() == [SOT, x, x, x, 8, 9, 10, 11, 12, 6, EOT]
    assert layout.prefix_index.tolist() == [0, 1, 0, 0, 1, 1, 0, 0, 0, 1, 1, 1]
    # eq. 11: the learnable suffix follows the object name
    assert layout.suffix_start == 6
    assert layout.suffix_index.tolist() == [-1] * 6 + [0, 1, 2, 0, 1, 2]
    assert layout.tokens[6, :10].tolist() == [SOT, x, x, x, 8, 9, x, x, 6, EOT]
    # the sentences tokenize to the same ids (how the CLIP wrapper embeds them)
    assert layout.sentences[4] == "X X X metal nut with a crack."
    assert layout.sentences[6] == "X X X metal nut X X."
    for sentence, row in zip(layout.sentences, layout.tokens):
        assert [SOT, *fake_encode(sentence), EOT] == row[row != 0].tolist()
    assert layout.eot_index.tolist() == [7, 7, 10, 9, 10, 9] + [9] * 6
    slices = layout.group_slices()
    assert slices["manual"] == slice(2, 6) and slices["learnable"] == slice(6, 12)


def test_layout_without_semantic_concatenation_has_independent_negatives():
    layout = build_prompt_layout(fake_encode, SOT, EOT, 16, "bottle", 2, 2, semantic_concatenation=False)
    assert (layout.num_manual, layout.num_learnable, layout.num_independent) == (0, 0, 2)
    assert layout.prefix_index.tolist() == [0, 1, 2, 3]


def test_layout_errors_name_the_problem():
    with pytest.raises(ValueError, match="context length"):
        build_prompt_layout(fake_encode, SOT, EOT, 8, "metal nut", 1, 4, ["with a crack"], 0)
    with pytest.raises(ValueError, match="anomaly suffixes or learnable"):
        build_prompt_layout(fake_encode, SOT, EOT, 16, "bottle", 1, 2, [], 0)


def test_default_suffixes_are_generic_and_per_category_lists_are_explicit():
    assert resolve_anomaly_suffixes(None, "bottle") == GENERIC_ANOMALY_SUFFIXES
    assert resolve_anomaly_suffixes(None, "cable") == GENERIC_ANOMALY_SUFFIXES
    table = {"bottle": ["with a crack"], "default": ["with flaw"]}
    assert resolve_anomaly_suffixes(table, "bottle") == ("with a crack",)
    assert resolve_anomaly_suffixes(table, "cable") == ("with flaw",)
    with pytest.raises(ValueError, match="no entry for category 'cable'"):
        resolve_anomaly_suffixes({"bottle": ["with a crack"]}, "cable")
    with pytest.raises(ValueError, match="single string"):
        resolve_anomaly_suffixes("with flaw", "bottle")
