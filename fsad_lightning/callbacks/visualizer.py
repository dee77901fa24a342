"""Overlay PNGs of a test run and a contact sheet of its worst cases.

For every test image the :class:`Visualizer` writes one PNG (drawn by :func:`render_overlay`) to
``<run folder>/images/<category>/<defect_type>/<stem>.png``, laid out top to bottom as

1. a title line: ``<category>/<defect_type>/<file>  |  score S >= threshold T: anomalous  |  truth: normal
   -> FALSE POSITIVE`` (:func:`overlay_title`; without a threshold ``score S  |  no threshold``);
2. a header strip labelling the panels below: ``image``, ``ground truth``, ``anomaly map``;
3. the panels side by side: the image as the method saw it; the image with the ground-truth region
   outlined (a two-tone line, white on the region's boundary beside black just outside it, so it shows
   on white, black and red parts alike; no outline on normal images; the panel is left out when the set
   has no pixel ground truth, and :func:`render_overlay` leaves it out for ``mask=None``, e.g. for
   ``fsad predict``); the anomaly map as a heat overlay (jet colour map, blended with the image);
4. right of the panels a colour bar of the heat colours with the value range printed at its ends and,
   when the bar's values are image scores, a tick at the threshold.

Panels whose short side is below :data:`MIN_PANEL_SIZE` (256 px) are upscaled (bilinear; the mask
nearest), and the text is 1/16 of a panel's short side, 14 to 28 px (Pillow's bundled scalable font;
Pillow < 10.1 falls back to its small bitmap font).

One contact sheet ``<run folder>/images/worst_cases.png`` shows the false positives (the ``worst_k``
highest-scored, highest first) and false negatives (the ``worst_k`` lowest-scored, lowest first), each an
overlay under an ``FP #i`` / ``FN #i`` title, below a caption naming the rule used (:class:`ErrorRule`):

- with a decision threshold (the ``threshold`` argument, else the module's ``decision_threshold``
  attribute when set): a normal image scoring ``>=`` it is a false positive, an anomalous one scoring
  ``<`` it a false negative;
- without one: only the images misranked at every threshold, normal images scoring ``>=`` the lowest
  anomalous score and anomalous images scoring ``<=`` the highest normal score; at an image AUROC of
  100 % there are none.

When there are none the sheet is still written, its caption ending ``no false positives or negatives at
threshold T`` (or ``no misranked images: ...``), and no image is ever labelled an error that is not one.
When the trainer logs to W&B the overlays (captioned with their titles) and the sheet (captioned with the
rule) are also logged as ``wandb.Image`` (:mod:`fsad_lightning.callbacks.wandb_media`).

Drawing uses PIL and numpy only (no matplotlib): the colour map is :func:`jet_colormap`, written here.

Choices:

- The heat overlay is normalised with one range for the whole test run, the minimum and maximum of every
  anomaly map, so colours are comparable across images (a per-image range would paint a hot spot on every
  normal image); the colour bar prints that range. The images are therefore written at the end of the
  test epoch, and the ones waiting are held in memory as uint8 images and float32 maps (``max_images``
  bounds them).
- A method that returns no anomaly map gets its image score, normalised over the run's scores, as a
  uniform heat panel labelled ``image score``.
- The threshold is one on image scores. Its tick goes on the colour bar only where the bar's values are
  image scores: when there are no maps, or when every image's score is its map's maximum (PatchKNN);
  elsewhere (a method whose image score is not its map's maximum) the two scales differ and the threshold
  is in the title only.
- Under DDP every rank writes the images it scored; the contact sheet of each rank covers its shard (and
  the rule without a threshold uses that shard's scores).
"""

from __future__ import annotations

import functools
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
#: the two tones of the ground-truth outline: a dark ring just outside the region beside a bright ring
#: just inside it, so one of them contrasts with any image (white, black, red, ...)
OUTLINE_DARK = (0, 0, 0)
OUTLINE_BRIGHT = (255, 255, 255)
#: a panel whose short side is smaller is upscaled to this many pixels (bilinear; masks nearest)
MIN_PANEL_SIZE = 256
#: panel labels of an overlay, left to right (the ground-truth panel only when there is ground truth)
PANEL_LABELS = ("image", "ground truth", "anomaly map")
SHEET_NAME = "worst_cases.png"
SHEET_MIN_WIDTH = 640
BACKGROUND = (255, 255, 255)
TEXT_COLOR = (0, 0, 0)

Box = tuple[int, int, int, int]  # (left, top, right, bottom), right and bottom exclusive


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


def _erode(mask: np.ndarray, border: bool = False) -> np.ndarray:
    """Erosion of a boolean ``[H, W]`` mask by a 3x3 cross; beyond the image counts as ``border``."""
    padded = np.pad(mask, 1, mode="constant", constant_values=border)
    return padded[1:-1, 1:-1] & padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]


def mask_outline(mask: np.ndarray, thickness: int = 1) -> np.ndarray:
    """Boundary pixels of a binary ``[H, W]`` mask: the mask minus its erosion by a 3x3 cross,
    repeated ``thickness`` times inwards."""
    inside = np.asarray(mask).astype(bool)
    eroded = inside
    for _ in range(max(1, thickness)):
        eroded = _erode(eroded)
    return inside & ~eroded


def _resize_2d(values: np.ndarray, height: int, width: int) -> np.ndarray:
    if values.shape == (height, width):
        return values
    image = Image.fromarray(values.astype(np.float32)).resize((width, height), Image.BILINEAR)
    return np.asarray(image, dtype=np.float32)


def _resize_mask(mask: np.ndarray, height: int, width: int) -> np.ndarray:
    mask = np.asarray(mask).astype(bool)
    if mask.shape == (height, width):
        return mask
    image = Image.fromarray(mask.astype(np.uint8) * 255).resize((width, height), Image.NEAREST)
    return np.asarray(image) > 127


def draw_outline(
    image: np.ndarray,
    mask: np.ndarray | None,
    dark: tuple[int, int, int] = OUTLINE_DARK,
    bright: tuple[int, int, int] = OUTLINE_BRIGHT,
) -> np.ndarray:
    """``image`` (uint8 ``[H, W, 3]``) with the boundary of ``mask`` as a two-tone line: ``bright`` on the
    region's own boundary ring, ``dark`` on the ring just outside it, each ``max(1, min(H, W) // 128)``
    pixels thick (at the image border, where there is no outside, only the bright ring shows)."""
    out = image.copy()
    if mask is None or not np.asarray(mask).any():
        return out
    height, width = image.shape[:2]
    inside = _resize_mask(mask, height, width)
    thickness = max(1, min(height, width) // 128)
    outside = ~inside
    grown = outside
    for _ in range(thickness):
        grown = _erode(grown, border=True)
    out[outside & ~grown] = dark  # the ring of outside pixels next to the region
    out[mask_outline(inside, thickness)] = bright
    return out


def heat_overlay(image: np.ndarray, heat: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """Blend the jet colours of ``heat`` (``[H, W]`` in ``[0, 1]``) over ``image``:
    ``(1 - alpha) * image + alpha * jet(heat)``."""
    height, width = image.shape[:2]
    heat = _resize_2d(np.asarray(heat, dtype=np.float32), height, width)
    blended = (1.0 - alpha) * image.astype(np.float64) + alpha * jet_colormap(heat).astype(np.float64)
    return np.clip(blended, 0, 255).round().astype(np.uint8)


@functools.lru_cache(maxsize=8)
def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    """Pillow's bundled font at ``size`` pixels (Pillow >= 10.1 with FreeType); older Pillow falls back
    to its fixed small bitmap font."""
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError, ImportError):
        return ImageFont.load_default()


def _text_width(font: Any, text: str) -> int:
    return int(math.ceil(font.getlength(text)))


def _line_height(font: Any) -> int:
    return int(font.getbbox("Ag|")[3]) + 2


def font_size_for(panel_short_side: int) -> int:
    """The text size of an overlay: 1/16 of the (displayed) panel's short side, between 14 and 28 px."""
    return int(min(28, max(14, round(panel_short_side / 16))))


def display_size(height: int, width: int, min_size: int = MIN_PANEL_SIZE) -> tuple[int, int]:
    """``(height, width)`` scaled up (aspect kept) so the short side is at least ``min_size``."""
    short = min(height, width)
    if short >= min_size:
        return height, width
    scale = min_size / short
    return int(round(height * scale)), int(round(width * scale))


def overlay_title(name: str, score: float, threshold: float | None = None, label: int | None = None) -> str:
    """The title line of an overlay: the file name, the image score, the threshold and the decision
    (``anomalous`` when ``score >= threshold``), and with a known ``label`` the truth and, when they
    differ, ``FALSE POSITIVE`` / ``FALSE NEGATIVE``."""
    parts = [name, f"score {score:.4g}"]
    decision = None
    if threshold is None:
        parts.append("no threshold")
    else:
        decision = int(score >= threshold)
        comparison = ">=" if decision else "<"
        parts[-1] += f" {comparison} threshold {threshold:.4g}: " + ("anomalous" if decision else "normal")
    if label is not None:
        truth = "truth: " + ("anomalous" if label else "normal")
        if decision is not None and decision != label:
            truth += " -> " + ("FALSE POSITIVE" if decision else "FALSE NEGATIVE")
        parts.append(truth)
    return "  |  ".join(parts)


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")


def _value_text(value: float) -> str:
    return f"{value:.4g}"


@dataclass(frozen=True)
class OverlayLayout:
    """Where :func:`render_overlay` puts things, in pixels of the returned image."""

    size: tuple[int, int]  # (width, height)
    title: Box
    labels: tuple[Box, ...]  # one header label per panel
    panels: tuple[Box, ...]
    color_bar: Box
    threshold_row: int | None  # the colour bar's row of the threshold tick
    bar_text_x: int  # where the colour bar's value labels start
    font_size: int


def overlay_layout(
    image_size: tuple[int, int],
    n_panels: int,
    title: str,
    value_range: tuple[float, float],
    threshold: float | None = None,
    min_panel_size: int = MIN_PANEL_SIZE,
) -> OverlayLayout:
    """The layout of :func:`render_overlay` for an image of ``image_size`` ``(H, W)`` and ``n_panels``
    panels: title strip, header strip of panel labels, the panels side by side, the colour bar right of
    them with its value labels."""
    panel_h, panel_w = display_size(*image_size, min_size=min_panel_size)
    font_size = font_size_for(min(panel_h, panel_w))
    font = _font(font_size)
    line = _line_height(font)
    pad = max(6, font_size // 2)
    title_box = (pad, pad, pad + _text_width(font, title), pad + line)
    header_top = title_box[3] + pad // 2
    panels_top = header_top + line + 2
    panels, labels = [], []
    for i in range(n_panels):
        left = pad + i * (panel_w + pad)
        panels.append((left, panels_top, left + panel_w, panels_top + panel_h))
        labels.append((left, header_top, left + panel_w, header_top + line))
    bar_left = panels[-1][2] + pad
    bar = (bar_left, panels_top, bar_left + max(12, font_size), panels_top + panel_h)
    texts = [_value_text(v) for v in value_range]
    if threshold is not None:
        texts.append(f"threshold {_value_text(threshold)}")
    bar_text_x = bar[2] + 4 + max(3, font_size // 4)  # right of the threshold tick's overhang
    width = max(bar_text_x + max(_text_width(font, t) for t in texts) + pad, title_box[2] + pad)
    height = bar[3] + line // 2 + pad
    threshold_row = None
    if threshold is not None:
        level = float(normalize(np.array(threshold), *value_range))
        threshold_row = bar[3] - 1 - int(round(level * (panel_h - 1)))
    return OverlayLayout(
        (width, height), title_box, tuple(labels), tuple(panels), bar, threshold_row, bar_text_x, font_size
    )


def color_bar(height: int, width: int) -> np.ndarray:
    """A vertical jet colour bar, uint8 ``[height, width, 3]``: the top row is 1, the bottom row 0."""
    levels = np.linspace(1.0, 0.0, height)[:, None].repeat(width, axis=1)
    return jet_colormap(levels)


def render_overlay(
    image: np.ndarray,
    heat: np.ndarray,
    mask: np.ndarray | None,
    title: str,
    value_range: tuple[float, float],
    threshold: float | None = None,
    alpha: float = 0.5,
    heat_label: str = PANEL_LABELS[2],
    min_panel_size: int = MIN_PANEL_SIZE,
) -> Image.Image:
    """One overlay: ``title`` on top, then the panels under their labels (``image``, ``ground truth``,
    ``anomaly map``), then a colour bar.

    Args:
        image: uint8 ``[H, W, 3]``.
        heat: the anomaly map already normalised to ``[0, 1]`` by ``value_range`` (any ``[h, w]``, resized).
        mask: the ground truth ``[H, W]`` (all False for a normal image: its panel shows no outline);
            ``None`` omits the ground-truth panel (no ground truth, e.g. ``fsad predict``).
        title: the title line (see :func:`overlay_title`).
        value_range: ``(low, high)``, the values heat 0 and 1 stand for; printed at the colour bar's ends.
        threshold: a value on the colour bar's scale to mark with a tick (``None``: no tick).
        alpha: opacity of the heat colours over the image.
        heat_label: the label of the heat panel.
        min_panel_size: panels whose short side is smaller are upscaled to it.
    """
    n_panels = 2 if mask is None else 3
    layout = overlay_layout(image.shape[:2], n_panels, title, value_range, threshold, min_panel_size)
    left, top, right, bottom = layout.panels[0]
    panel_w, panel_h = right - left, bottom - top
    shown = image
    if image.shape[:2] != (panel_h, panel_w):
        shown = np.asarray(Image.fromarray(image).resize((panel_w, panel_h), Image.BILINEAR))
    panels = [shown]
    if mask is not None:
        panels.append(draw_outline(shown, mask))
    panels.append(heat_overlay(shown, heat, alpha))
    labels = [PANEL_LABELS[0], heat_label] if mask is None else [PANEL_LABELS[0], PANEL_LABELS[1], heat_label]

    canvas = Image.new("RGB", layout.size, BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    font = _font(layout.font_size)
    draw.text(layout.title[:2], title, fill=TEXT_COLOR, font=font)
    for panel, box in zip(panels, layout.panels, strict=True):
        canvas.paste(Image.fromarray(panel), box[:2])
    for box, label in zip(layout.labels, labels, strict=True):
        centred = (box[0] + box[2] - _text_width(font, label)) // 2  # no anchors: bitmap fonts lack them
        draw.text((centred, box[1]), label, fill=TEXT_COLOR, font=font)

    bar_left, bar_top, bar_right, bar_bottom = layout.color_bar
    canvas.paste(Image.fromarray(color_bar(bar_bottom - bar_top, bar_right - bar_left)), (bar_left, bar_top))
    draw.rectangle((bar_left - 1, bar_top - 1, bar_right, bar_bottom), outline=TEXT_COLOR)
    text_x = layout.bar_text_x
    ends = [(bar_top, _value_text(value_range[1])), (bar_bottom - 1, _value_text(value_range[0]))]
    line = _line_height(font)

    def beside_bar(y: int, text: str) -> None:  # the text's middle at row y
        draw.text((text_x, y - line // 2), text, fill=TEXT_COLOR, font=font)

    if layout.threshold_row is not None:
        row = layout.threshold_row
        draw.line((bar_left - 4, row, bar_right + 3, row), fill=TEXT_COLOR, width=3)
        draw.line((bar_left - 4, row, bar_right + 3, row), fill=OUTLINE_BRIGHT, width=1)
        beside_bar(row, f"threshold {_value_text(threshold)}")
        ends = [(y, text) for y, text in ends if abs(y - row) >= line]  # the tick's label wins a clash
    for y, text in ends:
        beside_bar(y, text)
    return canvas


def contact_sheet(
    header: list[str], sections: list[tuple[str, list[Image.Image]]], font_size: int = 16
) -> Image.Image:
    """Stack ``header`` lines, then per section its title line and its rows (images, left-aligned on
    white): ``sections = [(title, [row, ...]), ...]``. A section without rows shows ``(none)``. The sheet
    is as wide as its widest row or line, at least :data:`SHEET_MIN_WIDTH`."""
    font = _font(font_size)
    line = _line_height(font)
    pad = max(6, font_size // 2)
    blocks: list[tuple[str, Any]] = [("text", text) for text in header]
    for title, rows in sections:
        blocks.append(("gap", None))
        blocks.append(("text", title))
        blocks += [("image", row) for row in rows] if rows else [("text", "  (none)")]
    widths = [SHEET_MIN_WIDTH]
    heights = []
    for kind, value in blocks:
        if kind == "text":
            widths.append(_text_width(font, value) + 2 * pad)
            heights.append(line)
        elif kind == "image":
            widths.append(value.width)
            heights.append(value.height)
        else:
            heights.append(pad)
    sheet = Image.new("RGB", (max(widths), sum(heights) + 2 * pad), BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    top = pad
    for (kind, value), height in zip(blocks, heights, strict=True):
        if kind == "text":
            draw.text((pad, top), value, fill=TEXT_COLOR, font=font)
        elif kind == "image":
            sheet.paste(value, (0, top))
        top += height
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

    @property
    def name(self) -> str:
        return f"{self.category}/{self.defect_type}/{os.path.basename(self.path)}"


@dataclass(frozen=True)
class ErrorRule:
    """Which test images the worst-cases sheet calls false positives / negatives.

    With a ``threshold``: normal images scoring ``>= threshold`` and anomalous ones scoring ``< threshold``.
    Without one: the images misranked at every threshold, normal images scoring ``>=`` the lowest anomalous
    score (``fp_from``) and anomalous ones scoring ``<=`` the highest normal score (``fn_to``); at an
    image AUROC of 100 % there are none.
    """

    fp_from: float  # a normal image is a false positive when its score >= fp_from
    fn_to: float  # an anomalous image is a false negative when its score < fn_to (threshold) or <= fn_to
    threshold: float | None
    source: str  # where the threshold comes from, or why there is none

    @classmethod
    def from_scores(
        cls, scores: np.ndarray, labels: np.ndarray, threshold: float | None, source: str
    ) -> ErrorRule:
        if threshold is not None:
            return cls(threshold, threshold, threshold, source)
        anomalous, normal = scores[labels == 1], scores[labels == 0]
        lowest_anomalous = float(anomalous.min()) if anomalous.size else math.inf
        highest_normal = float(normal.max()) if normal.size else -math.inf
        return cls(lowest_anomalous, highest_normal, None, source)

    def is_false_positive(self, score: float) -> bool:
        return score >= self.fp_from

    def is_false_negative(self, score: float) -> bool:
        return score < self.fn_to if self.threshold is not None else score <= self.fn_to

    def describe(self) -> list[str]:
        """The sheet's caption: the rule in words."""
        if self.threshold is not None:
            t = _value_text(self.threshold)
            return [
                f"decision threshold {t} ({self.source}):",
                f"false positive = normal image scoring >= {t}; "
                f"false negative = anomalous image scoring < {t}",
            ]
        return [
            f"no decision threshold ({self.source}): listed are the images misranked at every threshold,",
            f"normal images scoring >= the lowest anomalous score ({_value_text(self.fp_from)}) and "
            f"anomalous images scoring <= the highest normal score ({_value_text(self.fn_to)})",
        ]

    def none_found(self) -> str:
        if self.threshold is not None:
            return f"no false positives or negatives at threshold {_value_text(self.threshold)}"
        return "no misranked images: every anomalous image scores above every normal one"


class Visualizer(Callback):
    """Write overlay PNGs and a worst-cases contact sheet for every test run (see the module docstring).

    Args:
        max_images: write overlays for at most this many test images (in test order); ``None`` for all.
            The contact sheet always considers every test image.
        worst_k: rows per section of the contact sheet (false positives, false negatives); 0 skips it.
        alpha: opacity of the heat colours over the image.
        wandb_max_images: how many overlays are also logged as ``wandb.Image`` when the trainer logs to W&B
            (``None`` for all); the contact sheet is always logged there.
        threshold: the image-score decision threshold for the titles and the sheet; ``None`` takes the
            module's ``decision_threshold`` attribute when it has one (set and not ``None``).
        min_panel_size: panels whose short side is smaller are upscaled to this many pixels.
    """

    def __init__(
        self,
        max_images: int | None = None,
        worst_k: int = 8,
        alpha: float = 0.5,
        wandb_max_images: int | None = 32,
        threshold: float | None = None,
        min_panel_size: int = MIN_PANEL_SIZE,
    ) -> None:
        super().__init__()
        if max_images is not None and max_images < 0:
            raise ValueError(f"Visualizer max_images must be >= 0 or None, got {max_images}")
        if worst_k < 0:
            raise ValueError(f"Visualizer worst_k must be >= 0, got {worst_k}")
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"Visualizer alpha must be in [0, 1], got {alpha}")
        if threshold is not None and not math.isfinite(threshold):
            raise ValueError(f"Visualizer threshold must be a finite number or None, got {threshold}")
        if min_panel_size < 1:
            raise ValueError(f"Visualizer min_panel_size must be >= 1, got {min_panel_size}")
        self.max_images = max_images
        self.worst_k = worst_k
        self.alpha = alpha
        self.wandb_max_images = wandb_max_images
        self.threshold = threshold
        self.min_panel_size = min_panel_size
        self.written: list[str] = []
        self.sheet_path: str | None = None
        self._reset()

    def _reset(self) -> None:
        self._pending: list[_Scored] = []
        self._highest_normals: list[tuple[float, int, _Scored]] = []  # min-heap on score: keeps the highest
        self._lowest_anomalies: list[tuple[float, int, _Scored]] = []  # min-heap on -score: keeps the lowest
        self._counter = itertools.count()
        self._map_range = [np.inf, -np.inf]
        self._score_range = [np.inf, -np.inf]
        self._scores: list[float] = []
        self._labels: list[int] = []
        self._has_maps = False
        self._score_is_map_max = True
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
            score = float(scores[i])
            if anomaly_map is not None:
                low, high = float(anomaly_map.min()), float(anomaly_map.max())
                self._map_range = [min(self._map_range[0], low), max(self._map_range[1], high)]
                self._has_maps = True
                self._score_is_map_max &= abs(score - high) <= 1e-5 * max(1.0, abs(high))
            self._score_range = [min(self._score_range[0], score), max(self._score_range[1], score)]
            keep_image = self.max_images is None or self._seen < self.max_images
            label = int(batch[LABEL][i])
            self._scores.append(score)
            self._labels.append(label)
            is_fp_candidate = label == 0 and self._would_enter(self._highest_normals, score)
            is_fn_candidate = label == 1 and self._would_enter(self._lowest_anomalies, -score)
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
                self._push(self._highest_normals, score, entry)
            if is_fn_candidate:
                self._push(self._lowest_anomalies, -score, entry)

    def on_test_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        folder = self._folder or os.path.join(run_folder(trainer), "images")
        threshold, source = self._decision_threshold(pl_module)
        used: set[str] = set()
        logged: list[tuple[str, Image.Image]] = []
        sheet, rule = None, None
        try:
            for entry in self._pending:
                title = overlay_title(entry.name, entry.score, threshold, entry.label)
                panel = self._render(entry, title, threshold)
                path = self._unique_path(folder, entry, used)
                save_png(panel, path)
                self.written.append(path)
                if self.wandb_max_images is None or len(logged) < self.wandb_max_images:
                    logged.append((title, panel))
            if self.worst_k > 0:
                rule = ErrorRule.from_scores(
                    np.array(self._scores, dtype=np.float64), np.array(self._labels), threshold, source
                )
                sheet = self._sheet(rule)
                self.sheet_path = os.path.join(folder, SHEET_NAME)
                save_png(sheet, self.sheet_path)
        except OSError as err:
            raise self._unwritten_error(err, folder) from err
        if wandb_loggers(trainer):
            if logged:
                log_images_to_wandb(trainer, "test/overlays", [p for _, p in logged], [c for c, _ in logged])
            if sheet is not None and rule is not None:
                log_images_to_wandb(trainer, "test/worst_cases", [sheet], [" ".join(rule.describe())])
        self._reset()

    # ------------------------------------------------------------------ helpers
    def _decision_threshold(self, pl_module: LightningModule | None) -> tuple[float | None, str]:
        """The threshold and where it comes from: this callback's ``threshold``, else the module's
        ``decision_threshold``, else none."""
        if self.threshold is not None:
            return float(self.threshold), "the Visualizer's threshold"
        raw = getattr(pl_module, "decision_threshold", None)
        if raw is None:
            return None, "the module has no decision_threshold"
        try:
            value = float(raw)
        except (TypeError, ValueError):
            value = math.nan
        if not math.isfinite(value):
            raise ValueError(
                f"Visualizer: the module's decision_threshold must be a finite number or None, got {raw!r}"
            )
        return value, "the module's decision_threshold"

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

    def _heat(self, entry: _Scored) -> tuple[np.ndarray, tuple[float, float], str]:
        """The heat panel's values in ``[0, 1]``, the range they stand for and the panel's label."""
        if entry.anomaly_map is not None:
            low, high = self._map_range
            return normalize(entry.anomaly_map, low, high), (low, high), PANEL_LABELS[2]
        low, high = self._score_range
        level = normalize(np.array(entry.score), low, high)
        return np.full(entry.image.shape[:2], float(level), dtype=np.float32), (low, high), "image score"

    def _render(self, entry: _Scored, title: str, threshold: float | None) -> Image.Image:
        heat, value_range, heat_label = self._heat(entry)
        # the tick goes on the colour bar only where its values are image scores: no maps (the panel is
        # the score) or every score is its map's maximum (PatchKNN); else the scales differ
        on_bar = threshold if (not self._has_maps or self._score_is_map_max) else None
        return render_overlay(
            entry.image, heat, entry.mask, title, value_range, threshold=on_bar, alpha=self.alpha,
            heat_label=heat_label, min_panel_size=self.min_panel_size,
        )  # fmt: skip

    def _unique_path(self, folder: str, entry: _Scored, used: set[str]) -> str:
        stem = _safe_name(os.path.splitext(os.path.basename(entry.path.rstrip("/")))[0])
        base = os.path.join(folder, _safe_name(entry.category), _safe_name(entry.defect_type), stem)
        path, n = base + ".png", 1
        while path in used:
            path, n = f"{base}_{n}.png", n + 1
        used.add(path)
        return path

    def worst_cases(self, rule: ErrorRule) -> tuple[list[_Scored], list[_Scored]]:
        """The false positives (highest score first) and false negatives (lowest first) under ``rule``,
        at most ``worst_k`` each, of the images seen since the test started."""
        normals = [e for _, _, e in sorted(self._highest_normals, key=lambda t: (-t[0], t[1]))]
        anomalies = [e for _, _, e in sorted(self._lowest_anomalies, key=lambda t: (-t[0], t[1]))]
        return (
            [e for e in normals if rule.is_false_positive(e.score)],
            [e for e in anomalies if rule.is_false_negative(e.score)],
        )

    def _sheet(self, rule: ErrorRule) -> Image.Image:
        false_positives, false_negatives = self.worst_cases(rule)
        scores, labels = np.array(self._scores, dtype=np.float64), np.array(self._labels)
        n_fp = sum(rule.is_false_positive(s) for s in scores[labels == 0])
        n_fn = sum(rule.is_false_negative(s) for s in scores[labels == 1])
        header = rule.describe()
        if n_fp == 0 and n_fn == 0:
            return contact_sheet(header + [rule.none_found()], [])

        def rows(entries: list[_Scored], prefix: str) -> list[Image.Image]:
            out = []
            for i, entry in enumerate(entries):
                title = f"{prefix} #{i + 1}  " + overlay_title(
                    entry.name, entry.score, rule.threshold, entry.label
                )
                out.append(self._render(entry, title, rule.threshold))
            return out

        fp_title = f"false positives: {_count(n_fp, 'normal image')}, "
        fp_title += f"the {len(false_positives)} highest-scored shown"
        fn_title = f"false negatives: {_count(n_fn, 'anomalous image')}, "
        fn_title += f"the {len(false_negatives)} lowest-scored shown"
        return contact_sheet(
            header, [(fp_title, rows(false_positives, "FP")), (fn_title, rows(false_negatives, "FN"))]
        )
