"""AnomalySD's default prompts (§4.1) name no defect: neither a test-set defect type of MVTec AD or VisA, nor
its stem, nor its negation, nor a generic defect word.

The paper's argument against WinCLIP (§1, §5.2) is that AnomalySD needs no words describing anomalies: its
prompts describe the normal object. A prompt such as "a hazelnut without holes" or "an uncracked tile" puts
the test split's defect vocabulary into the condition; this test keeps every built-in prompt (the per-class
fine-grained ones, the generic ones, the coarse and the simple prompt) free of it.

The lists used:

- MVTec AD (Bergmann et al., CVPR 2019): the official ``test/`` defect folder names of all 15 categories.
- VisA (Zou et al., ECCV 2022): VisA has no defect folders; its split CSV labels each anomalous image with
  free text. The per-class anomaly types below are those labels as reproduced in public prompt code that
  lists them per class (``visa_anomaly_detail``), plus the wording variants the VisA paper uses (e.g.
  "wax melded out of the candle", "foreign particals on candle", "fryum stuck together").

Every name is split into words. A word that names *what is wrong* (crack, scratch, broken, missing, ...) is
forbidden with every inflection (checked as a word start, so "cracks", "scratched", "breakage" match) and
with a negating prefix ("un-", "non-", "in-": "uncracked", "unbent", "unbroken"). A word that only names
*where* the defect sits or a qualifier (head, neck, teeth, lead, case, wire, cable, insulation, fabric,
wax, wick, corner, edge, small, large, ...) is ordinary vocabulary for describing the normal object and is
allowed; :data:`LOCATION_WORDS` lists them. Negations ("no", "not", "without", "-free", "free of") and
words that only assert the absence of a defect ("intact", "undamaged", "correct", "complete", "whole",
"clean", "the right way up", ...) are forbidden outright, as are generic defect words (defect, damage, flaw, stain, ...).
The object's own name (``[c]``, from :mod:`fsad_lightning.class_names`) is removed before the check: "A
perfect printed circuit board." names the object, not the "print" defect of hazelnut.
"""

from __future__ import annotations

import re

import pytest

from fsad_lightning.class_names import object_name
from fsad_lightning.methods.anomalysd.torch_model import resolve_prompts
from fsad_lightning.prompts import (
    ANOMALYSD_COARSE_PROMPT,
    ANOMALYSD_FINE_PROMPTS,
    ANOMALYSD_GENERIC_FINE_PROMPTS,
    ANOMALYSD_SIMPLE_PROMPT,
    anomalysd_prompts,
)

#: MVTec AD: the defect folder names of every category's test split ("good" is the normal folder)
MVTEC_DEFECT_FOLDERS: dict[str, tuple[str, ...]] = {
    "bottle": ("broken_large", "broken_small", "contamination"),
    "cable": ("bent_wire", "cable_swap", "combined", "cut_inner_insulation", "cut_outer_insulation",
              "missing_cable", "missing_wire", "poke_insulation"),
    "capsule": ("crack", "faulty_imprint", "poke", "scratch", "squeeze"),
    "carpet": ("color", "cut", "hole", "metal_contamination", "thread"),
    "grid": ("bent", "broken", "glue", "metal_contamination", "thread"),
    "hazelnut": ("crack", "cut", "hole", "print"),
    "leather": ("color", "cut", "fold", "glue", "poke"),
    "metal_nut": ("bent", "color", "flip", "scratch"),
    "pill": ("color", "combined", "contamination", "crack", "faulty_imprint", "pill_type", "scratch"),
    "screw": ("manipulated_front", "scratch_head", "scratch_neck", "thread_side", "thread_top"),
    "tile": ("crack", "glue_strip", "gray_stroke", "oil", "rough"),
    "toothbrush": ("defective",),
    "transistor": ("bent_lead", "cut_lead", "damaged_case", "misplaced"),
    "wood": ("color", "combined", "hole", "liquid", "scratch"),
    "zipper": ("broken_teeth", "combined", "fabric_border", "fabric_interior", "rough", "split_teeth",
               "squeezed_teeth"),
}

#: VisA: the anomaly labels of the split CSV per class (see the module docstring)
VISA_ANOMALY_TYPES: dict[str, tuple[str, ...]] = {
    "candle": ("chunk of wax missing", "foreign particals on candle", "different colour spot",
               "damaged corner of packaging", "weird candle wick", "extra wax in candle",
               "wax melded out of the candle"),
    "capsules": ("bubble", "discolor", "scratch", "leak", "misshape"),
    "cashew": ("burnt", "corner or edge breakage", "different colour spot", "middle breakage", "small holes",
               "same colour spot", "small scratches", "stuck together"),
    "chewinggum": ("chunk of gum missing", "scratches", "small cracks", "corner missing",
                   "similar colour spot"),
    "fryum": ("burnt", "similar colour spot", "corner or edge breakage", "middle breakage", "small scratches",
              "different colour spot", "fryum stuck together"),
    "macaroni1": ("chip around edge and corner", "small scratches", "small cracks", "different colour spot",
                  "middle breakage", "similar colour spot"),
    "macaroni2": ("breakage down the middle", "small scratches", "color spot similar to the object",
                  "different color spot", "small chip around edge", "small cracks"),
    "pcb1": ("bent", "melt", "scratch", "missing"),
    "pcb2": ("bent", "melt", "scratch", "missing"),
    "pcb3": ("bent", "melt", "scratch", "missing"),
    "pcb4": ("burnt", "scratch", "dirt", "damage", "extra", "missing", "wrong place"),
    "pipe_fryum": ("burnt", "corner and edge breakage", "different colour spot", "middle breakage",
                   "small scratches", "small cracks", "similar colour spot", "stuck together"),
}

#: words of the defect names that say where a defect sits (a part of the object, its material) or qualify
#: it; they are what a description of the normal object is made of, so they are allowed
LOCATION_WORDS = frozenset(
    "large small inner outer insulation wire cable metal pill head neck side top front strip lead case teeth "
    "fabric border interior wax candle corner packaging wick edge middle gum fryum object of on in the and "
    "or around to down out together different same similar".split()
)

#: stems of the defect words whose inflections do not start with the word itself
EXTRA_STEMS = ("break", "broke", "bend", "squeez", "contamina", "manipulat", "damag", "misplac", "place",
               "shape", "colour", "grey", "discolo", "melt", "meld", "burn", "miss", "fault", "partic", "defect")

#: generic defect words and words that only assert the absence of a defect (never in a normal prompt)
GENERIC_WORDS = ("defect", "damage", "flaw", "stain", "blemish", "anomal", "abnormal", "fault", "imperfect",
                 "dirt", "debris", "mark", "spot", "intact", "correct", "proper", "complete", "whole",
                 "clean", "pristine", "error", "wrong", "right way")

#: negations: a normal description says what is there, not what is not
NEGATIONS = (r"\bno\b", r"\bnot\b", r"\bwithout\b", r"-free\b", r"\bfree of\b", r"\bnon-", r"\bnone\b",
             r"\bnever\b", r"n't\b")


def defect_stems() -> list[str]:
    """Every defect word of both lists (lower case), location words removed, plus :data:`EXTRA_STEMS`."""
    names = [name for names in MVTEC_DEFECT_FOLDERS.values() for name in names]
    names += [name for names in VISA_ANOMALY_TYPES.values() for name in names]
    words = {word for name in names for word in re.split(r"[_\s]+", name.lower()) if word}
    return sorted((words - LOCATION_WORDS) | set(EXTRA_STEMS) | set(GENERIC_WORDS))


def leaks(prompt: str, object_words: str) -> list[str]:
    """The forbidden forms found in ``prompt`` once its object name is removed."""
    text = prompt.lower().replace(object_words.lower(), " ") if object_words else prompt.lower()
    found = [stem for stem in defect_stems() if re.search(rf"\b(?:un|non-?|in|im|mis)?{re.escape(stem)}", text)]
    found += [pattern for pattern in NEGATIONS if re.search(pattern, text)]
    return found


CATEGORIES = sorted(ANOMALYSD_FINE_PROMPTS)


def test_the_lists_cover_both_datasets():
    assert set(CATEGORIES) == set(MVTEC_DEFECT_FOLDERS) | set(VISA_ANOMALY_TYPES)
    stems = defect_stems()
    for word in ("crack", "scratch", "hole", "bent", "cut", "print", "imprint", "flip", "thread", "color",
                 "burnt", "chip", "bubble", "misshape", "stuck", "extra", "missing", "rough", "combined"):
        assert word in stems


@pytest.mark.parametrize(
    "prompt",
    [
        "A metal nut lying the right way up.",  # the old prompts' leaks, one per form
        "A transistor placed correctly.",
        "A grid with an even, unbent mesh.",
        "A leather texture without cuts, folds or stains.",
        "A pill with a clear imprint.",
        "A tile surface that is smooth, intact and uncracked.",
        "A hazelnut with no holes.",
        "A crack-free tile.",
        "A wood surface with no visible damage.",
    ],
)
def test_the_check_catches_each_form_of_leak(prompt):
    assert leaks(prompt, "")


@pytest.mark.parametrize("category", CATEGORIES)
def test_default_prompts_name_no_defect(category):
    name = object_name(category)
    for prompt in anomalysd_prompts(category) + resolve_prompts(category, "simple"):
        assert not leaks(prompt, name), (category, prompt, leaks(prompt, name))


def test_generic_coarse_and_simple_prompts_name_no_defect():
    templates = (ANOMALYSD_COARSE_PROMPT, ANOMALYSD_SIMPLE_PROMPT, *ANOMALYSD_GENERIC_FINE_PROMPTS)
    for template in templates:
        assert not leaks(template.replace("{}", " "), ""), (template, leaks(template.replace("{}", " "), ""))
    for prompt in anomalysd_prompts("gizmo") + anomalysd_prompts("bottle", class_name="solar cell"):
        assert not leaks(prompt, "gizmo" if "gizmo" in prompt else "solar cell"), prompt
