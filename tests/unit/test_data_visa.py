"""VisA read through a generated official-style split file."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fsad_lightning.data.batch import GT_MASK
from fsad_lightning.data.visa import VisADataset


def _write_visa(root: Path, objects=("candle", "pcb1"), n_normal=3, n_anomaly=2) -> Path:
    """A tiny VisA tree: JPEG images, palette-free masks with value 1 inside, and split_csv/1cls.csv."""
    rows = []
    rng = np.random.default_rng(0)
    for obj in objects:
        for kind, count in (("Normal", n_normal + 2), ("Anomaly", n_anomaly)):
            image_dir = root / obj / "Data" / "Images" / kind
            image_dir.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                image = rng.integers(0, 255, size=(20, 28, 3), dtype=np.uint8)
                name = f"{i:04d}.JPG"
                Image.fromarray(image).save(image_dir / name, format="JPEG")
                relative = f"{obj}/Data/Images/{kind}/{name}"
                if kind == "Normal":
                    split = "train" if i < n_normal else "test"
                    rows.append([obj, split, "normal", relative, ""])
                else:
                    mask_dir = root / obj / "Data" / "Masks" / "Anomaly"
                    mask_dir.mkdir(parents=True, exist_ok=True)
                    mask = np.zeros((20, 28), dtype=np.uint8)
                    mask[5:9, 3 + i : 10 + i] = 1  # VisA marks defects with small non-zero values
                    Image.fromarray(mask).save(mask_dir / f"{i:04d}.png")
                    rows.append([obj, "test", "anomaly", relative, f"{obj}/Data/Masks/Anomaly/{i:04d}.png"])
    (root / "split_csv").mkdir(parents=True, exist_ok=True)
    with open(root / "split_csv" / "1cls.csv", "w", newline="") as stream:
        writer = csv.writer(stream)
        writer.writerow(["object", "split", "label", "image", "mask"])
        writer.writerows(rows)
    return root


def test_visa_splits_labels_and_masks(tmp_path):
    root = _write_visa(tmp_path)
    assert VisADataset.available_categories(str(root)) == ["candle", "pcb1"]
    train = VisADataset(str(root), "candle", split="train", image_size=16)
    assert len(train) == 3 and set(train.labels) == {0}
    assert train.relative_paths[0] == "candle/Data/Images/Normal/0000.JPG"
    test = VisADataset(str(root), "candle", split="test", image_size=16)
    assert len(test) == 2 + 2 and sorted(set(test.labels)) == [0, 1]
    assert test.relative_paths == sorted(test.relative_paths)
    for i in range(len(test)):
        sample = test[i]
        assert sample["image"].shape == (3, 16, 16) and sample["original_size"].tolist() == [20, 28]
        assert sample["has_mask"].item() is True
        if sample["label"].item() == 1:
            assert sample["defect_type"] == "anomaly" and int(sample[GT_MASK].sum()) == 4 * 7
        else:
            assert sample["defect_type"] == "good" and int(sample[GT_MASK].sum()) == 0


def test_visa_errors_name_the_csv_and_file(tmp_path):
    root = _write_visa(tmp_path)
    with pytest.raises(ValueError, match="category 'capsules' not found.*candle, pcb1"):
        VisADataset(str(root), "capsules")
    (root / "pcb1" / "Data" / "Masks" / "Anomaly" / "0001.png").unlink()
    with pytest.raises(
        FileNotFoundError, match=r"1cls\.csv line \d+: missing mask .*pcb1/Data/Masks/Anomaly/0001\.png"
    ):
        VisADataset(str(root), "pcb1", split="test")
    csv_path = root / "split_csv" / "1cls.csv"
    csv_path.write_text("object,split,image\ncandle,train,x.JPG\n")
    with pytest.raises(ValueError, match=r"1cls\.csv lacks the column\(s\) label, mask"):
        VisADataset(str(root), "candle")


def test_visa_missing_split_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"split_csv/1cls\.csv"):
        VisADataset(str(tmp_path), "candle")
