"""Visualizer: drawing functions and the callback's PNGs (sizes, folders, worst-case sheet)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from fsad_lightning.callbacks import visualizer
from fsad_lightning.callbacks.visualizer import (
    JET_ANCHORS,
    MIN_PANEL_SIZE,
    OUTLINE_BRIGHT,
    OUTLINE_DARK,
    PANEL_LABELS,
    SHEET_NAME,
    ErrorRule,
    Visualizer,
    _font,
    _line_height,
    display_size,
    draw_outline,
    font_size_for,
    heat_overlay,
    jet_colormap,
    mask_outline,
    normalize,
    overlay_layout,
    overlay_title,
    render_overlay,
    to_uint8_image,
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
    assert tuple(outlined[8, 8]) == OUTLINE_BRIGHT and tuple(outlined[7, 8]) == OUTLINE_DARK
    assert tuple(outlined[12, 12]) == (100, 100, 100) and tuple(outlined[0, 0]) == (100, 100, 100)
    assert np.array_equal(draw_outline(image, None), image)
    heat = heat_overlay(image, np.ones((SIZE // 2, SIZE // 2)), alpha=1.0)  # a coarser map is resized
    assert heat.shape == image.shape and tuple(heat[0, 0]) == tuple(jet_colormap(np.array(1.0)))
    assert np.array_equal(normalize(np.array([1.0, 2.0, 3.0]), 1.0, 3.0), [0.0, 0.5, 1.0])
    assert not normalize(np.array([5.0]), 1.0, 1.0).any()
    with pytest.raises(ValueError, match=r"\[3, H, W\]"):
        to_uint8_image(torch.rand(SIZE, SIZE))


# ------------------------------------------------------------------ one overlay, as an engineer reads it
def _luminance(rgb) -> np.ndarray:
    return np.asarray(rgb, dtype=np.float64) @ np.array([0.299, 0.587, 0.114])


def _dark_pixels(image: Image.Image, box) -> int:
    region = np.asarray(image.crop(box))
    return int((_luminance(region) < 128).sum())


def _overlay(mask=True, threshold=None, size=(SIZE, SIZE), title="widget/scratch/002.png  |  score 0.8"):
    image = np.full((*size, 3), 90, dtype=np.uint8)
    ground_truth = None
    if mask:
        ground_truth = np.zeros(size, dtype=bool)
        ground_truth[size[0] // 4 : size[0] // 2, size[1] // 4 : size[1] // 2] = True
    heat = np.linspace(0.0, 1.0, size[0] * size[1]).reshape(size)
    overlay = render_overlay(image, heat, ground_truth, title, (0.1, 0.9), threshold=threshold)
    layout = overlay_layout(size, 3 if mask else 2, title, (0.1, 0.9), threshold)
    return overlay, layout


def test_overlay_panels_sit_under_labelled_header_strips():
    overlay, layout = _overlay()
    assert overlay.size == layout.size and len(layout.panels) == len(layout.labels) == 3
    labels = [np.asarray(overlay.crop(box)) for box in layout.labels]
    for label, panel in zip(layout.labels, layout.panels, strict=True):
        assert label[3] <= panel[1] and label[0] == panel[0] and label[2] == panel[2]  # above its panel
        assert _dark_pixels(overlay, label) > 20  # text on the white strip
    # three different words: image, ground truth, anomaly map
    assert not np.array_equal(labels[0], labels[1]) and not np.array_equal(labels[1], labels[2])
    panels = [np.asarray(overlay.crop(box)) for box in layout.panels]
    assert (panels[0] == 90).all()  # the image panel is the image
    assert not np.array_equal(panels[1], panels[0]) and not np.array_equal(panels[2], panels[0])
    # without ground truth (fsad predict) the ground-truth panel is left out
    image_only, layout = _overlay(mask=False)
    assert len(layout.panels) == 2 and image_only.width < overlay.width
    assert PANEL_LABELS == ("image", "ground truth", "anomaly map")


def test_title_holds_the_file_the_score_and_the_threshold():
    assert overlay_title("w/good/001.png", 0.7312, 0.5, 0) == (
        "w/good/001.png  |  score 0.7312 >= threshold 0.5: anomalous  |  truth: normal -> FALSE POSITIVE"
    )
    assert overlay_title("w/bad/002.png", 0.2, 0.5, 1) == (
        "w/bad/002.png  |  score 0.2 < threshold 0.5: normal  |  truth: anomalous -> FALSE NEGATIVE"
    )
    assert overlay_title("w/bad/003.png", 0.9, 0.5, 1).endswith("anomalous  |  truth: anomalous")
    assert overlay_title("x.png", 0.25) == "x.png  |  score 0.25  |  no threshold"
    one, layout = _overlay(title=overlay_title("w/good/001.png", 0.7312, 0.5, 0))
    other, _ = _overlay(title=overlay_title("w/good/001.png", 0.2, 0.5, 0))
    assert _dark_pixels(one, layout.title) > 100  # the title strip holds text
    assert layout.title[3] <= min(box[1] for box in layout.labels)  # above the panel labels
    assert not np.array_equal(np.asarray(one.crop(layout.title)), np.asarray(other.crop(layout.title)))


def _jet_positions(pixels: np.ndarray) -> np.ndarray:
    """The colour map position of every ``[..., 3]`` pixel: its nearest entry of a fine jet table."""
    grid = np.linspace(0.0, 1.0, 1001)
    table = jet_colormap(grid).astype(np.float64)
    distance = ((pixels[..., None, :].astype(np.float64) - table) ** 2).sum(axis=-1)
    return grid[distance.argmin(axis=-1)]


def test_color_bar_runs_from_the_lowest_to_the_highest_value_with_a_threshold_tick():
    overlay, layout = _overlay()
    left, top, right, bottom = layout.color_bar
    assert left >= layout.panels[-1][2] and bottom - top == layout.panels[-1][3] - layout.panels[-1][1]
    column = np.asarray(overlay)[top:bottom, (left + right) // 2]
    positions = _jet_positions(column)[::-1]  # bottom to top
    assert np.all(np.diff(positions) >= 0) and positions[0] < 0.01 and positions[-1] > 0.99
    # the value range is printed beside the bar's ends
    beside = (layout.bar_text_x, top - 10, overlay.width, top + 10)
    assert _dark_pixels(overlay, beside) > 10
    assert _dark_pixels(overlay, (layout.bar_text_x, bottom - 10, overlay.width, bottom + 10)) > 10
    ticked, layout = _overlay(threshold=0.5)
    row = layout.threshold_row
    assert abs(row - (top + bottom) / 2) <= 2  # 0.5 is half-way between 0.1 and 0.9
    tick = np.asarray(ticked)[row - 1 : row + 2, left:right]
    assert {tuple(p) for p in tick.reshape(-1, 3)} <= {(0, 0, 0), (255, 255, 255)}
    assert _dark_pixels(ticked, (layout.bar_text_x, row - 6, ticked.width, row + 6)) > 10  # its label


@pytest.mark.parametrize(
    "background", [(255, 255, 255), (0, 0, 0), (255, 0, 0)], ids=["white", "black", "red"]
)
def test_ground_truth_outline_contrasts_with_any_image(background):
    image = np.zeros((MIN_PANEL_SIZE, MIN_PANEL_SIZE, 3), dtype=np.uint8)
    image[:] = background
    mask = np.zeros(image.shape[:2], dtype=bool)
    mask[64:128, 64:160] = True
    outlined = draw_outline(image, mask)
    changed = (outlined != image).any(axis=-1)
    assert changed.sum() > 4 * 64  # a line around the region, not a dot
    strong = changed & (np.abs(_luminance(outlined) - _luminance(background)) >= 127)
    # every row and column crossing the region meets a pixel that stands out by half the luminance scale
    for side in (strong[64:128, 60:68], strong[64:128, 156:164]):  # left and right edges
        assert side.any(axis=1).all()
    for side in (strong[60:68, 64:160], strong[124:132, 64:160]):  # top and bottom edges
        assert side.any(axis=0).all()
    assert {tuple(p) for p in outlined[changed]} <= {OUTLINE_DARK, OUTLINE_BRIGHT}  # a two-tone line


def test_small_images_are_shown_at_a_readable_size():
    assert display_size(SIZE, SIZE) == (MIN_PANEL_SIZE, MIN_PANEL_SIZE)
    assert display_size(32, 64) == (256, 512) and display_size(300, 400) == (300, 400)
    overlay, layout = _overlay(size=(SIZE, 2 * SIZE))
    for left, top, right, bottom in layout.panels:
        assert (bottom - top, right - left) == (MIN_PANEL_SIZE, 2 * MIN_PANEL_SIZE)
    assert layout.font_size >= 14 and font_size_for(1024) <= 28
    assert _line_height(_font(layout.font_size)) >= 14  # not Pillow's 11 px bitmap font


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


def _trainer(tmp_path) -> SimpleNamespace:
    return SimpleNamespace(log_dir=str(tmp_path), default_root_dir=str(tmp_path), loggers=[])


def _run_callback(
    tmp_path, callback: Visualizer, with_maps: bool = True, scores=None, module=None
) -> Visualizer:
    """Two batches: normal images score 0.1, 0.7, 0.3 and anomalous ones 0.9, 0.2, 0.8 (by default)."""
    trainer = _trainer(tmp_path)
    callback.on_test_start(trainer, module)
    labels = [[0, 0, 1], [1, 0, 1]]
    scores = scores or [[0.1, 0.7, 0.9], [0.2, 0.3, 0.8]]
    for index, (batch_labels, batch_scores) in enumerate(zip(labels, scores, strict=True)):
        batch = _batch(batch_labels, start=3 * index)
        maps = torch.rand(len(batch_labels), SIZE, SIZE) if with_maps else None
        output = AnomalyOutput(pred_score=torch.tensor(batch_scores), anomaly_map=maps)
        callback.on_test_batch_end(trainer, module, output, batch, index)
    callback.on_test_end(trainer, module)
    return callback


def test_callback_writes_a_readable_png_per_image_and_the_sheet(tmp_path):
    callback = _run_callback(tmp_path, Visualizer(worst_k=2))
    good = sorted(p.name for p in (tmp_path / "images" / "widget" / "good").glob("*.png"))
    bad = sorted(p.name for p in (tmp_path / "images" / "widget" / "scratch").glob("*.png"))
    assert good == ["000.png", "001.png", "004.png"] and bad == ["002.png", "003.png", "005.png"]
    for path in callback.written:
        with Image.open(path) as image:
            image.verify()
        with Image.open(path) as image:
            # three panels of at least MIN_PANEL_SIZE (the 32 px images are upscaled), title, labels, bar
            assert image.format == "PNG" and image.mode == "RGB"
            assert image.width > 3 * MIN_PANEL_SIZE and image.height > MIN_PANEL_SIZE + 2 * 14
    assert (tmp_path / "images" / SHEET_NAME).is_file()
    assert not list(tmp_path.rglob(".*.tmp"))


def _sheet_names(callback: Visualizer, rule: ErrorRule) -> tuple[list[str], list[str]]:
    false_positives, false_negatives = callback.worst_cases(rule)
    return [e.path[-7:-4] for e in false_positives], [e.path[-7:-4] for e in false_negatives]


class _Recorder(Visualizer):
    """A Visualizer that keeps the rule of its sheet and the sheet's images after the test; it writes
    no overlays (``max_images=0``) to stay fast."""

    def __init__(self, **kwargs):
        super().__init__(max_images=0, **kwargs)

    def _sheet(self, rule):
        self.rule = rule
        self.cases = _sheet_names(self, rule)
        self.rows = sum(len(c) for c in self.cases)
        return super()._sheet(rule)


def test_without_a_threshold_the_sheet_lists_only_images_misranked_at_every_threshold(tmp_path):
    # normal 0.1, 0.7, 0.3 / anomalous 0.9, 0.2, 0.8: normals >= 0.2 (lowest anomalous) are misranked,
    # anomalies <= 0.7 (highest normal) too
    callback = _run_callback(tmp_path, _Recorder(worst_k=8))
    assert callback.rule.threshold is None and "misranked at every threshold" in " ".join(
        callback.rule.describe()
    )
    assert callback.cases == (["001", "004"], ["003"])
    with Image.open(tmp_path / "images" / SHEET_NAME) as sheet:
        assert sheet.height > 3 * MIN_PANEL_SIZE  # three rows
    # at 100 % AUROC (every anomaly above every normal) nothing is called an error
    perfect = _run_callback(
        tmp_path / "perfect", _Recorder(worst_k=8), scores=[[0.1, 0.3, 0.9], [0.8, 0.2, 0.7]]
    )
    assert perfect.cases == ([], []) and perfect.rows == 0
    with Image.open(tmp_path / "perfect" / "images" / SHEET_NAME) as sheet:
        assert sheet.height < MIN_PANEL_SIZE  # only the caption lines: no overlay rows
        assert (_luminance(np.asarray(sheet)) < 128).sum() > 100  # "no misranked images ..."
    assert perfect.rule.none_found().startswith("no misranked images")


def test_with_a_threshold_the_sheet_lists_exactly_its_false_positives_and_negatives(tmp_path):
    # threshold 0.5: false positives are normals >= 0.5 (0.7), false negatives anomalies < 0.5 (0.2)
    explicit = _run_callback(tmp_path / "explicit", _Recorder(worst_k=8, threshold=0.5))
    assert explicit.cases == (["001"], ["003"]) and explicit.rule.source == "the Visualizer's threshold"
    module = SimpleNamespace(decision_threshold=0.25)  # the module's label-free threshold (issue 16)
    from_module = _run_callback(tmp_path / "module", _Recorder(worst_k=8), module=module)
    assert from_module.cases == (["001", "004"], ["003"])  # normals 0.7, 0.3 >= 0.25; anomaly 0.2 < 0.25
    assert from_module.rule.source == "the module's decision_threshold"
    override = _run_callback(tmp_path / "override", _Recorder(worst_k=8, threshold=0.95), module=module)
    assert override.cases == ([], ["003", "005", "002"])  # the argument wins; lowest score first
    # worst_k keeps the worst: the highest-scored false positive, the lowest-scored false negative
    limited = _run_callback(tmp_path / "limited", _Recorder(worst_k=1, threshold=0.25))
    assert limited.cases == (["001"], ["003"])
    # a threshold that makes no error: no rows, the sheet says so
    perfect = [[0.1, 0.3, 0.9], [0.8, 0.2, 0.7]]
    clean = _run_callback(tmp_path / "clean", _Recorder(worst_k=8, threshold=0.5), scores=perfect)
    assert clean.cases == ([], []) and clean.rows == 0
    with Image.open(tmp_path / "clean" / "images" / SHEET_NAME) as sheet:
        assert sheet.height < MIN_PANEL_SIZE
    assert ErrorRule.from_scores(np.array([0.1, 0.9]), np.array([0, 1]), 0.5, "x").none_found() == (
        "no false positives or negatives at threshold 0.5"
    )


def test_titles_and_the_colour_bar_tick_follow_the_threshold(tmp_path, monkeypatch):
    seen = []

    def recording(*args, **kwargs):
        seen.append((args[3], kwargs["threshold"]))
        return render_overlay(*args, **kwargs)

    monkeypatch.setattr(visualizer, "render_overlay", recording)
    _run_callback(tmp_path / "maps", Visualizer(worst_k=0, threshold=0.5))
    assert (
        seen[1][0]
        == "widget/good/001.png  |  score 0.7 >= threshold 0.5: anomalous  |  truth: normal -> FALSE POSITIVE"
    )
    assert all(tick is None for _, tick in seen)  # random maps: the score is not on the map's scale
    seen.clear()
    _run_callback(tmp_path / "scores", Visualizer(worst_k=0, threshold=0.5), with_maps=False)
    assert all(tick == 0.5 for _, tick in seen)  # without maps the heat panel is the image score
    seen.clear()
    callback, trainer = Visualizer(worst_k=0, threshold=0.5), _trainer(tmp_path / "max")
    callback.on_test_start(trainer, None)
    maps = torch.rand(3, SIZE, SIZE)
    output = AnomalyOutput(pred_score=maps.flatten(1).max(dim=1).values, anomaly_map=maps)
    callback.on_test_batch_end(trainer, None, output, _batch([0, 1, 0], 0), 0)
    callback.on_test_end(trainer, None)
    assert [tick for _, tick in seen] == [0.5] * 3  # every score is its map's maximum (PatchKNN)


def test_worst_case_candidates_are_the_highest_normals_and_lowest_anomalies(tmp_path):
    callback = Visualizer(worst_k=2)
    trainer = _trainer(tmp_path)
    callback.on_test_start(trainer, None)
    batch = _batch([0, 0, 0, 1, 1, 1], start=0)
    output = AnomalyOutput(pred_score=torch.tensor([0.5, 0.9, 0.1, 0.2, 0.95, 0.3]))
    callback.on_test_batch_end(trainer, None, output, batch, 0)
    everything = ErrorRule(-np.inf, np.inf, None, "test")
    assert _sheet_names(callback, everything) == (["001", "000"], ["003", "005"])  # 0.9, 0.5 / 0.2, 0.3
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
    with pytest.raises(ValueError, match="threshold"):
        Visualizer(threshold=float("nan"))
    callback = Visualizer()
    trainer = _trainer(tmp_path)
    callback.on_test_start(trainer, None)
    with pytest.raises(ValueError, match="AnomalyOutput"):
        callback.on_test_batch_end(trainer, None, torch.zeros(3), _batch([0, 1, 0], 0), 0)
    with pytest.raises(ValueError, match="decision_threshold must be a finite number"):
        _run_callback(tmp_path / "nan", Visualizer(), module=SimpleNamespace(decision_threshold=float("nan")))
