"""PromptAD (Li et al., CVPR 2024) as a plain ``nn.Module``: prompt learner, losses and scoring.

- Backbone: VV-CLIP (§3.2), the frozen :class:`~fsad_lightning.backbones.clip.CLIPBackbone`; its original
  branch gives the global feature ``Z_ori[0]`` (image level), its value-value branch the local features
  ``Z[1:]`` (pixel level), and the same pass returns the patch tokens of the memory blocks.
- Prompts: semantic concatenation (eq. 9-11, :mod:`.prompts`), learnable context vectors in the text
  token-embedding space (:class:`PromptLearner`).
- Training (§4.2-4.3): ``L = L_clip + L_ema`` at image level (global features) plus the same at pixel
  level (every local patch feature of every shot is a ``z``), plus ``L_align`` (eq. 15).
- Inference (§4.1, §4.4): prompt-guided scores (eq. 16), the vision-guided memory map (eq. 8) of two
  blocks averaged, harmonic fusion (eq. 17-18), maps upsampled to the image and blurred (sigma = 4).

Choices where the paper is silent are stated where they are made: memory blocks, number of VV blocks,
context initialisation, the SC-off baseline, and where fusion happens relative to upsampling.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from fsad_lightning.backbones.clip import CLIPBackbone, load_clip
from fsad_lightning.methods.promptad.losses import (
    alignment_loss,
    anomaly_prototype,
    clip_contrastive_loss,
    explicit_anomaly_margin_loss,
    feature_prototype,
)
from fsad_lightning.methods.promptad.prompts import (
    PLACEHOLDER_WORD,
    PromptLayout,
    build_prompt_layout,
    resolve_anomaly_suffixes,
)
from fsad_lightning.scoring import (
    DEFAULT_CHUNK,
    harmonic_mean,
    min_cosine_distance,
    text_anomaly_probability,
    upsample_and_smooth,
)

#: standard deviation of the random initialisation of context vectors (CoOp's choice)
CONTEXT_INIT_STD = 0.02


@dataclass
class PromptFeatures:
    """L2-normalised text features of the prompt groups (``None``: group switched off)."""

    normal: Tensor  # [N, D]
    manual: Tensor | None  # [N*M, D] MAPs
    learnable: Tensor | None  # [N*L, D] LAPs
    independent: Tensor | None  # [N, D] anomaly prompts of the no-SC baseline

    def anomaly_features(self) -> Tensor:
        """The set ``W`` of eq. 12: every anomaly-prompt feature."""
        groups = [g for g in (self.manual, self.learnable, self.independent) if g is not None]
        return torch.cat(groups, dim=0)

    def normal_prototype(self) -> Tensor:
        """``w_n``: the mean of the normal-prompt features (below eq. 12)."""
        return feature_prototype(self.normal)

    def anomaly_prototype(self) -> Tensor:
        """``w_a`` (eq. 14); without SC, the mean of the independent anomaly prompts."""
        if self.independent is not None:
            return feature_prototype(self.independent)
        return anomaly_prototype(self.manual, self.learnable)


class PromptLearner(nn.Module):
    """The learnable tokens of PromptAD's prompts and their assembly into token embeddings.

    Parameters (the only trainable tensors of PromptAD):

    - ``normal_prefix`` ``[N, E_N, W]``: ``[P_1]..[P_EN]`` of each normal prompt (eq. 9), shared by every
      MAP and LAP built on it (eq. 10-11);
    - ``anomaly_suffix`` ``[L, E_A, W]``: ``[A_1]..[A_EA]`` of each learnable suffix (eq. 11), shared by the
      ``N`` LAPs that carry it; absent when ``L = 0`` or without SC;
    - ``independent_prefix`` ``[N, E_N, W]``: only without SC, the contexts of the baseline's anomaly
      prompts (see :func:`~fsad_lightning.methods.promptad.prompts.build_prompt_layout`).

    All are drawn from ``N(0, 0.02^2)`` as in CoOp (the paper does not say how it initialises them).
    The token layout depends on the object name and is attached with :meth:`attach_layout`; it is rebuilt
    from text, never stored in checkpoints.
    """

    def __init__(
        self,
        text_width: int,
        num_normal_prompts: int = 3,
        num_prefix_tokens: int = 4,
        num_learnable_suffixes: int = 4,
        num_suffix_tokens: int = 1,
        semantic_concatenation: bool = True,
    ) -> None:
        super().__init__()
        for name, value, low in (
            ("num_normal_prompts", num_normal_prompts, 1),
            ("num_prefix_tokens", num_prefix_tokens, 1),
            ("num_learnable_suffixes", num_learnable_suffixes, 0),
            ("num_suffix_tokens", num_suffix_tokens, 1),
        ):
            if not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
        self.num_normal_prompts = num_normal_prompts
        self.num_prefix_tokens = num_prefix_tokens
        self.num_learnable_suffixes = num_learnable_suffixes if semantic_concatenation else 0
        self.num_suffix_tokens = num_suffix_tokens
        self.semantic_concatenation = semantic_concatenation
        shape = (num_normal_prompts, num_prefix_tokens, text_width)
        self.normal_prefix = nn.Parameter(torch.randn(shape) * CONTEXT_INIT_STD)
        if self.num_learnable_suffixes > 0:
            suffix_shape = (self.num_learnable_suffixes, num_suffix_tokens, text_width)
            self.anomaly_suffix = nn.Parameter(torch.randn(suffix_shape) * CONTEXT_INIT_STD)
        else:
            self.anomaly_suffix = None
        if not semantic_concatenation:
            self.independent_prefix = nn.Parameter(torch.randn(shape) * CONTEXT_INIT_STD)
        else:
            self.independent_prefix = None
        self.layout: PromptLayout | None = None
        self.register_buffer("token_embeddings", torch.empty(0), persistent=False)
        self.register_buffer("eot_index", torch.empty(0, dtype=torch.long), persistent=False)
        self.register_buffer("prefix_index", torch.empty(0, dtype=torch.long), persistent=False)
        self.register_buffer("suffix_index", torch.empty(0, dtype=torch.long), persistent=False)

    def attach_layout(self, layout: PromptLayout, token_embeddings: Tensor) -> None:
        """Use ``layout`` with its frozen token embeddings ``[P, context_length, W]``.

        The text transformer is causal and pools at the end-of-text token, so positions after the last
        end-of-text token cannot change any prompt feature: they are cut off, which makes every text
        forward several times cheaper (about 15 of 77 positions remain) with identical features.
        """
        if token_embeddings.shape[:2] != layout.tokens.shape:
            raise ValueError(
                f"token embeddings {tuple(token_embeddings.shape)} do not match the layout "
                f"{tuple(layout.tokens.shape)}"
            )
        device = self.normal_prefix.device
        self.layout = layout
        length = int(layout.eot_index.max()) + 1
        token_embeddings = token_embeddings[:, :length]
        self.token_embeddings = token_embeddings.detach().to(device=device, dtype=self.normal_prefix.dtype)
        self.eot_index = layout.eot_index.to(device)
        self.prefix_index = layout.prefix_index.to(device)
        self.suffix_index = layout.suffix_index.to(device)

    def forward(self) -> Tensor:
        """Token embeddings ``[P, T, W]`` of every prompt, learnable positions filled in (``T``: up to the
        last end-of-text token)."""
        if self.layout is None:
            raise RuntimeError(
                "PromptLearner has no prompt layout: call attach_layout() with the object name first"
            )
        contexts = self.normal_prefix
        if self.independent_prefix is not None:
            contexts = torch.cat([contexts, self.independent_prefix], dim=0)
        frozen = self.token_embeddings
        end = 1 + self.num_prefix_tokens
        embeddings = torch.cat([frozen[:, :1], contexts[self.prefix_index], frozen[:, end:]], dim=1)
        if self.anomaly_suffix is None or self.layout.num_learnable == 0:
            return embeddings
        rows = self.layout.group_slices()["learnable"]
        start, stop = self.layout.suffix_start, self.layout.suffix_start + self.num_suffix_tokens
        learnable = embeddings[rows]
        learnable = torch.cat(
            [learnable[:, :start], self.anomaly_suffix[self.suffix_index[rows]], learnable[:, stop:]], dim=1
        )
        return torch.cat([embeddings[: rows.start], learnable, embeddings[rows.stop :]], dim=0)


class PromptADModel(nn.Module):
    """PromptAD: VV-CLIP, semantic-concatenation prompts, explicit anomaly margin, vision memory.

    Args:
        clip_model / clip_pretrained / image_size / precision: passed to
            :func:`~fsad_lightning.backbones.clip.load_clip` (paper: ``ViT-B-16-plus-240`` with
            ``laion400m_e31`` at 240 px).
        num_normal_prompts: ``N`` (3). num_prefix_tokens: ``E_N`` (4).
        num_learnable_suffixes: ``L`` (4). num_suffix_tokens: ``E_A`` (1).
        anomaly_suffixes: manual suffixes of eq. 10: ``None`` for the generic list, a list, or an explicit
            ``{category: list}`` mapping (see :func:`~.prompts.resolve_anomaly_suffixes`).
        align_weight: ``lambda`` of eq. 15 (0.001).
        margin: the margin of eq. 13 (0 in the paper).
        temperature: ``1 / tau`` of eq. 12 and 16; ``None`` uses CLIP's own learned logit scale (the paper
            keeps CLIP's default; 100 for the LAION-400M ViT-B-16+).
        memory_layers: the two blocks (0-based) whose patch tokens form the vision memory (eq. 8). The
            paper says only "two layers"; we take the outputs of blocks 6 and 9 of 12 (``[5, 8]``).
        vv_layers: how many final blocks get the VV branch. The paper does not give the number; we use the
            last half of the blocks (6 of 12), which keeps the first blocks' attention intact.
        semantic_concatenation / explicit_anomaly_margin / vision_guided: Table 3's switches SC, EAM, VAD.
        sigma: Gaussian blur of the upsampled maps (4).
        chunk_size: query patches per memory-distance chunk.
    """

    def __init__(
        self,
        clip_model: str = "ViT-B-16-plus-240",
        clip_pretrained: str | None = "laion400m_e31",
        image_size: int | None = 240,
        precision: str = "fp32",
        num_normal_prompts: int = 3,
        num_prefix_tokens: int = 4,
        num_learnable_suffixes: int = 4,
        num_suffix_tokens: int = 1,
        anomaly_suffixes: Sequence[str] | Mapping[str, Sequence[str]] | None = None,
        align_weight: float = 0.001,
        margin: float = 0.0,
        temperature: float | None = None,
        memory_layers: Sequence[int] = (5, 8),
        vv_layers: int = 6,
        semantic_concatenation: bool = True,
        explicit_anomaly_margin: bool = True,
        vision_guided: bool = True,
        sigma: float = 4.0,
        chunk_size: int = DEFAULT_CHUNK,
        backbone: CLIPBackbone | None = None,
    ) -> None:
        super().__init__()
        self.backbone = backbone if backbone is not None else load_clip(
            clip_model, clip_pretrained, image_size=image_size, precision=precision
        )
        if not 1 <= vv_layers <= self.backbone.num_layers:
            raise ValueError(
                f"vv_layers must be in [1, {self.backbone.num_layers}] for {clip_model!r}, got {vv_layers}"
            )
        num_blocks = self.backbone.num_layers
        if vision_guided and len(memory_layers) == 0:
            raise ValueError("vision_guided needs at least one block in memory_layers")
        if any(not -num_blocks <= int(layer) < num_blocks for layer in memory_layers):
            raise ValueError(
                f"memory_layers {list(memory_layers)} out of range for {clip_model!r}, which has "
                f"{num_blocks} blocks"
            )
        self.memory_layers = tuple(int(layer) for layer in memory_layers) if vision_guided else ()
        self.vv_layers = vv_layers
        self.anomaly_suffixes = anomaly_suffixes
        self.align_weight = align_weight
        self.margin = margin
        self.temperature = temperature
        self.explicit_anomaly_margin = explicit_anomaly_margin
        self.vision_guided = vision_guided
        self.sigma = sigma
        self.chunk_size = chunk_size
        self.prompt_learner = PromptLearner(
            self.backbone.text_width,
            num_normal_prompts=num_normal_prompts,
            num_prefix_tokens=num_prefix_tokens,
            num_learnable_suffixes=num_learnable_suffixes,
            num_suffix_tokens=num_suffix_tokens,
            semantic_concatenation=semantic_concatenation,
        )
        self.class_name: str | None = None
        self._prompts_built_for: tuple[str, str | None] | None = None
        # vision memory R (eq. 8): [n_layers, M, C]; rebuilt from the shots, never checkpointed
        self.register_buffer("memory_bank", torch.empty(0), persistent=False)
        # [2, D] normal / anomaly prototypes frozen for inference, cleared whenever prompts may change
        self.register_buffer("text_prototypes", torch.empty(0), persistent=False)

    # ------------------------------------------------------------------ prompts
    @property
    def logit_scale(self) -> Tensor | float:
        """``1 / tau``: ``temperature`` if given, else CLIP's own learned logit scale."""
        if self.temperature is not None:
            return float(self.temperature)
        return self.backbone.model.logit_scale.detach().exp().float()

    def set_class_name(self, class_name: str, category: str | None = None) -> None:
        """Lay out the prompts for the object ``class_name``; ``category`` picks per-category suffixes."""
        if (class_name, category) == self._prompts_built_for and self.prompt_learner.layout is not None:
            return
        learner = self.prompt_learner
        suffixes = resolve_anomaly_suffixes(self.anomaly_suffixes, category or class_name)
        sc = learner.semantic_concatenation
        pieces = [PLACEHOLDER_WORD, class_name, ".", *(suffixes if sc else ())]
        encode, sot, eot, context_length = self._piece_encoder(pieces)
        layout = build_prompt_layout(
            encode, sot, eot, context_length, class_name,
            num_normal_prompts=learner.num_normal_prompts,
            num_prefix_tokens=learner.num_prefix_tokens,
            anomaly_suffixes=suffixes if sc else (),
            num_learnable_suffixes=learner.num_learnable_suffixes,
            num_suffix_tokens=learner.num_suffix_tokens,
            semantic_concatenation=sc,
        )
        tokenized = self.backbone.tokenize(layout.sentences)
        if not torch.equal(tokenized.token_ids.cpu(), layout.tokens):
            raise RuntimeError(
                f"the tokenizer of {self.backbone.model_name!r} does not encode the prompts word by word; "
                "PromptAD cannot place its learnable tokens"
            )
        learner.attach_layout(layout, tokenized.token_embeddings)
        self.class_name = class_name
        self._prompts_built_for = (class_name, category)
        self.text_prototypes = torch.empty(0, device=self.text_prototypes.device)

    def _piece_encoder(self, pieces: list[str]):
        """Encode each text piece with the backbone's tokenizer, start / end tokens stripped."""
        tokenized = self.backbone.tokenize(pieces)
        ids, eot_index = tokenized.token_ids.cpu(), tokenized.eot_index.cpu()
        table = {piece: ids[i, 1 : int(eot_index[i])].tolist() for i, piece in enumerate(pieces)}
        sot, eot = int(ids[0, 0]), int(ids[0, int(eot_index[0])])

        def encode(text: str) -> list[int]:
            return table[text]

        return encode, sot, eot, ids.shape[1]

    def encode_prompts(self) -> PromptFeatures:
        """Normalised text features ``g(s)`` of every prompt, split into their groups (differentiable)."""
        learner = self.prompt_learner
        embeddings = learner()
        features = self.backbone.encode_text_embeddings(embeddings, learner.eot_index, normalize=True)
        groups = learner.layout.group_slices()

        def part(name: str) -> Tensor | None:
            rows = groups[name]
            return features[rows] if rows.stop > rows.start else None

        return PromptFeatures(
            normal=features[groups["normal"]],
            manual=part("manual"),
            learnable=part("learnable"),
            independent=part("independent"),
        )

    def freeze_text_prototypes(self) -> Tensor:
        """Compute and keep ``[w_n, w_a]`` (normalised) for inference; returns them ``[2, D]``."""
        with torch.no_grad():
            prompts = self.encode_prompts()
            protos = torch.stack([prompts.normal_prototype(), prompts.anomaly_prototype()])
        self.text_prototypes = nn.functional.normalize(protos, dim=-1)
        return self.text_prototypes

    # ------------------------------------------------------------------ training
    def compute_losses(self, images: Tensor) -> dict[str, Tensor]:
        """Prompt-learning losses on normal ``images`` ``[B, 3, H, W]``; ``loss`` is their sum.

        ``L = L_clip^img + L_ema^img + L_clip^pix + L_ema^pix + L_align``: eq. 12 and 13 for the global
        features and for every local (VV) patch feature, eq. 15 once. The paper gives the terms without
        weights other than ``lambda``, so they are summed.
        """
        self.text_prototypes = torch.empty(0, device=images.device)
        with torch.no_grad():
            visual = self.backbone.encode_image(images, vv_layers=self.vv_layers)
        global_z = visual.global_embedding
        local_z = visual.vv_patch_tokens.reshape(-1, visual.vv_patch_tokens.shape[-1])
        prompts = self.encode_prompts()
        w_n = prompts.normal_prototype()
        negatives = prompts.anomaly_features()
        scale = self.logit_scale
        losses = {
            "clip_image": clip_contrastive_loss(global_z, w_n, negatives, scale),
            "clip_pixel": clip_contrastive_loss(local_z, w_n, negatives, scale),
        }
        if self.explicit_anomaly_margin:
            w_a = prompts.anomaly_prototype()
            losses["ema_image"] = explicit_anomaly_margin_loss(global_z, w_n, w_a, self.margin)
            losses["ema_pixel"] = explicit_anomaly_margin_loss(local_z, w_n, w_a, self.margin)
        if prompts.manual is not None and prompts.learnable is not None and self.align_weight > 0:
            losses["align"] = alignment_loss(prompts.manual, prompts.learnable, self.align_weight)
        losses["loss"] = torch.stack(list(losses.values())).sum()
        return losses

    # ------------------------------------------------------------------ inference
    @torch.no_grad()
    def fit_memory(self, images: Tensor) -> None:
        """Vision memory ``R``: every patch token of the memory blocks of the normal ``images``."""
        if not self.vision_guided:
            self.memory_bank = torch.empty(0, device=images.device)
            return
        visual = self.backbone.encode_image(images, layers=self.memory_layers)
        self.memory_bank = torch.stack([t.reshape(-1, t.shape[-1]) for t in visual.patch_tokens]).contiguous()

    def vision_guided_map(self, patch_tokens: Sequence[Tensor], grid: tuple[int, int]) -> Tensor:
        """Eq. 8, ``M_ij = min_r (1 - <F_ij, r>) / 2`` per memory block, averaged: ``[B, h, w]``."""
        if self.memory_bank.numel() == 0:
            raise RuntimeError(
                "PromptADModel has an empty vision memory: call fit_memory() with normal shots first"
            )
        maps = [
            min_cosine_distance(tokens, memory, self.chunk_size) / 2.0
            for tokens, memory in zip(patch_tokens, self.memory_bank)
        ]
        return torch.stack(maps).mean(dim=0).reshape(-1, *grid)

    @torch.no_grad()
    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """Image scores ``[B]`` and anomaly maps ``[B, H, W]`` in ``[0, 1]`` for query ``images``.

        Eq. 16 is written for the normal class; the anomaly score is its complement, the softmax
        probability of ``w_a`` (:func:`~fsad_lightning.scoring.text_anomaly_probability`).
        Eq. 17-18 are the harmonic mean up to a factor 2 (``1 / (1/a + 1/b)``); we use the harmonic mean
        itself (:func:`~fsad_lightning.scoring.harmonic_mean`), which keeps scores in ``[0, 1]`` and ranks
        identically. The pixel maps are fused on the patch grid, then upsampled and blurred; the image
        score takes ``max_ij M_v`` on the patch grid, as eq. 18 defines it.
        """
        if self.text_prototypes.numel() == 0:
            self.freeze_text_prototypes()
        visual = self.backbone.encode_image(images, layers=self.memory_layers, vv_layers=self.vv_layers)
        grid = visual.grid_size
        scale = self.logit_scale
        image_text = text_anomaly_probability(visual.global_embedding, self.text_prototypes, scale)  # S_t
        pixel_text = text_anomaly_probability(visual.vv_patch_tokens, self.text_prototypes, scale)
        pixel_text = pixel_text.reshape(-1, *grid)  # M_t
        if self.vision_guided:
            pixel_vision = self.vision_guided_map(visual.patch_tokens, grid)  # M_v
            pixel = harmonic_mean([pixel_vision, pixel_text])  # eq. 17
            scores = harmonic_mean([pixel_vision.flatten(1).max(dim=1).values, image_text])  # eq. 18
        else:
            pixel, scores = pixel_text, image_text
        maps = upsample_and_smooth(pixel, tuple(images.shape[-2:]), self.sigma)
        return scores, maps
