"""Checkpoint files: read one with a one-line error for anything that is not a complete checkpoint, and
write them atomically.

:func:`read_checkpoint` is what ``fsad`` reads a ``--ckpt_path`` with before any run starts: a missing
file, a folder, an empty or truncated file and a file that is no PyTorch checkpoint at all (a YAML
config given by mistake) each get a ``ValueError`` / ``FileNotFoundError`` naming the file.

:class:`AtomicCheckpointIO` is the trainer's checkpoint writer in every ``fsad`` run: a checkpoint goes
to a temporary file in its own folder and replaces the old one in one ``os.replace``, so a kill, a full
disk or a crash while saving leaves the previous checkpoint whole (Lightning's own writer stages the file
in the system temporary folder, and moving it from another filesystem is a copy, not atomic).
"""

from __future__ import annotations

import os
import pickle
import zipfile
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from fsad_lightning.io import atomic_torch_save

#: the first bytes of a zip archive: what ``torch.save`` writes
ZIP_MAGIC = b"PK\x03\x04"


def read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """The checkpoint at ``path`` on the CPU, its tensors memory-mapped (a large one is not read whole).

    Raises:
        FileNotFoundError: nothing at ``path``.
        ValueError: a folder, an empty file, a truncated or corrupt checkpoint, a file that is not a
            PyTorch checkpoint, or one without Lightning's ``state_dict``; the message names the file.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        hint = " (a broken link)" if os.path.islink(path) else ""
        raise FileNotFoundError(f"checkpoint {path} does not exist{hint}")
    if os.path.isdir(path):
        raise ValueError(f"checkpoint {path} is a folder: give the .ckpt file in it (e.g. {path}/last.ckpt)")
    size = os.path.getsize(path)
    if size == 0:
        raise ValueError(f"checkpoint {path} is empty (0 bytes): its writer was stopped; use an earlier one")
    with open(path, "rb") as handle:
        head = handle.read(len(ZIP_MAGIC))
    if head != ZIP_MAGIC:
        raise ValueError(f"{path} is not a PyTorch checkpoint (a .ckpt written by `fsad fit` is expected)")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except (RuntimeError, EOFError, zipfile.BadZipFile, pickle.UnpicklingError, OSError) as err:
        raise ValueError(
            f"checkpoint {path} is truncated or corrupt ({size} bytes, not a complete PyTorch archive): "
            "use an earlier one"
        ) from err
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise ValueError(f"{path} is a PyTorch file but not a Lightning checkpoint (it has no state_dict)")
    return checkpoint


class AtomicCheckpointIO(TorchCheckpointIO):
    """``torch.save`` into a temporary file beside the checkpoint, synced, then renamed onto it."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options, got {storage_options!r}")

        atomic_torch_save(path, checkpoint)
