"""Label-free decision thresholds: from the normal shots alone, when is an image anomalous?

A few-shot detector sees no anomalous image before it is deployed, so its threshold cannot be fitted
on labelled anomalies (as anomalib's adaptive threshold is). Here it is set from the normal shots:

1. **Leave-one-out normal scores.** Each shot ``i`` is scored by the method against the memory built
   from the *other* shots (:meth:`~fsad_lightning.methods.base.FewShotAnomalyModule.leave_one_out_scores`):
   a normal image the memory has never seen, which is what a good part on the line is. With
   :attr:`ThresholdRule.views` > 0 each held-out shot also contributes that many augmented views
   (the datamodule's augmentation, seeded), scored against the same memory.
2. **The rule.** With ``s`` those ``n`` normal scores, ``Q_q(s)`` their ``q``-quantile (linear
   interpolation, ``q = 1`` the largest) and ``sigma(s)`` their standard deviation (population,
   ``ddof = 0``)::

       threshold = Q_q(s) + margin * sigma(s)

   Defaults ``q = 1.0``, ``margin = 0.0``: the largest leave-one-out score of a normal shot. The memory
   of the deployed detector holds all ``k`` shots (one more than each leave-one-out memory), so good
   parts usually score below that and the largest score is already a margin; raise ``margin`` for
   fewer false alarms, lower ``q`` for fewer misses.
3. **Decision.** An image is anomalous when its score is at or above the threshold (``score >=
   threshold``, as the overlays of :mod:`fsad_lightning.callbacks.visualizer` decide).

A fixed ``threshold: <float>`` in the config replaces the rule. The way the threshold was set (rule,
normal scores, or the fixed value) is recorded in :class:`ThresholdRecord` and written beside every
prediction and into the detector folder.

With ``k = 1`` there is no "other shot" to build a memory from, so leave-one-out is impossible; scoring
augmented views of the single shot against a memory holding that very shot would give a far too low
threshold. Such a run needs ``threshold: <float>`` (:func:`require_calibration_shots` says so in one
line).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor

#: how :attr:`ThresholdRecord.source` names the two ways a threshold is set
LEAVE_ONE_OUT, FIXED = "leave_one_out", "fixed"


@dataclass(frozen=True)
class ThresholdRule:
    """The label-free threshold rule (module docstring): ``Q_q(s) + margin * sigma(s)``.

    Args:
        quantile: ``q`` in ``[0, 1]``; 1 takes the largest leave-one-out normal score.
        margin: multiples of the normal scores' standard deviation added to the quantile (may be negative).
        views: augmented views of each held-out shot scored besides the shot itself (0: none). They use
            the datamodule's ``augment_options`` (its default augmentation when it has none).
    """

    quantile: float = 1.0
    margin: float = 0.0
    views: int = 0

    def __post_init__(self) -> None:
        if not (isinstance(self.quantile, (int, float)) and 0.0 <= float(self.quantile) <= 1.0):
            raise ValueError(f"threshold_from_shots.quantile must be in [0, 1], got {self.quantile!r}")
        if not (isinstance(self.margin, (int, float)) and math.isfinite(float(self.margin))):
            raise ValueError(f"threshold_from_shots.margin must be a finite number, got {self.margin!r}")
        if isinstance(self.views, bool) or not isinstance(self.views, int) or self.views < 0:
            raise ValueError(f"threshold_from_shots.views must be an integer >= 0, got {self.views!r}")

    def describe(self) -> str:
        q = "max" if float(self.quantile) == 1.0 else f"Q{float(self.quantile):g}"
        margin = f" + {float(self.margin):g} std" if float(self.margin) else ""
        views = f", {self.views} augmented views per shot" if self.views else ""
        return f"{q} of the leave-one-out normal scores{margin}{views}"


@dataclass
class ThresholdRecord:
    """How a threshold was set: written to ``threshold.json``, results and the detector manifest."""

    value: float
    source: str  # LEAVE_ONE_OUT or FIXED
    rule: dict[str, Any] | None = None
    description: str = ""
    normal_scores: list[float] = field(default_factory=list)
    num_shots: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ThresholdRecord:
        known = {k: data[k] for k in ("value", "source", "rule", "description", "normal_scores", "num_shots") if k in data}
        return cls(**known)


def threshold_from_normal_scores(scores: Tensor, rule: ThresholdRule) -> float:
    """``Q_q(s) + margin * sigma(s)`` of the normal scores ``s`` (fp32 math, any shape; NaN refused)."""
    values = torch.as_tensor(scores).detach().reshape(-1).float().cpu()
    if values.numel() == 0:
        raise ValueError("no normal score to set a threshold from")
    if not bool(torch.isfinite(values).all()):
        raise ValueError(f"the leave-one-out normal scores are not all finite: {values.tolist()}")
    quantile = torch.quantile(values, float(rule.quantile)).item()
    spread = values.std(unbiased=False).item() if values.numel() > 1 else 0.0
    return float(quantile + float(rule.margin) * spread)


def fixed_record(value: float) -> ThresholdRecord:
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"threshold must be a finite number, got {value!r}")
    return ThresholdRecord(value=value, source=FIXED, description=f"fixed in the config (threshold: {value:g})")


def leave_one_out_record(scores: Tensor, rule: ThresholdRule, num_shots: int) -> ThresholdRecord:
    values = torch.as_tensor(scores).detach().reshape(-1).float().cpu()
    return ThresholdRecord(
        value=threshold_from_normal_scores(values, rule),
        source=LEAVE_ONE_OUT,
        rule=asdict(rule),
        description=rule.describe(),
        normal_scores=[float(v) for v in values],
        num_shots=int(num_shots),
    )


def require_calibration_shots(num_shots: int) -> None:
    """ValueError (one line) when ``num_shots`` < 2: leave-one-out needs another shot to score against."""
    if num_shots < 2:
        raise ValueError(
            f"the label-free threshold needs at least 2 normal shots (leave-one-out), got {num_shots}: "
            "set `threshold: <float>` in the config (or --threshold) or use k_shot >= 2"
        )


def decide(scores: Tensor, threshold: float | None) -> Tensor | None:
    """Boolean ``[N]``: anomalous where the score is at or above ``threshold`` (``None`` without one)."""
    if threshold is None:
        return None
    return torch.as_tensor(scores).detach().float().cpu() >= float(threshold)


def rates_at_threshold(scores: Tensor, labels: Tensor, threshold: float) -> dict[str, float]:
    """What the decision ``score >= threshold`` (:func:`decide`) gives on labelled images (0 normal, 1 anomalous):
    ``threshold_precision``, ``threshold_recall`` (true-positive rate on anomalous images),
    ``threshold_f1`` and ``threshold_fpr`` (false-positive rate on good images), as float fractions.
    Precision is 0 when nothing is flagged; a rate over no images is NaN."""
    scores = torch.as_tensor(scores).detach().reshape(-1).float().cpu()
    labels = torch.as_tensor(labels).detach().reshape(-1).cpu().bool()
    flagged = decide(scores, threshold)
    tp = int((flagged & labels).sum())
    fp = int((flagged & ~labels).sum())
    positives, negatives = int(labels.sum()), int((~labels).sum())
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / positives if positives else float("nan")
    f1 = 2 * precision * recall / (precision + recall) if positives and (precision + recall) > 0 else 0.0
    return {
        "threshold": float(threshold),
        "threshold_precision": float(precision),
        "threshold_recall": float(recall),
        "threshold_f1": float(f1),
        "threshold_fpr": fp / negatives if negatives else float("nan"),
    }
