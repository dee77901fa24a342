"""FewShotDataModule: shots, manifest, loaders, multi-class runs, extra normals and every bad input."""

from __future__ import annotations

import os
import shutil

import pytest
import torch

from fsad_lightning.data.batch import GT_MASK
from fsad_lightning.data.datamodule import EpochShuffleSampler, FewShotDataModule
from fsad_lightning.data.sampler import MANIFEST_KEYS


def _dm(root, **kwargs) -> FewShotDataModule:
    kwargs.setdefault("category", "widget")
    kwargs.setdefault("k_shot", 3)
    kwargs.setdefault("image_size", 24)
    return FewShotDataModule(str(root), **kwargs)


def test_single_category_shots_manifest_and_loaders(synthetic_root):
    dm = _dm(synthetic_root, batch_size=4, seed=2)
    dm.setup("fit")
    manifest = dm.manifest
    assert set(MANIFEST_KEYS) <= set(manifest)
    assert manifest["category"] == "widget" and manifest["k_shot"] == 3 and manifest["seed"] == 2
    assert manifest["dataset"] == os.path.basename(synthetic_root) and manifest["format"] == "folder"
    assert len(manifest["files"]) == 3 and all(f.startswith("widget/train/good/") for f in manifest["files"])
    assert manifest["root"] == str(synthetic_root) and manifest["extra_normals"] == []

    shots = dm.shot_batch()
    assert shots["image"].shape == (3, 3, 24, 24) and shots["mask"].shape == (3, 1, 24, 24)
    assert GT_MASK not in shots and shots["label"].tolist() == [0, 0, 0]
    assert [os.path.relpath(p, synthetic_root) for p in shots["path"]] == manifest["files"]

    train_batches = list(dm.train_dataloader())
    assert len(train_batches) == 1 and sorted(train_batches[0]["path"]) == sorted(shots["path"])

    test_batches = list(dm.test_dataloader())
    assert [b["image"].shape[0] for b in test_batches] == [4, 3]
    paths = [p for b in test_batches for p in b["path"]]
    assert paths == sorted(paths) and len(paths) == 7
    assert all(len(b[GT_MASK]) == b["image"].shape[0] for b in test_batches)
    assert [p for b in dm.predict_dataloader() for p in b["path"]] == paths


def test_manifest_is_available_before_setup_and_setup_is_idempotent(synthetic_root):
    lazy = _dm(synthetic_root, seed=1)
    manifest = lazy.manifest  # no setup yet
    lazy.setup("fit")
    lazy.setup("test")
    assert lazy.manifest == manifest
    eager = _dm(synthetic_root, seed=1)
    eager.setup("test")
    assert eager.manifest == manifest
    assert _dm(synthetic_root, seed=2).manifest["files"] != manifest["files"]


def test_multi_class_all_categories(synthetic_root):
    dm = _dm(synthetic_root, category="all", k_shot=2, batch_size=8)
    dm.setup("test")
    assert dm.categories == ["gadget", "widget"]
    manifest = dm.manifest
    assert manifest["category"] == ["gadget", "widget"]
    assert [f.split("/")[0] for f in manifest["files"]] == ["gadget", "gadget", "widget", "widget"]
    shots = dm.shot_batch()
    assert shots["category"] == ["gadget", "gadget", "widget", "widget"]
    assert shots["image"].shape == (4, 3, 24, 24)  # 40 px and 32 px sources share one image_size
    samples = [(c, p) for b in dm.test_dataloader() for c, p in zip(b["category"], b["path"])]
    assert len(samples) == (2 + 4) + (3 + 4)
    assert all(f"/{category}/test/" in path for category, path in samples)
    assert [c for c, _ in samples] == sorted(c for c, _ in samples)
    # a list keeps the user's order, and each category draws its shots like a single-category run
    listed = _dm(synthetic_root, category=["widget", "gadget"], k_shot=2)
    assert listed.categories == ["widget", "gadget"]
    single = _dm(synthetic_root, category="gadget", k_shot=2)
    assert listed.manifest["files"][2:] == single.manifest["files"]


def test_train_loader_repeats_augments_and_is_reproducible(synthetic_root):
    def epoch_images(dm, loader):
        return torch.cat([b["image"] for b in loader])

    settings = dict(k_shot=2, train_repeats=3, train_batch_size=4, augment=True, seed=7)
    dm = _dm(synthetic_root, **settings)
    loader = dm.train_dataloader()
    batches = list(loader)
    assert [b["image"].shape[0] for b in batches] == [4, 2]  # 2 shots x 3 repeats
    first = torch.cat([b["image"] for b in batches])
    second = epoch_images(dm, loader)  # next epoch: new order and views
    assert not torch.equal(first, second)
    again = _dm(synthetic_root, **settings)
    assert torch.equal(epoch_images(again, again.train_dataloader()), first)
    # augmentation never reaches the shot batch used for memory banks
    plain = _dm(synthetic_root, k_shot=2, seed=7).shot_batch()
    assert torch.equal(dm.shot_batch()["image"], plain["image"])


def test_epoch_shuffle_sampler_tags_the_epoch():
    sampler = EpochShuffleSampler(5, seed=0)
    sampler.set_epoch(2)
    indices = list(sampler)
    assert sorted(indices) == list(range(10, 15))
    sampler.set_epoch(2)
    assert list(sampler) == indices


def test_extra_normal_dirs(synthetic_root, tmp_path):
    flat = tmp_path / "generated"
    flat.mkdir()
    for i in range(2):
        shutil.copy(synthetic_root / "widget" / "train" / "good" / f"00{i}.png", flat / f"gen{i}.png")
    dm = _dm(synthetic_root, k_shot=1, extra_normal_dirs=[str(flat)])
    assert [os.path.basename(p) for p in dm.manifest["extra_normals"]] == ["gen0.png", "gen1.png"]
    shots = dm.shot_batch()
    assert shots["image"].shape[0] == 3 and shots["has_mask"].tolist() == [True, False, False]
    assert sum(b["image"].shape[0] for b in dm.train_dataloader()) == 3

    per_category = tmp_path / "per_category"
    (per_category / "gadget").mkdir(parents=True)
    shutil.copy(flat / "gen0.png", per_category / "gadget" / "g.png")
    with pytest.raises(ValueError, match="has no sub-folder 'widget'"):
        _dm(synthetic_root, category="all", k_shot=1, extra_normal_dirs=[str(per_category)]).setup("fit")
    (per_category / "widget").mkdir()
    shutil.copy(flat / "gen1.png", per_category / "widget" / "w.png")
    dm = _dm(synthetic_root, category="all", k_shot=1, extra_normal_dirs=[str(per_category)])
    assert dm.shot_batch()["category"] == ["gadget", "gadget", "widget", "widget"]
    with pytest.raises(FileNotFoundError, match="extra normal folder does not exist: .*missing"):
        _dm(synthetic_root, extra_normal_dirs=[str(tmp_path / "missing")]).setup("fit")


def test_dataset_version_follows_the_files(writable_root):
    before = _dm(writable_root).manifest["dataset_version"]
    assert _dm(writable_root).manifest["dataset_version"] == before
    shutil.copy(
        writable_root / "widget" / "test" / "good" / "000.png",
        writable_root / "widget" / "test" / "good" / "009.png",
    )
    assert _dm(writable_root).manifest["dataset_version"] != before


# ---------------------------------------------------------------------------------------------- bad input
def test_missing_root(tmp_path):
    with pytest.raises(FileNotFoundError, match="dataset root does not exist.*nowhere"):
        _dm(tmp_path / "nowhere").setup("fit")


def test_missing_category_lists_the_present_ones(synthetic_root):
    with pytest.raises(
        ValueError, match="category 'bottle' not found .*available categories: gadget, widget"
    ):
        _dm(synthetic_root, category="bottle").setup("fit")


def test_root_pointing_at_a_category_gives_a_hint(synthetic_root):
    with pytest.raises(ValueError, match="looks like a single category folder.*'widget' as category"):
        _dm(synthetic_root / "widget", category="all").setup("fit")


def test_k_shot_larger_than_the_pool_says_how_many(synthetic_root):
    with pytest.raises(
        ValueError, match=r"k_shot=7 but only 6 normal image\(s\) are available in .*widget/train/good"
    ):
        _dm(synthetic_root, k_shot=7).setup("fit")


@pytest.mark.parametrize(
    "field,value,message",
    [
        ("k_shot", 0, "k_shot must be an integer >= 1"),
        ("batch_size", 0, "batch_size must be an integer >= 1"),
        ("train_repeats", 0, "train_repeats must be an integer >= 1"),
        ("train_batch_size", 0, "train_batch_size must be None or an integer >= 1"),
        ("dataset", "mvtec", "dataset must be one of"),
        ("category", [], "category is an empty list"),
        ("augment_options", {"spin": 1.0}, "unknown augment_options"),
    ],
)
def test_bad_settings_fail_at_construction(synthetic_root, field, value, message):
    with pytest.raises(ValueError, match=message):
        _dm(synthetic_root, **{field: value})


def test_empty_test_split(writable_root):
    shutil.rmtree(writable_root / "widget" / "test")
    shutil.rmtree(writable_root / "widget" / "ground_truth")
    (writable_root / "widget" / "test" / "good").mkdir(parents=True)
    with pytest.raises(ValueError, match="the test split of category 'widget' under .* has no images"):
        _dm(writable_root).setup("test")


def test_one_class_test_split_is_rejected_except_for_predict(writable_root):
    for defect in ("scratch", "blob"):
        shutil.rmtree(writable_root / "widget" / "test" / defect)
    with pytest.raises(ValueError, match="has only normal images .*AUROC is undefined"):
        _dm(writable_root).setup("fit")
    dm = _dm(writable_root)
    dm.setup("predict")
    assert sum(b["image"].shape[0] for b in dm.predict_dataloader()) == 3


def test_corrupt_test_image_names_the_file(writable_root):
    (writable_root / "widget" / "test" / "blob" / "001.png").write_bytes(b"\x89PNG broken")
    dm = _dm(writable_root)
    dm.setup("test")
    with pytest.raises(ValueError, match=r"cannot read image .*widget/test/blob/001\.png"):
        list(dm.test_dataloader())


def test_mask_size_mismatch_names_the_file(writable_root):
    from PIL import Image

    Image.new("L", (16, 16), 255).save(writable_root / "widget" / "ground_truth" / "scratch" / "000_mask.png")
    dm = _dm(writable_root, batch_size=16)
    dm.setup("test")
    with pytest.raises(ValueError, match=r"scratch/000_mask\.png is 16x16 \(WxH\) but its image .* is 32x32"):
        next(iter(dm.test_dataloader()))


# ---------------------------------------------------------------------------------------------- other formats
def test_mnist_all_classes_through_the_datamodule(tiny_mnist_root):
    dm = FewShotDataModule(str(tiny_mnist_root), dataset="mnist", category="all", k_shot=2, image_size=16)
    dm.setup("test")
    assert dm.categories == [str(d) for d in range(10)] and dm.manifest["dataset"] == "mnist"
    assert len(dm.manifest["files"]) == 20 and dm.shot_batch()["image"].shape == (20, 3, 16, 16)
    assert len(dm.test_dataset()) == 10 * 20  # one one-vs-all test split per normal class


def test_semantic_missing_files_fail_at_setup(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"cifar-10-batches-py.*download=True"):
        FewShotDataModule(str(tmp_path), dataset="cifar10", category="cat").setup("fit")


def test_elpv_through_the_datamodule():
    pytest.importorskip("elpv_dataset")
    dm = FewShotDataModule("", dataset="elpv", category="mono", k_shot=2, image_size=16, batch_size=64)
    dm.setup("test")
    manifest = dm.manifest
    assert manifest["dataset"] == "elpv" and manifest["category"] == "mono"
    assert os.path.isfile(os.path.join(manifest["root"], "labels.csv"))
    assert all(f.startswith("images/cell") for f in manifest["files"])
    assert dm.shot_batch()["original_size"].tolist() == [[300, 300], [300, 300]]


def test_built_from_a_config_by_jsonargparse(synthetic_root):
    from jsonargparse import ArgumentParser

    parser = ArgumentParser()
    parser.add_class_arguments(FewShotDataModule, "data")
    config = parser.parse_object(
        {
            "data": {
                "root": str(synthetic_root),
                "category": ["widget", "gadget"],
                "k_shot": 2,
                "image_size": 16,
                "augment": True,
                "augment_options": {"rot90": 0.0, "padding_mode": "border"},
                "extra_normal_dirs": [],
            }
        }
    )
    dm = parser.instantiate_classes(config).data
    assert isinstance(dm, FewShotDataModule)
    assert dm.categories == ["widget", "gadget"] and dm.augment_config.rot90 == 0.0
    assert dm.augment_config.padding_mode == "border"


def test_trainer_fit_reshuffles_each_epoch(synthetic_root):
    from lightning.pytorch import LightningModule, Trainer

    class Recorder(LightningModule):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.zeros(()))
            self.seen: list[list[str]] = []

        def training_step(self, batch, batch_idx):
            self.seen.append(list(batch["path"]))
            return (self.weight * batch["image"].mean()) ** 2

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    model = Recorder()
    dm = _dm(synthetic_root, k_shot=4, seed=0)
    trainer = Trainer(
        max_epochs=3,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model, datamodule=dm)
    assert len(model.seen) == 3 and all(sorted(s) == sorted(model.seen[0]) for s in model.seen)
    assert len({tuple(s) for s in model.seen}) > 1
