"""Write what ``fsad predict`` scored: ``predictions.csv`` (path, pred_score) and ``anomaly_maps.npz``.

``anomaly_maps.npz`` holds ``paths`` and, when the method returns maps, ``maps`` (float16,
``[N, H, W]`` at the batch image size) in the same order as the CSV. Both files are written atomically
into the run folder once prediction ends.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import BasePredictionWriter

from fsad_lightning.callbacks.results import csv_text, run_folder
from fsad_lightning.io import atomic_write, atomic_write_text


class PredictionWriter(BasePredictionWriter):
    def __init__(self) -> None:
        super().__init__(write_interval="epoch")

    def write_on_epoch_end(
        self, trainer: Trainer, pl_module: LightningModule, predictions: list[Any], batch_indices: Any
    ) -> None:
        batches = predictions[0] if predictions and isinstance(predictions[0], list) else predictions
        if not batches:
            return
        paths = [p for batch in batches for p in batch["path"]]
        scores = torch.cat([batch["pred_score"] for batch in batches]).tolist()
        folder = run_folder(trainer)
        suffix = "" if trainer.world_size == 1 else f".rank{trainer.global_rank}"
        rows = [{"path": p, "pred_score": s} for p, s in zip(paths, scores)]
        atomic_write_text(os.path.join(folder, f"predictions{suffix}.csv"), csv_text(rows, ["path", "pred_score"]))
        arrays: dict[str, np.ndarray] = {"paths": np.asarray(paths)}
        if all(batch["anomaly_map"] is not None for batch in batches):
            arrays["maps"] = torch.cat([batch["anomaly_map"] for batch in batches]).numpy().astype(np.float16)

        def write(tmp: str) -> None:
            with open(tmp, "wb") as handle:
                np.savez_compressed(handle, **arrays)

        atomic_write(os.path.join(folder, f"anomaly_maps{suffix}.npz"), write)
