"""image_size [H, W] and the aspect-preserving resize modes (issue 15): no squashing, maps evaluated at
ground-truth resolution on the image content."""

import numpy as np
import pytest
import torch
from PIL import Image

from fsad_lightning.data import FewShotDataModule
from fsad_lightning.data.batch import CONTENT_BOX, GT_MASK, IMAGE, MASK, AnomalyOutput
from fsad_lightning.data.folder import plan_resize
from fsad_lightning.metrics.evaluator import Evaluator

H0, W0 = 40, 100  # a wide source image, like KSDD's strips on their side


def _write_wide_category(root):
    """One normal train image, one normal and one anomalous test image of 40 x 100 px; the defect is a
    bright 10 x 10 square (a square must stay a square) and its mask marks exactly it."""
    cat = root / "strip"
    for sub in ("train/good", "test/good", "test/spot", "ground_truth/spot"):
        (cat / sub).mkdir(parents=True)
    base = np.full((H0, W0), 60, np.uint8)
    for name in ("train/good/000.png", "test/good/000.png"):
        Image.fromarray(base).save(cat / name)
    defect, mask = base.copy(), np.zeros((H0, W0), np.uint8)
    defect[15:25, 70:80] = 255
    mask[15:25, 70:80] = 255
    Image.fromarray(defect).save(cat / "test/spot/000.png")
    Image.fromarray(mask).save(cat / "ground_truth/spot/000_mask.png")
    return root


def _test_batch(root, **kwargs):
    dm = FewShotDataModule(str(root), category="strip", k_shot=1, batch_size=4, **kwargs)
    dm.setup("test")
    return next(iter(dm.test_dataloader()))


def _box(mask2d):
    ys, xs = np.nonzero(np.asarray(mask2d) > 0.5)
    return ys.min(), ys.max() + 1, xs.min(), xs.max() + 1


def test_image_size_height_width_pair(tmp_path):
    batch = _test_batch(_write_wide_category(tmp_path), image_size=[16, 40])
    assert tuple(batch[IMAGE].shape) == (2, 3, 16, 40)
    assert tuple(batch[MASK].shape) == (2, 1, 16, 40)
    assert all(tuple(m.shape) == (H0, W0) for m in batch[GT_MASK])  # ground truth stays at source size


def test_pad_mode_keeps_the_aspect_ratio_and_marks_the_content(tmp_path):
    batch = _test_batch(_write_wide_category(tmp_path), image_size=50, resize_mode="pad")
    assert tuple(batch[IMAGE].shape) == (2, 3, 50, 50)
    assert batch[CONTENT_BOX].tolist() == [[15, 0, 20, 50]] * 2  # long side to 50: 20 x 50, centred
    y0, y1, x0, x1 = _box(batch[MASK][1, 0])
    assert (y1 - y0, x1 - x0) == (5, 5)  # the 10 x 10 defect scaled by 1/2 on both axes: still square
    assert batch[IMAGE][:, :, :15].abs().max() == 0  # padding is zero


def test_crop_mode_crops_image_and_ground_truth_alike(tmp_path):
    batch = _test_batch(_write_wide_category(tmp_path), image_size=20, resize_mode="crop")
    assert tuple(batch[IMAGE].shape) == (2, 3, 20, 20)
    gt = batch[GT_MASK][1]
    assert tuple(gt.shape) == (40, 40)  # the centred 40 x 40 source box (columns 30..69)
    assert plan_resize((H0, W0), 20, "crop").crop == (0, 30, 40, 40)
    # the defect at columns 70..79 lies outside the kept box: neither the image nor the masks show it
    assert gt.sum() == 0 and batch[MASK][1].sum() == 0
    assert batch[IMAGE][1].max() < 0.3


def test_predict_dir_and_shots_dir_images_are_padded_like_the_dataset(tmp_path):
    root = _write_wide_category(tmp_path / "data")
    folder = root / "strip" / "test" / "spot"  # a plain folder: as predict_dir and as shots_dir
    dm = FewShotDataModule(str(root), category="strip", k_shot=1, image_size=50, resize_mode="pad",
                           predict_dir=str(folder), shots_dir=str(folder))
    dm.setup("predict")
    predicted = next(iter(dm.predict_dataloader()))
    shots = dm.shot_batch()
    for batch in (predicted, shots):
        assert batch[CONTENT_BOX].tolist() == [[15, 0, 20, 50]]
        assert batch[IMAGE][:, :, :15].abs().max() == 0  # padded, not stretched over the frame


def test_stretch_squashes_which_is_why_the_modes_exist(tmp_path):
    batch = _test_batch(_write_wide_category(tmp_path), image_size=50)
    y0, y1, x0, x1 = _box(batch[MASK][1, 0])
    assert (y1 - y0) > 2 * (x1 - x0)  # the square defect becomes a tall rectangle


def test_padded_maps_are_evaluated_on_the_content_at_ground_truth_resolution(tmp_path):
    """A map equal to the (padded) mask is perfect once the padding is cut off before the resize to the
    ground truth; resizing the whole padded map would misplace it."""
    batch = _test_batch(_write_wide_category(tmp_path), image_size=50, resize_mode="pad")
    maps = batch[MASK][:, 0].clone()
    output = AnomalyOutput(pred_score=torch.tensor([0.0, 1.0]), anomaly_map=maps)
    evaluator = Evaluator()
    evaluator.update(output, batch)
    assert evaluator.compute()["pixel_auroc"] > 0.999  # bilinear upsampling softens the edges only
    without_box = {k: v for k, v in batch.items() if k != CONTENT_BOX}
    evaluator = Evaluator()
    evaluator.update(output, without_box)
    assert evaluator.compute()["pixel_auroc"] < 0.99


def test_bad_image_size_is_one_clear_line(tmp_path):
    with pytest.raises(ValueError, match=r"data.image_size must be a positive integer or a \[height, width\]"):
        FewShotDataModule(str(tmp_path), image_size=[16, 0])
    with pytest.raises(ValueError, match="resize_mode must be one of"):
        FewShotDataModule(str(tmp_path), image_size=16, resize_mode="squash")
