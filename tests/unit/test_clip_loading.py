"""load_clip: tiny twins by name, local checkpoints, and one-line errors for weights that are not there."""

import os

import open_clip
import pytest
import torch

from fsad_lightning.backbones.clip import PretrainedWeightsNotFoundError, load_clip
from fsad_lightning.backbones.tiny import TINY_CLIP_CONFIGS, register_tiny_clip


def test_tiny_configs_are_registered_idempotently():
    assert register_tiny_clip() == register_tiny_clip() == list(TINY_CLIP_CONFIGS)
    for name, config in TINY_CLIP_CONFIGS.items():
        assert name in open_clip.list_models()
        assert open_clip.get_model_config(name) == config


def test_local_checkpoint_round_trip(tmp_path):
    torch.manual_seed(0)
    first = load_clip("fsad-tiny-vit", pretrained=None)
    path = tmp_path / "tiny.pt"
    torch.save(first.model.state_dict(), path)
    second = load_clip("fsad-tiny-vit", pretrained=str(path))
    assert second.pretrained == str(path)
    images = torch.rand(1, 3, 64, 64)
    torch.testing.assert_close(
        first.encode_image(images).global_embedding, second.encode_image(images).global_embedding
    )
    torch.testing.assert_close(
        first.encode_text(["a photo of a widget."]), second.encode_text(["a photo of a widget."])
    )


def _assert_one_clear_line(message: str, *parts: str) -> None:
    assert "\n" not in message
    for part in parts:
        assert part in message, f"{part!r} missing from: {message}"


def test_tag_that_cannot_be_fetched_offline(tmp_path):
    assert os.environ.get("HF_HUB_OFFLINE") == "1"  # tests/conftest.py: no test touches the network
    with pytest.raises(PretrainedWeightsNotFoundError) as info:
        load_clip("ViT-B-16-plus-240", pretrained="laion400m_e31", cache_dir=str(tmp_path))
    assert isinstance(info.value, FileNotFoundError)
    _assert_one_clear_line(
        str(info.value), "ViT-B-16-plus-240", "laion400m_e31", "unreachable", "local checkpoint path"
    )
    assert info.value.__cause__ is None and info.value.__suppress_context__


def test_missing_checkpoint_path(tmp_path):
    missing = str(tmp_path / "weights" / "vit_b_16_plus_240.pt")
    with pytest.raises(FileNotFoundError) as info:
        load_clip("ViT-B-16-plus-240", pretrained=missing)
    _assert_one_clear_line(str(info.value), "ViT-B-16-plus-240", missing, "missing", "local checkpoint path")


def test_unknown_tag_model_and_precision():
    with pytest.raises(ValueError, match="laion400m_e31"):
        load_clip("ViT-B-16-plus-240", pretrained="laion9000")
    with pytest.raises(ValueError, match="unknown open_clip model 'ViT-Q-99'"):
        load_clip("ViT-Q-99", pretrained=None)
    with pytest.raises(ValueError, match="precision"):
        load_clip("fsad-tiny-vit", pretrained=None, precision="fp8")
    with pytest.raises(ValueError, match="architecture name"):
        load_clip("hf-hub:timm/vit_base_patch16_plus_clip_240.laion400m_e31", pretrained=None)


def test_checkpoint_of_another_architecture(tmp_path):
    path = tmp_path / "other.pt"
    torch.save({"visual.proj": torch.zeros(3, 3)}, path)
    with pytest.raises(ValueError, match="does not fit the open_clip model 'fsad-tiny-vit'") as info:
        load_clip("fsad-tiny-vit", pretrained=str(path))
    assert "\n" not in str(info.value)
