"""The object name a prompt uses for a category folder: one map for every method.

Dataset folders are not always English words ("pcb1", "macaroni2", "chewinggum", "metal_nut"). Every method
that puts a class name into a sentence (WinCLIP, PromptAD, One-to-Normal, ADP_l, AnomalySD) asks
:func:`object_name`, so one category reads the same in all of them. A config overrides it with the method's
``class_name`` (one category) or ``class_names`` (``{category: name}``, multi-class).

The names say what the object is, never how it can be defective: nothing here comes from a test split.
"""

from __future__ import annotations

from collections.abc import Mapping

#: folder names whose object name is not the folder name with ``_`` read as a space
CLASS_NAMES: dict[str, str] = {
    # VisA (Zou et al., ECCV 2022): numbered variants of one object and run-together words
    "pcb1": "printed circuit board",
    "pcb2": "printed circuit board",
    "pcb3": "printed circuit board",
    "pcb4": "printed circuit board",
    "macaroni1": "macaroni",
    "macaroni2": "macaroni",
    "chewinggum": "chewing gum",
    "pipe_fryum": "pipe fryum",
    # MNIST one-vs-all (fsad_lightning.data.semantic): the normal class "0" .. "9" is a digit
    **{str(digit): f"digit {digit}" for digit in range(10)},
}
# MVTec AD, MPDD, BTAD, MTD, ...: the default rule ("metal_nut" -> "metal nut", "magnetic_tile" -> ...)


def object_name(category: str, overrides: Mapping[str, str] | None = None) -> str:
    """The object name of ``category`` in prompts: ``overrides[category]``, else :data:`CLASS_NAMES`, else
    the folder name with ``_`` read as a space. Raises ``ValueError`` for an empty result."""
    category = str(category)
    if overrides and category in overrides:
        name = str(overrides[category])
    else:
        name = CLASS_NAMES.get(category, category.replace("_", " "))
    name = name.strip()
    if not name:
        raise ValueError(f"category {category!r} gives an empty object name for the prompts")
    return name
