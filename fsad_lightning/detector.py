"""A detector folder: one fitted few-shot detector that scores new images without the dataset.

``fsad export`` writes it; ``fsad predict --detector DIR`` and :meth:`Detector.load` read it::

    from fsad_lightning.detector import Detector

    detector = Detector.load("detector/")                  # CPU, or device="cuda"
    result = detector.predict(["part_001.png", "line/"])   # files, folders, PIL / numpy / tensor images
    for path, score, anomalous in zip(result.paths, result.scores, result.decisions):
        print(path, float(score), "ANOMALOUS" if anomalous else "ok")
    result.maps                                            # [N, H, W] anomaly maps (None: image scores only)

The folder (written into a temporary sibling folder and renamed into place, so it is whole or absent):

- ``detector.json``, the manifest: ``format`` / ``format_version`` (what a reader checks first), the
  fsad / torch / torchvision / lightning / Python versions that wrote it, the method class, its
  hyper-parameters, ``image_size``, ``resize_mode`` and ``category``, the threshold and how it was set
  (:class:`~fsad_lightning.thresholds.ThresholdRecord`), the shots' manifest (which files, seed,
  dataset version) and how the frozen weights are kept;
- ``config.yaml``: the same method and data settings as an fsad config (readable, re-runnable);
- ``state.pt``: the learned state (what a checkpoint holds: prompts, adapters, ...) and, when they take
  at most :data:`FROZEN_INLINE_BYTES`, the frozen weights too (random test backbones, EfficientNet-Lite0);
  larger frozen weights (CLIP, Stable Diffusion) are loaded from the source the hyper-parameters name,
  as for checkpoints, and checked against the SHA-256 fingerprint recorded at export (a different
  backbone is refused, it would give other scores);
- ``shots.pt``: the shots as the method saw them (``image_size`` float RGB, categories, relative paths);
- ``memory.pt``: the shot memory :meth:`~fsad_lightning.methods.base.FewShotAnomalyModule.shot_memory`
  returned after the export's ``fit_shots``.

Loading builds the method from its hyper-parameters, loads ``state.pt``, runs ``fit_shots`` on the
stored shots (state a method keeps outside buffers, such as WinCLIP's per-category references, is
rebuilt from them; One-to-Normal's generated pool is generated again, or read from its ``cache_dir``)
and puts ``memory.pt`` back, so the scores are those of the export. A folder that is not a detector, is
incomplete, or has another ``format_version`` is refused with one line.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from PIL import Image
from torch import Tensor

import fsad_lightning
from fsad_lightning.data.batch import (
    CATEGORY,
    CONTENT_BOX,
    DEFECT_TYPE,
    HAS_MASK,
    IMAGE,
    LABEL,
    MASK,
    MASK_PATH,
    ORIGINAL_SIZE,
    PATH,
)
from fsad_lightning.data.folder import (
    RESIZE_MODES,
    apply_resize_plan,
    check_resize_mode,
    list_image_files,
    parse_image_size,
    pil_to_rgb_tensor,
    plan_resize,
    read_image,
)
from fsad_lightning.io import atomic_torch_save, atomic_write_json, atomic_write_text
from fsad_lightning.methods.base import FewShotAnomalyModule, class_path
from fsad_lightning.thresholds import ThresholdRecord, decide, fixed_record

FORMAT = "fsad-detector"
#: the detector folder layout this fsad writes and reads; any other is refused
FORMAT_VERSION = 1
MANIFEST_NAME, CONFIG_NAME, STATE_NAME, SHOTS_NAME, MEMORY_NAME = (
    "detector.json", "config.yaml", "state.pt", "shots.pt", "memory.pt",
)
#: frozen weights up to this size are stored in the detector (larger ones are loaded from their source)
FROZEN_INLINE_BYTES = 64 * 2**20


class PreparedImages(NamedTuple):
    """What :meth:`Detector.preprocess` returns for ``N`` images, the arguments of :meth:`Detector.score`."""

    images: Tensor  #: ``[N, 3, H, W]`` float RGB at the detector's ``image_size``
    paths: list[str]  #: the file of each image (``<image i>`` for in-memory images)
    #: ``[N, 4]`` (top, left, height, width) of each image inside its padded input, ``None`` unless
    #: ``resize_mode`` is ``pad``: methods that score inside the content (PatchKNN) read it, as in ``fsad test``
    content_box: Tensor | None


@dataclass
class DetectorPrediction:
    """What :meth:`Detector.predict` returns for ``N`` images.

    ``paths``: the file of each image (``<image i>`` for in-memory images); ``scores``: float32 ``[N]``;
    ``decisions``: bool ``[N]``, True for anomalous (``None`` without a threshold); ``maps``: float32
    ``[N, H, W]`` at the detector's ``image_size``, or ``None`` for a method without maps;
    ``threshold``: the threshold the decisions used.
    """

    paths: list[str]
    scores: Tensor
    decisions: Tensor | None
    maps: Tensor | None
    threshold: float | None


def _tensor_bytes(tensor: Tensor) -> bytes:
    flat = tensor.detach().cpu().contiguous().reshape(-1)
    return flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b""


def fingerprint(state: dict[str, Tensor]) -> str:
    """SHA-256 over the names, dtypes, shapes and bytes of ``state`` (sorted by name)."""
    digest = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name]
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(_tensor_bytes(tensor))
    return digest.hexdigest()


def _versions() -> dict[str, str]:
    import lightning
    import torchvision

    return {
        "fsad": fsad_lightning.__version__,
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "lightning": lightning.__version__,
        "python": platform.python_version(),
    }


def _plain_hparams(module: FewShotAnomalyModule) -> dict[str, Any]:
    """The module's init arguments (LightningCLI's private ``_class_path`` etc. left out), JSON-plain."""
    hparams = {k: v for k, v in dict(module.hparams).items() if not k.startswith("_")}
    return json.loads(json.dumps(hparams, default=_json_default))


def _json_default(value: Any) -> Any:
    if isinstance(value, (tuple, set)):
        return list(value)
    if hasattr(value, "__dict__"):
        return vars(value)
    raise TypeError(f"hyper-parameter value {value!r} cannot be stored in a detector manifest")


def _module_device(module: FewShotAnomalyModule) -> torch.device:
    return next((t.device for t in module.state_dict().values()), torch.device("cpu"))


class Detector:
    """A fitted method with its shots, memory and decision threshold (see the module docstring).

    Build one with :meth:`from_datamodule` (what ``fsad export`` does) or :meth:`load`.
    """

    def __init__(
        self,
        module: FewShotAnomalyModule,
        shots: dict[str, Any],
        image_size: int | Sequence[int],
        category: str,
        manifest: dict[str, Any] | None = None,
        resize_mode: str = "stretch",
    ) -> None:
        self.module = module.eval()
        self.shots = shots
        height, width = parse_image_size(image_size, "detector image_size")
        #: a side for square images (as the detector manifest writes it), else ``[height, width]``
        self.image_size: int | list[int] = height if height == width else [height, width]
        #: how an image reaches ``image_size``, as in the data module (``stretch``, ``pad`` or ``crop``)
        self.resize_mode = check_resize_mode(resize_mode)
        self.category = str(category)
        self.manifest = dict(manifest or {})

    # ------------------------------------------------------------------ threshold
    @property
    def threshold(self) -> float | None:
        return self.module.decision_threshold

    @property
    def threshold_record(self) -> ThresholdRecord | None:
        return self.module.threshold_record

    def set_threshold(self, value: float) -> None:
        """Decide with the fixed ``value`` from now on (the record says so)."""
        record = fixed_record(value)
        self.module.decision_threshold, self.module.threshold_record = record.value, record

    # ------------------------------------------------------------------ building
    @classmethod
    def from_datamodule(cls, module: FewShotAnomalyModule, datamodule: Any, device: torch.device | str = "cpu") -> Detector:
        """Fit ``module`` on the datamodule's shots (fp32): threshold first (the label-free rule, or the
        module's fixed one), then the memory of all shots.

        Raises:
            ValueError: a trainable method without learned state, one fitted on other shots, or a
                label-free threshold from fewer than 2 shots (one line each).
        """
        categories = list(datamodule.categories)
        if len(categories) != 1:
            raise ValueError(
                f"a detector holds one category, but the data selects {categories}: set data.category"
            )
        manifest = datamodule.manifest
        module.check_fitted(manifest)
        module = module.to(device).eval()
        shots = datamodule.shot_batch()
        on_device = {k: v.to(device) if isinstance(v, Tensor) else v for k, v in shots.items()}
        augment = module.threshold_views_augment(datamodule)
        with torch.no_grad():
            module.calibrate_threshold(on_device, augment, int(getattr(datamodule, "seed", 0)), required=True)
            module.fit_shots(on_device)
        resize_mode = getattr(datamodule, "resize_mode", "stretch")
        return cls(module, shots, datamodule.image_size, categories[0], manifest, resize_mode)

    # ------------------------------------------------------------------ writing
    def save(self, folder: str | os.PathLike) -> Path:
        """Write the detector folder (module docstring) atomically; an existing detector there is
        replaced, any other non-empty folder refused. Returns the folder."""
        folder = Path(folder)
        if folder.exists() and not folder.is_dir():
            raise ValueError(f"detector output {folder} is a file: give a folder path")
        if folder.is_dir() and any(folder.iterdir()) and not (folder / MANIFEST_NAME).is_file():
            raise ValueError(
                f"detector output {folder} is a non-empty folder that holds no detector: choose a new or empty folder"
            )
        module = self.module
        learned_keys = module.learned_state_keys()
        state = {k: v.detach().cpu() for k, v in module.state_dict().items()}
        learned = {k: v for k, v in state.items() if k in learned_keys}
        frozen = {k: v for k, v in state.items() if k not in learned_keys}
        frozen_bytes = sum(v.numel() * v.element_size() for v in frozen.values())
        inline = frozen_bytes <= FROZEN_INLINE_BYTES
        record = self.threshold_record
        hparams = _plain_hparams(module)
        manifest = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "versions": _versions(),
            "method": class_path(type(module)),
            "method_name": getattr(module, "method_name", type(module).__name__),
            "learning_type": module.learning_type,
            "hyper_parameters": hparams,
            "image_size": self.image_size,
            "resize_mode": self.resize_mode,
            "category": self.category,
            "threshold": None if record is None else record.to_dict(),
            "shots_manifest": self.manifest,
            "frozen_weights": {
                "stored": inline,
                "bytes": int(frozen_bytes),
                "sha256": fingerprint(frozen),
            },
            "files": [MANIFEST_NAME, CONFIG_NAME, STATE_NAME, SHOTS_NAME, MEMORY_NAME],
        }
        config = {
            "model": {"class_path": class_path(type(module)), "init_args": hparams},
            "data": {"init_args": {"image_size": self.image_size, "resize_mode": self.resize_mode,
                                   "category": self.category}},
            "threshold": None if record is None else record.value,
        }
        shots = {
            IMAGE: self.shots[IMAGE].detach().float().cpu(),
            CATEGORY: [str(c) for c in self.shots[CATEGORY]],
            PATH: [str(p) for p in self.shots[PATH]],
        }
        parent = folder.absolute().parent
        parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".tmp", dir=parent))
        try:
            import yaml

            atomic_write_text(staging / CONFIG_NAME, yaml.safe_dump(config, sort_keys=False))
            atomic_torch_save(staging / STATE_NAME, {"learned": learned, "frozen": frozen if inline else {}})
            atomic_torch_save(staging / SHOTS_NAME, shots)
            atomic_torch_save(staging / MEMORY_NAME, module.shot_memory())
            atomic_write_json(staging / MANIFEST_NAME, manifest)  # last: a folder without it is no detector
            os.chmod(staging, 0o777 & ~_umask())
            _replace_folder(staging, folder)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        return folder

    # ------------------------------------------------------------------ reading
    @classmethod
    def load(cls, folder: str | os.PathLike, device: str | torch.device | None = None) -> Detector:
        """The detector written into ``folder``, on ``device`` (default: CUDA when available, else CPU).

        Raises:
            FileNotFoundError: no such folder.
            ValueError: not a detector folder, an incomplete or corrupt one, another format version, or
                one whose method / weights cannot be rebuilt here (one line naming the folder).
        """
        folder = Path(folder)
        manifest = read_detector_manifest(folder)
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        module = _build_module(folder, manifest)
        state = _load_torch(folder, STATE_NAME)
        frozen_info = manifest.get("frozen_weights") or {}
        weights = {**state.get("learned", {}), **state.get("frozen", {})}
        own = module.state_dict()
        unknown = sorted(set(weights) - set(own))
        if unknown:
            raise ValueError(
                f"detector {folder}: state {unknown[:3]} is not part of {type(module).__name__} as configured "
                "in its manifest (edited, or written by another version of the method?)"
            )
        module.load_state_dict(weights, strict=False)
        if not frozen_info.get("stored", False):
            learned_keys = module.learned_state_keys()
            frozen = {k: v for k, v in module.state_dict().items() if k not in learned_keys}
            if fingerprint(frozen) != frozen_info.get("sha256"):
                raise ValueError(
                    f"detector {folder}: the frozen weights loaded from their source (hyper-parameters "
                    f"{_weights_hint(manifest)}) differ from the export's (SHA-256 mismatch): install the same "
                    "weights, or export again"
                )
        module = module.to(device).eval()
        module.fit_manifest = manifest.get("shots_manifest")
        shots = _load_torch(folder, SHOTS_NAME)
        batch = _batch(shots[IMAGE], list(shots[PATH]), list(shots[CATEGORY]))
        with torch.no_grad():
            module.fit_shots({k: v.to(device) if isinstance(v, Tensor) else v for k, v in batch.items()})
        module.load_shot_memory(_load_torch(folder, MEMORY_NAME))
        record = manifest.get("threshold")
        if record is not None:
            threshold = ThresholdRecord.from_dict(record)
            module.decision_threshold, module.threshold_record = float(threshold.value), threshold
        resize_mode = manifest.get("resize_mode", "stretch")  # written since pad / crop detectors; before: stretch
        if resize_mode not in RESIZE_MODES:
            raise ValueError(
                f"detector {folder}: {MANIFEST_NAME} has resize_mode {resize_mode!r}, expected one of {RESIZE_MODES}"
            )
        return cls(module, batch, manifest["image_size"], str(manifest["category"]), manifest.get("shots_manifest"),
                   resize_mode)

    # ------------------------------------------------------------------ scoring
    def preprocess(self, items: Any) -> PreparedImages:
        """:class:`PreparedImages` (float RGB at ``image_size``, reached by ``resize_mode``: stretched, padded
        with the aspect ratio kept, or centre-cropped) from files, folders (every image inside, recursively),
        PIL images, numpy arrays (``H x W`` or ``H x W x 3``; uint8 or float in ``[0, 1]``) or tensors
        (``[3, H, W]`` / ``[N, 3, H, W]`` in ``[0, 1]``), alone or in a list."""
        images, paths, boxes = [], [], []
        for index, item in enumerate(_flatten(items)):
            if isinstance(item, (str, os.PathLike)):
                image, path = read_image(os.fspath(item)), os.path.abspath(os.fspath(item))
            else:
                image, path = _as_image(item), f"<image {index}>"
            plan = plan_resize((int(image.shape[-2]), int(image.shape[-1])), self.image_size, self.resize_mode)
            images.append(apply_resize_plan(image, plan))
            paths.append(path)
            boxes.append(plan.content)
        if not images:
            raise ValueError("Detector.predict got no image (an empty list, or folders holding no image file)")
        content_box = torch.tensor(boxes, dtype=torch.long) if self.resize_mode == "pad" else None
        return PreparedImages(torch.stack(images), paths, content_box)

    def score(self, images: Tensor, paths: Sequence[str], content_box: Tensor | None = None) -> DetectorPrediction:
        """Score a preprocessed batch (``[N, 3, H, W]``) in one forward pass (``content_box``: see
        :class:`PreparedImages`). The maps cover the whole ``H x W`` input, padding included."""
        module = self.module
        device = _module_device(module)
        batch = _batch(images.to(device), list(paths), [self.category] * len(paths))
        if content_box is not None:
            batch[CONTENT_BOX] = content_box.to(device)
        with torch.no_grad():
            output = module._score(batch).detach_cpu()
        threshold = self.threshold
        return DetectorPrediction(list(paths), output.pred_score, decide(output.pred_score, threshold), output.anomaly_map, threshold)

    def predict(self, images_or_paths: Any, batch_size: int = 16) -> DetectorPrediction:
        """Scores, decisions and maps of images given as in :meth:`preprocess`, ``batch_size`` at a time."""
        items = list(_flatten(images_or_paths))
        parts = []
        for start in range(0, max(len(items), 1), batch_size):
            parts.append(self.score(*self.preprocess(items[start : start + batch_size])))
        maps = None if any(p.maps is None for p in parts) else torch.cat([p.maps for p in parts])
        scores = torch.cat([p.scores for p in parts])
        return DetectorPrediction(
            [path for p in parts for path in p.paths], scores, decide(scores, self.threshold), maps, self.threshold
        )


# ---------------------------------------------------------------------------------------------- helpers
def read_detector_manifest(folder: Path) -> dict[str, Any]:
    """``detector.json`` of ``folder``, checked: a detector of :data:`FORMAT_VERSION` with every file."""
    if not folder.exists():
        raise FileNotFoundError(f"detector folder {folder} does not exist")
    if not folder.is_dir():
        raise ValueError(f"detector {folder} is a file: give the folder `fsad export` wrote")
    path = folder / MANIFEST_NAME
    if not path.is_file():
        raise ValueError(f"{folder} is not an fsad detector folder (no {MANIFEST_NAME}): write one with `fsad export`")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"detector {folder}: {MANIFEST_NAME} is not readable JSON ({err}): export it again") from err
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ValueError(f"{folder} is not an fsad detector folder ({MANIFEST_NAME} has no format {FORMAT!r})")
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        written_by = (manifest.get("versions") or {}).get("fsad", "an unknown fsad")
        raise ValueError(
            f"detector {folder} has format version {version!r} (written by fsad {written_by}); this fsad "
            f"{fsad_lightning.__version__} reads format version {FORMAT_VERSION} only: export it again with this fsad"
        )
    for key in ("method", "hyper_parameters", "image_size", "category"):
        if key not in manifest:
            raise ValueError(f"detector {folder}: {MANIFEST_NAME} lacks {key!r}: export it again")
    missing = [name for name in (STATE_NAME, SHOTS_NAME, MEMORY_NAME) if not (folder / name).is_file()]
    if missing:
        raise ValueError(f"detector {folder} is incomplete (no {', '.join(missing)}): export it again")
    return manifest


def _build_module(folder: Path, manifest: dict[str, Any]) -> FewShotAnomalyModule:
    import importlib

    module_name, _, name = str(manifest["method"]).rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError, ValueError) as err:
        raise ValueError(f"detector {folder}: method {manifest['method']!r} is not available in this fsad") from err
    if not (isinstance(cls, type) and issubclass(cls, FewShotAnomalyModule)):
        raise ValueError(f"detector {folder}: {manifest['method']!r} is not an fsad method")
    try:
        return cls(**manifest["hyper_parameters"])
    except TypeError as err:
        raise ValueError(
            f"detector {folder}: {cls.__name__} does not take the manifest's hyper-parameters ({err}): export it again"
        ) from err


def _load_torch(folder: Path, name: str) -> Any:
    path = folder / name
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 -- any unreadable file is the same user error
        raise ValueError(f"detector {folder}: {name} is truncated or corrupt ({type(err).__name__}): export it again") from err


def _weights_hint(manifest: dict[str, Any]) -> str:
    hparams = manifest.get("hyper_parameters") or {}
    named = {k: v for k, v in hparams.items() if any(w in k for w in ("weights", "backbone", "pretrained", "model_id"))}
    return ", ".join(f"{k}={v!r}" for k, v in named.items()) or "see detector.json"


def _batch(images: Tensor, paths: list[str], categories: list[str]) -> dict[str, Any]:
    """The batch contract for unlabelled images (``label`` -1, no mask)."""
    n, size = images.shape[0], tuple(images.shape[-2:])
    return {
        IMAGE: images,
        MASK: torch.zeros(n, 1, *size, device=images.device),
        LABEL: torch.full((n,), -1, dtype=torch.long),
        HAS_MASK: torch.zeros(n, dtype=torch.bool),
        PATH: paths,
        MASK_PATH: [""] * n,
        CATEGORY: categories,
        DEFECT_TYPE: [""] * n,
        ORIGINAL_SIZE: torch.tensor([size] * n, dtype=torch.long),
    }


def _flatten(items: Any) -> Iterable[Any]:
    """Single items and lists alike; a folder stands for the images under it; a 4-D tensor for its images."""
    if isinstance(items, (str, os.PathLike, Image.Image, np.ndarray)) or (isinstance(items, Tensor) and items.ndim == 3):
        items = [items]
    for item in items:
        if isinstance(item, Tensor) and item.ndim == 4:
            yield from item
        elif isinstance(item, (str, os.PathLike)) and os.path.isdir(item):
            root = os.fspath(item)
            yield from (os.path.join(root, name) for name in list_image_files(root, recursive=True))
        else:
            yield item


def _as_image(item: Any) -> Tensor:
    """An in-memory image as float ``[3, H, W]`` in ``[0, 1]``."""
    if isinstance(item, Image.Image):
        return pil_to_rgb_tensor(item)
    if isinstance(item, np.ndarray):
        array = item.astype(np.float32) / 255.0 if item.dtype == np.uint8 else item.astype(np.float32)
        tensor = torch.from_numpy(np.ascontiguousarray(array))
        if tensor.ndim == 2:
            tensor = tensor.unsqueeze(-1).expand(-1, -1, 3)
        if tensor.ndim != 3 or tensor.shape[-1] not in (1, 3):
            raise ValueError(f"a numpy image must be H x W or H x W x 3, got shape {item.shape}")
        return tensor.expand(-1, -1, 3).permute(2, 0, 1).clamp(0, 1).contiguous()
    if isinstance(item, Tensor):
        if item.ndim != 3 or item.shape[0] not in (1, 3):
            raise ValueError(f"a tensor image must be [3, H, W] in [0, 1], got shape {tuple(item.shape)}")
        return item.detach().float().cpu().expand(3, -1, -1)
    raise ValueError(f"cannot score {type(item).__name__}: give image paths, folders, PIL images, numpy arrays or tensors")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _replace_folder(staging: Path, folder: Path) -> None:
    """Move the complete ``staging`` folder onto ``folder``: a rename when ``folder`` is absent or empty;
    an old detector there is first renamed aside, then removed."""
    if folder.is_dir() and not any(folder.iterdir()):
        folder.rmdir()
    if not folder.exists():
        os.rename(staging, folder)
        return
    aside = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".old", dir=folder.absolute().parent))
    aside.rmdir()
    os.rename(folder, aside)
    try:
        os.rename(staging, folder)
    except BaseException:
        os.rename(aside, folder)
        raise
    shutil.rmtree(aside, ignore_errors=True)
