"""ELPV: electroluminescence images of solar cells (Buerhop-Lutz et al. 2018; Deitsch et al. 2019).

Read from the PyPI package ``elpv_dataset`` (or a copy of its ``data`` folder): ``labels.csv`` lists one
cell per line, ``images/cellNNNN.png <defect probability> <mono|poly>``, separated by whitespace; the images
are 300x300 grayscale. Images are read one at a time when a sample is loaded, never all at once.

Labels: defect probability 0 is normal, 1 anomalous; the uncertain ratings 1/3 and 2/3 are excluded by
default, or counted as normal / anomalous with ``include_uncertain``.

Split (ELPV has no official few-shot split; this one is fixed and documented here): a *certain* normal cell
(probability 0) whose ``int(sha1(file name).hexdigest(), 16) % 5 == 0`` (file name such as
``cell0004.png``) belongs to the train/good pool the shots are drawn from; every other image kept by the
label rule (the other normals, the anomalies, and the uncertain cells when included) is the test split. The
pool does not depend on ``include_uncertain``, so the shots of a seed never change with that setting.

Categories: ``"mono"`` and ``"poly"`` (the cell type), or ``"all"`` for both. Image-only: no masks.
"""

from __future__ import annotations

import hashlib
import os
from typing import ClassVar, Literal

from fsad_lightning.data.folder import (
    GOOD,
    AnomalyDataset,
    ImageRecord,
    Split,
    check_root,
    check_split,
    file_entries,
    unknown_category_error,
)

UncertainPolicy = Literal["exclude", "normal", "anomalous"]
UNCERTAIN_POLICIES = ("exclude", "normal", "anomalous")
CATEGORIES = ("all", "mono", "poly")
#: defect types of the ELPV test images
DEFECTIVE = "defective"
UNCERTAIN = "uncertain"
#: one in ``TRAIN_MODULUS`` certain normal cells goes to the train pool
TRAIN_MODULUS = 5


def default_elpv_root() -> str:
    """The ``data`` folder of the installed ``elpv_dataset`` package (ImportError with a hint if absent)."""
    try:
        import elpv_dataset
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(
            "ELPV needs the package elpv_dataset: pip install elpv-dataset "
            "(or pass root=<folder with labels.csv>)"
        ) from err
    return os.path.join(os.path.dirname(elpv_dataset.__file__), "data")


def in_train_pool(file_name: str) -> bool:
    """Whether a certain normal cell belongs to the train pool: ``int(sha1(file_name), 16) % 5 == 0``."""
    return int(hashlib.sha1(file_name.encode("utf-8")).hexdigest(), 16) % TRAIN_MODULUS == 0


def read_labels(root: str) -> list[tuple[str, float, str]]:
    """``(relative image path, defect probability, cell type)`` for every line of ``<root>/labels.csv``."""
    csv_path = os.path.join(root, "labels.csv")
    if not os.path.isfile(csv_path):
        raise FileNotFoundError(f"ELPV label file not found: {csv_path} (expected <root>/labels.csv)")
    entries = []
    with open(csv_path, encoding="utf-8") as stream:
        for line_number, line in enumerate(stream, start=1):
            fields = line.split()
            if not fields:
                continue
            if len(fields) != 3:
                raise ValueError(
                    f"{csv_path} line {line_number}: expected '<image> <probability> <mono|poly>', "
                    f"got {line.strip()!r}"
                )
            path, probability, cell_type = fields
            try:
                value = float(probability)
            except ValueError as err:
                raise ValueError(
                    f"{csv_path} line {line_number}: probability {probability!r} is not a number"
                ) from err
            if cell_type not in ("mono", "poly"):
                raise ValueError(
                    f"{csv_path} line {line_number}: cell type must be mono or poly, got {cell_type!r}"
                )
            entries.append((path, value, cell_type))
    return entries


class ELPVDataset(AnomalyDataset):
    """ELPV solar cells as a one-class anomaly set (split and labels: see the module docstring).

    Args:
        root: folder with ``labels.csv`` and ``images/``; ``""`` (default) uses the installed
            ``elpv_dataset`` package.
        category: ``"all"`` (both cell types), ``"mono"`` or ``"poly"``.
        split: ``"train"`` (the normal pool) or ``"test"``.
        image_size: side length of the square resized image.
        include_uncertain: what the cells rated 1/3 and 2/3 are: ``"exclude"`` (left out), ``"normal"``
            or ``"anomalous"`` (test split only).
    """

    format_name: ClassVar[str] = "elpv"

    def __init__(
        self,
        root: str = "",
        category: str = "all",
        split: Split = "test",
        image_size: int = 256,
        include_uncertain: UncertainPolicy = "exclude",
    ) -> None:
        root = check_root(root or default_elpv_root(), "ELPV root")
        check_split(split)
        if category not in CATEGORIES:
            raise unknown_category_error(category, CATEGORIES, root)
        if include_uncertain not in UNCERTAIN_POLICIES:
            raise ValueError(
                f"include_uncertain must be one of {UNCERTAIN_POLICIES}, got {include_uncertain!r}"
            )
        self.include_uncertain = include_uncertain
        self._entries = [e for e in read_labels(root) if category == "all" or e[2] == category]
        records = []
        for relative, probability, _cell_type in self._entries:
            record = self._record(root, category, relative, probability, split)
            if record is not None:
                records.append(record)
        records.sort(key=lambda r: r.relative_path)
        super().__init__(records, image_size=image_size, split=split, root=root, category=category)

    @staticmethod
    def available_categories(root: str = "") -> list[str]:
        return list(CATEGORIES)

    def _record(
        self, root: str, category: str, relative: str, probability: float, split: Split
    ) -> ImageRecord | None:
        certain_normal = probability == 0.0
        if split == "train":
            if not (certain_normal and in_train_pool(os.path.basename(relative))):
                return None
            label, defect = 0, GOOD
        elif certain_normal:
            if in_train_pool(os.path.basename(relative)):
                return None
            label, defect = 0, GOOD
        elif probability == 1.0:
            label, defect = 1, DEFECTIVE
        elif self.include_uncertain == "exclude":
            return None
        elif self.include_uncertain == "normal":
            label, defect = 0, GOOD
        else:
            label, defect = 1, UNCERTAIN
        return ImageRecord(
            path=os.path.join(root, relative),
            relative_path=relative.replace(os.sep, "/"),
            category=category,
            label=label,
            defect_type=defect,
        )

    def version_entries(self) -> list[tuple[str, int]]:
        """``labels.csv`` and every image of the category."""
        paths = [os.path.join(self.root, "labels.csv")]
        paths += [os.path.join(self.root, relative) for relative, _, _ in self._entries]
        return file_entries(paths, self.root)
