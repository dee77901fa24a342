"""The label-free threshold: the rule, the rates it gives, and leave-one-out on a toy memory method."""

from __future__ import annotations

import math

import pytest
import torch

from fsad_lightning.data.batch import IMAGE, PATH, AnomalyOutput
from fsad_lightning.methods.base import FewShotAnomalyModule
from fsad_lightning.thresholds import (
    FIXED,
    LEAVE_ONE_OUT,
    ThresholdRule,
    decide,
    rates_at_threshold,
    threshold_from_normal_scores,
)


def test_the_rule_is_a_quantile_plus_a_margin_of_standard_deviations():
    scores = torch.tensor([4.0, 1.0, 3.0, 2.0])
    assert threshold_from_normal_scores(scores, ThresholdRule()) == 4.0  # default: the largest
    std = math.sqrt(1.25)  # population std of 1, 2, 3, 4
    rule = ThresholdRule(quantile=0.5, margin=2.0)
    assert threshold_from_normal_scores(scores, rule) == pytest.approx(2.5 + 2.0 * std)
    assert threshold_from_normal_scores(torch.tensor([0.7]), ThresholdRule(margin=3.0)) == pytest.approx(0.7)
    with pytest.raises(ValueError, match="not all finite"):
        threshold_from_normal_scores(torch.tensor([1.0, float("nan")]), ThresholdRule())


@pytest.mark.parametrize(
    "options, field", [({"quantile": 1.5}, "quantile"), ({"margin": float("inf")}, "margin"), ({"views": -1}, "views")]
)
def test_a_bad_rule_is_refused_naming_the_field(options, field):
    with pytest.raises(ValueError, match=f"threshold_from_shots.{field}"):
        ThresholdRule(**options)


def test_rates_at_the_threshold_count_scores_at_or_above_it_as_anomalous():
    scores = torch.tensor([0.1, 0.5, 0.6, 0.9, 0.4, 0.5])
    labels = torch.tensor([0, 0, 0, 1, 1, 1])
    rates = rates_at_threshold(scores, labels, 0.5)  # flagged: 0.5 and 0.6 (good), 0.9 and 0.5 (defects)
    assert rates["threshold_precision"] == 0.5 and rates["threshold_recall"] == pytest.approx(2 / 3)
    assert rates["threshold_fpr"] == pytest.approx(2 / 3)
    assert rates["threshold_f1"] == pytest.approx(2 * 0.5 * (2 / 3) / (0.5 + 2 / 3))
    assert decide(scores, 0.5).tolist() == [False, True, True, True, False, True]
    assert decide(scores, None) is None
    nothing = rates_at_threshold(scores, labels, 10.0)
    assert nothing["threshold_precision"] == 0.0 and nothing["threshold_f1"] == 0.0 and nothing["threshold_fpr"] == 0.0


class NearestShot(FewShotAnomalyModule):
    """Toy memory method: the score of an image is its distance to the nearest shot (mean pixel)."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("memory", torch.empty(0), persistent=False)
        self.fits: list[int] = []

    def fit_shots(self, shots):
        self.fits.append(int(shots[IMAGE].shape[0]))
        self.memory = shots[IMAGE].mean(dim=(1, 2, 3))

    def predict_anomaly(self, batch):
        values = batch[IMAGE].mean(dim=(1, 2, 3))
        return AnomalyOutput(pred_score=(values[:, None] - self.memory[None]).abs().min(dim=1).values)


def _shots(levels):
    images = torch.stack([torch.full((3, 4, 4), float(v)) for v in levels])
    return {IMAGE: images, PATH: [f"shot{i}.png" for i in range(len(levels))], "category": ["toy"] * len(levels)}


def test_leave_one_out_scores_each_shot_against_the_memory_of_the_others():
    module = NearestShot()
    scores = module.leave_one_out_scores(_shots([0.1, 0.2, 0.5, 0.55]))
    torch.testing.assert_close(scores, torch.tensor([0.1, 0.1, 0.05, 0.05]))
    assert module.fits == [3, 3, 3, 3]  # every memory lacks the shot it scores
    record = module.calibrate_threshold(_shots([0.1, 0.2, 0.5, 0.55]))
    assert record.source == LEAVE_ONE_OUT and module.decision_threshold == pytest.approx(0.1)
    assert record.normal_scores == pytest.approx([0.1, 0.1, 0.05, 0.05]) and record.num_shots == 4


def test_augmented_views_of_each_held_out_shot_join_the_normal_scores():
    module = NearestShot()
    module.configure_threshold(rule=ThresholdRule(views=2))

    def brighten(images, masks, seed):
        return images + 0.01 * (1 + seed % 7), masks

    record = module.calibrate_threshold(_shots([0.1, 0.3, 0.6]), augment=brighten, seed=0)
    assert len(record.normal_scores) == 3 * (1 + 2) and record.rule["views"] == 2


def test_a_fixed_threshold_needs_no_leave_one_out_and_one_shot_needs_one():
    module = NearestShot()
    with pytest.raises(ValueError, match="at least 2 normal shots.*threshold: <float>"):
        module.calibrate_threshold(_shots([0.1]))
    assert module.calibrate_threshold(_shots([0.1]), required=False) is None and module.decision_threshold is None
    module.configure_threshold(0.25)
    record = module.calibrate_threshold(_shots([0.1]))
    assert record.source == FIXED and module.decision_threshold == 0.25 and module.fits == []


def test_the_shot_memory_round_trips_through_its_hooks():
    module = NearestShot()
    module.fit_shots(_shots([0.1, 0.4]))
    memory = module.shot_memory()
    assert set(memory) == {"memory"}
    other = NearestShot()
    other.load_shot_memory(memory)
    torch.testing.assert_close(other.memory, torch.tensor([0.1, 0.4]))
    with pytest.raises(ValueError, match="does not hold"):
        other.load_shot_memory({"bank": torch.zeros(1)})
