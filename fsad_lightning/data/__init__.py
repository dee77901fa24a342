"""The data layer: readers, the few-shot sampler and manifest, augmentation, synthetic data, the datamodule.

Every reader yields the per-image sample dicts of :mod:`fsad_lightning.data.batch`; batches are collated
with :func:`~fsad_lightning.data.batch.collate_samples`.

The names below are imported lazily on first use, so ``import fsad_lightning.data.batch`` (which every
method and metric does) does not pull in Lightning, kornia or torchvision.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

#: exported name -> the module defining it
_EXPORTS = {
    "AnomalyOutput": "batch",
    "collate_samples": "batch",
    "AugmentConfig": "augment",
    "FewShotAugment": "augment",
    "READERS": "datamodule",
    "EpochShuffleSampler": "datamodule",
    "FewShotDataModule": "datamodule",
    "ShotTrainDataset": "datamodule",
    "ELPVDataset": "elpv",
    "IMAGE_EXTENSIONS": "folder",
    "AnomalyDataset": "folder",
    "FolderDataset": "folder",
    "ImageRecord": "folder",
    "extra_normal_records": "folder",
    "read_image": "folder",
    "read_mask": "folder",
    "build_manifest": "sampler",
    "dataset_version": "sampler",
    "load_manifest": "sampler",
    "save_manifest": "sampler",
    "select_shots": "sampler",
    "CIFAR10OneVsAll": "semantic",
    "MNISTOneVsAll": "semantic",
    "SemanticOneVsAllDataset": "semantic",
    "write_synthetic_category": "synthetic",
    "VisADataset": "visa",
}

__all__ = [
    "AnomalyDataset",
    "AnomalyOutput",
    "AugmentConfig",
    "CIFAR10OneVsAll",
    "ELPVDataset",
    "EpochShuffleSampler",
    "FewShotAugment",
    "FewShotDataModule",
    "FolderDataset",
    "IMAGE_EXTENSIONS",
    "ImageRecord",
    "MNISTOneVsAll",
    "READERS",
    "SemanticOneVsAllDataset",
    "ShotTrainDataset",
    "VisADataset",
    "build_manifest",
    "collate_samples",
    "dataset_version",
    "extra_normal_records",
    "load_manifest",
    "read_image",
    "read_mask",
    "save_manifest",
    "select_shots",
    "write_synthetic_category",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


if TYPE_CHECKING:  # static type checkers and IDEs see the real imports
    from fsad_lightning.data.augment import AugmentConfig, FewShotAugment
    from fsad_lightning.data.batch import AnomalyOutput, collate_samples
    from fsad_lightning.data.datamodule import (
        READERS,
        EpochShuffleSampler,
        FewShotDataModule,
        ShotTrainDataset,
    )
    from fsad_lightning.data.elpv import ELPVDataset
    from fsad_lightning.data.folder import (
        IMAGE_EXTENSIONS,
        AnomalyDataset,
        FolderDataset,
        ImageRecord,
        extra_normal_records,
        read_image,
        read_mask,
    )
    from fsad_lightning.data.sampler import (
        build_manifest,
        dataset_version,
        load_manifest,
        save_manifest,
        select_shots,
    )
    from fsad_lightning.data.semantic import CIFAR10OneVsAll, MNISTOneVsAll, SemanticOneVsAllDataset
    from fsad_lightning.data.synthetic import write_synthetic_category
    from fsad_lightning.data.visa import VisADataset
