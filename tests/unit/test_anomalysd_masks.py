"""AnomalySD masks: multi-scale proposals (§4.2), the eq. 15 threshold, the §4.1 foreground and IoU filter."""

import pytest
import torch

from fsad_lightning.methods.anomalysd.masks import (
    box_iou_with_masks,
    box_masks,
    foreground_mask,
    grid_edges,
    multiscale_masks,
    prototype_masks,
    sample_training_masks,
    variance_split_threshold,
)


# ---------------------------------------------------------------------------------------- proposals
@pytest.mark.parametrize("height, width", [(64, 64), (30, 22)])
def test_multiscale_masks_cover_the_image_exactly_once_per_scale(height, width):
    scales = [1, 2, 4, 8]
    masks, scale_index = multiscale_masks(height, width, scales)
    assert masks.shape == (85, 1, height, width)  # 1 + 4 + 16 + 64
    assert scale_index.tolist() == [0] + [1] * 4 + [2] * 16 + [3] * 64
    for position, k in enumerate(scales):
        of_scale = masks[scale_index == position]
        assert of_scale.shape[0] == k * k
        assert torch.equal(of_scale.sum(dim=0), torch.ones(1, height, width))  # every pixel exactly once
        assert set(of_scale.unique().tolist()) <= {0.0, 1.0}
        assert (of_scale.flatten(1).sum(1) > 0).all()  # no empty cell
    # row-major order: the first cell of the 2 x 2 grid is the top-left quarter
    top, left = grid_edges(height, 2)[1], grid_edges(width, 2)[1]
    assert masks[1, 0, :top, :left].all() and masks[1, 0].sum() == top * left


def test_multiscale_masks_reject_a_grid_finer_than_the_image():
    with pytest.raises(ValueError, match="does not fit"):
        multiscale_masks(4, 4, [8])
    masks, index = multiscale_masks(8, 8, [])
    assert masks.shape == (0, 1, 8, 8) and index.numel() == 0


# ---------------------------------------------------------------------------------------- eq. 15
def _naive_threshold(values: torch.Tensor, weighted: bool) -> float:
    ordered = sorted(values.flatten().double().tolist())
    best, best_r = float("inf"), None
    for i in range(1, len(ordered)):
        if ordered[i] == ordered[i - 1]:
            continue
        low, high = torch.tensor(ordered[:i]), torch.tensor(ordered[i:])
        if weighted:  # Otsu: each variance weighted by its set's size
            objective = float(len(low) * low.var(unbiased=False) + len(high) * high.var(unbiased=False))
        else:  # the literal eq. 15
            objective = float(low.var(unbiased=False) + high.var(unbiased=False))
        if objective < best:
            best, best_r = objective, (ordered[i - 1] + ordered[i]) / 2
    return best_r


@pytest.mark.parametrize("rule", ["otsu", "literal"])
def test_both_threshold_rules_split_a_bimodal_map_between_its_modes(rule):
    generator = torch.Generator().manual_seed(0)
    error = 0.1 + 0.02 * torch.rand(16, 16, generator=generator)  # the normal mode
    anomalous = torch.zeros(16, 16, dtype=torch.bool)
    anomalous[3:7, 9:14] = True
    error[anomalous] = 1.0 + 0.05 * torch.rand(int(anomalous.sum()), generator=generator)  # the anomaly
    r = float(variance_split_threshold(error, rule))
    assert float(error[~anomalous].max()) < r < float(error[anomalous].min())
    mask = prototype_masks(error[None], (64, 64), rule)
    assert mask.shape == (1, 1, 64, 64)
    expected = anomalous.repeat_interleave(4, 0).repeat_interleave(4, 1)  # nearest upsampling
    assert torch.equal(mask[0, 0].bool(), expected)


def test_on_a_heavy_tailed_map_the_literal_rule_masks_a_cell_and_otsu_a_region():
    # exponential error values (a heavy right tail, as the squared distances of eq. 14 on a normal image):
    # an upper set of many values keeps variance ~1 (memoryless), so the literal unweighted sum is least
    # for an upper set of one or two cells; Otsu's size-weighted sum keeps about a fifth of the map
    error = torch.empty(64, 64).exponential_(generator=torch.Generator().manual_seed(0))
    literal = (error > variance_split_threshold(error, "literal")).sum()
    otsu = (error > variance_split_threshold(error, "otsu")).float().mean()
    assert 1 <= int(literal) <= 2  # of 4,096 cells
    assert 0.15 < float(otsu) < 0.25
    lognormal = torch.randn(64, 64, generator=torch.Generator().manual_seed(1)).exp()  # a heavier tail
    assert int((lognormal > variance_split_threshold(lognormal, "literal")).sum()) <= 2
    assert 0.03 < float((lognormal > variance_split_threshold(lognormal, "otsu")).float().mean()) < 0.15


def test_on_a_gaussian_map_both_rules_mask_about_half():
    # a symmetric unimodal map has no second mode: any two-set split lands near its middle
    error = torch.randn(64, 64, generator=torch.Generator().manual_seed(0))
    for rule in ("literal", "otsu"):
        fraction = float((error > variance_split_threshold(error, rule)).float().mean())
        assert 0.4 < fraction < 0.6, (rule, fraction)


@pytest.mark.parametrize("rule", ["otsu", "literal"])
def test_variance_threshold_matches_the_definition_and_handles_ties_and_constants(rule):
    weighted = rule == "otsu"
    values = torch.rand(40, generator=torch.Generator().manual_seed(1)).pow(2)
    assert float(variance_split_threshold(values, rule)) == pytest.approx(_naive_threshold(values, weighted), abs=1e-6)
    ties = torch.tensor([0.0, 0.0, 0.0, 1.0, 1.0, 5.0])
    r = float(variance_split_threshold(ties, rule))
    assert r == pytest.approx(_naive_threshold(ties, weighted)) and r not in (0.0, 1.0, 5.0)
    constant = torch.full((4, 4), 0.3)
    assert prototype_masks(constant[None], (8, 8), rule).sum() == 0  # nothing stands out: an empty mask


def test_the_default_threshold_rule_is_otsu():
    error = torch.empty(64, 64).exponential_(generator=torch.Generator().manual_seed(0))
    assert torch.equal(variance_split_threshold(error), variance_split_threshold(error, "otsu"))
    assert torch.equal(prototype_masks(error[None], (64, 64)), prototype_masks(error[None], (64, 64), "otsu"))
    with pytest.raises(ValueError, match="threshold rule"):
        variance_split_threshold(error, "mean")


# ---------------------------------------------------------------------------------------- §4.1 training masks
def _object_on_background(size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(2)
    image = 0.15 + 0.01 * torch.rand(1, 3, size, size, generator=generator)  # dark, plain background
    truth = torch.zeros(1, 1, size, size)
    truth[..., 20:44, 16:40] = 1.0
    image[:, :, 20:44, 16:40] = 0.7 + 0.05 * torch.rand(3, 24, 24, generator=generator)
    return image, truth


def test_foreground_mask_finds_the_object_and_falls_back_to_the_whole_image():
    image, truth = _object_on_background()
    foreground = foreground_mask(image)
    grown = torch.nn.functional.max_pool2d(truth, 5, stride=1, padding=2)  # the object grown by 2 px
    assert (foreground >= truth).all() and (foreground <= grown).all()  # the smoothing blurs edges by 1 px
    texture = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(3))  # no plain background
    uniform = torch.full((1, 3, 64, 64), 0.4)  # nothing differs from the border
    assert torch.equal(foreground_mask(torch.cat([texture, uniform])), torch.ones(2, 1, 64, 64))


def test_box_iou_with_masks_matches_drawn_boxes():
    _, truth = _object_on_background()
    boxes = torch.tensor([[[0, 0, 64, 64], [20, 16, 44, 40], [30, 30, 50, 60], [0, 0, 5, 5]]])
    drawn = box_masks(boxes[0], 64, 64)
    inter = (drawn * truth).flatten(1).sum(1)
    union = ((drawn + truth) > 0).float().flatten(1).sum(1)
    assert torch.allclose(box_iou_with_masks(boxes, truth), (inter / union)[None])
    assert box_iou_with_masks(boxes, truth)[0, 1] == 1.0


@pytest.mark.parametrize("gamma", [0.0, 0.2, 0.5])
def test_training_masks_pass_the_foreground_iou_filter(gamma):
    _, truth = _object_on_background()
    foreground = truth.repeat(32, 1, 1, 1)
    masks, gammas = sample_training_masks(foreground, [gamma], torch.Generator().manual_seed(4))
    assert masks.shape == (32, 1, 64, 64) and torch.equal(gammas, torch.full((32,), gamma))
    iou = (masks * foreground).flatten(1).sum(1) / ((masks + foreground) > 0).float().flatten(1).sum(1)
    assert (iou > gamma).all()
    rows, cols = masks[:, 0].any(dim=2).sum(1), masks[:, 0].any(dim=1).sum(1)  # rectangles, sides >= 1/8
    assert torch.equal(masks.flatten(1).sum(1), (rows * cols).float()) and (rows >= 8).all() and (cols >= 8).all()
    if gamma == 0.0:  # the filter does not fix the rectangles: they vary in size and place
        assert len({tuple(m.nonzero()[0].tolist()) for m in masks}) > 10


def test_training_masks_draw_gamma_evenly_are_seeded_and_fall_back_to_the_bounding_box():
    _, truth = _object_on_background()
    foreground = truth.repeat(300, 1, 1, 1)
    masks, gammas = sample_training_masks(foreground, [0.0, 0.2, 0.5], torch.Generator().manual_seed(5))
    counts = torch.stack([(gammas == g).sum() for g in (0.0, 0.2, 0.5)])
    assert counts.min() > 70  # ~100 each
    again, _ = sample_training_masks(foreground, [0.0, 0.2, 0.5], torch.Generator().manual_seed(5))
    assert torch.equal(masks, again)
    speck = torch.zeros(2, 1, 64, 64)
    speck[..., 30:32, 40:43] = 1.0  # no rectangle of side >= 8 reaches IoU 0.9 with it
    fallback, _ = sample_training_masks(speck, [0.9], torch.Generator().manual_seed(6))
    assert torch.equal(fallback, speck)  # its bounding box
    with pytest.raises(ValueError, match="iou_thresholds"):
        sample_training_masks(foreground, [1.0])
