"""The learned concept word inside CLIP's text encoder, and the ADP prompt sentences.

ADP learns one vector ``v`` in the token-embedding space of Stable Diffusion's text encoder (textual
inversion) and reads it with CLIP's text encoder, which shares that space: SD 2.1's text encoder *is*
OpenCLIP ViT-H/14's (LAION-2B), so a row of one token-embedding table is a row of the other.

On the Stable Diffusion side the concept is a new token of the tokenizer
(:func:`fsad_lightning.backbones.diffusion.add_token`). On the CLIP side nothing is added: sentences are
tokenized with a placeholder word (:data:`CLIP_CONCEPT_PLACEHOLDER`, one BPE token) in the concept's slot,
and the placeholder's row of the token embeddings is replaced by ``v`` before the text transformer runs
(:meth:`~fsad_lightning.backbones.clip.CLIPBackbone.encode_text_embeddings`), so gradients reach ``v``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from fsad_lightning.backbones.clip import CLIPBackbone

#: the word standing for the concept in CLIP sentences ("*" as Gal et al. write S_*); one BPE token
CLIP_CONCEPT_PLACEHOLDER = "*"


def state_sentences(state: str | None, templates: Sequence[str], word: str) -> list[str]:
    """``T(S(word))`` for every template ``T`` (``state=None``: ``T(word)``, the neutral prompt)."""
    if state is not None and state.count("{}") != 1:
        raise ValueError(f"state {state!r} must contain exactly one '{{}}' slot")
    for template in templates:
        if template.count("{}") != 1:
            raise ValueError(f"template {template!r} must contain exactly one '{{}}' slot")
    phrase = word if state is None else state.format(word)
    return [template.format(phrase) for template in templates]


@dataclass
class ConceptSentences:
    """Sentences tokenized for CLIP with the concept's slot marked.

    Attributes:
        token_embeddings: ``[T, L, W]`` frozen token embeddings, ``L`` cut to the longest sentence (the
            causal text transformer's output at the end-of-text token ignores later positions).
        eot_index: ``[T]`` end-of-text positions.
        concept_mask: ``[T, L]`` true at the concept's position (one per sentence).
    """

    token_embeddings: Tensor
    eot_index: Tensor
    concept_mask: Tensor

    def __len__(self) -> int:
        return int(self.eot_index.shape[0])

    def select(self, rows: Tensor) -> ConceptSentences:
        rows = rows.to(self.eot_index.device)
        return ConceptSentences(self.token_embeddings[rows], self.eot_index[rows], self.concept_mask[rows])


def tokenize_concept_sentences(
    clip: CLIPBackbone, sentences: Sequence[str], placeholder: str = CLIP_CONCEPT_PLACEHOLDER
) -> ConceptSentences:
    """Tokenize ``sentences`` (each holding ``placeholder`` exactly once) and mark the placeholder."""
    probe = clip.tokenize([placeholder])
    if int(probe.eot_index[0]) != 2:
        raise ValueError(f"the concept placeholder {placeholder!r} must be a single CLIP token")
    placeholder_id = int(probe.token_ids[0, 1])
    tokenized = clip.tokenize(list(sentences))
    mask = tokenized.token_ids == placeholder_id
    counts = mask.sum(dim=1)
    if (counts != 1).any():
        bad = sentences[int((counts != 1).nonzero()[0, 0])]
        raise ValueError(f"sentence {bad!r} must hold the concept placeholder {placeholder!r} exactly once")
    length = int(tokenized.eot_index.max()) + 1
    return ConceptSentences(
        token_embeddings=tokenized.token_embeddings[:, :length].detach().float(),
        eot_index=tokenized.eot_index,
        concept_mask=mask[:, :length],
    )


def encode_concept_sentences(clip: CLIPBackbone, sentences: ConceptSentences, concept: Tensor) -> Tensor:
    """CLIP text features ``g(T(S(c)))`` ``[T, D]`` (L2-normalised) with the concept vector ``concept``
    ``[W]`` in the marked slot; differentiable in ``concept``."""
    if concept.shape != sentences.token_embeddings.shape[-1:]:
        raise ValueError(
            f"the concept vector has shape {tuple(concept.shape)}, CLIP's token embeddings are "
            f"{sentences.token_embeddings.shape[-1]} wide"
        )
    vector = concept.float().view(1, 1, -1)
    embeddings = torch.where(sentences.concept_mask.unsqueeze(-1), vector, sentences.token_embeddings)
    return clip.encode_text_embeddings(embeddings, sentences.eot_index)
