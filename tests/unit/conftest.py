"""Fixtures of the unit tests: small synthetic datasets written to temporary folders (nothing downloaded)."""

from __future__ import annotations

import pickle
import struct
import sys
from pathlib import Path

import numpy as np
import pytest

from fsad_lightning.data.semantic import CIFAR10_CLASSES
from fsad_lightning.data.synthetic import write_synthetic_category


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory) -> Path:
    """A read-only MVTec-layout root shared by the session: do not modify it.

    - ``widget``: 32x32 PNG, 6 train/good, 3 test/good, 2 ``scratch`` + 2 ``blob``, with masks;
    - ``gadget``: 40x40 JPEG, 5 train/good, 2 test/good, 2 ``scratch`` + 2 ``blob``, with masks.
    """
    root = tmp_path_factory.mktemp("synthetic_mvtec")
    write_synthetic_category(root, "widget", n_train=6, n_test_good=3, n_test_defect=2, size=32, seed=0)
    write_synthetic_category(
        root, "gadget", n_train=5, n_test_good=2, n_test_defect=2, size=40, seed=1, image_ext=".jpg"
    )
    return root


@pytest.fixture
def writable_root(tmp_path) -> Path:
    """A fresh MVTec-layout root with one category ``widget`` (32x32 PNG, masks) that a test may modify."""
    write_synthetic_category(tmp_path, "widget", n_train=6, n_test_good=3, n_test_defect=2, size=32, seed=0)
    return tmp_path


def _idx(path: Path, array: np.ndarray) -> None:
    """Write an uint8 array as an idx file (magic 0x08 type, then the big-endian dimensions)."""
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def write_tiny_mnist(root: Path, n_train: int = 30, n_test: int = 20) -> Path:
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for prefix, count in (("train", n_train), ("t10k", n_test)):
        labels = np.arange(count) % 10
        images = rng.integers(0, 256, size=(count, 28, 28), dtype=np.uint8)
        _idx(raw / f"{prefix}-images-idx3-ubyte", images)
        _idx(raw / f"{prefix}-labels-idx1-ubyte", labels)
    return root


def write_tiny_cifar10(root: Path, per_batch: int = 10, n_test: int = 20) -> Path:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(1)
    batches = [(f"data_batch_{i}", per_batch) for i in range(1, 6)] + [("test_batch", n_test)]
    for name, count in batches:
        entry = {
            "data": rng.integers(0, 256, size=(count, 3 * 32 * 32), dtype=np.uint8),
            "labels": [int(v) for v in (np.arange(count) + len(name)) % 10],
        }
        with open(folder / name, "wb") as stream:
            pickle.dump(entry, stream)
    with open(folder / "batches.meta", "wb") as stream:
        pickle.dump({"label_names": list(CIFAR10_CLASSES)}, stream)
    return root


@pytest.fixture
def tiny_mnist_root(tmp_path) -> Path:
    """MNIST in torchvision's raw layout: 30 train / 20 test random 28x28 digits labelled ``index % 10``."""
    return write_tiny_mnist(tmp_path)


@pytest.fixture
def tiny_cifar10_root(tmp_path) -> Path:
    """CIFAR-10 in torchvision's pickle layout: 5 x 10 train / 20 test random 32x32 images."""
    return write_tiny_cifar10(tmp_path)


@pytest.fixture
def toy_command(tmp_path, monkeypatch):
    """Register ``fsad toy`` for this test (module ``toy_command`` in tmp_path). Each call appends what it
    saw to ``toy_command.calls`` (``argv``, ``command_line`` = ``sys.argv[1:]``, the ``FSAD_VERBOSE``
    variable, the number of warning filters) and raises ``toy_command.behaviour["raise"]`` when set."""
    from fsad_lightning.commands import dispatch

    (tmp_path / "toy_command.py").write_text(
        "import os, sys, warnings\n"
        "calls = []\n"
        "behaviour = {}\n\n"
        "def toy_main(argv):\n"
        "    calls.append({'argv': argv, 'command_line': sys.argv[1:],\n"
        "                  'FSAD_VERBOSE': os.environ.get('FSAD_VERBOSE'), 'filters': len(warnings.filters)})\n"
        "    if behaviour.get('raise') is not None:\n"
        "        raise behaviour['raise']\n"
        "    return 'ran'\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "toy_command", raising=False)  # another test's toy, if any
    monkeypatch.setattr(dispatch, "SUBCOMMANDS", dict(dispatch.SUBCOMMANDS))
    monkeypatch.delenv("FSAD_VERBOSE", raising=False)
    monkeypatch.delenv("FSAD_DEBUG", raising=False)
    dispatch.register("toy", "toy_command:toy_main", "a toy subcommand")
    import toy_command

    return toy_command
