"""The Evaluator: batch contract in, metric dict out; resolution handling and error messages."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fsad_lightning.data.batch import AnomalyOutput
from fsad_lightning.metrics import Evaluator, image_metrics, pixel_metrics


def _batch(labels, gt_masks=None, paths=None, has_mask=None, mask=None):
    n = len(labels)
    batch = {
        "label": torch.tensor(labels),
        "has_mask": torch.tensor(has_mask if has_mask is not None else [True] * n),
        "path": paths or [f"/data/test/{i}.png" for i in range(n)],
    }
    if gt_masks is not None:
        batch["gt_mask"] = gt_masks
    if mask is not None:
        batch["mask"] = mask
    return batch


def _mask(height, width, box):
    m = torch.zeros(height, width, dtype=torch.uint8)
    y0, y1, x0, x1 = box
    m[y0:y1, x0:x1] = 1
    return m


def test_ground_truth_resolution_upsamples_each_map_to_its_own_mask():
    g = torch.Generator().manual_seed(0)
    maps = torch.rand(3, 4, 4, generator=g)
    scores = torch.tensor([0.2, 0.9, 0.6])
    gt = [torch.zeros(8, 8, dtype=torch.uint8), _mask(6, 10, (1, 4, 2, 7)), _mask(12, 9, (5, 11, 0, 3))]
    evaluator = Evaluator()
    evaluator.update(AnomalyOutput(scores, maps), _batch([0, 1, 1], gt))
    result = evaluator.compute()

    upsampled = [
        F.interpolate(m[None, None], size=tuple(t.shape), mode="bilinear", align_corners=False)[0, 0]
        for m, t in zip(maps, gt)
    ]
    expected = pixel_metrics(upsampled, [t.bool() for t in gt])
    for key, value in expected.items():
        assert result[key] == pytest.approx(value, abs=1e-12)
    image = image_metrics(scores, torch.tensor([0, 1, 1]))
    for key, value in image.items():
        assert result[key] == pytest.approx(value, abs=1e-12)
    # every ground-truth pixel was evaluated: 64 + 60 + 108
    states = evaluator.groups[0].pixel_metrics
    evaluated = sum(t.numel() for t in states.normal_scores) + sum(t.numel() for t in states.defect_scores)
    assert evaluated == 64 + 60 + 108
    assert result["eval_resolution"] == "ground_truth"
    assert result["num_images"] == 3 and result["num_anomalous"] == 2


def test_fixed_eval_size_resizes_maps_and_masks():
    maps = torch.rand(2, 4, 4)
    gt = [_mask(8, 8, (1, 4, 0, 5)), torch.zeros(8, 8, dtype=torch.uint8)]
    evaluator = Evaluator(eval_size=4)
    evaluator.update(AnomalyOutput(torch.tensor([0.8, 0.1]), maps), _batch([1, 0], gt))
    result = evaluator.compute()
    # pixel-centre nearest neighbour from 8 to 4 samples source pixels 1, 3, 5, 7 (rows 1 and 3 of the box)
    small_masks = [t[1::2, 1::2].bool() for t in gt]
    assert int(small_masks[0].sum()) == 2 * 2
    expected = pixel_metrics(list(maps), small_masks)
    assert result["pixel_aupro"] == pytest.approx(expected["pixel_aupro"], abs=1e-12)
    assert result["pixel_auroc"] == pytest.approx(expected["pixel_auroc"], abs=1e-12)
    assert result["eval_resolution"] == 4


def test_falls_back_to_the_batch_mask_without_gt_mask():
    maps = torch.rand(2, 6, 6)
    mask = torch.zeros(2, 1, 6, 6)
    mask[0, 0, 1:4, 1:4] = 1.0
    evaluator = Evaluator()
    evaluator.update(AnomalyOutput(torch.tensor([0.7, 0.3]), maps), _batch([1, 0], mask=mask))
    result = evaluator.compute()
    expected = pixel_metrics(maps, mask[:, 0].bool())
    assert result["pixel_auroc"] == pytest.approx(expected["pixel_auroc"], abs=1e-12)


def test_batches_accumulate_and_reset_forgets():
    maps = torch.rand(4, 5, 5)
    gt = [_mask(5, 5, (0, 2, 0, 2)), torch.zeros(5, 5, dtype=torch.uint8)] * 2
    scores = torch.tensor([0.9, 0.1, 0.4, 0.5])
    evaluator = Evaluator()
    evaluator.update(AnomalyOutput(scores[:2], maps[:2]), _batch([1, 0], gt[:2]))
    evaluator.update(AnomalyOutput(scores[2:], maps[2:]), _batch([1, 0], gt[2:]))
    result = evaluator.compute()
    assert result["num_images"] == 4
    assert result["image_auroc"] == pytest.approx(
        image_metrics(scores, torch.tensor([1, 0, 1, 0]))["image_auroc"]
    )
    assert result["pixel_aupro"] == pytest.approx(pixel_metrics(maps, torch.stack(gt).bool())["pixel_aupro"])
    evaluator.reset()
    with pytest.raises(ValueError, match="no image was evaluated"):
        evaluator.compute()


def test_no_pixel_metrics_without_maps_or_without_pixel_ground_truth():
    evaluator = Evaluator()
    evaluator.update(AnomalyOutput(torch.tensor([0.2, 0.8])), _batch([0, 1]))
    result = evaluator.compute()
    assert "pixel_auroc" not in result and result["image_auroc"] == 1.0

    evaluator = Evaluator()
    gt = [torch.zeros(4, 4, dtype=torch.uint8), _mask(4, 4, (0, 2, 0, 2))]
    evaluator.update(AnomalyOutput(torch.tensor([0.2, 0.8]), torch.rand(2, 4, 4)), _batch([0, 1], gt))
    evaluator.update(
        AnomalyOutput(torch.tensor([0.3]), torch.rand(1, 4, 4)), _batch([1], [None], has_mask=[False])
    )
    assert not any(key.startswith("pixel_") for key in evaluator.compute())


def test_maps_for_only_some_images_is_an_error():
    evaluator = Evaluator()
    gt = [torch.zeros(4, 4, dtype=torch.uint8), _mask(4, 4, (0, 2, 0, 2))]
    evaluator.update(AnomalyOutput(torch.tensor([0.2, 0.8]), torch.rand(2, 4, 4)), _batch([0, 1], gt))
    evaluator.update(AnomalyOutput(torch.tensor([0.3])), _batch([1], gt[1:]))
    with pytest.raises(ValueError, match="anomaly maps for 2 of 3 images"):
        evaluator.compute()


def test_nan_or_inf_names_the_image_path():
    maps = torch.rand(3, 4, 4)
    maps[1, 2, 2] = float("nan")
    maps[2, 0, 0] = float("inf")
    paths = ["/d/good/000.png", "/d/crack/001.png", "/d/crack/002.png"]
    gt = [torch.zeros(4, 4, dtype=torch.uint8)] * 3
    evaluator = Evaluator()
    with pytest.raises(ValueError, match="anomaly map of /d/crack/001.png contains NaN") as error:
        evaluator.update(AnomalyOutput(torch.rand(3), maps), _batch([0, 1, 1], gt, paths=paths))
    assert "anomaly map of /d/crack/002.png contains inf" in str(error.value)
    assert "000.png" not in str(error.value)
    with pytest.raises(ValueError, match="anomaly score of /d/good/000.png contains NaN"):
        evaluator.update(
            AnomalyOutput(torch.tensor([float("nan"), 0.1, 0.2])), _batch([0, 1, 1], gt, paths=paths)
        )


def test_only_anomalous_images_is_a_clear_error():
    evaluator = Evaluator()
    evaluator.update(AnomalyOutput(torch.tensor([0.2, 0.8])), _batch([1, 1]))
    with pytest.raises(ValueError, match="only anomalous images: AUROC is undefined"):
        evaluator.compute()


def test_is_a_module_with_no_checkpoint_state():
    evaluator = Evaluator(eval_size=32)
    assert isinstance(evaluator, nn.Module)
    assert evaluator.state_dict() == {}
    with pytest.raises(ValueError, match="eval_size"):
        Evaluator(eval_size=0)


def test_multi_class_metrics_per_category_and_their_mean():
    g = torch.Generator().manual_seed(3)
    n = 8
    categories = ["bolt", "nut", "bolt", "nut", "bolt", "nut", "bolt", "nut"]
    labels = [0, 0, 1, 1, 0, 1, 1, 0]
    scores = torch.rand(n, generator=g)
    maps = torch.rand(n, 6, 6, generator=g)
    gt = [_mask(6, 6, (1, 4, 1, 3)) if y else torch.zeros(6, 6, dtype=torch.uint8) for y in labels]
    batch = {**_batch(labels, gt), "category": categories}

    evaluator = Evaluator()
    evaluator.set_categories(["bolt", "nut"])
    # two batches, each with images of both categories
    for rows in (slice(0, 5), slice(5, 8)):
        part = {k: (v[rows] if not isinstance(v, list) else v[rows]) for k, v in batch.items()}
        evaluator.update(AnomalyOutput(scores[rows], maps[rows]), part)
    result = evaluator.compute()

    assert result["aggregation"] == "category_mean"
    assert set(result["per_category"]) == {"bolt", "nut"}
    for name in ("bolt", "nut"):
        rows = [i for i, c in enumerate(categories) if c == name]
        alone = Evaluator()
        alone.update(
            AnomalyOutput(scores[rows], maps[rows]),
            _batch([labels[i] for i in rows], [gt[i] for i in rows], paths=[f"/x/{i}.png" for i in rows]),
        )
        expected = alone.compute()
        for key in ("image_auroc", "image_auprc", "pixel_auroc", "pixel_aupro", "num_images"):
            assert result["per_category"][name][key] == pytest.approx(expected[key], abs=1e-12), (name, key)
    for key in ("image_auroc", "pixel_aupro", "pixel_f1_max"):
        mean = (result["per_category"]["bolt"][key] + result["per_category"]["nut"][key]) / 2
        assert result[key] == pytest.approx(mean, abs=1e-12)
    assert result["num_images"] == n


def test_multi_class_rejects_an_unknown_or_missing_category():
    evaluator = Evaluator()
    evaluator.set_categories(["bolt", "nut"])
    output = AnomalyOutput(torch.tensor([0.1, 0.9]), None)
    with pytest.raises(ValueError, match="'screw', not one of the evaluated"):
        evaluator.update(output, {**_batch([0, 1]), "category": ["bolt", "screw"]})
    with pytest.raises(ValueError, match="needs a 'category' entry"):
        evaluator.update(output, _batch([0, 1]))
    # a single category is the ordinary, un-split evaluation
    evaluator.set_categories(["bolt"])
    evaluator.update(output, _batch([0, 1], has_mask=[False, False]))
    assert "per_category" not in evaluator.compute()
