"""Image metrics and pixel AUROC / F1-max against scikit-learn and brute-force loops."""

import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score, roc_auc_score

from fsad_lightning.metrics import f1_max, image_metrics, pixel_metrics


def _brute_force_f1_max(scores: np.ndarray, labels: np.ndarray) -> float:
    best = 0.0
    for t in np.unique(scores):
        predicted = scores >= t
        tp = np.sum(predicted & (labels == 1))
        fp = np.sum(predicted & (labels == 0))
        fn = np.sum(~predicted & (labels == 1))
        best = max(best, 2 * tp / (2 * tp + fp + fn))
    return float(best)


@pytest.mark.parametrize("seed", range(5))
def test_image_metrics_match_sklearn_and_brute_force(seed):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, size=40)
    labels[:2] = [0, 1]
    # large, tied scores: a sigmoid inside torchmetrics would squash these into ties of 1.0
    scores = np.round(rng.normal(50.0, 10.0, size=40) + 8.0 * labels, decimals=[0, 1, 3][seed % 3])
    result = image_metrics(torch.from_numpy(scores), torch.from_numpy(labels))
    assert result["image_auroc"] == pytest.approx(roc_auc_score(labels, scores), abs=1e-6)
    assert result["image_auprc"] == pytest.approx(average_precision_score(labels, scores), abs=1e-6)
    assert result["image_f1_max"] == pytest.approx(_brute_force_f1_max(scores, labels), abs=1e-6)
    assert f1_max(scores, labels) == pytest.approx(result["image_f1_max"], abs=1e-12)


@pytest.mark.parametrize("labels", [[0, 0, 0], [1, 1, 1]])
def test_one_class_is_a_clear_error(labels):
    kind = "normal" if labels[0] == 0 else "anomalous"
    with pytest.raises(ValueError, match=f"only {kind} images: AUROC is undefined"):
        image_metrics(torch.tensor([0.1, 0.2, 0.3]), torch.tensor(labels))


def test_image_metrics_reject_bad_labels_and_nan():
    with pytest.raises(ValueError, match="0 \\(normal\\) or 1"):
        image_metrics(torch.tensor([0.1, 0.2]), torch.tensor([0, 2]))
    with pytest.raises(ValueError, match="NaN"):
        image_metrics(torch.tensor([0.1, float("nan")]), torch.tensor([0, 1]))


@pytest.mark.parametrize("seed", range(4))
def test_pixel_auroc_and_f1_max_match_sklearn_and_brute_force(seed):
    rng = np.random.default_rng(100 + seed)
    masks = np.zeros((3, 12, 12), dtype=bool)
    masks[0, 2:6, 3:9] = True
    masks[1, 7:11, 1:3] = True
    levels = [5, 50, 100_000, 7][seed]
    maps = (np.floor(rng.random(masks.shape) * levels) / levels + 0.2 * masks).astype(np.float32)
    result = pixel_metrics(maps, masks)
    labels, scores = masks.ravel().astype(int), maps.ravel()
    assert result["pixel_auroc"] == pytest.approx(roc_auc_score(labels, scores), abs=1e-9)
    assert result["pixel_f1_max"] == pytest.approx(_brute_force_f1_max(scores, labels), abs=1e-9)
    assert 0.0 <= result["pixel_aupro"] <= 1.0
