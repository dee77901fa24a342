import torch

from fsad_lightning.methods.patchknn import PatchKNNModel


def test_patchknn_scores_a_foreign_patch_higher_and_normals_near_zero():
    torch.manual_seed(0)
    model = PatchKNNModel("resnet18", stages=(2, 3), weights="random", sigma=1.0, chunk_size=64)
    normals = torch.rand(3, 3, 64, 64) * 0.1 + 0.45
    model.fit(normals)
    assert model.memory_bank.shape == (3 * 8 * 8, 128 + 256)
    query = normals[:1].clone()
    query[:, :, 8:24, 8:24] = 1.0  # a bright defect in the top-left
    scores, maps = model(torch.cat([normals[:1], query]))
    assert maps.shape == (2, 64, 64)
    assert scores[0] < 1e-2 < scores[1]
    top_left, bottom_right = maps[1, :32, :32].mean(), maps[1, 32:, 32:].mean()
    assert top_left > bottom_right


def test_patchknn_needs_fit_first():
    model = PatchKNNModel("resnet18", weights="random")
    try:
        model(torch.rand(1, 3, 32, 32))
    except RuntimeError as err:
        assert "fit()" in str(err)
    else:
        raise AssertionError("an unfitted model must refuse to score")
