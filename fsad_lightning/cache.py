"""On-disk cache of generated image pools (anomaly-free normals, DreamBooth class images).

A pool is identified by what determines its pixels: the base model, the few-shot manifest (which
shots a customized model was fitted on), the prompts, the seed, and any further settings a caller
adds (``extra``: strength, steps, resolution, ...). Their hash names the pool's folder::

    <cache_dir>/<key>/
        pool.json          written last, atomically: the key fields and the ordered image list
        images/000000.png  one PNG per image, each written atomically

A pool is complete once ``pool.json`` lists at least the requested number of images; a complete pool
is reused, never regenerated. Image ``i`` must depend only on ``(seed, i)`` -- :func:`image_seed`
gives the seed to use -- so a killed generation resumes where it stopped and yields the same pool as
an uninterrupted one. Every file goes through :mod:`fsad_lightning.io`, so a kill leaves complete
images and at worst a hidden ``.*.tmp`` file (never a ``*.png``), which the next run removes.

Any method takes a pool as extra normals through the datamodule's ``extra_normal_dirs`` with
``<cache_dir>/<key>/images``.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from fsad_lightning.io import atomic_write, atomic_write_json

POOL_MARKER = "pool.json"
IMAGE_DIR = "images"
#: manifest fields that decide which shots a model saw; other fields (timestamps, run folders) do not
MANIFEST_KEY_FIELDS = (
    "dataset",
    "root",
    "dataset_version",
    "category",
    "k_shot",
    "seed",
    "files",
    "extra_normals",
)
KEY_LENGTH = 20
#: environment variable that moves the default cache root
CACHE_ENV = "FSAD_CACHE_DIR"


def default_cache_dir() -> Path:
    """``$FSAD_CACHE_DIR`` when set, else ``~/.cache/fsad_lightning``."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "fsad_lightning").expanduser()


def manifest_identity(manifest: Mapping[str, Any] | None) -> dict[str, Any]:
    """The part of a few-shot manifest that a generated pool depends on (``{}`` for none)."""
    if manifest is None:
        return {}
    if not isinstance(manifest, Mapping):
        raise ValueError(
            f"manifest must be a mapping (the datamodule's manifest), got {type(manifest).__name__}"
        )
    return {field: manifest[field] for field in MANIFEST_KEY_FIELDS if field in manifest}


def pool_key(
    base_model: str,
    manifest: Mapping[str, Any] | None,
    prompts: Sequence[str],
    seed: int,
    extra: Mapping[str, Any] | None = None,
) -> str:
    """Hash of ``(base model, manifest, prompts, seed, extra)`` naming a pool's folder."""
    payload = {
        "base_model": str(base_model),
        "manifest": manifest_identity(manifest),
        "prompts": [str(p) for p in prompts],
        "seed": int(seed),
        "extra": dict(extra or {}),
    }
    blob = json.dumps(payload, sort_keys=True, default=str).encode("utf-8")
    return hashlib.sha256(blob).hexdigest()[:KEY_LENGTH]


def image_seed(seed: int, index: int) -> int:
    """The random seed of image ``index`` of a pool generated with ``seed`` (independent of batching)."""
    return (int(seed) * 1_000_003 + int(index)) % (2**63 - 1)


def quantize_images(images: Tensor) -> Tensor:
    """Round images in ``[0, 1]`` to 8-bit levels, exactly what a PNG round trip gives."""
    return images.detach().float().clamp(0, 1).mul(255).round().div(255)


def save_image_atomically(image: Tensor, path: str | os.PathLike) -> Path:
    """Write one ``[3, H, W]`` image in ``[0, 1]`` as an 8-bit PNG, atomically."""
    if image.ndim != 3 or image.shape[0] != 3:
        raise ValueError(f"expected an RGB image [3, H, W], got shape {tuple(image.shape)}")
    array = image.detach().float().clamp(0, 1).mul(255).round().byte().permute(1, 2, 0).cpu().numpy()

    def write(tmp: str) -> None:
        with open(tmp, "wb") as handle:
            Image.fromarray(array, mode="RGB").save(handle, format="PNG")
            handle.flush()
            os.fsync(handle.fileno())

    return atomic_write(path, write)


def load_image(path: str | os.PathLike, size: int | tuple[int, int] | None = None) -> Tensor:
    """Read an image file as ``[3, H, W]`` float in ``[0, 1]``, optionally resized (bilinear)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"pool image {path} does not exist")
    with Image.open(path) as handle:
        rgb = handle.convert("RGB")
        if size is not None:
            h, w = (size, size) if isinstance(size, int) else size
            rgb = rgb.resize((w, h), Image.BILINEAR)
        array = np.asarray(rgb, dtype=np.float32) / 255.0
    return torch.from_numpy(array.copy()).permute(2, 0, 1)


class ImagePoolCache:
    """One generated pool in a cache folder (see the module docstring).

    Args:
        cache_dir: the cache root; pools live in ``<cache_dir>/<key>``.
        base_model: id or path of the generator's base weights.
        manifest: the few-shot manifest the generator was fitted on (``None`` for a base model).
        prompts: the prompts the images are generated with.
        seed: the pool's seed.
        extra: further settings that change the pixels (strength, steps, resolution, fine-tuning).
    """

    def __init__(
        self,
        cache_dir: str | os.PathLike,
        base_model: str,
        manifest: Mapping[str, Any] | None,
        prompts: Sequence[str],
        seed: int,
        extra: Mapping[str, Any] | None = None,
    ) -> None:
        self.cache_dir = Path(cache_dir)
        self.base_model = str(base_model)
        self.manifest = manifest_identity(manifest)
        self.prompts = [str(p) for p in prompts]
        self.seed = int(seed)
        self.extra = dict(extra or {})
        self.key = pool_key(self.base_model, self.manifest, self.prompts, self.seed, self.extra)

    @property
    def folder(self) -> Path:
        return self.cache_dir / self.key

    @property
    def image_dir(self) -> Path:
        """The folder to give a datamodule as an extra normal dir."""
        return self.folder / IMAGE_DIR

    @property
    def marker(self) -> Path:
        return self.folder / POOL_MARKER

    def image_path(self, index: int) -> Path:
        return self.image_dir / f"{index:06d}.png"

    def read_marker(self) -> dict[str, Any] | None:
        """The pool's ``pool.json``, or ``None`` while the pool was never completed."""
        if not self.marker.is_file():
            return None
        try:
            return json.loads(self.marker.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise ValueError(
                f"pool marker {self.marker} is not valid JSON ({err}): delete the folder"
            ) from err

    def image_paths(self, count: int | None = None) -> list[Path] | None:
        """The first ``count`` images (all when ``None``) of a complete pool, or ``None`` if the pool
        is missing or holds fewer than ``count`` images."""
        marker = self.read_marker()
        if marker is None:
            return None
        names = marker.get("images", [])
        if count is not None and len(names) < count:
            return None
        paths = [self.image_dir / name for name in names[: len(names) if count is None else count]]
        missing = [p for p in paths if not p.is_file()]
        if missing:
            raise FileNotFoundError(
                f"pool {self.folder} lists {missing[0].name} but the file is gone: delete the folder"
            )
        return paths

    def is_complete(self, count: int | None = None) -> bool:
        return self.image_paths(count) is not None

    def load_images(self, count: int | None = None, size: int | tuple[int, int] | None = None) -> Tensor:
        """The pool's images as ``[N, 3, H, W]`` in ``[0, 1]``."""
        paths = self.image_paths(count)
        if paths is None:
            raise FileNotFoundError(
                f"no complete pool of {count if count is not None else 'any'} images in {self.folder}: "
                "generate it first (`fsad generate --config ...`)"
            )
        if not paths:
            raise ValueError(f"pool {self.folder} is empty")
        return torch.stack([load_image(p, size) for p in paths])

    def _remove_stale_temporaries(self) -> None:
        if self.image_dir.is_dir():
            for stale in self.image_dir.glob(".*.tmp"):
                stale.unlink(missing_ok=True)

    def generate(
        self,
        count: int,
        make_images: Callable[[list[int]], Tensor],
        batch_size: int = 8,
        on_batch: Callable[[int, int], None] | None = None,
    ) -> list[Path]:
        """Make sure the pool holds ``count`` images and return their paths.

        A complete pool of at least ``count`` images is returned as is. Otherwise the images not yet
        on disk are made in batches by ``make_images(indices) -> [len(indices), 3, H, W]`` (in
        ``[0, 1]``; image ``i`` seeded by :func:`image_seed`), each written atomically, and
        ``pool.json`` is written last. ``on_batch(done, count)`` reports progress.
        """
        if count < 1:
            raise ValueError(f"a pool needs at least one image, got count={count}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        existing = self.image_paths(count)
        if existing is not None:
            return existing
        self.image_dir.mkdir(parents=True, exist_ok=True)
        self._remove_stale_temporaries()
        todo = [i for i in range(count) if not self.image_path(i).is_file()]
        for start in range(0, len(todo), batch_size):
            indices = todo[start : start + batch_size]
            images = make_images(indices)
            if images.ndim != 4 or images.shape[0] != len(indices):
                raise RuntimeError(
                    f"make_images returned shape {tuple(images.shape)} for {len(indices)} indices, "
                    "expected [N, 3, H, W]"
                )
            for index, image in zip(indices, images):
                save_image_atomically(image, self.image_path(index))
            if on_batch is not None:
                on_batch(count - len(todo) + start + len(indices), count)
        names = [self.image_path(i).name for i in range(count)]
        atomic_write_json(
            self.marker,
            {
                "key": self.key,
                "base_model": self.base_model,
                "manifest": self.manifest,
                "prompts": self.prompts,
                "seed": self.seed,
                "extra": self.extra,
                "count": count,
                "images": names,
            },
        )
        return [self.image_dir / name for name in names]


def generate_pool_images(
    count: int,
    make_images: Callable[[list[int]], Tensor],
    batch_size: int = 8,
    cache: ImagePoolCache | None = None,
) -> Tensor:
    """The ``count`` images of a pool as ``[count, 3, H, W]`` in ``[0, 1]``: through ``cache`` when given
    (reused, resumable, on disk), else made in memory. In-memory images are rounded to 8-bit levels like
    the cached PNGs, so a run gives the same pixels with and without a cache."""
    if cache is not None:
        cache.generate(count, make_images, batch_size)
        return cache.load_images(count)
    if count < 1:
        raise ValueError(f"a pool needs at least one image, got count={count}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    batches = [make_images(list(range(s, min(s + batch_size, count)))) for s in range(0, count, batch_size)]
    return quantize_images(torch.cat(batches)).cpu()
