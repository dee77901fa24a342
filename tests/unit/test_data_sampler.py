"""Deterministic k-shot selection, dataset version and the manifest file."""

from __future__ import annotations

import json
import os
import random
import shutil

import pytest
import torch

from fsad_lightning.data.folder import FolderDataset
from fsad_lightning.data.sampler import (
    MANIFEST_KEYS,
    build_manifest,
    dataset_version,
    load_manifest,
    save_manifest,
    select_shots,
)

POOL = [f"widget/train/good/{i:03d}.png" for i in range(20)]


def test_same_seed_same_shots_and_different_seed_different_shots():
    first = select_shots(POOL, 5, seed=3)
    assert select_shots(POOL, 5, seed=3) == first
    assert select_shots(POOL, 5, seed=4) != first
    assert len({tuple(select_shots(POOL, 5, seed=s)) for s in range(10)}) == 10


def test_selection_is_the_documented_randperm_over_sorted_paths():
    expected_order = torch.randperm(len(POOL), generator=torch.Generator().manual_seed(3))[:5]
    assert select_shots(POOL, 5, seed=3) == [sorted(POOL)[int(i)] for i in expected_order]


def test_selection_ignores_listing_order():
    shuffled = list(POOL)
    random.Random(0).shuffle(shuffled)
    assert select_shots(shuffled, 7, seed=11) == select_shots(POOL, 7, seed=11)


def test_selection_is_without_replacement_and_from_the_pool():
    shots = select_shots(POOL, len(POOL), seed=1)
    assert sorted(shots) == sorted(POOL)  # every candidate exactly once
    small = select_shots(POOL, 8, seed=2)
    assert len(set(small)) == 8 and set(small) <= set(POOL)


def test_selection_is_a_prefix_of_the_seeded_permutation():
    # k and k+1 shots of one seed share their first k: growing k adds shots, never swaps them
    assert select_shots(POOL, 5, seed=9)[:4] == select_shots(POOL, 4, seed=9)


@pytest.mark.parametrize("k_shot", [0, -1])
def test_k_shot_below_one_is_rejected(k_shot):
    with pytest.raises(ValueError, match="k_shot must be an integer >= 1"):
        select_shots(POOL, k_shot, seed=0)


def test_k_shot_above_pool_says_how_many_are_available():
    with pytest.raises(ValueError, match=r"k_shot=21 but only 20 normal image\(s\) are available in my/pool"):
        select_shots(POOL, 21, seed=0, where="my/pool")


def test_duplicate_candidates_are_rejected():
    with pytest.raises(ValueError, match="more than once"):
        select_shots([*POOL, POOL[3]], 2, seed=0)


def test_shots_do_not_depend_on_where_the_dataset_lives(synthetic_root, tmp_path):
    moved = tmp_path / "elsewhere"
    shutil.copytree(synthetic_root / "widget", moved / "widget")
    here = FolderDataset(str(synthetic_root), "widget", split="train")
    there = FolderDataset(str(moved), "widget", split="train")
    assert here.relative_paths == there.relative_paths
    assert select_shots(here.relative_paths, 3, seed=5) == select_shots(there.relative_paths, 3, seed=5)
    assert dataset_version(here.version_entries()) == dataset_version(there.version_entries())


def test_dataset_version_sees_added_and_resized_files():
    entries = [("a.png", 10), ("b.png", 20)]
    base = dataset_version(entries)
    assert dataset_version(list(reversed(entries))) == base
    assert dataset_version([*entries, ("c.png", 1)]) != base
    assert dataset_version([("a.png", 11), ("b.png", 20)]) != base
    assert len(base) == 12


def test_manifest_round_trip(tmp_path):
    manifest = build_manifest(
        dataset="mvtec",
        category=["bottle", "cable"],
        k_shot=2,
        seed=7,
        files=["bottle/train/good/001.png", "cable/train/good/004.png"],
        root="/data/mvtec",
        dataset_version="0123456789ab",
        extra_normals=["/gen/bottle/000.png"],
        format="folder",
    )
    path = tmp_path / "run" / "manifest.json"
    save_manifest(manifest, path)
    assert load_manifest(path) == manifest
    assert set(MANIFEST_KEYS) <= set(load_manifest(path))
    # atomic write: no temporary file is left beside it
    assert os.listdir(path.parent) == ["manifest.json"]
    # overwriting keeps one complete file
    save_manifest({**manifest, "seed": 8}, path)
    assert load_manifest(path)["seed"] == 8


def test_load_manifest_errors_name_the_file_and_fields(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.json"):
        load_manifest(tmp_path / "missing.json")
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    with pytest.raises(ValueError, match="broken.json is not valid JSON"):
        load_manifest(broken)
    partial = tmp_path / "partial.json"
    partial.write_text(json.dumps({"dataset": "x", "category": "y"}))
    with pytest.raises(ValueError, match="partial.json lacks the field.*k_shot.*seed.*files"):
        load_manifest(partial)
