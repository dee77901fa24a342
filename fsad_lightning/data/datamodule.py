"""``FewShotDataModule``: k normal shots to fit on, the full official test split to evaluate on.

The datamodule is the few-shot protocol in one place:

- the shots: ``k_shot`` normal images per category drawn by :func:`~fsad_lightning.data.sampler.select_shots`
  (sorted relative paths, without replacement, ``seed``), plus any ``extra_normal_dirs`` images; recorded
  in :attr:`FewShotDataModule.manifest`;
- :meth:`~FewShotDataModule.shot_batch`: the un-augmented shots as one collated batch (what memory-bank
  methods build from);
- :meth:`~FewShotDataModule.train_dataloader`: the shots repeated ``train_repeats`` times per epoch,
  augmented when ``augment`` is on, shuffled by a seeded sampler;
- :meth:`~FewShotDataModule.test_dataloader` / ``predict_dataloader``: the whole test split of every
  category, in sorted order, with ``gt_mask`` at source resolution;
- ``predict_dir``: ``predict_dataloader`` scores every image under that folder instead (recursively,
  unlabelled), and ``shots_dir``: the shots come from a plain folder of good images (no dataset layout),
  so an inspector needs neither a dataset nor labels.

All ``__init__`` arguments are plain types, so LightningCLI / jsonargparse builds it from YAML::

    data:
      class_path: fsad_lightning.data.FewShotDataModule
      init_args: {root: /data/mvtec, category: bottle, k_shot: 4, seed: 0, image_size: 256}

Checks that need no model (root, category, ``k_shot``, an empty or one-class test split) run in
:meth:`~FewShotDataModule.setup`, so a bad configuration fails before any backbone is loaded.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Iterator
from typing import Any, Literal

import torch
from lightning.pytorch import LightningDataModule
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from torch.utils.data import ConcatDataset, DataLoader, Dataset, Sampler

from fsad_lightning.data.augment import AugmentConfig, FewShotAugment
from fsad_lightning.data.batch import IMAGE, MASK, collate_samples
from fsad_lightning.data.elpv import UNCERTAIN_POLICIES, ELPVDataset, UncertainPolicy, default_elpv_root
from fsad_lightning.data.folder import (
    GOOD,
    IMAGE_EXTENSIONS,
    AnomalyDataset,
    FolderDataset,
    ImageRecord,
    ResizeMode,
    check_resize_mode,
    check_root,
    extra_normal_records,
    file_entries,
    list_image_files,
    parse_image_size,
    unknown_category_error,
)
from fsad_lightning.data.sampler import build_manifest, dataset_version, select_shots
from fsad_lightning.data.semantic import CIFAR10OneVsAll, MNISTOneVsAll, SemanticOneVsAllDataset
from fsad_lightning.data.visa import VisADataset
from fsad_lightning.validation import require_integers

DatasetFormat = Literal["folder", "visa", "elpv", "mnist", "cifar10"]
#: the reader class of each ``dataset`` value
READERS: dict[str, type[AnomalyDataset]] = {
    "folder": FolderDataset,
    "visa": VisADataset,
    "elpv": ELPVDataset,
    "mnist": MNISTOneVsAll,
    "cifar10": CIFAR10OneVsAll,
}
#: the ``category`` value that selects every category of the dataset (for ELPV it is a category itself)
ALL = "all"


def mix_seed(seed: int, index: int) -> int:
    """A per-item seed from a run seed and an index (a fixed affine mix, identical on every machine)."""
    return (int(seed) * 1_000_003 + int(index)) % (2**63 - 1)


class EpochShuffleSampler(Sampler[int]):
    """Seeded shuffling that changes every epoch and tags each index with its epoch.

    Epoch ``e`` yields ``e * length + i`` for ``i`` in ``torch.randperm(length)`` under the generator seed
    ``mix_seed(seed, e)``. The dataset takes ``index % length`` as the item and the full index as the seed of
    that item's augmentation, so shuffling and augmentation are deterministic for any ``num_workers``.
    Lightning calls :meth:`set_epoch` before each epoch; used on its own the epoch advances by one per pass.
    ``start`` (epoch, items already seen) makes the first pass continue an interrupted epoch: a resumed
    fit sees the items an uninterrupted one would.
    """

    def __init__(self, length: int, seed: int, start: tuple[int, int] = (0, 0)) -> None:
        self.length = int(length)
        self.seed = int(seed)
        self.epoch = int(start[0])
        self._skip = int(start[1])

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.length

    def __iter__(self) -> Iterator[int]:
        epoch, skip = self.epoch, self._skip
        self.epoch, self._skip = epoch + 1, 0
        generator = torch.Generator().manual_seed(mix_seed(self.seed, epoch))
        offset = epoch * self.length
        order = torch.randperm(self.length, generator=generator)[skip:]
        return iter([offset + int(i) for i in order])


class ShotTrainDataset(Dataset):
    """The shots as seen in training: repeated ``repeats`` times, each view augmented with its own seed.

    Item ``index`` is shot ``index % len(shots)``; with an augmentation it is transformed under the seed
    ``mix_seed(seed, index)``, so repeats (and, through :class:`EpochShuffleSampler`, epochs) give
    different but reproducible views.
    """

    def __init__(
        self, shots: Dataset, repeats: int = 1, augment: FewShotAugment | None = None, seed: int = 0
    ):
        if repeats < 1:
            raise ValueError(f"train_repeats must be >= 1, got {repeats}")
        self.shots = shots
        self.repeats = repeats
        self.augment = augment
        self.seed = seed

    def __len__(self) -> int:
        return len(self.shots) * self.repeats

    def __getitem__(self, index: int) -> dict[str, Any]:
        sample = dict(self.shots[index % len(self.shots)])
        if self.augment is not None:
            sample[IMAGE], sample[MASK] = self.augment(
                sample[IMAGE], sample[MASK], seed=mix_seed(self.seed, index)
            )
        return sample


def _training_batches_done(trainer: Any) -> int | None:
    """Training batches the fit of ``trainer`` has run to completion (``None`` outside a fit or under
    several devices, whose shards the single-device sampler does not describe)."""
    if trainer is None or trainer.state.fn != "fit" or trainer.world_size != 1:
        return None
    return int(trainer.fit_loop.epoch_loop.batch_progress.total.processed)


def unrepeated_test_sampler(dataset) -> Sampler | None:
    """Under DDP, each rank gets a disjoint share of the test split with no image repeated.

    Lightning's default distributed sampler pads the last shard by repeating images, which would count
    them twice in the metrics; a ``DistributedSampler`` subclass given here is left in place by Lightning.
    Outside DDP: ``None`` (sequential order).
    """
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return None
    if torch.distributed.get_world_size() == 1:
        return None
    return UnrepeatedDistributedSampler(dataset, shuffle=False)


class FewShotDataModule(LightningDataModule):
    """Few-shot anomaly detection data: k normal shots per category and the full test split.

    Args:
        root: dataset root: the folder holding the category folders (``folder``), the VisA root (``visa``),
            the folder with ``MNIST/raw`` or ``cifar-10-batches-py`` (``mnist``, ``cifar10``), or for
            ``elpv`` a folder with ``labels.csv`` and ``images/`` (``""`` uses the installed package).
        category: a category name, a list of names, or ``"all"`` for every category of the dataset
            (for ELPV ``"all"`` is the category holding both cell types). Several categories give a
            multi-class run: shots are drawn per category (``k_shot`` each, same ``seed``), the test split
            holds all of them and each sample carries its category.
        dataset: the reader: ``folder`` (MVTec layout), ``visa``, ``elpv``, ``mnist``, ``cifar10``.
        name: the dataset name in results and the manifest; default: the root folder's name for
            ``folder`` / ``visa``, the format otherwise.
        k_shot: normal shots per category.
        seed: seed of the shot draw, the training shuffle and the augmentations.
        image_size: side of the square images and masks of every batch, or ``[height, width]``.
        resize_mode: how each image reaches ``image_size``: ``stretch`` (resized as a whole, the aspect
            ratio follows ``image_size``), ``pad`` (aspect kept, fitted inside and zero-padded: the long
            side to N for a square N) or ``crop`` (aspect kept, the centred box of ``image_size``'s aspect
            ratio: the short side to N). Image and masks go through the same geometry; anomaly maps are
            evaluated at ground-truth resolution on the image content (``pad``: the padding is cut off,
            ``crop``: the ground truth is cropped alike). See :func:`~fsad_lightning.data.folder.plan_resize`.
        augment: augment the training view of the shots (never :meth:`shot_batch` or the test split).
        augment_options: :class:`~fsad_lightning.data.augment.AugmentConfig` fields, e.g. ``{"rot90": 0}``.
        extra_normal_dirs: folders of extra normal images (e.g. generated normals) added to the shots for
            memory building and training. With several categories each folder needs one sub-folder per
            category (``<dir>/<category>/``); with one category the folder's own images are used unless it
            has a sub-folder named after the category.
        batch_size: batch size of the test / predict loaders.
        train_batch_size: batch size of the train loader; ``None`` puts all shots (and extra normals) in
            one batch.
        train_repeats: how many times the shots are repeated in one training epoch.
        num_workers: DataLoader worker processes.
        include_uncertain: ELPV only: cells rated 1/3 or 2/3 are left out (``"exclude"``) or counted as
            ``"normal"`` or ``"anomalous"``.
        download: MNIST / CIFAR-10 only: fetch the files with torchvision in :meth:`prepare_data` (needs a
            network).
        predict_dir: a folder of images to score with ``fsad predict``: every file a reader accepts
            (:data:`~fsad_lightning.data.folder.IMAGE_EXTENSIONS`, any case, any size), in sub-folders too
            (hidden ones skipped), in sorted order; no labels (``label`` -1), no masks. They belong to the
            run's one category (a name for methods that prompt with it).
        shots_dir: a plain folder of normal images (sub-folders included) to draw the ``k_shot`` shots
            from (sorted relative paths, ``seed``) instead of the dataset's train split; ``root`` is then
            only needed for ``fsad test``. Its category is ``category`` when that names one, else the
            folder's name.
    """

    def __init__(
        self,
        root: str = "",
        category: str | list[str] = ALL,
        dataset: DatasetFormat = "folder",
        name: str | None = None,
        k_shot: int = 4,
        seed: int = 0,
        image_size: int | list[int] = 256,
        resize_mode: ResizeMode = "stretch",
        augment: bool = False,
        augment_options: dict[str, float | str] | None = None,
        extra_normal_dirs: list[str] | None = None,
        batch_size: int = 16,
        train_batch_size: int | None = None,
        train_repeats: int = 1,
        num_workers: int = 0,
        include_uncertain: UncertainPolicy = "exclude",
        download: bool = False,
        predict_dir: str | None = None,
        shots_dir: str | None = None,
    ) -> None:
        super().__init__()
        if dataset not in READERS:
            raise ValueError(f"dataset must be one of {sorted(READERS)}, got {dataset!r}")
        require_integers(k_shot=k_shot, batch_size=batch_size, train_repeats=train_repeats)
        parse_image_size(image_size, "data.image_size")
        check_resize_mode(resize_mode)
        require_integers(low=0, num_workers=num_workers)
        if train_batch_size is not None and (not isinstance(train_batch_size, int) or train_batch_size < 1):
            raise ValueError(f"train_batch_size must be None or an integer >= 1, got {train_batch_size!r}")
        if include_uncertain not in UNCERTAIN_POLICIES:
            raise ValueError(
                f"include_uncertain must be one of {UNCERTAIN_POLICIES}, got {include_uncertain!r}"
            )
        if isinstance(category, (list, tuple)):
            if not category:
                raise ValueError("category is an empty list: name at least one category or use 'all'")
            if len(set(category)) != len(category):
                raise ValueError(f"category lists a name more than once: {list(category)}")
        # logger=False: the model and the data may both say `image_size` with different values (CLIP at
        # 240 px on 256 px loads), which Lightning's hparams merge refuses; config.yaml and manifest.json
        # keep the data settings
        self.save_hyperparameters(logger=False)
        self.root = root
        self.category = category
        self.dataset_format = dataset
        self.k_shot = k_shot
        self.seed = seed
        self.image_size = list(image_size) if isinstance(image_size, (list, tuple)) else image_size
        self.resize_mode = resize_mode
        self.augment = augment
        self.augment_config = AugmentConfig.from_dict(augment_options)  # validates the options now
        self.extra_normal_dirs = list(extra_normal_dirs or [])
        self.batch_size = batch_size
        self.train_batch_size = train_batch_size
        self.train_repeats = train_repeats
        self.num_workers = num_workers
        self.include_uncertain = include_uncertain
        self.download = download
        self.predict_dir = predict_dir
        self.shots_dir = shots_dir
        self.reader = READERS[dataset]
        self.name = name or self._default_name()

        self._categories: list[str] | None = None
        self._resolved_root: str | None = None
        self._shots: list[Dataset] | None = None
        self._manifest: dict[str, Any] | None = None
        self._test_sets: list[AnomalyDataset] | None = None
        self._predict_set: AnomalyDataset | None = None
        self._resume_batches = 0  # training batches a resumed fit had done (from its checkpoint)

    # ------------------------------------------------------------------ Lightning hooks
    def prepare_data(self) -> None:
        """Download MNIST / CIFAR-10 when ``download=True`` (Lightning runs this on one process only)."""
        if self.download and issubclass(self.reader, SemanticOneVsAllDataset):
            self.reader.download(os.path.abspath(self.root))

    def setup(self, stage: str | None = None) -> None:
        """Resolve the categories, draw the shots and index the test split; cheap to call again.

        Every check that needs no model runs here. The one-class test-split check is skipped for
        ``stage="predict"`` (scoring unlabelled images needs no AUROC), and with ``predict_dir`` the test
        split is not read at all.
        """
        self._prepare_shots()
        if stage == "predict" and self.predict_dir is not None:
            self._prepare_predict()
            return
        self._prepare_test()
        if stage != "predict":
            self._check_test_labels()

    def train_dataloader(self) -> DataLoader:
        """The shots (plus extra normals), repeated, augmented when ``augment``, shuffled by seed; a
        resumed fit's loader starts where the interrupted one stopped (:meth:`load_state_dict`)."""
        shots = self._shot_dataset()
        augment = FewShotAugment(self.augment_config) if self.augment else None
        dataset = ShotTrainDataset(shots, repeats=self.train_repeats, augment=augment, seed=self.seed)
        batch_size = self.train_batch_size or len(shots)
        per_epoch = -(-len(dataset) // batch_size)  # batches of an epoch (the last one may be short)
        epoch, done = divmod(self._resume_batches, per_epoch)
        self._resume_batches = 0  # the next loader (a later fit of this datamodule) starts afresh
        return DataLoader(
            dataset,
            batch_size=batch_size,
            sampler=EpochShuffleSampler(len(dataset), self.seed, start=(epoch, done * batch_size)),
            collate_fn=collate_samples,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint keeps of the data: the training batches done so far (single device), so a
        resumed fit continues the epoch it was in with the batches an uninterrupted fit would see."""
        progress = _training_batches_done(self.trainer) if self.trainer is not None else None
        return {} if progress is None else {"training_batches_done": progress}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._resume_batches = int(state_dict.get("training_batches_done", 0))

    def test_dataloader(self) -> DataLoader:
        """The whole test split of every category, sorted by category then path, with ``gt_mask``."""
        self._prepare_test()
        dataset = ConcatDataset(self._test_sets)
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            sampler=unrepeated_test_sampler(dataset),
            shuffle=False,
            collate_fn=collate_samples,
            num_workers=self.num_workers,
        )

    def predict_dataloader(self) -> DataLoader:
        """Every image under ``predict_dir`` (unlabelled), else the same as :meth:`test_dataloader`."""
        if self.predict_dir is None:
            return self.test_dataloader()
        self._prepare_predict()
        return DataLoader(
            self._predict_set,
            batch_size=self.batch_size,
            sampler=unrepeated_test_sampler(self._predict_set),
            shuffle=False,
            collate_fn=collate_samples,
            num_workers=self.num_workers,
        )

    # ------------------------------------------------------------------ what methods use
    @property
    def manifest(self) -> dict[str, Any]:
        """The run manifest (see :mod:`fsad_lightning.data.sampler`); drawn on first access if needed."""
        self._prepare_shots()
        return copy.deepcopy(self._manifest)

    @property
    def categories(self) -> list[str]:
        """The resolved category names, in the order shots and test samples follow."""
        if self._categories is None:
            if self.shots_dir is not None:
                self._categories = [self._shots_dir_category()]
            else:
                self._categories = self._resolve_categories()
        return list(self._categories)

    def shot_batch(self) -> dict[str, Any]:
        """All un-augmented shots and extra normals as one collated batch (no ``gt_mask``)."""
        shots = self._shot_dataset()
        return collate_samples([shots[i] for i in range(len(shots))])

    def test_dataset(self) -> ConcatDataset:
        """The test split as one dataset (what :meth:`test_dataloader` iterates)."""
        self._prepare_test()
        return ConcatDataset(self._test_sets)

    # ------------------------------------------------------------------ internals
    def _default_name(self) -> str:
        if self.dataset_format in ("folder", "visa") and self.root:
            return os.path.basename(os.path.normpath(os.path.abspath(self.root)))
        return self.dataset_format

    def _root(self) -> str:
        """The absolute dataset root; FileNotFoundError when it does not exist."""
        if self._resolved_root is None:
            if self.dataset_format == "elpv":
                self._resolved_root = check_root(self.root or default_elpv_root(), "ELPV root")
            elif issubclass(self.reader, SemanticOneVsAllDataset):
                self.reader.check_files(os.path.abspath(self.root) if self.root else "")
                self._resolved_root = os.path.abspath(self.root)
            else:
                self._resolved_root = check_root(self.root)
        return self._resolved_root

    def _reader_options(self) -> dict[str, Any]:
        if self.dataset_format == "elpv":
            return {"include_uncertain": self.include_uncertain}
        return {}

    def _plain_folder_set(self, records: list[ImageRecord], root: str, category: str) -> AnomalyDataset:
        """Images of a plain folder (``shots_dir``, ``predict_dir``, extra normals) read like the dataset's:
        at ``image_size`` by ``resize_mode``."""
        return AnomalyDataset(records, self.image_size, "train", root=root, category=category,
                              resize_mode=self.resize_mode)

    def _make(self, category: str, split: str) -> AnomalyDataset:
        dataset = self.reader(
            self._root(), category, split=split, image_size=self.image_size, **self._reader_options()
        )
        dataset.resize_mode = self.resize_mode
        return dataset

    def _resolve_categories(self) -> list[str]:
        root = self._root()
        available = list(self.reader.available_categories(root))
        if isinstance(self.category, str) and self.category == ALL and ALL not in available:
            if not available:
                hint = ""
                if os.path.isdir(os.path.join(root, "train")) or os.path.isdir(os.path.join(root, "test")):
                    hint = (
                        f"; {root} looks like a single category folder: pass its parent as root and "
                        f"{os.path.basename(root)!r} as category"
                    )
                raise ValueError(
                    f"no category folders (<category>/train, <category>/test) found under root {root}{hint}"
                )
            return available
        requested = [self.category] if isinstance(self.category, str) else list(self.category)
        resolved = []
        for category in requested:
            if issubclass(self.reader, SemanticOneVsAllDataset):
                resolved.append(self.reader.canonical_category(str(category)))
            elif category in available:
                resolved.append(category)
            else:
                raise unknown_category_error(str(category), available, root)
        return resolved

    def _shots_dir_category(self) -> str:
        """The category of ``shots_dir`` shots: ``category`` when it names one, else the folder's name."""
        if isinstance(self.category, str) and self.category != ALL:
            return self.category
        if isinstance(self.category, (list, tuple)) and len(self.category) == 1:
            return str(self.category[0])
        if isinstance(self.category, (list, tuple)):
            raise ValueError(
                f"shots_dir holds the shots of one category, but category lists {list(self.category)}: "
                "name one category (or none)"
            )
        return os.path.basename(os.path.normpath(os.path.abspath(self.shots_dir)))

    def _prepare_shots_dir(self) -> None:
        """The shots drawn from the plain folder ``shots_dir`` and their manifest."""
        folder = check_root(self.shots_dir, "shots_dir")
        category = self.categories[0]
        names = list_image_files(folder, recursive=True)
        if not names:
            raise ValueError(f"shots_dir {folder} holds no image files ({', '.join(IMAGE_EXTENSIONS[:7])}, ...)")
        records = [
            ImageRecord(
                path=os.path.join(folder, name), relative_path=name, category=category, label=0, defect_type=GOOD
            )
            for name in names
        ]
        pool = self._plain_folder_set(records, folder, category)
        selected = select_shots(pool.relative_paths, self.k_shot, self.seed, where=f"shots_dir {folder}")
        self._shots = [pool.select(selected)]
        extras: list[str] = []
        for directory in self.extra_normal_dirs:
            extra = extra_normal_records(self._extra_folder(directory, category, [category]), category)
            self._shots.append(self._plain_folder_set(extra, directory, category))
            extras.extend(record.path for record in extra)
        self._manifest = build_manifest(
            dataset=self.name,
            category=category,
            k_shot=self.k_shot,
            seed=self.seed,
            files=selected,
            root=folder,
            dataset_version=dataset_version(file_entries([r.path for r in records], folder)),
            extra_normals=extras,
            format="shots_dir",
        )

    def _prepare_predict(self) -> None:
        """Index every image under ``predict_dir`` (once): unlabelled records of the run's one category."""
        if self._predict_set is not None:
            return
        folder = check_root(self.predict_dir, "predict_dir")
        categories = self.categories
        if len(categories) != 1:
            raise ValueError(
                f"predict_dir scores images of one category, but the run has {categories}: set "
                "data.category to the category of the images"
            )
        names = list_image_files(folder, recursive=True)
        if not names:
            raise ValueError(
                f"predict_dir {folder} holds no image files ({', '.join(IMAGE_EXTENSIONS[:7])}, ... in any "
                "sub-folder)"
            )
        records = [
            ImageRecord(
                path=os.path.join(folder, name), relative_path=name, category=categories[0], label=-1, defect_type=""
            )
            for name in names
        ]
        self._predict_set = self._plain_folder_set(records, folder, categories[0])

    def _prepare_shots(self) -> None:
        """Draw the shots of every category and build the manifest (once)."""
        if self._manifest is not None:
            return
        if self.shots_dir is not None:
            self._prepare_shots_dir()
            return
        root = self._root()
        categories = self.categories
        shots: list[Dataset] = []
        files: list[str] = []
        extras: list[str] = []
        entries: list[tuple[str, int]] = []
        for category in categories:
            pool = self._make(category, "train")
            selected = select_shots(pool.relative_paths, self.k_shot, self.seed, where=pool.describe_pool())
            shots.append(pool.select(selected))
            files.extend(selected)
            entries.extend(pool.version_entries())
            for directory in self.extra_normal_dirs:
                records = extra_normal_records(self._extra_folder(directory, category, categories), category)
                shots.append(self._plain_folder_set(records, directory, category))
                extras.extend(record.path for record in records)
        multi = not isinstance(self.category, str) or (self.category == ALL and ALL not in categories)
        self._shots = shots
        self._manifest = build_manifest(
            dataset=self.name,
            category=list(categories) if multi else categories[0],
            k_shot=self.k_shot,
            seed=self.seed,
            files=files,
            root=root,
            dataset_version=dataset_version(entries),
            extra_normals=extras,
            format=self.dataset_format,
        )

    @staticmethod
    def _extra_folder(directory: str, category: str, categories: list[str]) -> str:
        """The folder holding ``category``'s extra normals in ``directory`` (see ``extra_normal_dirs``)."""
        if not os.path.isdir(directory):
            raise FileNotFoundError(f"extra normal folder does not exist: {directory!r}")
        per_category = os.path.join(directory, category)
        if os.path.isdir(per_category):
            return per_category
        if len(categories) == 1:
            return directory
        raise ValueError(
            f"extra normal folder {directory} has no sub-folder {category!r}: with several categories each "
            "extra normal folder needs one sub-folder per category (<dir>/<category>/)"
        )

    def _shot_dataset(self) -> Dataset:
        self._prepare_shots()
        return ConcatDataset(self._shots)

    def _prepare_test(self) -> None:
        """Index the test split of every category (once); an empty split is a ValueError."""
        if self._test_sets is not None:
            return
        test_sets = []
        for category in self.categories:
            test = self._make(category, "test")
            if len(test) == 0:
                raise ValueError(
                    f"the test split of category {category!r} under {self._root()} has no images"
                )
            test_sets.append(test)
        self._test_sets = test_sets

    def _check_test_labels(self) -> None:
        """Each category's test split needs normal and anomalous images, or image AUROC is undefined."""
        for test in self._test_sets or []:
            labels = set(test.labels)
            if len(labels) < 2:
                kind = "normal" if labels == {0} else "anomalous"
                raise ValueError(
                    f"the test split of category {test.category!r} under {test.root} has only {kind} images "
                    f"({len(test)}): image AUROC is undefined without both normal and anomalous test images"
                )
