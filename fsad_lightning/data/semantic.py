"""One-vs-all semantic anomaly sets: MNIST and CIFAR-10 from local files.

One class is normal, the nine others are anomalous. The train pool (where the shots come from) is the
normal class's images of the official train split; the test split is the whole official test split. The
category is the normal class: ``"0"`` .. ``"9"`` for MNIST, the class name (``"airplane"`` ..
``"truck"``) for CIFAR-10, where the index ``"0"`` .. ``"9"`` is accepted too. Image-only (no masks).

Files are read through ``torchvision.datasets.MNIST`` / ``CIFAR10`` in their on-disk layout::

    <root>/MNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte        (uncompressed idx files)
    <root>/cifar-10-batches-py/{data_batch_1..5,test_batch,batches.meta}  (python pickles)

Nothing is downloaded unless ``download=True``. The CIFAR-10 reader checks that its files exist but not
their md5 sums (torchvision verifies the archive when it downloads it, and hashing 170 MB on every run is
slow). Samples are identified as ``mnist://train/123`` / ``cifar10://test/42`` (split and index).
"""

from __future__ import annotations

import os
import pickle
from functools import lru_cache
from typing import ClassVar

import numpy as np
import torch
from torch import Tensor

from fsad_lightning.data.folder import (
    GOOD,
    AnomalyDataset,
    ImageRecord,
    Split,
    check_split,
    file_entries,
    unknown_category_error,
)

MNIST_CLASSES = tuple(str(i) for i in range(10))
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
MNIST_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)
#: what torchvision raises on truncated or malformed files (its idx parser asserts)
_READ_ERRORS = (
    RuntimeError,
    OSError,
    ValueError,
    TypeError,
    AssertionError,
    IndexError,
    EOFError,
    KeyError,
    pickle.UnpicklingError,
)
CIFAR10_FILES = (
    "data_batch_1",
    "data_batch_2",
    "data_batch_3",
    "data_batch_4",
    "data_batch_5",
    "test_batch",
    "batches.meta",
)


def _cifar10_class() -> type:
    """``torchvision.datasets.CIFAR10`` checking that its files exist instead of their md5 sums."""
    from torchvision.datasets import CIFAR10

    class LocalCIFAR10(CIFAR10):
        def _check_integrity(self) -> bool:
            folder = os.path.join(self.root, self.base_folder)
            return all(
                os.path.isfile(os.path.join(folder, name)) for name, _ in self.train_list + self.test_list
            )

        def _load_meta(self) -> None:
            path = os.path.join(self.root, self.base_folder, self.meta["filename"])
            with open(path, "rb") as stream:
                self.classes = pickle.load(stream, encoding="latin1")[self.meta["key"]]
            self.class_to_idx = {name: i for i, name in enumerate(self.classes)}

    return LocalCIFAR10


def _load_split(
    kind: str, root: str, train: bool, folder: str, files: tuple[str, ...]
) -> tuple[np.ndarray, np.ndarray]:
    """``(images, targets)`` of one split, cached until one of ``files`` (in ``folder``) changes."""
    stamp = tuple(os.stat(os.path.join(folder, name)).st_mtime_ns for name in files)
    return _load_split_cached(kind, root, train, stamp)


@lru_cache(maxsize=4)
def _load_split_cached(
    kind: str, root: str, train: bool, stamp: tuple[int, ...]
) -> tuple[np.ndarray, np.ndarray]:
    """``(images, targets)`` as numpy arrays (uint8 ``[N, H, W]`` / ``[N, H, W, 3]``, int).

    ``stamp`` (the files' modification times) only keys the cache.
    """
    try:
        if kind == "mnist":
            from torchvision.datasets import MNIST

            data = MNIST(root, train=train, download=False)
            return data.data.numpy(), data.targets.numpy()
        data = _cifar10_class()(root, train=train, download=False)
        return np.asarray(data.data), np.asarray(data.targets)
    except _READ_ERRORS as err:
        raise ValueError(
            f"cannot read the {kind} files under {root}: they are corrupt or incomplete ({err})"
        ) from err


class SemanticOneVsAllDataset(AnomalyDataset):
    """Base of the one-vs-all sets (see the module docstring); subclasses set the class constants.

    Args:
        root: folder holding ``MNIST/raw`` or ``cifar-10-batches-py``.
        category: the normal class.
        split: ``"train"`` (normal-class images of the train split) or ``"test"`` (the whole test split).
        image_size: side length of the square resized image.
        download: fetch the files with torchvision when they are missing (needs a network).
    """

    format_name: ClassVar[str] = ""
    classes: ClassVar[tuple[str, ...]] = ()
    files: ClassVar[tuple[str, ...]] = ()
    folder: ClassVar[str] = ""

    def __init__(
        self, root: str, category: str, split: Split = "test", image_size: int = 256, download: bool = False
    ) -> None:
        check_split(split)
        root = os.path.abspath(root) if root else root
        if download:
            self.download(root)
        self.check_files(root)
        self.normal_class = self.class_index(category, root)
        images, targets = _load_split(
            self.format_name, root, split == "train", self.file_folder(root), self.files
        )
        self._images = images
        self._targets = targets
        name = self.classes[self.normal_class]
        records = []
        for index, target in enumerate(targets.tolist()):
            is_normal = target == self.normal_class
            if split == "train" and not is_normal:
                continue
            records.append(
                ImageRecord(
                    path=f"{self.format_name}://{split}/{index}",
                    relative_path=f"{split}/{index}",
                    category=name,
                    label=0 if is_normal else 1,
                    defect_type=GOOD if is_normal else self.classes[target],
                )
            )
        super().__init__(records, image_size=image_size, split=split, root=root, category=name)

    # -------------------------------------------------------------- files
    @classmethod
    def file_folder(cls, root: str) -> str:
        return os.path.join(root, cls.folder)

    @classmethod
    def check_files(cls, root: str) -> None:
        """FileNotFoundError saying where the files are expected and that ``download=True`` fetches them."""
        folder = cls.file_folder(root)
        missing = [name for name in cls.files if not os.path.isfile(os.path.join(folder, name))]
        if not root or not os.path.isdir(root) or missing:
            shown = ", ".join(missing or cls.files)
            raise FileNotFoundError(
                f"{cls.format_name} files not found: expected {shown} in {folder}; "
                "pass download=True to fetch "
                "them when a network is available"
            )

    @classmethod
    def download(cls, root: str) -> None:
        """Fetch the files with torchvision (only called when the user asks, ``download=True``)."""
        raise NotImplementedError

    @classmethod
    def available_categories(cls, root: str = "") -> list[str]:
        return list(cls.classes)

    @classmethod
    def class_index(cls, category: str, root: str = "") -> int:
        """Index of ``category`` given as a class name or as ``"0"`` .. ``"9"``."""
        category = str(category)
        if category in cls.classes:
            return cls.classes.index(category)
        if category.isdigit() and int(category) < len(cls.classes):
            return int(category)
        raise unknown_category_error(category, cls.classes, root or cls.format_name)

    @classmethod
    def canonical_category(cls, category: str) -> str:
        return cls.classes[cls.class_index(category)]

    def version_entries(self) -> list[tuple[str, int]]:
        """The raw files with their sizes."""
        folder = self.file_folder(self.root)
        return file_entries([os.path.join(folder, name) for name in self.files], self.root)

    # -------------------------------------------------------------- samples
    def load_image(self, record: ImageRecord) -> Tensor:
        index = int(record.relative_path.rsplit("/", 1)[1])
        array = torch.from_numpy(np.ascontiguousarray(self._images[index])).float() / 255.0
        if array.ndim == 2:
            return array.unsqueeze(0).expand(3, -1, -1).contiguous()
        return array.permute(2, 0, 1).contiguous()

    def load_mask(self, record: ImageRecord) -> Tensor | None:
        return None


class MNISTOneVsAll(SemanticOneVsAllDataset):
    """MNIST one-vs-all: category ``"0"`` .. ``"9"`` is the normal digit."""

    format_name = "mnist"
    classes = MNIST_CLASSES
    files = MNIST_FILES
    folder = os.path.join("MNIST", "raw")

    @classmethod
    def download(cls, root: str) -> None:
        from torchvision.datasets import MNIST

        for train in (True, False):
            MNIST(root, train=train, download=True)


class CIFAR10OneVsAll(SemanticOneVsAllDataset):
    """CIFAR-10 one-vs-all: category is the normal class name (or its index)."""

    format_name = "cifar10"
    classes = CIFAR10_CLASSES
    files = CIFAR10_FILES
    folder = "cifar-10-batches-py"

    @classmethod
    def download(cls, root: str) -> None:
        from torchvision.datasets import CIFAR10

        CIFAR10(root, train=True, download=True)
