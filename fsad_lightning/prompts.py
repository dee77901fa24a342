"""Text prompt lists, kept as data.

Each method builds its sentences from these lists; nothing here calls a model. A *state* is a phrase with
one ``{}`` slot for the object (class) name (``"flawless {}"``); a *template* is a sentence with one ``{}``
slot for a state (``"a photo of a {}."``). :func:`compose_prompts` forms every state x template
sentence for a class name.

Sections:

- WinCLIP (Jeong et al., CVPR 2023, compositional prompt ensemble, §4.1 and the supplementary lists).
- One-to-Normal (Li et al., NeurIPS 2024, Appendix A.1) -- to be added.
- AnomalySD (Yan et al., hierarchical prompts) -- to be added.
"""

from __future__ import annotations

from collections.abc import Sequence


def compose_prompts(states: Sequence[str], templates: Sequence[str], class_name: str) -> list[str]:
    """Every ``template.format(state.format(class_name))`` sentence, states outermost.

    Raises ``ValueError`` for an empty list, an empty class name, or a state / template without exactly
    one ``{}`` slot, so a typo in a config fails here rather than as a silent odd prompt.
    """
    if not class_name or not class_name.strip():
        raise ValueError("class_name must be a non-empty string for prompt composition")
    if len(states) == 0 or len(templates) == 0:
        raise ValueError(f"need at least one state and one template, got {len(states)} and {len(templates)}")
    for kind, items in (("state", states), ("template", templates)):
        for item in items:
            if item.count("{}") != 1:
                raise ValueError(f"{kind} {item!r} must contain exactly one '{{}}' slot")
    return [template.format(state.format(class_name)) for state in states for template in templates]


# ==================================================================== WinCLIP (Jeong et al., CVPR 2023)
# Compositional prompt ensemble: state words describe a normal / anomalous object, templates describe the
# photograph. Every state is combined with every template and the encoded sentences are averaged into one
# text prototype per state class (7 x 22 normal and 4 x 22 anomalous sentences).

#: normal ("[o]" with no adjective counts as normal) state words
WINCLIP_NORMAL_STATES: tuple[str, ...] = (
    "{}",
    "flawless {}",
    "perfect {}",
    "unblemished {}",
    "{} without flaw",
    "{} without defect",
    "{} without damage",
)

#: anomalous state words
WINCLIP_ANOMALOUS_STATES: tuple[str, ...] = (
    "damaged {}",
    "{} with flaw",
    "{} with defect",
    "{} with damage",
)

#: templates: every combination of a/the with the image conditions the paper lists
WINCLIP_TEMPLATES: tuple[str, ...] = (
    "a cropped photo of the {}.",
    "a cropped photo of a {}.",
    "a close-up photo of a {}.",
    "a close-up photo of the {}.",
    "a bright photo of a {}.",
    "a bright photo of the {}.",
    "a dark photo of the {}.",
    "a dark photo of a {}.",
    "a jpeg corrupted photo of a {}.",
    "a jpeg corrupted photo of the {}.",
    "a blurry photo of the {}.",
    "a blurry photo of a {}.",
    "a photo of a {}.",
    "a photo of the {}.",
    "a photo of a small {}.",
    "a photo of the small {}.",
    "a photo of a large {}.",
    "a photo of the large {}.",
    "a photo of the {} for visual inspection.",
    "a photo of a {} for visual inspection.",
    "a photo of the {} for anomaly detection.",
    "a photo of a {} for anomaly detection.",
)


# ==================================================================== One-to-Normal (Li et al., NeurIPS 2024)
# Appendix A.1 state- and physical-level lists: to be added by the One-to-Normal engineer.


# ==================================================================== AnomalySD (Yan et al.)
# Hierarchical prompts: to be added by the AnomalySD engineer.
