"""The faster inference paths compute what the plain ones did (issue 15's speed goal)."""

import os
import subprocess
import sys

import pytest
import torch
from torch import nn

from fsad_lightning import allocator, scoring
from fsad_lightning.backbones import cnn


@pytest.mark.parametrize("columns", [64, 128, 320])
def test_first_min_index_is_the_first_row_minimum(columns):
    matrix = torch.randn(300, columns)
    matrix[:40] = matrix[:40].round()  # many ties inside and across blocks
    matrix[40:60, :] = 0.0  # a whole row tied: the first column
    matrix[60, [3, 70 % columns, columns - 1]] = -10.0
    assert torch.equal(scoring.first_min_index(matrix), matrix.min(dim=1).indices)


@pytest.mark.parametrize("bank_size", [1, 63, 65, 200])
def test_min_euclidean_distance_on_banks_off_the_block_size(bank_size):
    torch.manual_seed(bank_size)
    query, memory = torch.randn(37, 7, 12), torch.randn(bank_size, 12)
    expected = torch.cdist(query.reshape(-1, 12), memory).min(dim=1).values.reshape(37, 7)
    got = scoring.min_euclidean_distance(query, memory, chunk_size=50)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert scoring.min_euclidean_distance(memory, memory).abs().max() == 0.0


def test_min_euclidean_distance_keeps_the_gradient_of_the_distance():
    query = torch.randn(20, 5, requires_grad=True)
    memory = torch.randn(9, 5)
    scoring.min_euclidean_distance(query, memory).sum().backward()
    nearest = torch.cdist(query.detach(), memory).argmin(dim=1)
    expected = torch.nn.functional.normalize(query.detach() - memory[nearest], dim=1)
    torch.testing.assert_close(query.grad, expected)


@pytest.mark.parametrize("model_name", ["tf_efficientnet_lite0", "resnet18"])
def test_folded_backbone_matches_the_original(model_name):
    pyramid = cnn.CNNFeaturePyramid(model_name, stages=(2, 3), weights="random")
    with torch.no_grad():  # random weights, non-trivial BatchNorm statistics
        for module in pyramid.model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.normal_(0, 0.5)
                module.running_var.uniform_(0.5, 2.0)
                module.weight.normal_(1, 0.2)
                module.bias.normal_(0, 0.2)
    state_before = {k: v.clone() for k, v in pyramid.state_dict().items()}
    images = torch.rand(2, 3, 96, 80)
    unfolded = pyramid._run(pyramid.model, ((images - pyramid.mean) / pyramid.std))
    folded_model = pyramid.folded_model()
    assert folded_model is not pyramid.model
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded_model.modules())
    for got, expected in zip(pyramid(images), unfolded):
        torch.testing.assert_close(got, expected, atol=1e-4 * expected.abs().max().item(), rtol=1e-4)
    # the copy is private: state_dict keeps the BatchNorm tensors, unchanged
    assert pyramid.state_dict().keys() == state_before.keys()
    assert all(torch.equal(pyramid.state_dict()[k], v) for k, v in state_before.items())
    assert pyramid.folded_model() is folded_model  # cached while the weights stay


def test_folded_copy_follows_loaded_and_edited_weights():
    pyramid = cnn.CNNFeaturePyramid("resnet18", stages=(2,), weights="random")
    images = torch.rand(1, 3, 64, 64)
    first = pyramid.folded_model()
    state = {k: v.clone() for k, v in pyramid.state_dict().items()}
    state["model.bn1.running_mean"] += 3.0
    pyramid.load_state_dict(state)
    assert pyramid.folded_model() is not first
    expected = pyramid._run(pyramid.model, (images - pyramid.mean) / pyramid.std)[0]
    torch.testing.assert_close(pyramid(images)[0], expected, atol=1e-4, rtol=1e-4)
    second = pyramid.folded_model()
    with torch.no_grad():
        pyramid.model.conv1.weight.mul_(2.0)  # edited in place
    assert pyramid.folded_model() is not second


class _ConvUsedTwice(nn.Module):
    """The convolution's output feeds the BatchNorm and, unnormalised, the sum: folding would change it."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4).eval()
        with torch.no_grad():
            self.bn.running_mean.fill_(2.0)

    def forward(self, x):
        y = self.conv(x)
        return self.bn(y) + y


def test_folding_that_changes_outputs_is_refused():
    model = _ConvUsedTwice().eval()
    assert cnn.fold_batchnorm(model, torch.rand(1, 3, 8, 8)) is None
    plain = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).eval()
    folded = cnn.fold_batchnorm(plain, torch.rand(1, 3, 8, 8))
    assert folded is not None and isinstance(folded[1], nn.Sequential) and len(folded[1]) == 0


def test_building_the_folded_copy_leaves_the_random_stream_alone():
    pyramid = cnn.CNNFeaturePyramid("resnet18", stages=(2,), weights="random")
    torch.manual_seed(5)
    pyramid.folded_model()
    after = torch.rand(3)
    torch.manual_seed(5)
    torch.testing.assert_close(after, torch.rand(3))


def test_keep_freed_memory_respects_the_user(monkeypatch):
    monkeypatch.setenv(allocator.OPT_OUT_VARIABLE, "0")
    assert allocator.keep_freed_memory() is False
    monkeypatch.delenv(allocator.OPT_OUT_VARIABLE)
    monkeypatch.setenv("MALLOC_ARENA_MAX", "2")
    assert allocator.keep_freed_memory() is False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt")
def test_keep_freed_memory_stops_page_faults_on_repeated_large_blocks():
    # a fresh process: the setting is process-wide; a 64 MB block allocated and freed 20 times after 5
    script = (
        "import os, resource, sys, torch\n"
        "from fsad_lightning import allocator\n"
        "configured = allocator.keep_freed_memory() if sys.argv[1] == 'on' else False\n"
        "for _ in range(5): torch.ones(16 * 2**20)\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt\n"
        "for _ in range(20): torch.ones(16 * 2**20)\n"
        "print(configured, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != allocator.OPT_OUT_VARIABLE}
    results = {}
    for mode in ("off", "on"):
        out = subprocess.run([sys.executable, "-c", script, mode], capture_output=True, text=True, env=env, check=True)
        configured, faults = out.stdout.split()
        results[mode] = (configured == "True", int(faults))
    assert results["on"][0] is True, results
    assert results["off"][1] > 20 * 8000, results  # ~16k pages faulted in per fresh 64 MB block
    assert results["on"][1] < results["off"][1] / 4, results  # a few blocks at most, not one per allocation
