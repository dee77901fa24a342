"""MNIST / CIFAR-10 one-vs-all from tiny files in torchvision's on-disk format (nothing is downloaded)."""

from __future__ import annotations

import pytest

from fsad_lightning.data.semantic import CIFAR10_CLASSES, CIFAR10OneVsAll, MNISTOneVsAll


def test_mnist_one_vs_all(tiny_mnist_root):
    root = tiny_mnist_root
    train = MNISTOneVsAll(str(root), "3", split="train", image_size=16)
    assert len(train) == 3 and set(train.labels) == {0}  # digits 3, 13, 23 of the 30
    assert train.relative_paths == ["train/3", "train/13", "train/23"]
    sample = train[0]
    assert sample["path"] == "mnist://train/3" and sample["category"] == "3"
    assert sample["image"].shape == (3, 16, 16) and sample["original_size"].tolist() == [28, 28]
    test = MNISTOneVsAll(str(root), "3", split="test", image_size=16)
    assert len(test) == 20 and test.labels.count(0) == 2
    anomalous = test[4]
    assert anomalous["label"].item() == 1 and anomalous["defect_type"] == "4"
    assert anomalous["has_mask"].item() is False and int(anomalous["gt_mask"].sum()) == 0


def test_cifar10_one_vs_all_by_name_or_index(tiny_cifar10_root):
    root = tiny_cifar10_root
    by_name = CIFAR10OneVsAll(str(root), "cat", split="train", image_size=8)
    by_index = CIFAR10OneVsAll(str(root), "3", split="train", image_size=8)
    assert by_name.relative_paths == by_index.relative_paths and len(by_name) > 0
    assert by_index.category == "cat" and set(by_name.labels) == {0}
    sample = by_name[0]
    assert sample["image"].shape == (3, 8, 8) and sample["original_size"].tolist() == [32, 32]
    test = CIFAR10OneVsAll(str(root), "cat", split="test")
    assert sorted(set(test.labels)) == [0, 1] and len(test) == 20
    assert {r.defect_type for r in test.records if r.label == 1} <= set(CIFAR10_CLASSES) - {"cat"}


def test_missing_files_say_where_and_how_to_download(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"MNIST/raw.*download=True"):
        MNISTOneVsAll(str(tmp_path), "0")
    with pytest.raises(FileNotFoundError, match=r"cifar-10-batches-py.*download=True"):
        CIFAR10OneVsAll(str(tmp_path / "absent"), "cat")


def test_unknown_class_lists_the_classes(tiny_mnist_root):
    root = tiny_mnist_root
    with pytest.raises(ValueError, match=r"category '12' not found.*0, 1, 2"):
        MNISTOneVsAll(str(root), "12")
    with pytest.raises(ValueError, match="category 'zebra' not found.*airplane"):
        CIFAR10OneVsAll.class_index("zebra")


def test_corrupt_mnist_file_is_a_clear_error(tiny_mnist_root):
    root = tiny_mnist_root
    (root / "MNIST" / "raw" / "t10k-labels-idx1-ubyte").write_bytes(b"\x00\x00")
    with pytest.raises(ValueError, match="cannot read the mnist files"):
        MNISTOneVsAll(str(root), "0", split="test")
