"""VisA (Visual Anomaly dataset, Zou et al., ECCV 2022) read through its official split file.

The official one-class split ``<root>/split_csv/1cls.csv`` has the columns ``object,split,label,image,mask``:
``object`` is the category (``candle``, ``pcb1``...), ``split`` is ``train`` or ``test``, ``label`` is
``normal`` or ``anomaly``, ``image`` / ``mask`` are paths relative to the VisA root (``mask`` empty for
normal images). Masks mark anomalous pixels with non-zero values (VisA stores small integers, not 255); they
are binarised at > 0.
"""

from __future__ import annotations

import csv
import os
from functools import lru_cache
from typing import ClassVar

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

#: the official split file, relative to the VisA root
SPLIT_CSV = os.path.join("split_csv", "1cls.csv")
CSV_COLUMNS = ("object", "split", "label", "image", "mask")
#: defect type given to VisA's anomalous images (the split file names no defect kinds)
ANOMALY = "anomaly"


@lru_cache(maxsize=4)
def _read_split_csv(csv_path: str, stamp: tuple[int, int]) -> tuple[tuple[int, dict[str, str]], ...]:
    """Rows of the split file as ``(line number, row)``; ``stamp`` (mtime, size) only keys the cache."""
    with open(csv_path, newline="", encoding="utf-8") as stream:
        reader = csv.DictReader(stream)
        columns = [c.strip() for c in (reader.fieldnames or [])]
        missing = [c for c in CSV_COLUMNS if c not in columns]
        if missing:
            raise ValueError(
                f"VisA split file {csv_path} lacks the column(s) {', '.join(missing)}; "
                f"expected the header {','.join(CSV_COLUMNS)}"
            )
        rows = []
        for line, row in enumerate(reader, start=2):
            rows.append((line, {key.strip(): (value or "").strip() for key, value in row.items() if key}))
    return tuple(rows)


def read_split_csv(root: str) -> list[tuple[int, dict[str, str]]]:
    """The rows of ``<root>/split_csv/1cls.csv`` with their line numbers (FileNotFoundError if missing)."""
    csv_path = os.path.join(root, SPLIT_CSV)
    if not os.path.isfile(csv_path):
        raise FileNotFoundError(f"VisA split file not found: {csv_path} (expected <root>/{SPLIT_CSV})")
    stat = os.stat(csv_path)
    return list(_read_split_csv(csv_path, (stat.st_mtime_ns, stat.st_size)))


class VisADataset(AnomalyDataset):
    """One category of VisA, split by the official ``split_csv/1cls.csv``.

    ``defect_type`` is ``"good"`` for normal images and ``"anomaly"`` for anomalous ones (the split file
    does not name defect kinds). Every anomalous test image must have a mask: a row without one, or an
    image / mask file that does not exist, is an error naming the CSV line and the file.

    Args:
        root: the VisA root (holding ``split_csv/`` and the category folders).
        category: the ``object`` value, e.g. ``"candle"``.
        split: ``"train"`` or ``"test"``.
        image_size: side length of the square resized image and mask.
    """

    format_name: ClassVar[str] = "visa"

    def __init__(self, root: str, category: str, split: Split = "test", image_size: int = 256) -> None:
        root = check_root(root, "VisA root")
        check_split(split)
        rows = read_split_csv(root)
        categories = sorted({row["object"] for _, row in rows})
        if category not in categories:
            raise unknown_category_error(category, categories, root)
        self.csv_path = os.path.join(root, SPLIT_CSV)
        self._category_rows = [(line, row) for line, row in rows if row["object"] == category]
        records = [
            self._record(root, line, row) for line, row in self._category_rows if row["split"] == split
        ]
        records.sort(key=lambda record: record.relative_path)
        super().__init__(records, image_size=image_size, split=split, root=root, category=category)

    @staticmethod
    def available_categories(root: str) -> list[str]:
        """The sorted ``object`` values of the split file."""
        return sorted({row["object"] for _, row in read_split_csv(check_root(root, "VisA root"))})

    def _record(self, root: str, line: int, row: dict[str, str]) -> ImageRecord:
        where = f"{self.csv_path} line {line}"
        if row["split"] not in ("train", "test"):
            raise ValueError(f"{where}: split must be 'train' or 'test', got {row['split']!r}")
        if row["label"] not in ("normal", "anomaly"):
            raise ValueError(f"{where}: label must be 'normal' or 'anomaly', got {row['label']!r}")
        label = int(row["label"] == "anomaly")
        image_path = os.path.join(root, row["image"])
        if not os.path.isfile(image_path):
            raise FileNotFoundError(f"{where}: image file not found: {image_path}")
        mask_path = ""
        if label == 1:
            if not row["mask"]:
                raise ValueError(f"{where}: anomalous image {row['image']} has no mask entry")
            mask_path = os.path.join(root, row["mask"])
            if not os.path.isfile(mask_path):
                raise FileNotFoundError(f"{where}: missing mask {mask_path} for anomalous image {image_path}")
        return ImageRecord(
            path=image_path,
            relative_path=row["image"].replace(os.sep, "/"),
            category=row["object"],
            label=label,
            defect_type=ANOMALY if label else GOOD,
            mask_path=mask_path,
            has_mask=True,
        )

    def version_entries(self) -> list[tuple[str, int]]:
        """The split file plus every image and mask the split file lists for this category."""
        paths = [self.csv_path]
        for _, row in self._category_rows:
            paths.append(os.path.join(self.root, row["image"]))
            if row["mask"]:
                paths.append(os.path.join(self.root, row["mask"]))
        return file_entries(paths, self.root)
