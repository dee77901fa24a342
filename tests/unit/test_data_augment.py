"""Few-shot augmentation: image and mask stay aligned, a seed fixes the result, settings are validated."""

from __future__ import annotations

import pytest
import torch

from fsad_lightning.data.augment import AugmentConfig, FewShotAugment


def _paired(size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """An image whose red channel is 1 exactly where the mask is 1 (an off-centre, asymmetric L shape)."""
    mask = torch.zeros(1, 1, size, size)
    mask[..., 4:12, 5:9] = 1.0
    mask[..., 10:14, 5:20] = 1.0
    image = torch.zeros(1, 3, size, size)
    image[:, 0] = mask[:, 0]
    image[:, 2] = 0.3
    return image, mask


def test_geometric_augmentations_keep_image_and_mask_aligned():
    image, mask = _paired()
    exact = FewShotAugment(AugmentConfig(hflip=1.0, vflip=0.5, rot90=1.0, affine=0.0, color_jitter=0.0))
    warped = FewShotAugment(AugmentConfig(hflip=0.5, rot90=0.5, affine=1.0, degrees=15, color_jitter=0.0))
    for seed in range(4):
        out_image, out_mask = exact(image, mask, seed=seed)
        assert not torch.equal(out_mask, mask)  # the L shape always moves
        assert torch.equal((out_image[:, 0] > 0.5).float(), out_mask[:, 0])
        out_image, out_mask = warped(image, mask, seed=seed)
        agreement = ((out_image[:, 0] > 0.5).float() == out_mask[:, 0]).float().mean()
        assert agreement > 0.97  # bilinear image vs nearest mask differ at most along the edge
        assert set(out_mask.unique().tolist()) <= {0.0, 1.0}


def test_default_never_changes_the_orientation():
    """The default teaches no mirrored or rotated part as normal (MVTec's metal_nut "flip", transistor
    "misplaced"): the off-centre L shape keeps its place up to the small affine jitter, in every view."""
    image, mask = _paired()
    config = AugmentConfig()
    assert (config.hflip, config.vflip, config.rot90) == (0.0, 0.0, 0.0)
    assert config.affine > 0 and config.color_jitter > 0
    augment = FewShotAugment()

    def centroid(m):
        ys, xs = torch.nonzero(m[0, 0] > 0.5, as_tuple=True)
        return torch.stack([ys.float().mean(), xs.float().mean()])

    start = centroid(mask)
    changed = 0
    for seed in range(24):
        out_image, out_mask = augment(image, mask, seed=seed)
        assert float((centroid(out_mask) - start).abs().max()) < 3.0  # a flip moves it by ~13 px
        changed += not torch.equal(out_image, image)
    assert changed > 12


def test_same_seed_same_views_and_global_rng_untouched():
    image, mask = _paired()
    augment = FewShotAugment(AugmentConfig(hflip=0.5, vflip=0.5, rot90=0.5, affine=0.5))
    state = torch.random.get_rng_state()
    first = augment(image, mask, seed=5)
    assert torch.equal(torch.random.get_rng_state(), state)
    second = augment(image, mask, seed=5)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
    views = {tuple(augment(image, mask, seed=s)[1].flatten().tolist()) for s in range(8)}
    assert len(views) > 1


def test_colour_jitter_changes_the_image_only():
    image, mask = _paired()
    augment = FewShotAugment(
        AugmentConfig(hflip=0, vflip=0, rot90=0, affine=0, color_jitter=1.0, brightness=0.3, contrast=0.3)
    )
    out_image, out_mask = augment(image, mask, seed=0)
    assert torch.equal(out_mask, mask) and not torch.allclose(out_image, image)
    assert float(out_image.min()) >= 0.0 and float(out_image.max()) <= 1.0


def test_unbatched_input_and_missing_mask():
    image, _ = _paired()
    out_image, out_mask = FewShotAugment()(image[0], seed=1)
    assert out_image.shape == (3, 32, 32) and out_mask.shape == (1, 32, 32) and float(out_mask.sum()) == 0


def test_settings_are_validated():
    with pytest.raises(ValueError, match="augmentation probability hflip must be in"):
        AugmentConfig(hflip=1.5)
    with pytest.raises(ValueError, match=r"unknown augment_options key\(s\) \['rotate'\]"):
        AugmentConfig.from_dict({"rotate": 1.0})
    with pytest.raises(ValueError, match="padding_mode"):
        AugmentConfig(padding_mode="wrap")
    with pytest.raises(ValueError, match="mask of shape"):
        FewShotAugment()(torch.zeros(2, 3, 8, 8), torch.zeros(2, 1, 4, 4))
