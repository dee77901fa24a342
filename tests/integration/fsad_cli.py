"""Helpers of the integration tests that run `fsad` in this process: its exit status, and a config."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fsad_lightning.commands.dispatch import main


def exit_status(argv: list[str]) -> int:
    """Run ``fsad <argv>`` here; its exit status (0 when it returns)."""
    try:
        main(argv)
    except SystemExit as exit_:
        return int(exit_.code or 0)
    return 0


def fsad_config(model: dict, data: dict, runs: Path, trainer: dict | None = None) -> dict[str, Any]:
    """A config: ``model``, a FewShotDataModule of ``data``, a CPU trainer logging to ``<runs>/test``."""
    return {
        "seed_everything": 0,
        "model": model,
        "data": {"class_path": "fsad_lightning.data.FewShotDataModule", "init_args": data},
        "trainer": {
            "accelerator": "cpu",
            "devices": 1,
            "enable_progress_bar": False,
            "logger": {
                "class_path": "lightning.pytorch.loggers.CSVLogger",
                "init_args": {"save_dir": str(runs), "name": "test"},
            },
            **(trainer or {}),
        },
    }
