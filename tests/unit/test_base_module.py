"""Shared helpers of FewShotAnomalyModule."""

import pytest

from fsad_lightning.methods.adp import ADPConceptModule
from fsad_lightning.methods.base import FewShotAnomalyModule


def test_single_category_names_the_categories_and_the_reason():
    module = FewShotAnomalyModule()
    assert module.single_category(["bottle", "bottle"], "the shots") == "bottle"
    with pytest.raises(ValueError, match=r"the shots holds categories \['bottle', 'cable'\]: .*one category"):
        module.single_category(["cable", "bottle"], "the shots")
    # a method says why it needs one category, without building it
    assert "concepts for one category" in ADPConceptModule.single_category_reason
