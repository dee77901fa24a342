"""The synthetic MVTec-layout generator: layout, exact masks, determinism."""

from __future__ import annotations

import numpy as np
from PIL import Image

from fsad_lightning.data.synthetic import DEFECT_COLOR, write_synthetic_category


def _files(folder):
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())


def test_layout(tmp_path):
    category = write_synthetic_category(
        tmp_path, "widget", n_train=3, n_test_good=2, n_test_defect=1, size=24
    )
    assert category == tmp_path / "widget"
    assert _files(category) == [
        "ground_truth/blob/000_mask.png",
        "ground_truth/scratch/000_mask.png",
        "test/blob/000.png",
        "test/good/000.png",
        "test/good/001.png",
        "test/scratch/000.png",
        "train/good/000.png",
        "train/good/001.png",
        "train/good/002.png",
    ]
    image_only = write_synthetic_category(
        tmp_path,
        "plain",
        n_train=1,
        n_test_good=1,
        n_test_defect=1,
        size=16,
        image_ext=".jpg",
        with_masks=False,
    )
    assert not (image_only / "ground_truth").exists() and (image_only / "test" / "blob" / "000.jpg").is_file()


def test_masks_mark_exactly_the_painted_defect(tmp_path):
    category = write_synthetic_category(tmp_path, n_train=2, n_test_good=2, n_test_defect=3, size=48, seed=4)
    for defect in ("scratch", "blob"):
        for i in range(3):
            image = np.asarray(Image.open(category / "test" / defect / f"{i:03d}.png").convert("RGB"))
            mask = np.asarray(Image.open(category / "ground_truth" / defect / f"{i:03d}_mask.png"))
            assert set(np.unique(mask).tolist()) == {0, 255}
            painted = np.all(image == np.array(DEFECT_COLOR, dtype=np.uint8), axis=-1)
            assert np.array_equal(painted, mask > 0)
    for i in range(2):  # normal images never take the defect colour
        image = np.asarray(Image.open(category / "train" / "good" / f"{i:03d}.png").convert("RGB"))
        assert not np.all(image == np.array(DEFECT_COLOR, dtype=np.uint8), axis=-1).any()


def test_deterministic_for_a_seed(tmp_path):
    a = write_synthetic_category(tmp_path / "a", seed=3, n_train=2, n_test_good=1, n_test_defect=1, size=32)
    b = write_synthetic_category(tmp_path / "b", seed=3, n_train=2, n_test_good=1, n_test_defect=1, size=32)
    c = write_synthetic_category(tmp_path / "c", seed=4, n_train=2, n_test_good=1, n_test_defect=1, size=32)
    assert _files(a) == _files(b) == _files(c)
    assert all((a / f).read_bytes() == (b / f).read_bytes() for f in _files(a))
    assert any((a / f).read_bytes() != (c / f).read_bytes() for f in _files(a))
    # the train images differ from each other but share the stripe family (similar statistics)
    first, second = (
        np.asarray(Image.open(a / "train" / "good" / f"{i:03d}.png"), dtype=float) for i in (0, 1)
    )
    assert not np.array_equal(first, second)
    assert abs(first.mean() - second.mean()) < 10
