"""Prompt lists and their composition."""

import pytest

from fsad_lightning.prompts import (
    WINCLIP_ANOMALOUS_STATES,
    WINCLIP_NORMAL_STATES,
    WINCLIP_TEMPLATES,
    compose_prompts,
)


def test_winclip_lists_are_well_formed():
    for items in (WINCLIP_NORMAL_STATES, WINCLIP_ANOMALOUS_STATES, WINCLIP_TEMPLATES):
        assert len(set(items)) == len(items)  # no duplicate sentence skews the ensemble average
        assert all(item.count("{}") == 1 for item in items)
    assert (len(WINCLIP_NORMAL_STATES), len(WINCLIP_ANOMALOUS_STATES), len(WINCLIP_TEMPLATES)) == (7, 4, 22)
    assert not set(WINCLIP_NORMAL_STATES) & set(WINCLIP_ANOMALOUS_STATES)


def test_compose_prompts_forms_every_state_template_pair():
    normal = compose_prompts(WINCLIP_NORMAL_STATES, WINCLIP_TEMPLATES, "metal nut")
    anomalous = compose_prompts(WINCLIP_ANOMALOUS_STATES, WINCLIP_TEMPLATES, "metal nut")
    assert len(normal) == len(set(normal)) == 7 * 22
    assert len(anomalous) == 4 * 22
    assert all("metal nut" in s and "{" not in s for s in normal + anomalous)
    assert normal[0] == "a cropped photo of the metal nut."
    assert compose_prompts(["damaged {}"], ["a photo of a {}."], "widget") == ["a photo of a damaged widget."]


@pytest.mark.parametrize(
    "states, templates, name, match",
    [
        (["{}"], ["a photo."], "widget", "template 'a photo.'"),
        (["{} {}"], ["a {}."], "widget", "state"),
        ([], ["a {}."], "widget", "at least one"),
        (["{}"], ["a {}."], " ", "class_name"),
    ],
)
def test_compose_prompts_rejects_bad_input(states, templates, name, match):
    with pytest.raises(ValueError, match=match):
        compose_prompts(states, templates, name)
