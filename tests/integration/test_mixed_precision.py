"""Under `bf16-mixed` the memory bank and the queries are encoded in one precision and scored in fp32:
a query identical to a shot scores 0 in the memory branch of PatchKNN, WinCLIP+ and PromptAD."""

import shutil
from pathlib import Path

import lightning
import pytest
import torch

from fsad_lightning.data import FewShotDataModule
from fsad_lightning.data.synthetic import write_synthetic_category
from fsad_lightning.methods.patchknn import PatchKNNModule
from fsad_lightning.methods.promptad import PromptADModule
from fsad_lightning.methods.winclip import WinCLIPModule
from fsad_lightning.methods.winclip import torch_model as winclip_torch_model

SIZE = 64


def assert_not_bf16_quantized(cosine_map):
    """``(1 - cos) / 2`` from a bf16 similarity lies on a grid of 2**-9 (bf16 keeps 8 bits below 1), and a
    mean of up to 4 or 6 such maps on a grid of 2**-9 / 12; distances computed in fp32 do not."""
    steps = cosine_map.double() * 2**9 * 12
    assert (steps - steps.round()).abs().max() > 0.01, "the cosine distances were computed in bf16"


@pytest.fixture(scope="module")
def shots_in_test_split(tmp_path_factory) -> Path:
    """A category whose test/good folder holds copies of its 3 train/good images (plus 2 defects)."""
    root = tmp_path_factory.mktemp("copies")
    category = write_synthetic_category(root, "widget", n_train=3, n_test_good=1, n_test_defect=1, size=SIZE)
    good = category / "test" / "good"
    shutil.rmtree(good)
    shutil.copytree(category / "train" / "good", good)
    return root


def _predict(module, root: Path, monkeypatch=None, wrap: tuple[object, str] | None = None):
    """Predict the whole test split (one batch) under bf16-mixed; with ``wrap = (owner, name)``, also record
    what ``owner.name`` returns (a memory-branch map), each call's rows being the batch's images.
    Returns ``(is_copy [N], scores [N], recorded maps)``."""
    recorded = []
    if wrap is not None:
        owner, name = wrap
        inner = getattr(owner, name)

        def recording(*args, **kwargs):
            out = inner(*args, **kwargs)
            recorded.append(out)
            return out

        monkeypatch.setattr(owner, name, recording)
    # a fixed decision threshold: no leave-one-out scoring of the shots, so only the test batch is recorded
    module.configure_threshold(1.0)
    datamodule = FewShotDataModule(root=str(root), category="widget", k_shot=3, image_size=SIZE, batch_size=64)
    trainer = lightning.Trainer(
        accelerator="cpu", precision="bf16-mixed", logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False,
    )
    (prediction,) = trainer.predict(module, datamodule=datamodule)
    shots = {Path(p).name for p in datamodule.manifest["files"]}
    is_copy = torch.tensor(["/good/" in p and Path(p).name in shots for p in prediction["path"]])
    assert int(is_copy.sum()) == 3
    return is_copy, prediction["pred_score"], recorded


def test_patchknn_scores_a_copy_of_a_shot_zero_under_bf16_mixed(shots_in_test_split):
    module = PatchKNNModule(backbone="resnet18", weights="random", sigma=1.0)
    is_copy, scores, _ = _predict(module, shots_in_test_split)
    assert scores.dtype == torch.float32
    assert scores[is_copy].abs().max() < 1e-6, scores
    assert scores[~is_copy].min() > 1e-3


def test_winclip_plus_memory_scores_a_copy_of_a_shot_zero_under_bf16_mixed(shots_in_test_split, monkeypatch):
    module = WinCLIPModule(model_name="fsad-tiny-vit", pretrained=None, image_size=SIZE,
                           templates=["a photo of a {}."])
    # the patch-level and every window-level association (eq. of WinCLIP+ §4.3) of the batch
    is_copy, scores, maps = _predict(module, shots_in_test_split, monkeypatch,
                                     wrap=(winclip_torch_model, "visual_association_score"))
    assert scores.dtype == torch.float32 and len(maps) >= 2
    for memory_map in maps:
        assert memory_map.dtype == torch.float32
        assert memory_map[is_copy].abs().max() < 1e-6
        assert memory_map[~is_copy].max() > 1e-3
        assert_not_bf16_quantized(memory_map[~is_copy])


def test_promptad_vision_memory_scores_a_copy_of_a_shot_zero_under_bf16_mixed(shots_in_test_split, monkeypatch):
    module = PromptADModule(model_name="fsad-tiny-vit", pretrained=None, image_size=SIZE, class_name="widget",
                            memory_layers=[1, 2], vv_layers=2)
    module.trained_epochs.fill_(1)  # the memory branch does not depend on the (untrained) prompts
    is_copy, scores, (memory_map,) = _predict(module, shots_in_test_split, monkeypatch,
                                              wrap=(module.model, "vision_guided_map"))
    assert scores.dtype == torch.float32 and memory_map.dtype == torch.float32
    assert memory_map[is_copy].abs().max() < 1e-6
    assert memory_map[~is_copy].max() > 1e-3
    assert_not_bf16_quantized(memory_map[~is_copy])
