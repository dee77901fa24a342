"""Image-file readers: the shared dataset base class and the MVTec-layout folder reader.

This module holds what every reader of fsad_lightning shares:

- :class:`ImageRecord`: one image of a split (where it is, its label, its mask);
- :func:`read_image` / :func:`read_mask`: decode a file to a float RGB tensor / a binary mask with an error
  that names the file;
- :class:`AnomalyDataset`: a ``torch.utils.data.Dataset`` over records that yields the per-image sample
  dicts of :mod:`fsad_lightning.data.batch` (resized image and mask, label, paths, original size and, for
  the test split, the ground-truth mask at source resolution);

and the reader for MVTec-style folders, :class:`FolderDataset` (MVTec AD, MPDD, BTAD, KSDD, MTD, BrainMRI,
HeadCT or any folder laid out the same way), plus :func:`extra_normal_records` for folders of extra normal
images (e.g. generated anomaly-free images).
"""

from __future__ import annotations

import copy
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps, UnidentifiedImageError
from torch import Tensor
from torch.utils.data import Dataset

from fsad_lightning.data.batch import (
    CATEGORY,
    CONTENT_BOX,
    DEFECT_TYPE,
    GT_MASK,
    HAS_MASK,
    IMAGE,
    LABEL,
    MASK,
    MASK_PATH,
    ORIGINAL_SIZE,
    PATH,
)
from fsad_lightning.validation import warn_once


def _pillow_extensions() -> tuple[str, ...]:
    """Every file extension Pillow can open (not only save), the common ones first."""
    Image.init()
    common = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
    readable = {ext.lower() for ext, fmt in Image.registered_extensions().items() if fmt in Image.OPEN}
    return common + tuple(sorted(readable - set(common)))


#: image file extensions the readers accept (compared case-insensitively): whatever Pillow can open
IMAGE_EXTENSIONS = _pillow_extensions()
#: defect type of normal images (MVTec's folder name)
GOOD = "good"

Split = Literal["train", "test"]
SPLITS = ("train", "test")


# ---------------------------------------------------------------------------------------------- records
@dataclass(frozen=True)
class ImageRecord:
    """One image of a split, before it is read.

    Attributes:
        path: the image file (absolute), or a ``dataset://split/index`` id for in-memory sets.
        relative_path: ``path`` relative to the dataset root with ``/`` separators: what the few-shot
            sampler sorts and the manifest stores, so neither depends on where the dataset lives.
        category: category (class) name.
        label: 0 normal, 1 anomalous.
        defect_type: ``"good"`` for normal images, otherwise the defect name.
        mask_path: the pixel ground-truth file, ``""`` when there is none (normal images, image-only sets).
        has_mask: whether a pixel ground truth exists for this image; normal images of a set with masks
            have one (all zeros).
    """

    path: str
    relative_path: str
    category: str
    label: int
    defect_type: str
    mask_path: str = ""
    has_mask: bool = False


def is_image_file(name: str) -> bool:
    """Whether ``name`` has one of :data:`IMAGE_EXTENSIONS` (any case) and is not a hidden file."""
    return not os.path.basename(name).startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)


def list_image_files(directory: str, recursive: bool = False) -> list[str]:
    """Sorted names of the image files inside ``directory`` (hidden and other files skipped).

    With ``recursive``, image files in sub-folders (hidden ones skipped) are listed too, as paths relative
    to ``directory`` with ``/`` separators. A symbolic link whose target is missing is an error
    (``FileNotFoundError`` saying "broken link"), not a silently skipped file.
    """
    found = []
    for dirpath, dirnames, filenames in os.walk(directory, followlinks=True):
        dirnames[:] = sorted(name for name in dirnames if not name.startswith("."))
        for name in filenames:
            path = os.path.join(dirpath, name)
            if not is_image_file(name):
                continue
            if os.path.islink(path) and not os.path.exists(path):
                raise FileNotFoundError(f"broken link {path} -> {os.readlink(path)}: the image it points to is missing")
            found.append(to_relative(path, directory))
        if not recursive:
            break
    return sorted(found)


def to_relative(path: str, root: str) -> str:
    """``path`` relative to ``root`` with ``/`` separators on every platform."""
    return os.path.relpath(path, root).replace(os.sep, "/")


def file_entries(paths: Iterable[str], root: str) -> list[tuple[str, int]]:
    """``(relative path, size in bytes)`` of files: the input of the manifest's dataset version."""
    return [(to_relative(path, root), os.path.getsize(path)) for path in paths]


# ---------------------------------------------------------------------------------------------- decoding
def pil_to_rgb_tensor(image: Image.Image) -> Tensor:
    """Convert a PIL image of any mode to a float ``[3, H, W]`` RGB tensor in ``[0, 1]``.

    - 8-bit modes (``L``, ``P``, ``RGB``, ``RGBA``, ``LA``, ``CMYK``, ``1``...) go through
      ``convert("RGB")``; an alpha channel is dropped (not composited).
    - 16-bit grayscale (``I;16*``) and 32-bit integer (``I``) images are divided by 65535 (the 16-bit range;
      ``I`` values above it are clipped).
    - float images (``F``) are taken as ``[0, 1]`` when their maximum is at most 1, else as ``[0, 255]``.

    Grayscale images are repeated over the three channels.
    """
    return _pil_to_tensor(image).expand(3, -1, -1).contiguous()


def _pil_to_tensor(image: Image.Image) -> Tensor:
    """:func:`pil_to_rgb_tensor` before the channel repeat: ``[1, H, W]`` for grayscale modes (``L``,
    ``I*``, ``F``), ``[3, H, W]`` otherwise; readers resize grayscale images on one channel (3x less work)."""
    if image.mode == "L":
        array = np.asarray(image).astype(np.float32) / 255.0
    elif image.mode.startswith("I"):
        array = np.asarray(image).astype(np.float32) / 65535.0
    elif image.mode == "F":
        array = np.asarray(image).astype(np.float32)
        if array.size and float(array.max()) > 1.0:
            array = array / 255.0
    else:
        array = np.asarray(image.convert("RGB")).astype(np.float32) / 255.0
    tensor = torch.from_numpy(np.ascontiguousarray(array)).clamp_(0.0, 1.0)
    return tensor.unsqueeze(0) if tensor.ndim == 2 else tensor.permute(2, 0, 1).contiguous()


def _open_image(path: str, what: str) -> Image.Image:
    """Open and fully decode ``path`` as it is shown: the EXIF orientation (camera JPEGs) is applied, so a
    mask drawn on the displayed image lines up. A missing file is a FileNotFoundError, a corrupt one a
    ValueError."""
    if os.path.islink(path) and not os.path.exists(path):
        raise FileNotFoundError(f"broken link {path} -> {os.readlink(path)}: the {what} it points to is missing")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} file not found: {path}")
    try:
        with Image.open(path) as handle:
            handle.load()
            return ImageOps.exif_transpose(handle)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise ValueError(f"cannot read {what} {path}: the file is corrupt or not an image ({err})") from err


def read_image(path: str) -> Tensor:
    """Read an image file as float ``[3, H, W]`` RGB in ``[0, 1]`` (see :func:`pil_to_rgb_tensor`)."""
    return pil_to_rgb_tensor(_open_image(path, "image"))


#: images with a side below this many pixels earn a one-line warning (a thumbnail or a broken export)
TINY_IMAGE_SIDE = 16
#: a mask covering more than this fraction of its image is probably inverted (warned about once per file)
MOSTLY_FOREGROUND = 0.5


def read_mask(path: str) -> Tensor:
    """Read a ground-truth mask as uint8 ``[H, W]`` in ``{0, 1}``.

    A pixel is anomalous when it is at least half the value range (128 of 255, 32768 of 65535), as MVTec's
    0 / 255 masks intend; a lossy (JPEG) mask's ringing around the edges stays normal. Label masks whose
    largest value is 1 (0 / 1 PNGs) count every non-zero pixel. Colour masks take the brightest channel (an
    alpha channel is ignored); palette masks are converted to grayscale first. A mask whose anomalous area
    exceeds :data:`MOSTLY_FOREGROUND` of the image earns a one-line warning (it is probably inverted).
    """
    image = _open_image(path, "mask")
    if image.mode in ("RGBA", "LA", "PA", "P"):
        image = image.convert("RGB" if image.mode == "RGBA" else "L")
    array = np.asarray(image)
    if array.ndim == 3:
        array = array.max(axis=2)
    if array.dtype == bool or (array.size and array.max() <= 1):
        binary = array > 0
    else:
        full_range = 65535 if image.mode.startswith("I") else 255
        binary = array >= (full_range + 1) / 2
    if binary.size and binary.mean() > MOSTLY_FOREGROUND:
        warn_once(
            f"mask {path} marks {binary.mean():.0%} of its image as anomalous: is it inverted? "
            "(anomalous pixels must be white)"
        )
    return torch.from_numpy(np.ascontiguousarray(binary).astype(np.uint8))


#: how a source image is brought to ``image_size`` (see :func:`plan_resize`)
RESIZE_MODES = ("stretch", "pad", "crop")
ResizeMode = Literal["stretch", "pad", "crop"]


def parse_image_size(value: Any, field: str = "image_size") -> tuple[int, int]:
    """``(height, width)`` from an int (a square side) or an ``[H, W]`` pair of positive integers."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 1:
        return value, value
    if (
        isinstance(value, (list, tuple))
        and len(value) == 2
        and all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in value)
    ):
        return int(value[0]), int(value[1])
    raise ValueError(f"{field} must be a positive integer or a [height, width] pair of them, got {value!r}")


def check_resize_mode(mode: str) -> str:
    if mode not in RESIZE_MODES:
        raise ValueError(f"resize_mode must be one of {RESIZE_MODES}, got {mode!r}")
    return mode


@dataclass(frozen=True)
class ResizePlan:
    """How one source image of ``H0 x W0`` becomes a ``height x width`` tensor.

    ``crop``: the source box ``(top, left, height, width)`` that is kept (the whole image unless the mode
    is ``crop``). ``content``: where the resized box lands in the output, ``(top, left, height, width)``
    (the whole output unless the mode is ``pad``); outside it the image is 0 and the mask normal.
    """

    size: tuple[int, int]
    crop: tuple[int, int, int, int]
    content: tuple[int, int, int, int]


def plan_resize(source: tuple[int, int], size: int | Sequence[int], mode: str = "stretch") -> ResizePlan:
    """The :class:`ResizePlan` of a ``source`` ``(H0, W0)`` image for output ``size`` and ``mode``.

    - ``stretch``: the whole image resized to ``size`` (the aspect ratio changes unless it matches);
    - ``pad``: resized to fit inside ``size`` with its aspect ratio kept (for a square ``N``: the long side
      to ``N``), centred, the rest zero-padded;
    - ``crop``: the centred largest source box with the aspect ratio of ``size`` (for a square ``N``: the
      short side to ``N``) resized to ``size``; image and ground truth are cropped alike.
    """
    height, width = parse_image_size(size)
    h0, w0 = int(source[0]), int(source[1])
    full_source = (0, 0, h0, w0)
    full_output = (0, 0, height, width)
    check_resize_mode(mode)
    if mode == "stretch":
        return ResizePlan((height, width), full_source, full_output)
    if mode == "pad":
        scale = min(height / h0, width / w0)
        ch = min(height, max(1, round(h0 * scale)))
        cw = min(width, max(1, round(w0 * scale)))
        return ResizePlan((height, width), full_source, ((height - ch) // 2, (width - cw) // 2, ch, cw))
    # crop: keep the source box whose aspect ratio is the output's
    if h0 * width > w0 * height:  # source taller than the output: crop rows
        ch, cw = max(1, round(w0 * height / width)), w0
    else:
        ch, cw = h0, max(1, round(h0 * width / height))
    return ResizePlan((height, width), ((h0 - ch) // 2, (w0 - cw) // 2, ch, cw), full_output)


def _crop(tensor: Tensor, box: tuple[int, int, int, int]) -> Tensor:
    top, left, h, w = box
    return tensor[..., top : top + h, left : left + w]


def _place(tensor: Tensor, plan: ResizePlan) -> Tensor:
    """``tensor`` (already at the content size) zero-padded into the plan's output."""
    top, left, h, w = plan.content
    height, width = plan.size
    if (h, w) == (height, width):
        return tensor
    return F.pad(tensor, (left, width - w - left, top, height - h - top))


def resize_image(image: Tensor, size: int | Sequence[int], mode: str = "stretch") -> Tensor:
    """Bilinear (antialiased) resize of ``[C, H, W]`` to ``size`` (side or ``[H, W]``) by ``mode``
    (:func:`plan_resize`), clamped to ``[0, 1]``."""
    return apply_resize_plan(image, plan_resize(tuple(image.shape[-2:]), size, mode))


def apply_resize_plan(image: Tensor, plan: ResizePlan) -> Tensor:
    """:func:`resize_image` by a :class:`ResizePlan` already made for this image's size."""
    image = _crop(image, plan.crop)
    target = plan.content[2:]
    if tuple(image.shape[-2:]) != tuple(target):
        image = F.interpolate(
            image[None].float(), size=target, mode="bilinear", align_corners=False, antialias=True
        )[0].clamp_(0.0, 1.0)
    return _place(image.float(), plan)


def apply_mask_plan(mask: Tensor, plan: ResizePlan) -> Tensor:
    """Nearest-neighbour resize of an ``[H, W]`` mask to float ``[1, *plan.size]`` by the
    :class:`ResizePlan` of its image, matching :func:`apply_resize_plan` (``nearest-exact``: pixel centres
    aligned like the bilinear image resize)."""
    out = F.interpolate(_crop(mask, plan.crop)[None, None].float(), size=plan.content[2:], mode="nearest-exact")
    return _place(out[0], plan)


# ---------------------------------------------------------------------------------------------- base class
class AnomalyDataset(Dataset):
    """A split of an anomaly-detection set: records in, per-image sample dicts out.

    Subclasses find their records (and may override :meth:`load_image` / :meth:`load_mask` for sets that
    are not image files); this class decodes, resizes and packs them into the keys of
    :mod:`fsad_lightning.data.batch`. Errors about a file (missing, corrupt, mask size differing from its
    image) are raised when the sample is loaded and name the file.

    Args:
        records: the images of the split, in the order the dataset yields them.
        image_size: side of the square ``image`` / ``mask`` tensors, or their ``[height, width]``.
        split: ``"train"`` (no ``gt_mask``) or ``"test"`` (adds ``gt_mask`` at source resolution).
        root: the dataset root the records' relative paths refer to.
        category: the category this split belongs to.
        resize_mode: ``stretch``, ``pad`` or ``crop`` (:func:`plan_resize`); also a plain attribute that
            the datamodule sets on every reader it makes. With ``crop`` the ``gt_mask`` is the kept source
            box (still at source resolution); with ``pad`` samples carry ``content_box``, the placement of
            the image in the padded tensor, so maps are un-padded before evaluation.
    """

    #: the ``dataset`` value of the datamodule that selects this reader
    format_name: ClassVar[str] = ""

    def __init__(
        self,
        records: Sequence[ImageRecord],
        image_size: int | Sequence[int],
        split: Split,
        root: str = "",
        category: str = "",
        resize_mode: ResizeMode = "stretch",
    ) -> None:
        super().__init__()
        check_split(split)
        parse_image_size(image_size)
        self.records = list(records)
        self.image_size = image_size
        self.resize_mode = check_resize_mode(resize_mode)
        self.split = split
        self.root = root
        self.category = category

    # -------------------------------------------------------------- what subclasses may override
    def load_image(self, record: ImageRecord) -> Tensor:
        """The source image of ``record`` as float ``[3, H0, W0]`` in ``[0, 1]`` (``[1, H0, W0]`` for a
        grayscale file: it is repeated over three channels after the resize)."""
        return _pil_to_tensor(_open_image(record.path, "image"))

    def load_mask(self, record: ImageRecord) -> Tensor | None:
        """The source-resolution mask (uint8 ``[H0, W0]`` in ``{0, 1}``); ``None`` without a mask file."""
        return read_mask(record.mask_path) if record.mask_path else None

    def version_entries(self) -> list[tuple[str, int]]:
        """``(relative path, size)`` of every file of this category (both splits) for the dataset version."""
        raise NotImplementedError(f"{type(self).__name__} does not describe its files")

    def describe_pool(self) -> str:
        """Where the normal train images come from, for error messages (e.g. ``k_shot`` too large)."""
        return f"the train split of category {self.category!r} in {self.root}"

    # -------------------------------------------------------------- the Dataset protocol
    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict[str, Any]:
        record = self.records[index]
        image = self.load_image(record)
        height, width = int(image.shape[-2]), int(image.shape[-1])
        if min(height, width) < TINY_IMAGE_SIDE:
            warn_once(f"image {record.path} is only {width}x{height} pixels: is it the right file?")
        gt_mask = self.load_mask(record)
        no_mask = gt_mask is None
        if no_mask:
            gt_mask = torch.zeros(height, width, dtype=torch.uint8)
        elif tuple(gt_mask.shape) != (height, width):
            raise ValueError(
                f"mask {record.mask_path} is {gt_mask.shape[1]}x{gt_mask.shape[0]} (WxH) but its image "
                f"{record.path} is {width}x{height}: a mask must have the size of its image"
            )
        plan = plan_resize((height, width), self.image_size, self.resize_mode)
        resized = apply_resize_plan(image, plan)
        # an image without a mask file (normal, image-only set) needs no resize of its zero mask
        mask = torch.zeros(1, *plan.size) if no_mask else apply_mask_plan(gt_mask, plan)
        if self.resize_mode == "crop":  # the ground truth keeps only what the image keeps
            gt_mask = _crop(gt_mask, plan.crop)
        sample: dict[str, Any] = {
            IMAGE: resized.expand(3, -1, -1).contiguous() if resized.shape[0] == 1 else resized,
            MASK: mask,
            LABEL: torch.tensor(record.label, dtype=torch.long),
            HAS_MASK: torch.tensor(record.has_mask, dtype=torch.bool),
            PATH: record.path,
            MASK_PATH: record.mask_path,
            CATEGORY: record.category,
            DEFECT_TYPE: record.defect_type,
            ORIGINAL_SIZE: torch.tensor([height, width], dtype=torch.long),
        }
        if self.resize_mode == "pad":
            sample[CONTENT_BOX] = torch.tensor(plan.content, dtype=torch.long)
        if self.split == "test":
            sample[GT_MASK] = gt_mask.contiguous()
        return sample

    # -------------------------------------------------------------- helpers
    @property
    def labels(self) -> list[int]:
        """The image labels of the split, in order."""
        return [record.label for record in self.records]

    @property
    def relative_paths(self) -> list[str]:
        """The records' relative paths, in order (what the few-shot sampler draws from)."""
        return [record.relative_path for record in self.records]

    def select(self, relative_paths: Sequence[str]) -> AnomalyDataset:
        """A copy of this dataset holding only ``relative_paths``, in that order (the drawn shots)."""
        by_path = {record.relative_path: record for record in self.records}
        missing = [path for path in relative_paths if path not in by_path]
        if missing:
            raise ValueError(
                f"{len(missing)} selected file(s) are not in the {self.split} split of {self.root!r}, "
                f"e.g. {missing[0]!r}"
            )
        subset = copy.copy(self)
        subset.records = [by_path[path] for path in relative_paths]
        return subset

    def with_split(self, split: Split) -> AnomalyDataset:
        """A copy that yields samples of ``split``'s kind (``test`` adds ``gt_mask``) for the same records."""
        check_split(split)
        other = copy.copy(self)
        other.split = split
        return other


def _case_hint(parent: str, expected: str) -> str:
    """``"; found 'Good': rename it to 'good'"`` when ``parent`` holds ``expected`` in another case."""
    if not os.path.isdir(parent):
        return ""
    near = [entry.name for entry in os.scandir(parent) if entry.name.lower() == expected and entry.name != expected]
    return f"; found {near[0]!r}: rename it to {expected!r}" if near else ""


def check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")


def check_root(root: str, what: str = "dataset root") -> str:
    """The absolute ``root``; FileNotFoundError when it is not a directory."""
    if not root or not os.path.isdir(root):
        raise FileNotFoundError(f"{what} does not exist or is not a directory: {root!r}")
    return os.path.abspath(root)


def unknown_category_error(category: str, available: Sequence[str], root: str) -> ValueError:
    shown = ", ".join(available) if available else "none"
    return ValueError(f"category {category!r} not found under {root}; available categories: {shown}")


# ---------------------------------------------------------------------------------------------- MVTec layout
class FolderDataset(AnomalyDataset):
    """MVTec-layout reader: MVTec AD, MPDD, BTAD, KSDD, MTD, BrainMRI, HeadCT or any folder laid out as::

        <root>/<category>/train/good/*                      normal images (the k-shot pool)
        <root>/<category>/test/good/*                       normal test images
        <root>/<category>/test/<defect>/*                   anomalous test images, one folder per defect
        <root>/<category>/ground_truth/<defect>/<mask>      pixel masks (optional, see below)

    Images: any of :data:`IMAGE_EXTENSIONS` in any case; grayscale, palette, RGBA and 16-bit images are
    converted to RGB (:func:`pil_to_rgb_tensor`); hidden files and other files are skipped.

    Masks: a category *has masks* when its ``ground_truth`` folder exists; then every anomalous test image
    must have a mask (FileNotFoundError naming the expected path otherwise), and normal images get all-zero
    masks with ``has_mask`` True. Without a ``ground_truth`` folder the category is image-only
    (``has_mask`` False, all-zero masks). For the image ``test/<defect>/<stem>.<ext>`` the reader accepts,
    in this order, ``ground_truth/<defect>/<stem>_mask.<e>`` (MVTec AD, MPDD, MTD) and
    ``ground_truth/<defect>/<stem>.<e>`` (BTAD), where ``<e>`` is any image extension, ``.png`` first.
    Masks are binarised at > 0.

    Args:
        root: folder holding the category folders.
        category: the category folder name.
        split: ``"train"`` (``train/good``) or ``"test"`` (every folder under ``test``).
        image_size: side length of the square resized image and mask.
    """

    format_name: ClassVar[str] = "folder"

    def __init__(self, root: str, category: str, split: Split = "test", image_size: int = 256) -> None:
        root = check_root(root)
        check_split(split)
        category_dir = os.path.join(root, category)
        if not category or not os.path.isdir(category_dir):
            raise unknown_category_error(category, self.available_categories(root), root)
        self.category_dir = category_dir
        self.has_masks = os.path.isdir(os.path.join(category_dir, "ground_truth"))
        records = (
            self._train_records(root, category) if split == "train" else self._test_records(root, category)
        )
        super().__init__(records, image_size=image_size, split=split, root=root, category=category)

    # -------------------------------------------------------------- discovery
    @staticmethod
    def available_categories(root: str) -> list[str]:
        """Sorted names of the folders under ``root`` that hold a ``train`` or ``test`` folder."""
        root = check_root(root)
        return sorted(
            entry.name
            for entry in os.scandir(root)
            if entry.is_dir()
            and not entry.name.startswith(".")
            and (
                os.path.isdir(os.path.join(entry.path, "train"))
                or os.path.isdir(os.path.join(entry.path, "test"))
            )
        )

    def _train_records(self, root: str, category: str) -> list[ImageRecord]:
        good_dir = os.path.join(self.category_dir, "train", GOOD)
        if not os.path.isdir(good_dir):
            hint = _case_hint(os.path.join(self.category_dir, "train"), GOOD)
            raise FileNotFoundError(
                f"normal training folder not found: {good_dir} (expected <root>/<category>/train/good/){hint}"
            )
        return [
            ImageRecord(
                path=os.path.join(good_dir, name),
                relative_path=to_relative(os.path.join(good_dir, name), root),
                category=category,
                label=0,
                defect_type=GOOD,
                has_mask=self.has_masks,
            )
            for name in list_image_files(good_dir, recursive=True)
        ]

    def _test_records(self, root: str, category: str) -> list[ImageRecord]:
        test_dir = os.path.join(self.category_dir, "test")
        if not os.path.isdir(test_dir):
            raise FileNotFoundError(
                f"test folder not found: {test_dir} (expected <root>/<category>/test/<defect>/)"
            )
        records: list[ImageRecord] = []
        missing: list[str] = []
        defects = sorted(
            entry.name for entry in os.scandir(test_dir) if entry.is_dir() and not entry.name.startswith(".")
        )
        for defect in defects:
            if defect.lower() == GOOD and defect != GOOD:
                raise ValueError(
                    f"test folder {os.path.join(test_dir, defect)}: the normal test images must be in "
                    f"test/{GOOD} (lower case), or they would count as a defect type {defect!r}"
                )
        for defect in defects:
            defect_dir = os.path.join(test_dir, defect)
            label = 0 if defect == GOOD else 1
            mask_lookup = self._mask_lookup(defect) if (label == 1 and self.has_masks) else {}
            used_masks: set[str] = set()
            for name in list_image_files(defect_dir, recursive=True):
                mask_path = ""
                if label == 1 and self.has_masks:
                    mask_path = self._find_mask(mask_lookup, name)
                    used_masks.add(mask_path)
                    if not mask_path:
                        stem = os.path.splitext(name)[0]
                        missing.append(
                            os.path.join(self.category_dir, "ground_truth", defect, f"{stem}_mask.png")
                        )
                path = os.path.join(defect_dir, name)
                records.append(
                    ImageRecord(
                        path=path,
                        relative_path=to_relative(path, root),
                        category=category,
                        label=label,
                        defect_type=defect,
                        mask_path=mask_path,
                        has_mask=self.has_masks,
                    )
                )
            orphans = sorted(set(mask_lookup.values()) - used_masks)
            if orphans:
                warn_once(
                    f"{len(orphans)} mask(s) under ground_truth/{defect} of category {category!r} have no image "
                    f"in test/{defect}, e.g. {orphans[0]}"
                )
        if missing:
            raise FileNotFoundError(
                f"missing mask {missing[0]} for an anomalous test image of category {category!r} "
                f"({len(missing)} anomalous image(s) lack a mask; the ground_truth folder exists, so every "
                "anomalous image needs <stem>_mask.<ext> or <stem>.<ext> under ground_truth/<defect>/)"
            )
        return records

    def _mask_lookup(self, defect: str) -> dict[str, str]:
        """Lower-cased path (relative to the defect's mask folder, sub-folders included) -> path of the mask
        files of one defect folder (empty when it is missing)."""
        mask_dir = os.path.join(self.category_dir, "ground_truth", defect)
        if not os.path.isdir(mask_dir):
            return {}
        return {name.lower(): os.path.join(mask_dir, name) for name in list_image_files(mask_dir, recursive=True)}

    @staticmethod
    def _find_mask(lookup: dict[str, str], image_name: str) -> str:
        """The mask of ``image_name`` (a path relative to its defect folder) in ``lookup`` (accepted names:
        class docstring; for an image in a sub-folder, the same sub-folder under ground_truth/<defect>/
        first, then the defect folder itself), or ``""``."""
        stem = os.path.splitext(image_name)[0].lower()
        candidates = [stem] if "/" not in stem else [stem, stem.rsplit("/", 1)[1]]
        for base in candidates:
            for suffix in ("_mask", ""):
                for ext in IMAGE_EXTENSIONS:
                    found = lookup.get(f"{base}{suffix}{ext}")
                    if found:
                        return found
        return ""

    def describe_pool(self) -> str:
        return os.path.join(self.category_dir, "train", GOOD)

    def version_entries(self) -> list[tuple[str, int]]:
        """Every file under the category's ``train``, ``test`` and ``ground_truth`` folders."""
        paths = []
        for part in ("train", "test", "ground_truth"):
            for dirpath, _dirnames, filenames in os.walk(os.path.join(self.category_dir, part)):
                paths.extend(os.path.join(dirpath, name) for name in filenames if not name.startswith("."))
        return file_entries(paths, self.root)


# ---------------------------------------------------------------------------------------------- extra normals
def extra_normal_records(directory: str, category: str) -> list[ImageRecord]:
    """Normal-image records for the image files directly inside ``directory`` (sorted by name).

    Used for ``extra_normal_dirs`` (e.g. generated anomaly-free images): label 0, defect type ``good``,
    no mask. ``relative_path`` is the file path itself, since these folders have no dataset root.
    """
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"extra normal folder does not exist: {directory!r}")
    names = list_image_files(directory)
    if not names:
        raise ValueError(
            f"extra normal folder {directory} holds no image files ({', '.join(IMAGE_EXTENSIONS)})"
        )
    return [
        ImageRecord(
            path=os.path.join(directory, name),
            relative_path=os.path.join(directory, name),
            category=category,
            label=0,
            defect_type=GOOD,
        )
        for name in names
    ]
