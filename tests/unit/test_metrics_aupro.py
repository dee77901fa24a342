"""Exact AUPRO and the pixel threshold sweep: hand-computed cases and a brute-force cross-check."""

import numpy as np
import pytest
import torch
from scipy import ndimage

from fsad_lightning.metrics import (
    area_under_curve,
    aupro,
    curves,
    pixel_metrics,
    pro_curve,
    region_sizes,
    sweep_thresholds,
)
from fsad_lightning.metrics.curves import largest_scores, normal_count_for_fpr


def test_single_region_hand_computed():
    # region {0.9, 0.4} (2 pixels); normal pixels 0.7, 0.3, 0.2, 0.1 (4 pixels)
    # thresholds: 0.9 -> (FPR 0, PRO 1/2); 0.7 -> (1/4, 1/2); 0.4 -> (1/4, 1); 0.3 -> (2/4, 1)
    # area to 0.3: 0.25 * 0.5 + 0.05 * 1 = 0.175; AUPRO = 0.175 / 0.3 = 7/12
    maps = np.array([[[0.9, 0.4, 0.1], [0.7, 0.2, 0.3]]], dtype=np.float32)
    masks = np.array([[[1, 1, 0], [0, 0, 0]]], dtype=np.uint8)
    assert aupro(maps, masks) == pytest.approx(7 / 12, abs=1e-12)
    assert aupro(torch.from_numpy(maps), torch.from_numpy(masks)) == pytest.approx(7 / 12, abs=1e-12)
    assert pixel_metrics(maps, masks)["pixel_aupro"] == pytest.approx(7 / 12, abs=1e-12)


def test_regions_are_weighted_equally_not_by_size():
    # big region: row 0 (6 pixels) scored 0.1; small region: one pixel at (2, 5) scored 0.9;
    # the 11 normal pixels all score 0.5. Thresholds: 0.9 -> (0, PRO (0 + 1)/2 = 1/2); 0.5 -> (1, 1/2).
    # AUPRO = 1/2, while pixel-count weighting would give the small region only 1/7.
    maps = np.full((1, 3, 6), 0.5, dtype=np.float32)
    masks = np.zeros((1, 3, 6), dtype=bool)
    masks[0, 0, :] = True
    maps[0, 0, :] = 0.1
    masks[0, 2, 5] = True
    maps[0, 2, 5] = 0.9
    assert aupro(maps, masks) == pytest.approx(0.5, abs=1e-12)
    # pixel AUROC counts pixels: 1 of 7 defect pixels ranks above every normal pixel
    assert pixel_metrics(maps, masks)["pixel_auroc"] == pytest.approx(1 / 7, abs=1e-12)


def test_equal_scores_are_one_threshold():
    # every pixel scores 0.5: one threshold, the curve is the diagonal (0, 0) -> (1, 1);
    # PRO(0.3) = 0.3, area = 0.3 * 0.3 / 2 = 0.045, AUPRO = 0.15 (splitting the tie would give 0 or 1)
    maps = np.full((1, 1, 4), 0.5, dtype=np.float32)
    masks = np.array([[[1, 1, 0, 0]]], dtype=bool)
    assert aupro(maps, masks) == pytest.approx(0.15, abs=1e-12)
    assert pixel_metrics(maps, masks)["pixel_auroc"] == pytest.approx(0.5, abs=1e-12)


def test_negative_zero_ties_with_zero():
    # -0.0 and 0.0 are one score: a single threshold, the diagonal again
    maps = np.array([[[-0.0, 0.0, 0.0, -0.0]]], dtype=np.float32)
    masks = np.array([[[1, 0, 1, 0]]], dtype=bool)
    assert aupro(maps, masks) == pytest.approx(0.15, abs=1e-12)


def test_good_images_only_add_normal_pixels():
    # image A as in the single-region case; good image B adds 6 normal pixels (one of them 0.8)
    # n_normal = 10; thresholds: 0.9 -> (0, 1/2); 0.8 -> (0.1, 1/2); 0.7 -> (0.2, 1/2); 0.4 -> (0.2, 1);
    # 0.3 -> (0.3, 1). Area = 0.2 * 0.5 + 0.1 * 1 = 0.2; AUPRO = 2/3
    maps = np.array(
        [[[0.9, 0.4, 0.1], [0.7, 0.2, 0.3]], [[0.8, 0.05, 0.05], [0.05, 0.05, 0.05]]], dtype=np.float32
    )
    masks = np.zeros((2, 2, 3), dtype=bool)
    masks[0, 0, :2] = True
    assert aupro(maps, masks) == pytest.approx(2 / 3, abs=1e-12)
    assert aupro(list(maps), list(masks)) == pytest.approx(2 / 3, abs=1e-12)


def test_fpr_limit_interpolates_a_crossing_segment():
    # defect region (row 0, 5 pixels): 0.9 0.9 0.5 0.5 0.1; normal (row 1): 0.95 0.5 0.2 0.2 0.2
    # curve: (0,0) (0.2,0) (0.2,0.4) (0.4,0.8) (1,0.8) (1,1); the segment (0.2,0.4)-(0.4,0.8) crosses 0.3
    # at PRO 0.6: area = 0.1 * (0.4 + 0.6) / 2 = 0.05, AUPRO = 0.05 / 0.3 = 1/6
    maps = np.array([[[0.9, 0.9, 0.5, 0.5, 0.1], [0.95, 0.5, 0.2, 0.2, 0.2]]], dtype=np.float32)
    masks = np.array([[[1, 1, 1, 1, 1], [0, 0, 0, 0, 0]]], dtype=bool)
    assert aupro(maps, masks) == pytest.approx(1 / 6, abs=1e-12)
    # with the limit at 0.4 the end is a curve point: area 0.2 * (0.4 + 0.8) / 2 = 0.12 -> 0.12 / 0.4 = 0.3
    assert aupro(maps, masks, fpr_limit=0.4) == pytest.approx(0.3, abs=1e-12)
    sweep = sweep_thresholds(
        torch.from_numpy(maps[~masks]),
        torch.from_numpy(maps[masks]),
        torch.from_numpy(region_sizes(masks)),
    )
    fpr, pro = pro_curve(sweep)
    assert fpr[0] == 0 and pro[0] == 0
    assert area_under_curve(fpr, pro, 0.3) == pytest.approx(0.05, abs=1e-12)


def test_area_under_curve_interpolates_end_point():
    x = torch.tensor([0.0, 0.1, 0.5, 1.0], dtype=torch.float64)
    y = torch.tensor([0.0, 0.2, 0.6, 1.0], dtype=torch.float64)
    # y at 0.3 = 0.2 + (0.6 - 0.2) * (0.2 / 0.4) = 0.4; area = 0.1 * 0.1 + 0.2 * (0.2 + 0.4) / 2 = 0.07
    assert area_under_curve(x, y, 0.3) == pytest.approx(0.07, abs=1e-12)
    with pytest.raises(ValueError, match="before the limit"):
        area_under_curve(x[:2], y[:2], 0.3)


def test_regions_are_8_connected_and_per_image():
    diagonal = np.array([[1, 0, 0], [0, 1, 0], [0, 0, 0]], dtype=bool)
    assert region_sizes(diagonal).tolist() == [2, 2]
    stack = np.zeros((2, 3, 3), dtype=bool)
    stack[0, 1, 1] = stack[1, 1, 1] = True  # same position in two images: two regions of one pixel
    assert region_sizes(stack).tolist() == [1, 1]


def test_largest_scores_keeps_every_tie():
    scores = torch.tensor([0.1, 0.5, 0.5, 0.9, 0.5, 0.2])
    top = largest_scores(scores, 2)  # the 2nd largest is 0.5, which occurs three times
    assert top.tolist() == pytest.approx([0.5, 0.5, 0.5, 0.9])
    assert scores.tolist() == pytest.approx([0.1, 0.5, 0.5, 0.9, 0.5, 0.2])  # input untouched
    assert normal_count_for_fpr(10, 0.3) == 4 and normal_count_for_fpr(10, 1.0) == 10


def _brute_force_aupro(maps: np.ndarray, masks: np.ndarray, fpr_limit: float) -> float:
    """The MVTec definition literally: per threshold, the mean overlap of every labelled region."""
    regions = []
    for i, mask in enumerate(masks):
        labels, count = ndimage.label(mask, structure=np.ones((3, 3)))
        regions += [(i, labels == r) for r in range(1, count + 1)]
    normal = maps[masks == 0]
    fpr, pro = [0.0], [0.0]
    for t in np.unique(maps)[::-1]:
        fpr.append(float((normal >= t).mean()))
        pro.append(float(np.mean([(maps[i][region] >= t).mean() for i, region in regions])))
    fpr, pro = np.array(fpr), np.array(pro)
    beyond = np.searchsorted(fpr, fpr_limit, side="right")
    if beyond < fpr.size:
        end = np.interp(fpr_limit, fpr[beyond - 1 : beyond + 1], pro[beyond - 1 : beyond + 1])
        fpr, pro = np.r_[fpr[:beyond], fpr_limit], np.r_[pro[:beyond], end]
    return float(np.trapezoid(pro, fpr) / fpr_limit)


@pytest.mark.parametrize("seed", range(6))
def test_matches_brute_force_definition(seed):
    rng = np.random.default_rng(seed)
    masks = np.zeros((3, 10, 9), dtype=bool)
    for i in range(2):  # image 2 stays good
        for _ in range(rng.integers(1, 4)):
            y, x = rng.integers(0, 8, size=2)
            h, w = rng.integers(1, 5, size=2)
            masks[i, y : y + h, x : x + w] = True
    # coarse quantisation makes many ties, between normal and defect pixels too
    levels = [4, 30, 10_000][seed % 3]
    maps = (np.floor(rng.random(masks.shape) * levels) / levels + 0.3 * masks).astype(np.float32)
    for fpr_limit in (0.3, 0.05, 1.0):
        expected = _brute_force_aupro(maps, masks, fpr_limit)
        assert aupro(maps, masks, fpr_limit) == pytest.approx(expected, abs=1e-10)
        assert pixel_metrics(maps, masks, fpr_limit)["pixel_aupro"] == pytest.approx(expected, abs=1e-10)


def test_bad_inputs_are_clear_errors():
    maps = np.zeros((1, 2, 2), dtype=np.float32)
    with pytest.raises(ValueError, match="binary"):
        aupro(maps, np.full((1, 2, 2), 255, dtype=np.uint8))
    with pytest.raises(ValueError, match="shape"):
        aupro(maps, np.zeros((1, 2, 3), dtype=bool))
    with pytest.raises(ValueError, match="no defect pixels"):
        aupro(maps, np.zeros((1, 2, 2), dtype=bool))
    with pytest.raises(ValueError, match="NaN"):
        aupro(np.full((1, 2, 2), np.nan, dtype=np.float32), np.eye(2, dtype=bool)[None])
    with pytest.raises(ValueError, match="FPR limit"):
        aupro(maps, np.eye(2, dtype=bool)[None], fpr_limit=0.0)


def test_pure_torch_path_used_on_gpus_gives_the_same_values(monkeypatch):
    rng = np.random.default_rng(7)
    masks = np.zeros((4, 16, 16), dtype=bool)
    masks[0, 3:9, 2:6] = masks[1, 10:12, 10:15] = masks[1, 0, 0] = True
    maps = (np.floor(rng.random(masks.shape) * 40) / 40 + 0.25 * masks).astype(np.float32)
    maps[0, 0, :4] = -0.0  # negative zero ties with zero on both paths
    maps[2, 0, :4] = 0.0
    with_numpy = {"aupro": aupro(maps, masks), **pixel_metrics(maps, masks)}
    monkeypatch.setattr(curves, "NUMPY_ON_CPU", False)
    pure_torch = {"aupro": aupro(maps, masks), **pixel_metrics(maps, masks)}
    assert pure_torch == pytest.approx(with_numpy, abs=1e-12)
    assert largest_scores(torch.tensor([0.1, 0.5, 0.5, 0.9, 0.5]), 2).tolist() == pytest.approx(
        [0.5] * 3 + [0.9]
    )
