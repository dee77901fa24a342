"""PromptAD's prompts by semantic concatenation (Li et al., CVPR 2024, §4.2, eq. 9-11), as token layouts.

Three kinds of prompt share learnable parameters:

- normal prompt (NP), eq. 9: ``[P_1]..[P_EN][obj].`` -- ``N`` of them, each with its own prefix;
- manual anomaly prompt (MAP), eq. 10: ``[P_1]..[P_EN][obj][with][color][stain].`` -- every NP followed
  by each of the ``M`` manual anomaly suffixes (``N * M`` prompts);
- learnable anomaly prompt (LAP), eq. 11: ``[P_1]..[P_EN][obj][A_1]..[A_EA].`` -- every NP followed by
  each of ``L`` learnable suffixes (``N * L`` prompts).

"The parameters of prompts concatenated by the same normal prefix or anomaly suffix are shared": row
``(i, m)`` of the MAPs uses prefix ``i``; row ``(i, l)`` of the LAPs uses prefix ``i`` and suffix ``l``.
Like CoOp, each sentence ends with a full stop.

This module only lays out token ids and says which positions hold learnable vectors; the text encoder
(:mod:`fsad_lightning.backbones.clip`) embeds the ids and the prompt learner
(:class:`~fsad_lightning.methods.promptad.torch_model.PromptLearner`) writes its parameters into the
learnable positions.

Default anomaly suffixes
------------------------
The paper builds its manual suffixes from the anomaly labels of the benchmarks, and the published code
takes them from the test set's defect-folder names of the very category under test. That leaks test
labels into training, so the default here is one list of generic defect phrases, the same for every
category and written without looking at any category's defect types
(:data:`GENERIC_ANOMALY_SUFFIXES`). Per-category lists remain possible, but only explicitly: pass a
mapping ``{category: [suffix, ...]}`` (see :func:`resolve_anomaly_suffixes`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

#: category-independent defect phrases, appended to ``[P..][obj]`` (eq. 10)
GENERIC_ANOMALY_SUFFIXES: tuple[str, ...] = (
    "with flaw",
    "with defect",
    "with damage",
    "with a crack",
    "with a scratch",
    "with a hole",
    "with a stain",
    "with a dent",
    "with contamination",
    "with a missing part",
    "with a broken part",
    "with deformation",
    "with discoloration",
)

#: the word whose token id fills learnable positions before their vectors are written (as in CoOp)
PLACEHOLDER_WORD = "X"

DEFAULT_SUFFIX_KEY = "default"


def resolve_anomaly_suffixes(
    suffixes: Sequence[str] | Mapping[str, Sequence[str]] | None, category: str
) -> tuple[str, ...]:
    """The manual anomaly suffixes (eq. 10) for ``category``.

    ``suffixes`` is ``None`` (:data:`GENERIC_ANOMALY_SUFFIXES`), one list for every category, or an
    explicit mapping ``{category: list}`` which may hold a ``"default"`` entry for categories it does not
    name. Suffixes must be non-empty strings without ``{}``.
    """
    if suffixes is None:
        chosen: Sequence[str] = GENERIC_ANOMALY_SUFFIXES
    elif isinstance(suffixes, Mapping):
        if category in suffixes:
            chosen = suffixes[category]
        elif DEFAULT_SUFFIX_KEY in suffixes:
            chosen = suffixes[DEFAULT_SUFFIX_KEY]
        else:
            raise ValueError(
                f"anomaly_suffixes has no entry for category {category!r} and no {DEFAULT_SUFFIX_KEY!r} "
                "entry "
                f"(it names {sorted(suffixes)})"
            )
    elif isinstance(suffixes, str):
        raise ValueError(f"anomaly_suffixes must be a list of phrases, not the single string {suffixes!r}")
    else:
        chosen = suffixes
    chosen = tuple(chosen)
    if not chosen:
        raise ValueError(f"anomaly_suffixes for category {category!r} is empty: give at least one phrase")
    for suffix in chosen:
        if not isinstance(suffix, str) or not suffix.strip() or "{" in suffix:
            raise ValueError(f"anomaly suffix {suffix!r} must be a non-empty phrase without '{{}}'")
    return chosen


@dataclass
class PromptLayout:
    """Token ids of every prompt and where their learnable vectors go.

    Rows are ordered: ``N`` normal prompts, then ``N * M`` manual anomaly prompts (prefix-major:
    row ``N + i * M + m``), then ``N * L`` learnable anomaly prompts (row ``N + N*M + i * L + l``), then,
    only without semantic concatenation, ``N`` independent anomaly prompts (see
    :func:`build_prompt_layout`).

    Attributes:
        sentences: ``P`` texts that tokenize to ``tokens``, with the placeholder word in every learnable
            position (``"X X X X bottle with a crack."``).
        tokens: ``[P, context_length]`` long token ids (padded with 0).
        eot_index: ``[P]`` position of the end-of-text token, where the text feature is pooled.
        prefix_index: ``[P]`` which learnable context a row's positions ``1 .. 1 + E_N`` take: ``0..N-1``
            are the normal prefixes, ``N..2N-1`` the independent anomaly contexts of the no-SC baseline.
        suffix_index: ``[P]`` which learnable suffix a LAP row carries, ``-1`` for the other rows.
        suffix_start: position of the learnable suffix in LAP rows (the same for all of them).
        num_normal, num_manual, num_learnable, num_independent: row counts of the four groups.
    """

    sentences: list[str]
    tokens: Tensor
    eot_index: Tensor
    prefix_index: Tensor
    suffix_index: Tensor
    suffix_start: int
    num_normal: int
    num_manual: int
    num_learnable: int
    num_independent: int

    @property
    def num_prompts(self) -> int:
        return self.tokens.shape[0]

    def group_slices(self) -> dict[str, slice]:
        """Row slices of the groups: ``normal``, ``manual``, ``learnable``, ``independent``."""
        bounds = {}
        start = 0
        for name, count in (
            ("normal", self.num_normal),
            ("manual", self.num_manual),
            ("learnable", self.num_learnable),
            ("independent", self.num_independent),
        ):
            bounds[name] = slice(start, start + count)
            start += count
        return bounds


def build_prompt_layout(
    encode: Callable[[str], list[int]],
    sot_token_id: int,
    eot_token_id: int,
    context_length: int,
    class_name: str,
    num_normal_prompts: int = 3,
    num_prefix_tokens: int = 4,
    anomaly_suffixes: Sequence[str] = GENERIC_ANOMALY_SUFFIXES,
    num_learnable_suffixes: int = 4,
    num_suffix_tokens: int = 1,
    semantic_concatenation: bool = True,
) -> PromptLayout:
    """Lay out the prompts of eq. 9-11 for one object.

    Args:
        encode: the tokenizer's BPE encoding of a text, *without* start / end tokens.
        sot_token_id, eot_token_id, context_length: the tokenizer's framing.
        class_name: the ``[obj.]`` words (see :func:`fsad_lightning.class_names.object_name`).
        num_normal_prompts: ``N``.
        num_prefix_tokens: ``E_N``.
        anomaly_suffixes: the ``M`` manual suffixes (``[]`` for none).
        num_learnable_suffixes: ``L`` (0 for none).
        num_suffix_tokens: ``E_A``.
        semantic_concatenation: ``False`` gives the baseline of Table 3's first row (SC off): no MAPs or
            LAPs; the negatives are ``N`` conventional CoOp prompts ``[Q_1]..[Q_EN][obj].`` with their own
            context vectors (the two-class CoOp the paper calls the baseline; this reading is ours).

    Raises ``ValueError`` for non-positive sizes, an SC layout without any anomaly prompt, or a prompt
    longer than ``context_length``.
    """
    if num_normal_prompts < 1 or num_prefix_tokens < 1:
        raise ValueError(
            "need num_normal_prompts >= 1 and num_prefix_tokens >= 1, "
            f"got {num_normal_prompts}, {num_prefix_tokens}"
        )
    if num_learnable_suffixes < 0 or (num_learnable_suffixes > 0 and num_suffix_tokens < 1):
        raise ValueError(
            f"need num_learnable_suffixes >= 0 and num_suffix_tokens >= 1, got {num_learnable_suffixes}, "
            f"{num_suffix_tokens}"
        )
    if semantic_concatenation and not anomaly_suffixes and num_learnable_suffixes == 0:
        raise ValueError("semantic concatenation needs manual anomaly suffixes or learnable suffixes (L > 0)")
    placeholder = encode(PLACEHOLDER_WORD)
    if len(placeholder) != 1:
        raise ValueError(
            f"the tokenizer splits the placeholder {PLACEHOLDER_WORD!r} into {len(placeholder)} tokens"
        )
    body = [placeholder[0]] * num_prefix_tokens + encode(class_name)
    body_text = " ".join([PLACEHOLDER_WORD] * num_prefix_tokens + [class_name])
    learnable_suffix_text = " ".join([PLACEHOLDER_WORD] * num_suffix_tokens)
    full_stop = encode(".")

    def frame(ids: list[int], description: str) -> list[int]:
        sequence = [sot_token_id] + ids + full_stop + [eot_token_id]
        if len(sequence) > context_length:
            raise ValueError(
                f"prompt {description!r} needs {len(sequence)} tokens, more than the context length "
                f"{context_length}"
            )
        return sequence + [0] * (context_length - len(sequence))

    rows: list[list[int]] = []
    sentences: list[str] = []
    prefix_index: list[int] = []
    suffix_index: list[int] = []
    num_manual = num_learnable = num_independent = 0
    for i in range(num_normal_prompts):
        rows.append(frame(body, f"{class_name}"))
        sentences.append(f"{body_text}.")
        prefix_index.append(i)
        suffix_index.append(-1)
    if semantic_concatenation:
        encoded_suffixes = [encode(suffix) for suffix in anomaly_suffixes]
        for i in range(num_normal_prompts):
            for suffix, ids in zip(anomaly_suffixes, encoded_suffixes):
                rows.append(frame(body + ids, f"{class_name} {suffix}"))
                sentences.append(f"{body_text} {suffix}.")
                prefix_index.append(i)
                suffix_index.append(-1)
                num_manual += 1
        for i in range(num_normal_prompts):
            for j in range(num_learnable_suffixes):
                rows.append(frame(body + [placeholder[0]] * num_suffix_tokens, f"{class_name} [A]"))
                sentences.append(f"{body_text} {learnable_suffix_text}.")
                prefix_index.append(i)
                suffix_index.append(j)
                num_learnable += 1
    else:
        for i in range(num_normal_prompts):
            rows.append(frame(body, f"{class_name}"))
            sentences.append(f"{body_text}.")
            prefix_index.append(num_normal_prompts + i)
            suffix_index.append(-1)
            num_independent += 1
    tokens = torch.tensor(rows, dtype=torch.long)
    eot_index = (tokens == eot_token_id).int().argmax(dim=1)
    return PromptLayout(
        sentences=sentences,
        tokens=tokens,
        eot_index=eot_index,
        prefix_index=torch.tensor(prefix_index, dtype=torch.long),
        suffix_index=torch.tensor(suffix_index, dtype=torch.long),
        suffix_start=1 + len(body),
        num_normal=num_normal_prompts,
        num_manual=num_manual,
        num_learnable=num_learnable,
        num_independent=num_independent,
    )
