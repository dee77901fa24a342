"""Readers that neither drop nor distort data: nested folders, EXIF orientation, lossy masks, odd folders."""

from __future__ import annotations

import logging
import os
import shutil

import numpy as np
import pytest
from PIL import Image

from fsad_lightning.data import FewShotDataModule, FolderDataset, read_image, read_mask
from fsad_lightning.data.batch import GT_MASK, IMAGE
from fsad_lightning.data.folder import IMAGE_EXTENSIONS
from fsad_lightning.data.sampler import select_shots

WARNING = "fsad_lightning"


def test_images_in_sub_folders_of_a_defect_folder_are_read_with_their_masks(writable_root):
    test_dir = writable_root / "widget" / "test" / "scratch"
    gt_dir = writable_root / "widget" / "ground_truth" / "scratch"
    (test_dir / "line_a").mkdir()
    (gt_dir / "line_a").mkdir()
    shutil.move(test_dir / "000.png", test_dir / "line_a" / "000.png")  # mask mirrored in a sub-folder
    shutil.move(gt_dir / "000_mask.png", gt_dir / "line_a" / "000_mask.png")
    (test_dir / "line_b").mkdir()
    shutil.move(test_dir / "001.png", test_dir / "line_b" / "001.png")  # mask left flat in ground_truth/scratch
    (writable_root / "widget" / "train" / "good" / "more").mkdir()
    shutil.move(writable_root / "widget" / "train" / "good" / "005.png",
                writable_root / "widget" / "train" / "good" / "more" / "005.png")

    test = FolderDataset(str(writable_root), "widget", split="test")
    scratch = {r.relative_path: r for r in test.records if r.defect_type == "scratch"}
    assert sorted(scratch) == ["widget/test/scratch/line_a/000.png", "widget/test/scratch/line_b/001.png"]
    assert scratch["widget/test/scratch/line_a/000.png"].mask_path.endswith("line_a/000_mask.png")
    assert scratch["widget/test/scratch/line_b/001.png"].mask_path.endswith("scratch/001_mask.png")
    assert len(test) == 3 + 2 + 2
    train = FolderDataset(str(writable_root), "widget", split="train")
    assert "widget/train/good/more/005.png" in train.relative_paths and len(train) == 6


def test_exif_orientation_is_applied_to_images(tmp_path):
    pixels = np.zeros((20, 40, 3), dtype=np.uint8)
    pixels[:, :10] = 255  # a white band on the left of the stored pixels
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display": the shown image is 20 wide, 40 high, band on top
    Image.fromarray(pixels).save(tmp_path / "camera.jpg", exif=exif, quality=95)
    image = read_image(str(tmp_path / "camera.jpg"))
    assert tuple(image.shape) == (3, 40, 20)
    assert image[:, :10].mean() > 0.9 and image[:, 30:].mean() < 0.1


def test_a_mask_drawn_on_the_shown_camera_image_matches_it(tmp_path):
    """A non-square camera JPEG (stored 40 x 20, EXIF "rotate 90") and its mask drawn on the image as shown
    (20 x 40): no size-mismatch error, and the defect lies where the mask says."""
    for folder in ("train/good", "test/good", "test/scratch", "ground_truth/scratch"):
        (tmp_path / "widget" / folder).mkdir(parents=True)
    pixels = np.zeros((20, 40, 3), dtype=np.uint8)
    pixels[:, :10] = 255
    exif = Image.Exif()
    exif[0x0112] = 6
    for folder in ("train/good", "test/good", "test/scratch"):
        Image.fromarray(pixels).save(tmp_path / "widget" / folder / "000.jpg", exif=exif, quality=95)
    mask = np.zeros((40, 20), dtype=np.uint8)
    mask[:10] = 255  # the white band, on top of the shown image
    Image.fromarray(mask).save(tmp_path / "widget" / "ground_truth" / "scratch" / "000_mask.png")
    test = FolderDataset(str(tmp_path), "widget", split="test", image_size=32)
    [sample] = [test[i] for i, r in enumerate(test.records) if r.defect_type == "scratch"]
    assert tuple(sample[GT_MASK].shape) == (40, 20) and sample[GT_MASK][:10].all() and not sample[GT_MASK][10:].any()
    assert sample[IMAGE][:, :8].mean() > 0.9 and sample[IMAGE][:, 24:].mean() < 0.1  # image rows follow it


def test_lossy_jpeg_masks_are_binarised_at_half_range(tmp_path):
    mask = np.zeros((64, 64), dtype=np.uint8)
    mask[21:37, 27:43] = 255  # a 16 x 16 square across JPEG's 8 x 8 blocks
    Image.fromarray(mask).save(tmp_path / "m.jpg", quality=75)
    read = read_mask(str(tmp_path / "m.jpg")).numpy()
    # the JPEG ringing around the square is not a defect: the area stays that of the square
    assert abs(int(read.sum()) - 16 * 16) <= 16
    assert np.asarray(Image.open(tmp_path / "m.jpg")).astype(bool).sum() > 1.3 * 16 * 16  # what > 0 would give


def test_inverted_mask_orphan_mask_and_tiny_image_each_warn_in_one_line(writable_root, tmp_path, caplog):
    inverted = tmp_path / "inverted.png"
    Image.fromarray(np.full((8, 8), 255, dtype=np.uint8)).save(inverted)
    gt = writable_root / "widget" / "ground_truth" / "blob"
    shutil.copy(gt / "000_mask.png", gt / "099_mask.png")  # a mask without an image
    tiny = writable_root / "widget" / "test" / "good" / "tiny.png"
    Image.fromarray(np.zeros((1, 1, 3), dtype=np.uint8)).save(tiny)
    with caplog.at_level(logging.WARNING, logger=WARNING):
        read_mask(str(inverted))
        test = FolderDataset(str(writable_root), "widget", split="test")
        test[[r.path for r in test.records].index(str(tiny))]
    messages = [r.getMessage() for r in caplog.records if r.name == WARNING]
    assert any("inverted" in m and "inverted.png" in m for m in messages), messages
    assert any("have no image" in m and "099_mask.png" in m for m in messages), messages
    assert any("1x1 pixels" in m and "tiny.png" in m for m in messages), messages
    assert all("\n" not in m for m in messages)


def test_a_broken_link_is_named(writable_root):
    good = writable_root / "widget" / "train" / "good"
    os.symlink(good / "gone.png", good / "010.png")
    with pytest.raises(FileNotFoundError, match=r"broken link .*010\.png"):
        FolderDataset(str(writable_root), "widget", split="train")


def test_wrong_case_good_folders_get_a_hint(writable_root):
    test_dir = writable_root / "widget" / "test"
    os.rename(test_dir / "good", test_dir / "Good")
    with pytest.raises(ValueError, match=r"test/good \(lower case\)"):
        FolderDataset(str(writable_root), "widget", split="test")
    train_dir = writable_root / "widget" / "train"
    os.rename(train_dir / "good", train_dir / "Good")
    with pytest.raises(FileNotFoundError, match=r"found 'Good': rename it to 'good'"):
        FolderDataset(str(writable_root), "widget", split="train")


def test_an_empty_normal_pool_does_not_suggest_k_shot_zero(writable_root):
    with pytest.raises(ValueError) as caught:
        select_shots([], 2, 0, where="widget/train/good")
    assert "no normal images found in widget/train/good" in str(caught.value)
    assert "k_shot <= 0" not in str(caught.value)


def test_webp_and_other_pillow_formats_are_read(writable_root):
    assert ".webp" in IMAGE_EXTENSIONS and ".gif" in IMAGE_EXTENSIONS
    good = writable_root / "widget" / "train" / "good"
    for name in sorted(os.listdir(good)):
        Image.open(good / name).save(good / name.replace(".png", ".webp"), lossless=True)
        os.remove(good / name)
    datamodule = FewShotDataModule(root=str(writable_root), category="widget", k_shot=2, image_size=32)
    datamodule.setup("test")
    assert datamodule.shot_batch()[IMAGE].shape == (2, 3, 32, 32)
    assert all(path.endswith(".webp") for path in datamodule.manifest["files"])
    test = FolderDataset(str(writable_root), "widget", split="test")
    assert test[0][GT_MASK].ndim == 2
