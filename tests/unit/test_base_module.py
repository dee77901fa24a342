"""Shared helpers of FewShotAnomalyModule."""

import lightning
import pytest
import torch

from fsad_lightning.methods.adp import ADPConceptModule
from fsad_lightning.methods.base import FewShotAnomalyModule


def test_single_category_names_the_categories_and_the_reason():
    module = FewShotAnomalyModule()
    assert module.single_category(["bottle", "bottle"], "the shots") == "bottle"
    with pytest.raises(ValueError, match=r"the shots holds categories \['bottle', 'cable'\]: .*one category"):
        module.single_category(["cable", "bottle"], "the shots")
    # a method says why it needs one category, without building it
    assert "concepts for one category" in ADPConceptModule.single_category_reason


@pytest.mark.parametrize(
    "precision,dtype",
    [("bf16-mixed", torch.bfloat16), ("bf16-true", torch.bfloat16), ("16-true", torch.float16),
     ("16-mixed", torch.bfloat16),  # Lightning runs 16-mixed as bf16-mixed on the CPU
     ("32-true", torch.float32), ("64-true", torch.float32)],
)
def test_compute_dtype_follows_the_trainer_precision(precision, dtype):
    module = FewShotAnomalyModule()
    assert module.compute_dtype == torch.float32  # no trainer yet
    module.trainer = lightning.Trainer(accelerator="cpu", precision=precision, logger=False)
    assert module.compute_dtype == dtype
