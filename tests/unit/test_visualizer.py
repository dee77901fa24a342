"""Visualizer: drawing functions and the callback's PNGs (sizes, folders, worst-case sheet)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from fsad_lightning.callbacks.visualizer import (
    CAPTION_HEIGHT,
    JET_ANCHORS,
    SHEET_NAME,
    Visualizer,
    draw_outline,
    heat_overlay,
    jet_colormap,
    mask_outline,
    normalize,
    to_uint8_image,
    triptych,
)
from fsad_lightning.data.batch import AnomalyOutput

SIZE = 32


def test_jet_colormap_hits_its_anchors_and_clips():
    for position, color in JET_ANCHORS:
        expected = np.round(np.array(color) * 255).astype(np.uint8)
        assert np.array_equal(jet_colormap(np.array(position)), expected)
    assert np.array_equal(jet_colormap(np.array([-1.0, 2.0])), jet_colormap(np.array([0.0, 1.0])))
    assert jet_colormap(np.zeros((4, 5))).shape == (4, 5, 3)


def test_mask_outline_is_the_boundary_of_the_region():
    mask = np.zeros((8, 8), dtype=bool)
    mask[2:6, 2:6] = True
    outline = mask_outline(mask)
    assert outline[2, 2] and outline[5, 3] and not outline[3, 3] and not outline[0, 0]
    assert outline.sum() == 12  # the 4x4 square's ring


def test_draw_outline_and_heat_overlay():
    image = np.full((SIZE, SIZE, 3), 100, dtype=np.uint8)
    mask = np.zeros((SIZE, SIZE), dtype=bool)
    mask[8:16, 8:16] = True
    outlined = draw_outline(image, mask)
    assert tuple(outlined[8, 8]) == (255, 0, 0) and tuple(outlined[12, 12]) == (100, 100, 100)
    assert np.array_equal(draw_outline(image, None), image)
    heat = heat_overlay(image, np.ones((SIZE // 2, SIZE // 2)), alpha=1.0)  # a coarser map is resized
    assert heat.shape == image.shape and tuple(heat[0, 0]) == tuple(jet_colormap(np.array(1.0)))
    assert np.array_equal(normalize(np.array([1.0, 2.0, 3.0]), 1.0, 3.0), [0.0, 0.5, 1.0])
    assert not normalize(np.array([5.0]), 1.0, 1.0).any()


def test_triptych_is_three_panels_wide():
    image = to_uint8_image(torch.rand(3, SIZE, SIZE))
    panel = triptych(image, None, np.zeros((SIZE, SIZE)))
    assert panel.size == (3 * SIZE, SIZE)
    with pytest.raises(ValueError, match=r"\[3, H, W\]"):
        to_uint8_image(torch.rand(SIZE, SIZE))


def _batch(labels: list[int], start: int) -> dict:
    n = len(labels)
    masks = torch.zeros(n, 1, SIZE, SIZE)
    for i, label in enumerate(labels):
        if label:
            masks[i, 0, 10:20, 10:20] = 1.0
    return {
        "image": torch.rand(n, 3, SIZE, SIZE),
        "mask": masks,
        "label": torch.tensor(labels),
        "has_mask": torch.ones(n, dtype=torch.bool),
        "path": [
            f"/data/widget/test/{'scratch' if lab else 'good'}/{start + i:03d}.png"
            for i, lab in enumerate(labels)
        ],
        "category": ["widget"] * n,
        "defect_type": ["scratch" if lab else "good" for lab in labels],
    }


def _run_callback(tmp_path, callback: Visualizer, with_maps: bool = True) -> Visualizer:
    trainer = SimpleNamespace(log_dir=str(tmp_path), default_root_dir=str(tmp_path), loggers=[])
    callback.on_test_start(trainer, None)
    labels = [[0, 0, 1], [1, 0, 1]]
    scores = [[0.1, 0.7, 0.9], [0.2, 0.3, 0.8]]
    for index, (batch_labels, batch_scores) in enumerate(zip(labels, scores)):
        batch = _batch(batch_labels, start=3 * index)
        maps = torch.rand(len(batch_labels), SIZE, SIZE) if with_maps else None
        output = AnomalyOutput(pred_score=torch.tensor(batch_scores), anomaly_map=maps)
        callback.on_test_batch_end(trainer, None, output, batch, index)
    callback.on_test_end(trainer, None)
    return callback


def test_callback_writes_a_png_per_image_and_the_sheet(tmp_path):
    callback = _run_callback(tmp_path, Visualizer(worst_k=2))
    good = sorted(p.name for p in (tmp_path / "images" / "widget" / "good").glob("*.png"))
    bad = sorted(p.name for p in (tmp_path / "images" / "widget" / "scratch").glob("*.png"))
    assert good == ["000.png", "001.png", "004.png"] and bad == ["002.png", "003.png", "005.png"]
    for path in callback.written:
        with Image.open(path) as image:
            image.verify()
        with Image.open(path) as image:
            assert image.format == "PNG" and image.size == (3 * SIZE, SIZE) and image.mode == "RGB"
    with Image.open(tmp_path / "images" / SHEET_NAME) as sheet:
        # 2 section titles + 2 false positives + 2 false negatives, each under a caption strip
        assert sheet.size[0] >= 3 * SIZE
        assert sheet.size[1] == 2 * (CAPTION_HEIGHT + 2) + 4 * (CAPTION_HEIGHT + SIZE)
    assert not list(tmp_path.rglob(".*.tmp"))


def test_worst_cases_are_the_highest_normals_and_lowest_anomalies(tmp_path):
    callback = Visualizer(worst_k=2)
    trainer = SimpleNamespace(log_dir=str(tmp_path), default_root_dir=str(tmp_path), loggers=[])
    callback.on_test_start(trainer, None)
    batch = _batch([0, 0, 0, 1, 1, 1], start=0)
    output = AnomalyOutput(pred_score=torch.tensor([0.5, 0.9, 0.1, 0.2, 0.95, 0.3]))
    callback.on_test_batch_end(trainer, None, output, batch, 0)
    fps = [e.path[-7:-4] for _, _, e in sorted(callback._false_positives, key=lambda t: -t[0])]
    fns = [e.path[-7:-4] for _, _, e in sorted(callback._false_negatives, key=lambda t: -t[0])]
    assert fps == ["001", "000"]  # scores 0.9, 0.5
    assert fns == ["003", "005"]  # scores 0.2, 0.3
    callback.on_test_end(trainer, None)  # without anomaly maps the heat panel is the image score
    assert len(callback.written) == 6


def test_max_images_limits_the_overlays_not_the_sheet(tmp_path):
    callback = _run_callback(tmp_path, Visualizer(max_images=2, worst_k=1), with_maps=False)
    assert len(callback.written) == 2
    assert (tmp_path / "images" / SHEET_NAME).is_file()


def test_bad_arguments_and_outputs(tmp_path):
    with pytest.raises(ValueError, match="worst_k"):
        Visualizer(worst_k=-1)
    with pytest.raises(ValueError, match="max_images"):
        Visualizer(max_images=-2)
    callback = Visualizer()
    trainer = SimpleNamespace(log_dir=str(tmp_path), default_root_dir=str(tmp_path), loggers=[])
    callback.on_test_start(trainer, None)
    with pytest.raises(ValueError, match="AnomalyOutput"):
        callback.on_test_batch_end(trainer, None, torch.zeros(3), _batch([0, 1, 0], 0), 0)
