"""Write what ``fsad predict`` scored: ``predictions.csv``, ``threshold.json``, ``anomaly_maps.npz`` and,
when asked, overlay PNGs.

- ``predictions.csv``: one row per image, ``path, score, decision, threshold``: the image file, its
  anomaly score, ``anomalous`` when the score is at or above the decision threshold, else ``normal``
  (:func:`fsad_lightning.thresholds.decide`), and the threshold itself.
- ``threshold.json``: how the threshold was set (the label-free rule and the leave-one-out normal
  scores of the shots, or the fixed value of the config).
- ``anomaly_maps.npz``: ``paths`` and, when the method returns maps, ``maps`` (float16, ``[N, H, W]`` at
  the batch image size) in the order of the CSV.
- with ``overlays``: ``overlays/<path under the scored folder>.png`` per image, drawn by
  :func:`~fsad_lightning.callbacks.visualizer.render_overlay` without a ground-truth panel: the title
  gives score, threshold and decision (:func:`~fsad_lightning.callbacks.visualizer.overlay_title`), the
  heat colours share one range for the whole run (printed on the colour bar), so they compare across
  images.

Every file is written atomically into the run folder once prediction ends (:func:`write_predictions`,
also what a detector's ``fsad predict --detector`` writes with).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import BasePredictionWriter

from fsad_lightning.callbacks.results import csv_text, run_folder
from fsad_lightning.callbacks.visualizer import (
    PANEL_LABELS,
    _safe_name,
    normalize,
    overlay_title,
    render_overlay,
    save_png,
    to_uint8_image,
)
from fsad_lightning.data.batch import IMAGE, PATH
from fsad_lightning.io import atomic_write, atomic_write_json, atomic_write_text

PREDICTION_COLUMNS = ["path", "score", "decision", "threshold"]
ANOMALOUS, NORMAL = "anomalous", "normal"
OVERLAY_FOLDER = "overlays"


def decision_rows(paths: Sequence[str], scores: Sequence[float], threshold: float | None) -> list[dict[str, Any]]:
    """The rows of ``predictions.csv`` (decision and threshold empty without a threshold)."""
    rows = []
    for path, score in zip(paths, scores):
        decision = "" if threshold is None else (ANOMALOUS if float(score) >= float(threshold) else NORMAL)
        rows.append({"path": path, "score": float(score), "decision": decision, "threshold": threshold})
    return rows


def overlay_path(folder: str, path: str, root: str | None, used: set[str]) -> str:
    """Where the overlay of image ``path`` goes: its path under ``root`` (the scored folder), sanitised,
    under ``folder``; a name already used gets ``_1``, ``_2``, ..."""
    relative = os.path.relpath(path, root) if root and os.path.isabs(path) else os.path.basename(path)
    parts = [_safe_name(part) for part in os.path.splitext(relative)[0].replace(os.sep, "/").split("/") if part]
    parts = [p for p in parts if p not in ("..", "_")] or ["_"]
    base = os.path.join(folder, *parts)
    candidate, n = base + ".png", 1
    while candidate in used:
        candidate, n = f"{base}_{n}.png", n + 1
    used.add(candidate)
    return candidate


def write_predictions(
    folder: str,
    paths: Sequence[str],
    scores: Sequence[float],
    maps: np.ndarray | None,
    threshold_record: dict[str, Any] | None,
    suffix: str = "",
    images: Sequence[np.ndarray] | None = None,
    root: str | None = None,
) -> dict[str, Any]:
    """Write the files of the module docstring into ``folder``; returns the decision counts.

    Args:
        maps: ``[N, H, W]`` float maps or ``None``.
        threshold_record: :class:`~fsad_lightning.thresholds.ThresholdRecord` as a dict, or ``None``.
        images: uint8 ``[H, W, 3]`` images for the overlays (``None``: no overlays).
        root: the folder the images were found under (overlay paths mirror it).
    """
    threshold = None if threshold_record is None else float(threshold_record["value"])
    rows = decision_rows(paths, scores, threshold)
    atomic_write_text(os.path.join(folder, f"predictions{suffix}.csv"), csv_text(rows, PREDICTION_COLUMNS))
    if threshold_record is not None:
        atomic_write_json(os.path.join(folder, f"threshold{suffix}.json"), threshold_record)
    arrays: dict[str, np.ndarray] = {"paths": np.asarray(list(paths))}
    if maps is not None:
        arrays["maps"] = np.asarray(maps).astype(np.float16)

    def write(tmp: str) -> None:
        with open(tmp, "wb") as handle:
            np.savez_compressed(handle, **arrays)

    atomic_write(os.path.join(folder, f"anomaly_maps{suffix}.npz"), write)
    if images is not None:
        _write_overlays(os.path.join(folder, OVERLAY_FOLDER), rows, maps, images, root)
    flagged = sum(row["decision"] == ANOMALOUS for row in rows)
    return {"num_images": len(rows), "num_anomalous": flagged, "threshold": threshold}


def _write_overlays(
    folder: str, rows: list[dict[str, Any]], maps: np.ndarray | None, images: Sequence[np.ndarray], root: str | None
) -> None:
    """One :func:`~fsad_lightning.callbacks.visualizer.render_overlay` per row (no ground-truth panel):
    title with score, threshold and decision; one heat range for the run (maps, else scores); the
    threshold ticked on the colour bar only where its values are image scores (no maps, or every score
    its map's maximum), as the test overlays do."""
    scores = np.array([row["score"] for row in rows], dtype=np.float64)
    if maps is not None:
        value_range = (float(np.min(maps)), float(np.max(maps)))
        score_is_map_max = all(
            abs(float(np.max(m)) - s) <= 1e-5 * max(1.0, abs(s)) for m, s in zip(maps, scores)
        )
    else:
        value_range = (float(scores.min()), float(scores.max()))
        score_is_map_max = True
    used: set[str] = set()
    for i, (row, image) in enumerate(zip(rows, images)):
        if maps is not None:
            heat, label = normalize(np.asarray(maps[i], dtype=np.float32), *value_range), PANEL_LABELS[2]
        else:
            level = float(normalize(np.array(row["score"]), *value_range))
            heat, label = np.full(image.shape[:2], level, dtype=np.float32), "image score"
        threshold = row["threshold"]
        name = os.path.relpath(row["path"], root) if root and os.path.isabs(row["path"]) else os.path.basename(row["path"])
        title = overlay_title(name.replace(os.sep, "/"), row["score"], threshold)
        panel = render_overlay(
            image, heat, None, title, value_range, threshold=threshold if score_is_map_max else None, heat_label=label
        )
        save_png(panel, overlay_path(folder, row["path"], root, used))


class PredictionWriter(BasePredictionWriter):
    """Writes the files of the module docstring after ``fsad predict``.

    Args:
        overlays: also write an overlay PNG per image (the images are kept as uint8 until the end).
    """

    def __init__(self, overlays: bool = False) -> None:
        super().__init__(write_interval="epoch")
        self.overlays = overlays
        self._images: list[np.ndarray] = []
        self.summary: dict[str, Any] | None = None

    def on_predict_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._images = []

    def on_predict_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if self.overlays:
            self._images += [to_uint8_image(image) for image in batch[IMAGE]]
        super().on_predict_batch_end(trainer, pl_module, outputs, batch, batch_idx, dataloader_idx)

    def write_on_epoch_end(
        self, trainer: Trainer, pl_module: LightningModule, predictions: list[Any], batch_indices: Any
    ) -> None:
        batches = predictions[0] if predictions and isinstance(predictions[0], list) else predictions
        if not batches:
            return
        paths = [p for batch in batches for p in batch[PATH]]
        scores = torch.cat([batch["pred_score"] for batch in batches]).tolist()
        maps = None
        if all(batch["anomaly_map"] is not None for batch in batches):
            maps = torch.cat([batch["anomaly_map"] for batch in batches]).numpy()
        record = getattr(pl_module, "threshold_record", None)
        suffix = "" if trainer.world_size == 1 else f".rank{trainer.global_rank}"
        datamodule = getattr(trainer, "datamodule", None)
        root = getattr(datamodule, "predict_dir", None)
        self.summary = write_predictions(
            run_folder(trainer),
            paths,
            scores,
            maps,
            None if record is None else record.to_dict(),
            suffix,
            images=self._images if self.overlays else None,
            root=os.path.abspath(root) if root else None,
        )
        self._images = []
