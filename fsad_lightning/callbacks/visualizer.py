"""Overlay PNGs of a test run and a contact sheet of its worst cases.

For every test image the :class:`Visualizer` writes one PNG of three panels side by side, each at the
batch's image size ``H x W`` (so the PNG is ``3W x H``):

1. the image as the method saw it,
2. the image with the ground-truth region outlined in red (no outline for normal images and image-only
   sets),
3. the anomaly map as a heat overlay (jet colour map, blended with the image).

to ``<run folder>/images/<category>/<defect_type>/<stem>.png``, and one contact sheet
``<run folder>/images/worst_cases.png`` of the ``worst_k`` highest-scored normal images (false positives)
and the ``worst_k`` lowest-scored anomalous images (false negatives), each row a triptych under a caption
line. When the trainer logs to W&B the overlays and the sheet are also logged as ``wandb.Image``
(:mod:`fsad_lightning.callbacks.wandb_media`).

Drawing uses PIL and numpy only (no matplotlib): the colour map is :func:`jet_colormap`, written here.

Choices:

- The heat overlay is normalised with one range for the whole test run, the minimum and maximum of every
  anomaly map, so colours are comparable across images (a per-image range would paint a hot spot on every
  normal image). The images are therefore written at the end of the test epoch, and the ones waiting are
  held in memory as uint8 images and float32 maps (``max_images`` bounds them).
- A method that returns no anomaly map gets its image score, normalised over the run, as a uniform heat
  panel.
- Under DDP every rank writes the images it scored; the contact sheet of each rank covers its shard.
"""

from __future__ import annotations

import heapq
import itertools
import math
import os
import re
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from PIL import Image, ImageDraw, ImageFont

from fsad_lightning.callbacks.results import run_folder
from fsad_lightning.callbacks.wandb_media import log_images_to_wandb, wandb_loggers
from fsad_lightning.data.batch import CATEGORY, DEFECT_TYPE, HAS_MASK, IMAGE, LABEL, MASK, PATH, AnomalyOutput
from fsad_lightning.io import atomic_write

#: anchors of matplotlib's ``jet``: (position, (r, g, b)) with channels in [0, 1]
JET_ANCHORS = (
    (0.0, (0.0, 0.0, 0.5)),
    (0.11, (0.0, 0.0, 1.0)),
    (0.125, (0.0, 0.0, 1.0)),
    (0.34, (0.0, 0.86, 1.0)),
    (0.35, (0.0, 0.9, 0.97)),
    (0.375, (0.08, 0.94, 0.91)),
    (0.64, (0.98, 0.96, 0.0)),
    (0.65, (1.0, 0.91, 0.0)),
    (0.66, (1.0, 0.86, 0.0)),
    (0.89, (1.0, 0.0, 0.0)),
    (1.0, (0.5, 0.0, 0.0)),
)
OUTLINE_COLOR = (255, 0, 0)
CAPTION_HEIGHT = 14
SHEET_NAME = "worst_cases.png"


# ---------------------------------------------------------------------------------------------- drawing
def jet_colormap(values: np.ndarray) -> np.ndarray:
    """Map values in ``[0, 1]`` (any shape) to uint8 RGB ``[..., 3]`` by piecewise-linear interpolation
    between :data:`JET_ANCHORS`. Values outside ``[0, 1]`` are clipped."""
    values = np.clip(np.asarray(values, dtype=np.float64), 0.0, 1.0)
    positions = np.array([p for p, _ in JET_ANCHORS])
    colors = np.array([c for _, c in JET_ANCHORS])
    rgb = np.stack([np.interp(values, positions, colors[:, channel]) for channel in range(3)], axis=-1)
    return (rgb * 255.0).round().astype(np.uint8)


def to_uint8_image(image: torch.Tensor | np.ndarray) -> np.ndarray:
    """A ``[3, H, W]`` float image in ``[0, 1]`` (the batch contract) to uint8 ``[H, W, 3]``."""
    array = image.detach().float().cpu().numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
    if array.ndim != 3 or array.shape[0] not in (1, 3):
        raise ValueError(f"expected an image of shape [3, H, W] (or [1, H, W]), got {tuple(array.shape)}")
    if array.shape[0] == 1:
        array = np.repeat(array, 3, axis=0)
    return (np.clip(array.transpose(1, 2, 0), 0.0, 1.0) * 255.0).round().astype(np.uint8)


def normalize(values: np.ndarray, low: float, high: float) -> np.ndarray:
    """``(values - low) / (high - low)`` clipped to ``[0, 1]``; all zeros when ``high <= low``."""
    if not high > low:
        return np.zeros_like(values, dtype=np.float64)
    return np.clip((np.asarray(values, dtype=np.float64) - low) / (high - low), 0.0, 1.0)


def mask_outline(mask: np.ndarray, thickness: int = 1) -> np.ndarray:
    """Boundary pixels of a binary ``[H, W]`` mask: the mask minus its erosion by a 3x3 cross,
    repeated ``thickness`` times inwards."""
    inside = np.asarray(mask).astype(bool)
    eroded = inside
    for _ in range(max(1, thickness)):
        padded = np.pad(eroded, 1, mode="constant", constant_values=False)
        eroded = (
            padded[1:-1, 1:-1] & padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
        )
    return inside & ~eroded


def _resize_2d(values: np.ndarray, height: int, width: int) -> np.ndarray:
    if values.shape == (height, width):
        return values
    image = Image.fromarray(values.astype(np.float32)).resize((width, height), Image.BILINEAR)
    return np.asarray(image, dtype=np.float32)


def draw_outline(
    image: np.ndarray, mask: np.ndarray | None, color: tuple[int, int, int] = OUTLINE_COLOR
) -> np.ndarray:
    """``image`` (uint8 ``[H, W, 3]``) with the boundary of ``mask`` painted in ``color``."""
    out = image.copy()
    if mask is None or not np.asarray(mask).any():
        return out
    height, width = image.shape[:2]
    mask = _resize_2d(np.asarray(mask, dtype=np.float32), height, width) > 0.5
    out[mask_outline(mask, thickness=max(1, min(height, width) // 128))] = color
    return out


def heat_overlay(image: np.ndarray, heat: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """Blend the jet colours of ``heat`` (``[H, W]`` in ``[0, 1]``) over ``image``:
    ``(1 - alpha) * image + alpha * jet(heat)``."""
    height, width = image.shape[:2]
    heat = _resize_2d(np.asarray(heat, dtype=np.float32), height, width)
    blended = (1.0 - alpha) * image.astype(np.float64) + alpha * jet_colormap(heat).astype(np.float64)
    return np.clip(blended, 0, 255).round().astype(np.uint8)


def triptych(image: np.ndarray, mask: np.ndarray | None, heat: np.ndarray, alpha: float = 0.5) -> Image.Image:
    """Image | ground-truth outline | heat overlay, side by side: a ``3W x H`` RGB image."""
    panels = [image, draw_outline(image, mask), heat_overlay(image, heat, alpha)]
    return Image.fromarray(np.concatenate(panels, axis=1))


def with_caption(panel: Image.Image, text: str) -> Image.Image:
    """``panel`` under a white caption strip of :data:`CAPTION_HEIGHT` pixels holding ``text``."""
    font = ImageFont.load_default()
    width = max(panel.width, int(math.ceil(font.getlength(text))) + 4)
    out = Image.new("RGB", (width, panel.height + CAPTION_HEIGHT), (255, 255, 255))
    ImageDraw.Draw(out).text((2, 1), text, fill=(0, 0, 0), font=font)
    out.paste(panel, (0, CAPTION_HEIGHT))
    return out


def contact_sheet(sections: list[tuple[str, list[tuple[str, Image.Image]]]], width: int) -> Image.Image:
    """Stack captioned rows under section titles: ``[(title, [(caption, row image), ...]), ...]``.

    A section without rows shows ``(none)``. The sheet is ``width`` wide or as wide as its longest caption;
    narrower rows are left-aligned on white.
    """
    font = ImageFont.load_default()
    texts = [title for title, _ in sections] + [caption for _, rows in sections for caption, _ in rows]
    width = max([width] + [int(math.ceil(font.getlength(t))) + 4 for t in texts])
    blocks: list[Image.Image] = []
    for title, rows in sections:
        blocks.append(with_caption(Image.new("RGB", (width, 2), (255, 255, 255)), title))
        if not rows:
            blocks.append(with_caption(Image.new("RGB", (width, 2), (255, 255, 255)), "  (none)"))
        blocks += [with_caption(row, caption) for caption, row in rows]
    sheet = Image.new("RGB", (width, sum(b.height for b in blocks)), (255, 255, 255))
    top = 0
    for block in blocks:
        sheet.paste(block, (0, top))
        top += block.height
    return sheet


def save_png(image: Image.Image, path: str | os.PathLike) -> None:
    """Write ``image`` as PNG atomically (parent folders are created)."""
    atomic_write(path, lambda tmp: image.save(tmp, format="PNG"))


def _safe_name(name: str) -> str:
    cleaned = re.sub(r"[^A-Za-z0-9_.+-]+", "_", str(name)).strip(".")
    return cleaned or "_"


# ---------------------------------------------------------------------------------------------- callback
@dataclass
class _Scored:
    """One test image as the callback keeps it until the end of the epoch."""

    image: np.ndarray
    mask: np.ndarray | None
    anomaly_map: np.ndarray | None
    score: float
    label: int
    path: str
    category: str
    defect_type: str

    def caption(self, prefix: str) -> str:
        name = os.path.basename(self.path)
        return f"{prefix} score={self.score:.4g} {self.category}/{self.defect_type}/{name}"


class Visualizer(Callback):
    """Write overlay PNGs and a worst-cases contact sheet for every test run (see the module docstring).

    Args:
        max_images: write overlays for at most this many test images (in test order); ``None`` for all.
            The contact sheet always considers every test image.
        worst_k: rows per section of the contact sheet (false positives, false negatives); 0 skips it.
        alpha: opacity of the heat colours over the image.
        wandb_max_images: how many overlays are also logged as ``wandb.Image`` when the trainer logs to W&B
            (``None`` for all); the contact sheet is always logged there.
    """

    def __init__(
        self,
        max_images: int | None = None,
        worst_k: int = 8,
        alpha: float = 0.5,
        wandb_max_images: int | None = 32,
    ) -> None:
        super().__init__()
        if max_images is not None and max_images < 0:
            raise ValueError(f"Visualizer max_images must be >= 0 or None, got {max_images}")
        if worst_k < 0:
            raise ValueError(f"Visualizer worst_k must be >= 0, got {worst_k}")
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"Visualizer alpha must be in [0, 1], got {alpha}")
        self.max_images = max_images
        self.worst_k = worst_k
        self.alpha = alpha
        self.wandb_max_images = wandb_max_images
        self.written: list[str] = []
        self.sheet_path: str | None = None
        self._reset()

    def _reset(self) -> None:
        self._pending: list[_Scored] = []
        self._false_positives: list[tuple[float, int, _Scored]] = []  # min-heap on score: keeps the highest
        self._false_negatives: list[tuple[float, int, _Scored]] = []  # min-heap on -score: keeps the lowest
        self._counter = itertools.count()
        self._map_range = [np.inf, -np.inf]
        self._score_range = [np.inf, -np.inf]
        self._seen = 0
        self._folder: str | None = None

    # ------------------------------------------------------------------ hooks
    def on_test_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._reset()
        self.written = []
        self.sheet_path = None
        self._folder = os.path.join(run_folder(trainer), "images")  # every rank: log_dir may broadcast

    def on_test_batch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        outputs: Any,
        batch: dict[str, Any],
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        output = self._as_output(outputs)
        scores = output.pred_score.detach().float().cpu().numpy().reshape(-1)
        maps = None if output.anomaly_map is None else output.anomaly_map.detach().float().cpu().numpy()
        images = batch[IMAGE]
        masks = batch.get(MASK)
        has_mask = batch.get(HAS_MASK)
        for i in range(images.shape[0]):
            anomaly_map = None if maps is None else maps[i]
            if anomaly_map is not None:
                self._map_range = [
                    min(self._map_range[0], float(anomaly_map.min())),
                    max(self._map_range[1], float(anomaly_map.max())),
                ]
            score = float(scores[i])
            self._score_range = [min(self._score_range[0], score), max(self._score_range[1], score)]
            keep_image = self.max_images is None or self._seen < self.max_images
            label = int(batch[LABEL][i])
            is_fp_candidate = label == 0 and self._would_enter(self._false_positives, score)
            is_fn_candidate = label == 1 and self._would_enter(self._false_negatives, -score)
            self._seen += 1
            if not (keep_image or is_fp_candidate or is_fn_candidate):
                continue
            mask = None
            if masks is not None and (has_mask is None or bool(has_mask[i])):
                mask = masks[i, 0].detach().cpu().numpy() > 0.5
            entry = _Scored(
                image=to_uint8_image(images[i]),
                mask=mask,
                anomaly_map=None if anomaly_map is None else anomaly_map.astype(np.float32),
                score=score,
                label=label,
                path=str(batch[PATH][i]),
                category=str(batch[CATEGORY][i]),
                defect_type=str(batch[DEFECT_TYPE][i]),
            )
            if keep_image:
                self._pending.append(entry)
            if is_fp_candidate:
                self._push(self._false_positives, score, entry)
            if is_fn_candidate:
                self._push(self._false_negatives, -score, entry)

    def on_test_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        folder = self._folder or os.path.join(run_folder(trainer), "images")
        used: set[str] = set()
        logged: list[tuple[str, Image.Image]] = []
        try:
            for entry in self._pending:
                panel = self._render(entry)
                path = self._unique_path(folder, entry, used)
                save_png(panel, path)
                self.written.append(path)
                if self.wandb_max_images is None or len(logged) < self.wandb_max_images:
                    logged.append((entry.caption("label=" + ("anomalous" if entry.label else "normal")), panel))
            if self.worst_k > 0:
                sheet = self._sheet()
                self.sheet_path = os.path.join(folder, SHEET_NAME)
                save_png(sheet, self.sheet_path)
        except OSError as err:
            raise self._unwritten_error(err, folder) from err
        if wandb_loggers(trainer):
            if logged:
                log_images_to_wandb(trainer, "test/overlays", [p for _, p in logged], [c for c, _ in logged])
            if self.sheet_path is not None:
                log_images_to_wandb(
                    trainer, "test/worst_cases", [sheet], ["false positives / false negatives"]
                )
        self._reset()

    # ------------------------------------------------------------------ helpers
    def _unwritten_error(self, err: OSError, folder: str) -> OSError:
        """One line: which images were not written (a full disk, a read-only folder) and that the
        results (written before, see ``fsad_lightning.commands.lightning_cli``) are kept."""
        total = len(self._pending)
        sheet = f" and {SHEET_NAME}" if self.worst_k > 0 else ""
        results = os.path.join(os.path.dirname(folder), "results.json")
        kept = ""
        if os.path.exists(results):
            kept = f"; results.json / .csv / .md are written in {os.path.dirname(folder)}"
        return OSError(
            err.errno,
            f"overlay images not written: {total - len(self.written)} of {total} overlays{sheet} in {folder} "
            f"({err.strerror or err}){kept}",
        )

    @staticmethod
    def _as_output(outputs: Any) -> AnomalyOutput:
        if isinstance(outputs, AnomalyOutput):
            return outputs
        if isinstance(outputs, dict) and "pred_score" in outputs:
            return AnomalyOutput(pred_score=outputs["pred_score"], anomaly_map=outputs.get("anomaly_map"))
        raise ValueError(
            "Visualizer expects test_step to return an AnomalyOutput (pred_score, anomaly_map), "
            f"got {type(outputs).__name__}"
        )

    def _would_enter(self, heap: list, key: float) -> bool:
        return self.worst_k > 0 and (len(heap) < self.worst_k or key > heap[0][0])

    def _push(self, heap: list, key: float, entry: _Scored) -> None:
        item = (key, next(self._counter), entry)
        if len(heap) < self.worst_k:
            heapq.heappush(heap, item)
        else:
            heapq.heapreplace(heap, item)

    def _heat(self, entry: _Scored) -> np.ndarray:
        if entry.anomaly_map is not None:
            return normalize(entry.anomaly_map, *self._map_range)
        level = normalize(np.array(entry.score), *self._score_range)
        return np.full(entry.image.shape[:2], float(level), dtype=np.float32)

    def _render(self, entry: _Scored) -> Image.Image:
        return triptych(entry.image, entry.mask, self._heat(entry), self.alpha)

    def _unique_path(self, folder: str, entry: _Scored, used: set[str]) -> str:
        stem = _safe_name(os.path.splitext(os.path.basename(entry.path.rstrip("/")))[0])
        base = os.path.join(folder, _safe_name(entry.category), _safe_name(entry.defect_type), stem)
        path, n = base + ".png", 1
        while path in used:
            path, n = f"{base}_{n}.png", n + 1
        used.add(path)
        return path

    def _sheet(self) -> Image.Image:
        false_positives = [e for _, _, e in sorted(self._false_positives, key=lambda t: (-t[0], t[1]))]
        false_negatives = [e for _, _, e in sorted(self._false_negatives, key=lambda t: (-t[0], t[1]))]
        rows_fp = [(e.caption(f"FP #{i + 1}"), self._render(e)) for i, e in enumerate(false_positives)]
        rows_fn = [(e.caption(f"FN #{i + 1}"), self._render(e)) for i, e in enumerate(false_negatives)]
        width = max((row.width for _, row in rows_fp + rows_fn), default=0)
        return contact_sheet(
            [
                (f"false positives: highest-scored normal images (top {self.worst_k})", rows_fp),
                (f"false negatives: lowest-scored anomalous images (top {self.worst_k})", rows_fn),
            ],
            width=width,
        )
