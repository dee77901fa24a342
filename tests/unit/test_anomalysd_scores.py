"""AnomalySD scoring: eq. 18-21 fusion, the LPIPS-AlexNet distance (eq. 10, 16-17) and the §4.1 prompts."""

import importlib.util
import warnings

import pytest
import torch

from fsad_lightning.backbones.cnn import WeightsUnavailableError
from fsad_lightning.backbones.perceptual import ALEXNET_SLICES, PerceptualDistance, _lpips_linear_weights
from fsad_lightning.methods.anomalysd.masks import multiscale_masks
from fsad_lightning.methods.anomalysd.torch_model import (
    accumulate_scale_maps,
    fuse_scores,
    multiscale_score,
    resolve_prompts,
)
from fsad_lightning.prompts import ANOMALYSD_FINE_PROMPTS, anomalysd_prompts

MVTEC = ["bottle", "cable", "capsule", "carpet", "grid", "hazelnut", "leather", "metal_nut", "pill", "screw",
         "tile", "toothbrush", "transistor", "wood", "zipper"]
VISA = ["candle", "capsules", "cashew", "chewinggum", "fryum", "macaroni1", "macaroni2", "pcb1", "pcb2", "pcb3",
        "pcb4", "pipe_fryum"]


# ---------------------------------------------------------------------------------------- eq. 18-21
def test_scale_maps_sum_each_proposal_inside_its_own_mask():
    masks, scale_index = multiscale_masks(16, 16, [1, 2, 4])
    # every proposal's distance map is constant, equal to the proposal's number: S^(k) shows which cell
    # of scale k covers each pixel, and nothing leaks from a neighbouring cell
    distances = torch.arange(masks.shape[0], dtype=torch.float32).view(-1, 1, 1).expand(-1, 16, 16)
    queries = torch.zeros(masks.shape[0], dtype=torch.long)
    scale_maps = accumulate_scale_maps(torch.zeros(1, 3, 16, 16), queries, scale_index, masks[:, 0] * distances)
    assert torch.equal(scale_maps[0, 0], torch.zeros(16, 16))  # k = 1: proposal 0
    assert scale_maps[0, 1, 0, 0] == 1 and scale_maps[0, 1, 15, 15] == 4  # k = 2: proposals 1..4, row-major
    assert scale_maps[0, 2, 0, 0] == 5 and scale_maps[0, 2, 15, 15] == 20
    assert torch.equal(scale_maps[0, 2, :4, :4], torch.full((4, 4), 5.0))


def test_harmonic_fusion_over_scales_handles_zeros():
    scale_maps = torch.tensor([[[[1.0, 0.0]], [[4.0, 2.0]], [[4.0, 3.0]]]])  # [B=1, K=3, 1, 2]
    s_ms = multiscale_score(scale_maps)
    assert torch.isfinite(s_ms).all()
    assert s_ms[0, 0, 0] == pytest.approx(3 / (1 + 0.25 + 0.25))  # |K| (sum 1 / S^(k))^-1
    assert s_ms[0, 0, 1] == 0.0  # a zero at any scale: the limit of the harmonic mean, no inf / NaN
    assert torch.equal(multiscale_score(torch.zeros(2, 4, 3, 3)), torch.zeros(2, 3, 3))


def test_fusion_weights_the_prototype_map_by_alpha():
    s_ms, s_pg = torch.full((1, 2, 2), 2.0), torch.full((1, 2, 2), 12.0)
    assert torch.allclose(fuse_scores(s_ms, s_pg, 0.1), torch.full((1, 2, 2), 0.9 * 2.0 + 0.1 * 12.0))
    assert fuse_scores(s_ms, None, 0.1) is s_ms and fuse_scores(None, s_pg, 0.1) is s_pg
    with pytest.raises(ValueError, match="at least one"):
        fuse_scores(None, None, 0.1)


# ---------------------------------------------------------------------------------------- eq. 10, 16-17
def test_perceptual_distance_is_zero_for_equal_images_and_differentiable():
    perceptual = PerceptualDistance("random")
    x = torch.rand(2, 3, 48, 48, generator=torch.Generator().manual_seed(0))
    y = torch.rand(2, 3, 48, 48, generator=torch.Generator().manual_seed(1))
    assert torch.equal(perceptual.distance_map(x, x), torch.zeros(2, 48, 48))
    distance = perceptual.distance_map(y, x, size=(24, 24))
    assert distance.shape == (2, 24, 24) and (distance > 0).all()
    reused = perceptual.distance_map(y, size=(24, 24), reference_features=perceptual.features(x))
    assert torch.equal(reused, distance)
    y.requires_grad_(True)
    perceptual(y, x).sum().backward()
    assert y.grad is not None and y.grad.abs().sum() > 0
    assert not any(p.requires_grad for p in perceptual.parameters())
    with pytest.raises(ValueError, match="at least 32"):
        perceptual.features(torch.rand(1, 3, 16, 16))


@pytest.mark.skipif(importlib.util.find_spec("lpips") is None, reason="the lpips package is not installed")
def test_perceptual_distance_matches_the_lpips_package():
    import lpips

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = lpips.LPIPS(net="alex", pretrained=True, pnet_rand=True, verbose=False)  # random AlexNet
    ours = PerceptualDistance("random")
    state = {f"linear{i}": w for i, w in enumerate(_lpips_linear_weights())}
    slices = [reference.net.slice1, reference.net.slice2, reference.net.slice3, reference.net.slice4,
              reference.net.slice5]
    for index, (block, (first, _)) in enumerate(zip(slices, ALEXNET_SLICES)):
        for key, value in block.state_dict().items():
            layer, leaf = key.split(".", 1)
            state[f"slices.{index}.{int(layer) - first}.{leaf}"] = value
    ours.load_state_dict(state)
    x = torch.rand(3, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    y = torch.rand(3, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = reference(y * 2 - 1, x * 2 - 1).flatten()  # lpips takes images in [-1, 1]
    assert torch.allclose(ours(y, x), expected, rtol=1e-4, atol=1e-6)


def test_perceptual_weights_load_from_a_saved_file_and_fail_in_one_line(tmp_path, monkeypatch):
    torch.manual_seed(4)
    original = PerceptualDistance("random")
    path = original.save_weights(tmp_path / "perceptual.safetensors")
    loaded = PerceptualDistance(str(path))
    x, y = torch.rand(1, 3, 32, 32), torch.rand(1, 3, 32, 32)
    assert torch.equal(loaded(x, y), original(x, y))
    with pytest.raises(WeightsUnavailableError, match="no such file"):
        PerceptualDistance(str(tmp_path / "missing.pth"))

    def offline(*args, **kwargs):
        raise OSError("no network")

    monkeypatch.setattr("torchvision.models.AlexNet_Weights.get_state_dict", offline)
    with pytest.raises(WeightsUnavailableError, match="alexnet-owt") as error:
        PerceptualDistance("lpips")
    assert "\n" not in str(error.value)


# ---------------------------------------------------------------------------------------- §4.1 prompts
@pytest.mark.parametrize("category", MVTEC + VISA)
def test_every_mvtec_and_visa_class_has_a_hierarchical_prompt_set(category):
    prompts = anomalysd_prompts(category)
    assert category in ANOMALYSD_FINE_PROMPTS
    assert prompts[0].startswith("A perfect ") and prompts[0].endswith(".")  # T_c^1
    assert len(prompts) >= 3 and len(set(prompts)) == len(prompts)  # + the fine-grained T_c^2
    assert "{}" not in " ".join(prompts)


def test_prompt_modes_custom_prompts_and_class_names():
    assert anomalysd_prompts("metal_nut")[0] == "A perfect metal nut."
    assert anomalysd_prompts("pcb3")[0] == "A perfect printed circuit board."
    generic = anomalysd_prompts("gizmo")
    assert generic[0] == "A perfect gizmo." and len(generic) >= 3 and all("gizmo" in p for p in generic)
    assert resolve_prompts("bottle", "simple") == ["A photo of bottle."]
    assert resolve_prompts("bottle", "none") == [""]
    own = {"bottle": ["A flawless glass bottle.", "A bottle with a clean rim."]}
    assert resolve_prompts("bottle", "hierarchical", own) == own["bottle"]
    assert resolve_prompts("cable", "hierarchical", own) == anomalysd_prompts("cable")
    named = resolve_prompts("mono", "hierarchical", class_names={"mono": "solar cell"})
    assert named[0] == "A perfect solar cell." and all("solar cell" in p for p in named)
    with pytest.raises(ValueError, match="prompt_mode"):
        resolve_prompts("bottle", "fancy")
    with pytest.raises(ValueError, match="non-empty"):
        resolve_prompts("bottle", "hierarchical", {"bottle": []})
