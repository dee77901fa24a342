"""One-to-Normal's prompt lists (§3.2, Appendix A.1)."""

import pytest

from fsad_lightning.prompts import (
    ONE_TO_NORMAL_CLASS_PROMPT,
    ONE_TO_NORMAL_INSTANCE_PROMPT,
    ONE_TO_NORMAL_STATES,
    ONE_TO_NORMAL_TEMPLATES,
    one_to_normal_prompts,
)


def test_appendix_a1_lists():
    assert len(ONE_TO_NORMAL_STATES) == 3 and len(ONE_TO_NORMAL_TEMPLATES) == 10
    assert all(s.count("{}") == 1 for s in (*ONE_TO_NORMAL_STATES, *ONE_TO_NORMAL_TEMPLATES))
    assert ONE_TO_NORMAL_INSTANCE_PROMPT.format("cable") == "a photo of normal cable"
    assert ONE_TO_NORMAL_CLASS_PROMPT.format("cable") == "a photo of cable"


def test_prompt_selection_covers_states_then_every_pair():
    three = one_to_normal_prompts("metal nut", 3)
    assert three == [
        "a photo of a small normal metal nut without flaw.",
        "a photo of a large normal metal nut without defect.",
        "a bright photo of a normal metal nut without damage.",
    ]
    ten = one_to_normal_prompts("metal nut", 10)
    assert ten[:3] == three and len({p.split(" normal ")[0] for p in ten}) == 10  # every template once
    everything = one_to_normal_prompts("metal nut", 30)
    assert len(set(everything)) == 30
    with pytest.raises(ValueError, match="between 1 and 30"):
        one_to_normal_prompts("metal nut", 31)
    with pytest.raises(ValueError, match="class_name"):
        one_to_normal_prompts(" ", 3)
