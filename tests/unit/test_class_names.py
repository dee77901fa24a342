"""One class-name map for every method that writes a category into a prompt."""

import pytest
import torch

from fsad_lightning.class_names import object_name
from fsad_lightning.methods.anomalysd.torch_model import resolve_prompts
from fsad_lightning.methods.promptad import PromptADModule
from fsad_lightning.methods.winclip import WinCLIPModule
from fsad_lightning.prompts import anomalysd_prompts

VISA = {
    "pcb1": "printed circuit board", "pcb2": "printed circuit board", "pcb3": "printed circuit board",
    "pcb4": "printed circuit board", "macaroni1": "macaroni", "macaroni2": "macaroni",
    "chewinggum": "chewing gum", "pipe_fryum": "pipe fryum", "capsules": "capsules", "candle": "candle",
    "cashew": "cashew", "fryum": "fryum",
}


@pytest.mark.parametrize("category,name", [*VISA.items(), ("metal_nut", "metal nut"), ("bottle", "bottle"),
                                           ("magnetic_tile", "magnetic tile"), ("3", "digit 3")])
def test_object_name_reads_dataset_folders_as_english(category, name):
    assert object_name(category) == name


def test_object_name_override_and_empty_name():
    assert object_name("pcb1", {"pcb1": "circuit board"}) == "circuit board"
    assert object_name("pcb2", {"pcb1": "circuit board"}) == "printed circuit board"
    with pytest.raises(ValueError, match="empty object name"):
        object_name(" _ ")


def test_every_method_names_visa_classes_from_the_one_map():
    winclip = WinCLIPModule(model_name="fsad-tiny-vit", pretrained=None, image_size=64,
                            templates=["a photo of a {}."])
    assert winclip.prompt_name("pcb3") == "printed circuit board"
    assert winclip.prompt_name("chewinggum") == "chewing gum"
    promptad = PromptADModule(model_name="fsad-tiny-vit", pretrained=None, image_size=64,
                              memory_layers=[1, 2], vv_layers=2)
    promptad.prepare_prompts({"image": torch.zeros(1, 3, 64, 64), "category": ["macaroni2"]})
    assert promptad.model.class_name == "macaroni"
    assert resolve_prompts("pcb4", "simple") == ["A photo of printed circuit board."]
    assert anomalysd_prompts("widget_part")[0] == "A perfect widget part."


def test_one_to_normal_and_adp_prompt_names_use_the_map():
    from fsad_lightning.methods.adp.module import ADPConceptModule
    from fsad_lightning.methods.one_to_normal.torch_model import OneToNormalModel

    # the methods' own prompt_name, called on stand-ins that carry only the class_name setting (building the
    # diffusion models for a name lookup would cost seconds)
    stub = type("Stub", (), {"class_name": None})()
    assert OneToNormalModel.prompt_name(stub, "pcb1") == "printed circuit board"
    adp = type("Stub", (), {"hparams": type("H", (), {"class_name": None})()})()
    assert ADPConceptModule.prompt_name(adp, "macaroni1") == "macaroni"
