"""ELPV read from the installed elpv_dataset package (only its label file and a few images are read)."""

from __future__ import annotations

import os

import pytest

from fsad_lightning.data.elpv import ELPVDataset, default_elpv_root, in_train_pool, read_labels

pytest.importorskip("elpv_dataset")


@pytest.fixture(scope="module")
def labels():
    return read_labels(default_elpv_root())


def test_label_file_is_parsed(labels):
    assert len(labels) > 1000
    assert {cell for _, _, cell in labels} == {"mono", "poly"}
    assert all(path.startswith("images/") for path, _, _ in labels)


def test_split_is_deterministic_disjoint_and_complete(labels):
    train = ELPVDataset(category="all", split="train", image_size=32)
    test = ELPVDataset(category="all", split="test", image_size=32)
    assert set(train.labels) == {0} and sorted(set(test.labels)) == [0, 1]
    assert not set(train.relative_paths) & set(test.relative_paths)
    certain = [(p, v) for p, v, _ in labels if v in (0.0, 1.0)]
    assert len(train) + len(test) == len(certain)  # uncertain cells are excluded by default
    assert all(in_train_pool(os.path.basename(p)) for p in train.relative_paths)
    assert ELPVDataset(category="all", split="train").relative_paths == train.relative_paths


def test_samples_are_300px_grayscale_cells():
    test = ELPVDataset(category="mono", split="test", image_size=32)
    assert all(r.category == "mono" for r in test.records)
    sample = test[0]
    assert sample["image"].shape == (3, 32, 32) and sample["original_size"].tolist() == [300, 300]
    assert sample["has_mask"].item() is False and sample["mask_path"] == ""
    assert sample["image"][0].equal(sample["image"][1])


@pytest.mark.parametrize("policy,label", [("normal", 0), ("anomalous", 1)])
def test_uncertain_cells_are_selectable(labels, policy, label):
    excluded = ELPVDataset(category="poly", split="test")
    included = ELPVDataset(category="poly", split="test", include_uncertain=policy)
    uncertain = {p for p, v, c in labels if c == "poly" and v not in (0.0, 1.0)}
    added = [r for r in included.records if r.relative_path in uncertain]
    assert len(included) - len(excluded) == len(uncertain) == len(added)
    assert {r.label for r in added} == {label}
    # the train pool never changes with the policy
    assert (
        ELPVDataset(category="poly", split="train", include_uncertain=policy).relative_paths
        == ELPVDataset(category="poly", split="train").relative_paths
    )


def test_bad_elpv_settings():
    with pytest.raises(ValueError, match="category 'amorphous' not found.*all, mono, poly"):
        ELPVDataset(category="amorphous")
    with pytest.raises(ValueError, match="include_uncertain must be one of"):
        ELPVDataset(include_uncertain="maybe")


def test_malformed_label_file_names_the_line(tmp_path):
    (tmp_path / "labels.csv").write_text("images/cell0001.png 1.0 mono\nimages/cell0002.png high poly\n")
    with pytest.raises(ValueError, match=r"labels\.csv line 2: probability 'high' is not a number"):
        ELPVDataset(root=str(tmp_path))
