"""Deterministic k-shot selection and the run manifest.

The few-shot protocol: the candidate normal images of a category are identified by their paths relative
to the dataset root, sorted as strings, and ``k`` of them are drawn without replacement by
``torch.randperm`` under ``torch.Generator().manual_seed(seed)``. Sorting relative paths makes the draw
independent of the directory listing order and of where the dataset lives; ``torch.randperm`` with an
explicitly seeded CPU generator gives the same permutation on every machine.

The manifest records what a run used, so a result can be reproduced and a checkpoint matched to its shots::

    {"dataset": "mvtec", "category": "bottle", "k_shot": 4, "seed": 0,
     "files": ["bottle/train/good/017.png", ...],      # relative paths, in selection order
     "root": "/data/mvtec", "dataset_version": "3f2a9c0d1b7e",
     "extra_normals": ["/cache/gen/bottle/000.png", ...]}

For several categories ``category`` is the list of names and ``files`` the per-category selections
concatenated in that order.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Sequence
from typing import Any

import torch

from fsad_lightning.io import atomic_write_text
from fsad_lightning.validation import require_integers

#: keys every manifest holds
MANIFEST_KEYS = ("dataset", "category", "k_shot", "seed", "files", "root", "dataset_version", "extra_normals")
#: hex digits kept of the dataset-version sha1
VERSION_LENGTH = 12


def select_shots(candidates: Sequence[str], k_shot: int, seed: int, where: str = "") -> list[str]:
    """Draw ``k_shot`` of ``candidates`` without replacement, deterministically for ``seed``.

    ``candidates`` are sorted as strings first, so their input order does not matter; then the first
    ``k_shot`` entries of ``torch.randperm(len(candidates), generator=torch.Generator().manual_seed(seed))``
    index the sorted list. The result is in selection order.

    Args:
        candidates: identifiers of the normal images (relative paths), each at most once.
        k_shot: how many to draw, ``1 <= k_shot <= len(candidates)``.
        seed: the generator seed (any integer ``torch.Generator.manual_seed`` accepts).
        where: a description of the pool (e.g. the folder) used in error messages.

    Raises:
        ValueError: ``k_shot`` < 1, ``k_shot`` larger than the pool (saying how many are available), or a
            duplicated candidate.
    """
    pool = sorted(str(candidate) for candidate in candidates)
    place = f" in {where}" if where else ""
    if len(set(pool)) != len(pool):
        duplicate = next(a for a, b in zip(pool, pool[1:]) if a == b)
        raise ValueError(f"the normal images{place} list {duplicate!r} more than once")
    require_integers(k_shot=k_shot)
    if not pool:
        raise ValueError(f"no normal images found{place}: the k shots are drawn from there, so add images")
    if k_shot > len(pool):
        raise ValueError(
            f"k_shot={k_shot} but only {len(pool)} normal image(s) are available{place}: "
            f"choose k_shot <= {len(pool)}"
        )
    generator = torch.Generator().manual_seed(int(seed))
    order = torch.randperm(len(pool), generator=generator)[:k_shot]
    return [pool[int(i)] for i in order]


def dataset_version(entries: Iterable[tuple[str, int]]) -> str:
    """A short fingerprint of a dataset: sha1 over its sorted ``(relative path, size)`` list.

    Adding, removing, renaming or resizing a file changes it; it does not read file contents (fast on
    large sets), so an edit that keeps the byte size is not seen. Returns the first
    :data:`VERSION_LENGTH` hex digits.
    """
    digest = hashlib.sha1()
    for path, size in sorted((str(path), int(size)) for path, size in entries):
        digest.update(f"{path}\t{size}\n".encode())
    return digest.hexdigest()[:VERSION_LENGTH]


def build_manifest(
    dataset: str,
    category: str | list[str],
    k_shot: int,
    seed: int,
    files: Sequence[str],
    root: str,
    dataset_version: str,
    extra_normals: Sequence[str] = (),
    **extra: Any,
) -> dict[str, Any]:
    """The manifest dict (keys :data:`MANIFEST_KEYS` plus any ``extra`` fields, e.g. ``format``)."""
    manifest: dict[str, Any] = {
        "dataset": dataset,
        "category": category if isinstance(category, str) else list(category),
        "k_shot": int(k_shot),
        "seed": int(seed),
        "files": [str(f) for f in files],
        "root": str(root),
        "dataset_version": dataset_version,
        "extra_normals": [str(f) for f in extra_normals],
    }
    manifest.update(extra)
    return manifest


def save_manifest(manifest: dict[str, Any], path: str | os.PathLike) -> None:
    """Write ``manifest`` as JSON atomically (see :mod:`fsad_lightning.io`).

    A reader never sees a half-written file, and a crash leaves the previous manifest in place.
    """
    atomic_write_text(path, json.dumps(manifest, indent=2, sort_keys=False) + "\n")


def load_manifest(path: str | os.PathLike) -> dict[str, Any]:
    """Read a manifest written by :func:`save_manifest`.

    Raises:
        FileNotFoundError: no file at ``path``.
        ValueError: the file is not JSON or lacks some of :data:`MANIFEST_KEYS` (named in the message).
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"manifest file not found: {path}")
    try:
        with open(path, encoding="utf-8") as stream:
            manifest = json.load(stream)
    except json.JSONDecodeError as err:
        raise ValueError(f"manifest {path} is not valid JSON: {err}") from err
    if not isinstance(manifest, dict):
        raise ValueError(f"manifest {path} must hold a JSON object, got {type(manifest).__name__}")
    missing = [key for key in MANIFEST_KEYS if key not in manifest]
    if missing:
        raise ValueError(f"manifest {path} lacks the field(s) {', '.join(missing)}")
    return manifest
