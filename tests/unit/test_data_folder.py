"""The MVTec-layout folder reader and the image / mask decoding it shares with the other readers."""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from fsad_lightning.data.batch import GT_MASK, STACKED_KEYS, collate_samples
from fsad_lightning.data.folder import FolderDataset, extra_normal_records, read_image, read_mask
from fsad_lightning.data.synthetic import write_synthetic_category

SAMPLE_KEYS = {
    "image",
    "mask",
    "label",
    "has_mask",
    "path",
    "mask_path",
    "category",
    "defect_type",
    "original_size",
}


def test_categories_are_the_folders_with_splits(writable_root):
    (writable_root / "not_a_category").mkdir()
    (writable_root / ".hidden" / "train").mkdir(parents=True)
    write_synthetic_category(writable_root, "another", n_train=1, n_test_good=1, n_test_defect=1, size=16)
    assert FolderDataset.available_categories(str(writable_root)) == ["another", "widget"]


def test_train_split_holds_the_normal_pool(synthetic_root):
    train = FolderDataset(str(synthetic_root), "widget", split="train", image_size=24)
    assert len(train) == 6
    assert train.relative_paths == [f"widget/train/good/{i:03d}.png" for i in range(6)]
    sample = train[0]
    assert set(sample) == SAMPLE_KEYS  # no gt_mask outside the test split
    assert sample["image"].shape == (3, 24, 24) and sample["image"].dtype == torch.float32
    assert 0.0 <= float(sample["image"].min()) and float(sample["image"].max()) <= 1.0
    assert sample["label"].item() == 0 and sample["defect_type"] == "good"
    assert sample["original_size"].tolist() == [32, 32]


def test_test_split_with_masks(synthetic_root):
    test = FolderDataset(str(synthetic_root), "widget", split="test", image_size=16)
    assert len(test) == 3 + 2 + 2
    assert sorted(set(test.labels)) == [0, 1]
    by_defect = {}
    for i in range(len(test)):
        sample = test[i]
        assert set(sample) == SAMPLE_KEYS | {GT_MASK}
        by_defect.setdefault(sample["defect_type"], []).append(sample)
        assert sample["has_mask"].item() is True
        gt = sample[GT_MASK]
        assert gt.dtype == torch.uint8 and gt.shape == (32, 32)
        assert set(gt.unique().tolist()) <= {0, 1}
        assert sample["mask"].shape == (1, 16, 16)
        assert set(sample["mask"].unique().tolist()) <= {0.0, 1.0}
    assert set(by_defect) == {"good", "scratch", "blob"}
    for sample in by_defect["good"]:
        assert sample["mask_path"] == "" and int(sample[GT_MASK].sum()) == 0
    for sample in by_defect["scratch"] + by_defect["blob"]:
        assert sample["mask_path"].endswith("_mask.png") and int(sample[GT_MASK].sum()) > 0
        assert float(sample["mask"].sum()) > 0
    batch = collate_samples([test[0], test[4]])
    assert batch["image"].shape == (2, 3, 16, 16) and isinstance(batch[GT_MASK], list)
    assert all(key in batch for key in STACKED_KEYS)


def test_image_only_category_and_jpg_grayscale_images(tmp_path):
    write_synthetic_category(
        tmp_path,
        "plain",
        n_train=3,
        n_test_good=2,
        n_test_defect=1,
        size=24,
        image_ext=".JPG",
        with_masks=False,
    )
    # make every image grayscale, as in MTD / HeadCT
    for dirpath, _, names in os.walk(tmp_path / "plain"):
        for name in names:
            path = os.path.join(dirpath, name)
            Image.open(path).convert("L").save(path, format="JPEG")
    test = FolderDataset(str(tmp_path), "plain", split="test", image_size=20)
    assert len(test) == 2 + 2  # two defect folders with one image each
    for i in range(len(test)):
        sample = test[i]
        assert sample["has_mask"].item() is False and sample["mask_path"] == ""
        assert int(sample[GT_MASK].sum()) == 0 and float(sample["mask"].sum()) == 0
        image = sample["image"]
        assert image.shape == (3, 20, 20)
        assert torch.allclose(image[0], image[1]) and torch.allclose(image[1], image[2])


def test_sixteen_bit_and_rgba_images_become_rgb(tmp_path):
    sixteen = tmp_path / "deep.png"
    Image.fromarray(np.full((5, 7), 65535 // 2, dtype=np.uint16)).save(sixteen)
    image = read_image(str(sixteen))
    assert image.shape == (3, 5, 7)
    assert torch.allclose(image, torch.full_like(image, 0.5), atol=1e-4)
    rgba = tmp_path / "alpha.png"
    Image.new("RGBA", (4, 3), (255, 0, 0, 10)).save(rgba)
    image = read_image(str(rgba))
    assert image.shape == (3, 3, 4) and image[0].min() == 1.0 and image[1:].max() == 0.0


def test_mask_binarised_at_half_range_and_label_masks_at_one(tmp_path):
    path = tmp_path / "m.png"
    Image.fromarray(np.array([[0, 1], [128, 255]], dtype=np.uint8)).save(path)
    assert read_mask(str(path)).tolist() == [[0, 0], [1, 1]]
    labels = tmp_path / "labels.png"  # a 0 / 1 label mask
    Image.fromarray(np.array([[0, 1], [0, 0]], dtype=np.uint8)).save(labels)
    assert read_mask(str(labels)).tolist() == [[0, 1], [0, 0]]


def test_btad_style_masks_are_accepted(writable_root):
    gt_dir = writable_root / "widget" / "ground_truth" / "blob"
    for name in os.listdir(gt_dir):  # 000_mask.png -> 000.bmp
        stem = name.replace("_mask.png", "")
        Image.open(gt_dir / name).save(gt_dir / f"{stem}.bmp")
        os.remove(gt_dir / name)
    test = FolderDataset(str(writable_root), "widget", split="test")
    blob = [r for r in test.records if r.defect_type == "blob"]
    assert blob and all(r.mask_path.endswith(".bmp") for r in blob)
    assert int(test[test.records.index(blob[0])][GT_MASK].sum()) > 0


def test_missing_mask_names_the_expected_path(writable_root):
    os.remove(writable_root / "widget" / "ground_truth" / "scratch" / "001_mask.png")
    with pytest.raises(FileNotFoundError, match=r"ground_truth/scratch/001_mask\.png"):
        FolderDataset(str(writable_root), "widget", split="test")


def test_mask_size_mismatch_names_both_sizes_and_the_file(writable_root):
    mask_path = writable_root / "widget" / "ground_truth" / "blob" / "000_mask.png"
    Image.new("L", (30, 31), 255).save(mask_path)
    test = FolderDataset(str(writable_root), "widget", split="test")
    index = next(i for i, r in enumerate(test.records) if r.mask_path == str(mask_path))
    with pytest.raises(ValueError, match=r"000_mask\.png is 30x31 \(WxH\) but its image .*000\.png is 32x32"):
        test[index]


def test_corrupt_image_names_the_file(writable_root):
    bad = writable_root / "widget" / "train" / "good" / "003.png"
    bad.write_bytes(b"this is not a png")
    train = FolderDataset(str(writable_root), "widget", split="train")
    with pytest.raises(ValueError, match=r"cannot read image .*003\.png"):
        train[3]
    truncated = writable_root / "widget" / "train" / "good" / "004.png"
    truncated.write_bytes(truncated.read_bytes()[:60])
    with pytest.raises(ValueError, match=r"004\.png"):
        train[4]


def test_unknown_category_lists_the_available_ones(synthetic_root):
    with pytest.raises(ValueError, match=r"category 'nope' not found .*available categories: gadget, widget"):
        FolderDataset(str(synthetic_root), "nope")


def test_missing_root_and_missing_train_folder(tmp_path, writable_root):
    with pytest.raises(FileNotFoundError, match="does_not_exist"):
        FolderDataset(str(tmp_path / "does_not_exist"), "widget")
    shutil.rmtree(writable_root / "widget" / "train")
    (writable_root / "widget" / "train").mkdir()
    with pytest.raises(FileNotFoundError, match=r"widget/train/good"):
        FolderDataset(str(writable_root), "widget", split="train")


def test_hidden_and_non_image_files_are_skipped(writable_root):
    good = writable_root / "widget" / "train" / "good"
    (good / ".DS_Store").write_bytes(b"junk")
    (good / "notes.txt").write_text("not an image")
    assert len(FolderDataset(str(writable_root), "widget", split="train")) == 6


def test_extra_normal_records(tmp_path, synthetic_root):
    folder = tmp_path / "generated"
    folder.mkdir()
    shutil.copy(synthetic_root / "widget" / "train" / "good" / "000.png", folder / "a.png")
    records = extra_normal_records(str(folder), "widget")
    assert [os.path.basename(r.path) for r in records] == ["a.png"]
    assert records[0].label == 0 and records[0].category == "widget"
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="empty holds no image files"):
        extra_normal_records(str(empty), "widget")
    with pytest.raises(FileNotFoundError, match="nowhere"):
        extra_normal_records(str(tmp_path / "nowhere"), "widget")


@pytest.mark.realdata
def test_real_mtd_and_headct_when_present(shared_data_root):
    mtd = FolderDataset(os.path.join(shared_data_root, "mtd"), "magnetic_tile", split="test", image_size=32)
    assert mtd.has_masks and sorted(set(mtd.labels)) == [0, 1]
    anomalous = next(i for i, r in enumerate(mtd.records) if r.label == 1)
    sample = mtd[anomalous]
    assert tuple(sample[GT_MASK].shape) == tuple(sample["original_size"].tolist())
    headct = FolderDataset(os.path.join(shared_data_root, "headct"), "head_ct", split="test", image_size=32)
    assert not headct.has_masks and headct[0]["has_mask"].item() is False
