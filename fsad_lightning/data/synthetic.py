"""A synthetic MVTec-layout category with drawn defects and exact masks, for tests and the offline demo.

Normal images are one family of smooth textures: oriented sinusoid stripes in a blue-grey palette with
mild Gaussian noise, the orientation, frequency and phase varying slightly from image to image. A defective
image is a normal image with one defect painted in a saturated red that no normal pixel takes: a line
(``scratch``) or a filled ellipse (``blob``). The defect region is drawn on the mask first and the image
pixels under the mask are then painted, so ``ground_truth/<defect>/<stem>_mask.png`` (255 inside) marks
exactly the painted pixels.

Everything is drawn from ``numpy.random.default_rng`` seeded per image from ``seed``, so a seed always
writes the same files.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

#: RGB of the painted defects (normal pixels never reach this red)
DEFECT_COLOR = (235, 35, 35)
#: defect names drawn as a line; ``blob`` and other names alternate (see :func:`defect_shape`)
LINE_DEFECTS = ("scratch", "crack", "cut", "line")
ELLIPSE_DEFECTS = ("blob", "hole", "stain", "spot")
WRITABLE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


def defect_shape(defect: str, position: int) -> str:
    """``"line"`` or ``"ellipse"``: by name (:data:`LINE_DEFECTS`, :data:`ELLIPSE_DEFECTS`), otherwise
    alternating with the defect's position in ``defects`` (even: line, odd: ellipse)."""
    if defect in LINE_DEFECTS:
        return "line"
    if defect in ELLIPSE_DEFECTS:
        return "ellipse"
    return "line" if position % 2 == 0 else "ellipse"


def normal_texture(size: int, rng: np.random.Generator) -> np.ndarray:
    """A normal image, uint8 ``[size, size, 3]``: oriented stripes plus mild noise.

    ``value = base + amplitude * sin(2 pi f (x cos t + y sin t) / size + phase) + noise`` per channel, with
    ``t`` = 30 deg +- 5 deg, ``f`` = 5 +- 0.5 cycles per image, a uniform phase and noise sigma 0.02;
    the red channel stays below 0.7, far from :data:`DEFECT_COLOR`.
    """
    theta = np.deg2rad(30.0 + rng.uniform(-5.0, 5.0))
    frequency = 5.0 + rng.uniform(-0.5, 0.5)
    phase = rng.uniform(0.0, 2.0 * np.pi)
    y, x = np.mgrid[0:size, 0:size].astype(np.float64)
    wave = np.sin(2.0 * np.pi * frequency * (x * np.cos(theta) + y * np.sin(theta)) / size + phase)
    base = np.array([0.40, 0.47, 0.58])
    amplitude = np.array([0.12, 0.14, 0.16])
    image = base + amplitude * wave[..., None] + rng.normal(0.0, 0.02, size=(size, size, 3))
    return (np.clip(image, 0.0, 1.0) * 255.0).round().astype(np.uint8)


def defect_mask(size: int, shape: str, rng: np.random.Generator) -> np.ndarray:
    """A non-empty binary defect region, uint8 ``[size, size]`` with 255 inside."""
    mask = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(mask)
    margin = max(2, size // 8)
    if shape == "line":
        x0, y0, x1, y1 = (int(v) for v in rng.integers(margin, size - margin, size=4))
        if abs(x1 - x0) + abs(y1 - y0) < size // 4:  # keep the scratch visible
            x1, y1 = size - 1 - x0, size - 1 - y0
        draw.line([(x0, y0), (x1, y1)], fill=255, width=max(2, size // 20))
    elif shape == "ellipse":
        cx, cy = (int(v) for v in rng.integers(size // 3, size - size // 3, size=2))
        rx, ry = (int(v) for v in rng.integers(max(2, size // 12), max(3, size // 5), size=2))
        draw.ellipse([cx - rx, cy - ry, cx + rx, cy + ry], fill=255)
    else:
        raise ValueError(f"defect shape must be 'line' or 'ellipse', got {shape!r}")
    array = np.asarray(mask).copy()
    if not array.any():  # cannot happen for the sizes above; keep the mask non-empty regardless
        array[size // 2, size // 2] = 255
    return array


def _save_image(array: np.ndarray, path: Path) -> None:
    image = Image.fromarray(array)
    if path.suffix.lower() in (".jpg", ".jpeg"):
        image.save(path, quality=95)
    else:
        image.save(path)


def write_synthetic_category(
    root: str | os.PathLike,
    category: str = "widget",
    n_train: int = 8,
    n_test_good: int = 4,
    n_test_defect: int = 4,
    size: int = 64,
    defects: Sequence[str] = ("scratch", "blob"),
    seed: int = 0,
    image_ext: str = ".png",
    with_masks: bool = True,
) -> Path:
    """Write an MVTec-layout category under ``root`` and return the category folder.

    Layout (stems ``000``, ``001``...)::

        <root>/<category>/train/good/<stem><image_ext>              n_train normal images
        <root>/<category>/test/good/<stem><image_ext>               n_test_good normal images
        <root>/<category>/test/<defect>/<stem><image_ext>           n_test_defect images per defect
        <root>/<category>/ground_truth/<defect>/<stem>_mask.png     exact masks (only with_masks)

    Args:
        root: where the category folder is created (existing files of the same names are overwritten).
        category: the category folder name.
        n_train, n_test_good: numbers of normal train / test images.
        n_test_defect: anomalous test images per defect type.
        size: image side in pixels (>= 16).
        defects: defect folder names; shapes by :func:`defect_shape`.
        seed: everything drawn depends on it only.
        image_ext: image file extension (masks are always PNG); ``.jpg`` makes the images lossy, so only
            the masks stay exact.
        with_masks: write ``ground_truth`` (False gives an image-only category).
    """
    if size < 16:
        raise ValueError(f"size must be >= 16 pixels, got {size}")
    for name, value in (("n_train", n_train), ("n_test_good", n_test_good), ("n_test_defect", n_test_defect)):
        if value < 0:
            raise ValueError(f"{name} must be >= 0, got {value}")
    if not image_ext.startswith("."):
        image_ext = "." + image_ext
    if image_ext.lower() not in WRITABLE_EXTENSIONS:
        raise ValueError(f"image_ext must be one of {WRITABLE_EXTENSIONS}, got {image_ext!r}")
    if len(set(defects)) != len(defects) or "good" in defects:
        raise ValueError(f"defects must be distinct names other than 'good', got {list(defects)}")

    category_dir = Path(root) / category
    groups: list[tuple[str, str, int]] = [("train", "good", n_train), ("test", "good", n_test_good)]
    groups += [("test", defect, n_test_defect) for defect in defects]
    for group_index, (split, folder, count) in enumerate(groups):
        out_dir = category_dir / split / folder
        out_dir.mkdir(parents=True, exist_ok=True)
        is_defect = folder != "good"
        if is_defect and with_masks:
            (category_dir / "ground_truth" / folder).mkdir(parents=True, exist_ok=True)
        for index in range(count):
            rng = np.random.default_rng([seed, group_index, index])
            image = normal_texture(size, rng)
            stem = f"{index:03d}"
            if is_defect:
                mask = defect_mask(size, defect_shape(folder, list(defects).index(folder)), rng)
                image[mask > 0] = DEFECT_COLOR
                if with_masks:
                    Image.fromarray(mask).save(category_dir / "ground_truth" / folder / f"{stem}_mask.png")
            _save_image(image, out_dir / f"{stem}{image_ext}")
    return category_dir
