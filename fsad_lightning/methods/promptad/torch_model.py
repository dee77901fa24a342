"""PromptAD (Li et al., CVPR 2024) as a plain ``nn.Module``: two prompt sets, losses and scoring.

Eq. numbers are those of the paper; "official" is the authors' code (github FuNz-0/PromptAD). Where the
paper is silent we follow the official code; where the official code contradicts the paper or uses the
test set, we follow the paper. Every such point:

- Backbone: VV-CLIP (§3.2, eq. 4-7), the frozen :class:`~fsad_lightning.backbones.clip.CLIPBackbone`.
  The value-value branch runs on **every** block (official; the paper gives no number): both branches'
  attention reads ``ln_1`` of the *original* stream (eq. 6), the VV stream adds its attention update and
  skips the MLP (eq. 7), the class token comes from the original branch. ``Z_ori[0]`` (through
  ``ln_post`` / ``proj``) is the global feature, ``Z[1:]`` the local (VV) features.
- Two prompt sets, as the official code trains them in two runs (``train_cls.py`` / ``train_seg.py``):
  the **image-level** set (``N = 3`` normal prompts, 100 epochs) learns from the global features only
  and gives the image score; the **pixel-level** set (``N = 1``, 1 epoch) learns from the VV patch
  features only and gives the map. Both share ``E_N``, ``L``, ``E_A``, the manual suffixes and the
  optimiser settings. One ``fsad fit`` trains both (see
  :class:`~fsad_lightning.methods.promptad.module.PromptADModule`).
- Prompts: semantic concatenation (eq. 9-11, :mod:`.prompts`), learnable context vectors in the text
  token-embedding space (:class:`PromptLearner`, ``N(0, 0.02^2)`` as official).
- Prototypes (eq. 12, 14, 15): the mean of the *unnormalised* text features, L2-normalised (official;
  :func:`~.losses.feature_prototype`), in the losses and at inference.
- Losses per set (§4.2-4.3): ``L = L_clip + L_ema + L_align`` (eq. 12, 13, 15, unweighted but ``lambda``).
  ``L_ema`` uses the Euclidean distance of eq. 13; the official code uses squared distances and, in its
  pixel-level run, sums them over the patches instead of the channels -- we follow eq. 13 per feature.
- Vision memory (eq. 8): the patch tokens of blocks 3 and 8 (1-based; the paper says "two layers") at
  raw width, L2-normalised. By default they are what the official forward hooks hold: the hooks keep a
  view of the block's output that the next block's in-place residual update overwrites, so a memory token
  is "block ``l`` output + the attention update of block ``l + 1``" (``memory_tokens=
  "after_next_attention"``); ``"block_output"`` gives the plain block outputs (the paper's reading).
- Scores (§4.4): eq. 16 with the image set's prototypes on the global feature (``S_t``) and the pixel
  set's on every VV patch feature (``M_t``); eq. 17 and 18 exactly as written,
  ``1 / (1/a + 1/b)`` (half the harmonic mean). ``M_pix`` is fused on the patch grid, bilinearly
  upsampled to ``map_size`` (400 px, official) and blurred with ``sigma = 4`` at that size; the evaluator
  resizes it to the ground-truth resolution. ``max_ij M_v`` of eq. 18 is taken on ``M_v`` upsampled to
  ``map_size`` without blur (official). The blur's border is torch's "reflect" (scipy's "mirror"); the
  official scipy filter uses scipy's "reflect", which differs within 16 px of the border.
- Temperature: ``1 / tau`` defaults to CLIP's own ``exp(logit_scale)`` (100 for the LAION-400M weights,
  the paper's "default values of tau"). The official code multiplies by the *raw* log-scale parameter
  (``ln 100 = 4.6052``) instead; ``temperature: 4.6052`` reproduces that.

Official behaviour we refuse: choosing the best epoch by the test set's AUROC (we train a fixed
schedule), manual anomaly suffixes from the test set's defect names (ours are generic, :mod:`.prompts`),
feeding test images as BGR while shots are RGB (one RGB loader for both).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from fsad_lightning.backbones.clip import PATCH_TOKEN_SOURCES, CLIPBackbone, load_clip
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

#: standard deviation of the random initialisation of context vectors (CoOp's and the official choice)
CONTEXT_INIT_STD = 0.02
#: the two prompt sets: ``image`` (global features, image score) and ``pixel`` (VV patch features, map)
PROMPT_SETS = ("image", "pixel")


@dataclass
class PromptFeatures:
    """Text features of the prompt groups, as the text encoder returns them (``None``: group switched off)."""

    normal: Tensor  # [N, D]
    manual: Tensor | None  # [N*M, D] MAPs
    learnable: Tensor | None  # [N*L, D] LAPs
    independent: Tensor | None  # [N, D] anomaly prompts of the no-SC baseline

    def anomaly_features(self) -> Tensor:
        """The set ``W`` of eq. 12: every anomaly-prompt feature."""
        groups = [g for g in (self.manual, self.learnable, self.independent) if g is not None]
        return torch.cat(groups, dim=0)

    def normal_prototype(self) -> Tensor:
        """``w_n``: the normalised mean of the normal-prompt features (below eq. 12)."""
        return feature_prototype(self.normal)

    def anomaly_prototype(self) -> Tensor:
        """``w_a`` (eq. 14), normalised; without SC, from the independent anomaly prompts."""
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


def fuse(first: Tensor, second: Tensor) -> Tensor:
    """Eq. 17 / 18: ``1 / (1 / first + 1 / second)``, half the harmonic mean (0 where either is 0)."""
    return harmonic_mean([first, second]) / 2.0


class PromptADModel(nn.Module):
    """PromptAD: VV-CLIP, an image-level and a pixel-level prompt set, vision memory.

    Args:
        clip_model / clip_pretrained / image_size / precision: passed to
            :func:`~fsad_lightning.backbones.clip.load_clip` (official: ``ViT-B-16-plus-240`` with
            ``laion400m_e32`` at 240 px).
        image_normal_prompts: ``N`` of the image-level set (3, official ``train_cls.py``).
        pixel_normal_prompts: ``N`` of the pixel-level set (1, official ``train_seg.py``).
        num_prefix_tokens: ``E_N`` (4). num_learnable_suffixes: ``L`` (4). num_suffix_tokens: ``E_A`` (1).
        anomaly_suffixes: manual suffixes of eq. 10: ``None`` for the generic list, a list, or an explicit
            ``{category: list}`` mapping (see :func:`~.prompts.resolve_anomaly_suffixes`).
        align_weight: ``lambda`` of eq. 15 (0.001).
        margin: the margin of eq. 13 (0 in the paper).
        temperature: ``1 / tau`` of eq. 12 and 16; ``None`` uses CLIP's own ``exp(logit_scale)`` (100 for
            the LAION-400M ViT-B-16+, the paper's default). ``4.6052`` reproduces the official code, which
            multiplies by the raw log scale ``ln 100``.
        memory_layers: the two blocks (0-based) whose patch tokens form the vision memory (eq. 8); official:
            ``[2, 7]``, blocks 3 and 8 of 12.
        memory_tokens: ``"after_next_attention"`` (official hooks: block ``l`` output plus the attention
            update of block ``l + 1``) or ``"block_output"`` (the plain block outputs).
        vv_layers: how many final blocks get the VV branch; ``None``: every block (official).
        semantic_concatenation / explicit_anomaly_margin / vision_guided: Table 3's switches SC, EAM, VAD.
        map_size: side of the anomaly maps (400, official); ``None``: the query images' size.
        sigma: Gaussian blur of the maps at ``map_size`` (4).
        chunk_size: query patches per memory-distance chunk.
    """

    def __init__(
        self,
        clip_model: str = "ViT-B-16-plus-240",
        clip_pretrained: str | None = "laion400m_e32",
        image_size: int | None = 240,
        precision: str = "fp32",
        image_normal_prompts: int = 3,
        pixel_normal_prompts: int = 1,
        num_prefix_tokens: int = 4,
        num_learnable_suffixes: int = 4,
        num_suffix_tokens: int = 1,
        anomaly_suffixes: Sequence[str] | Mapping[str, Sequence[str]] | None = None,
        align_weight: float = 0.001,
        margin: float = 0.0,
        temperature: float | None = None,
        memory_layers: Sequence[int] = (2, 7),
        memory_tokens: str = "after_next_attention",
        vv_layers: int | None = None,
        semantic_concatenation: bool = True,
        explicit_anomaly_margin: bool = True,
        vision_guided: bool = True,
        map_size: int | None = 400,
        sigma: float = 4.0,
        chunk_size: int = DEFAULT_CHUNK,
        backbone: CLIPBackbone | None = None,
    ) -> None:
        super().__init__()
        self.backbone = backbone if backbone is not None else load_clip(
            clip_model, clip_pretrained, image_size=image_size, precision=precision
        )
        num_blocks = self.backbone.num_layers
        vv_layers = num_blocks if vv_layers is None else vv_layers
        if not 1 <= vv_layers <= num_blocks:
            raise ValueError(
                f"vv_layers must be in [1, {num_blocks}] (or null: every block) for {clip_model!r}, "
                f"got {vv_layers}"
            )
        if vision_guided and len(memory_layers) == 0:
            raise ValueError("vision_guided needs at least one block in memory_layers")
        if any(not -num_blocks <= int(layer) < num_blocks for layer in memory_layers):
            raise ValueError(
                f"memory_layers {list(memory_layers)} out of range for {clip_model!r}, which has "
                f"{num_blocks} blocks"
            )
        if memory_tokens not in PATCH_TOKEN_SOURCES:
            raise ValueError(f"memory_tokens must be one of {PATCH_TOKEN_SOURCES}, got {memory_tokens!r}")
        if map_size is not None and (
            isinstance(map_size, bool) or not isinstance(map_size, int) or map_size < 1
        ):
            raise ValueError(f"map_size must be a positive int or null (the images' size), got {map_size!r}")
        self.memory_layers = tuple(int(layer) for layer in memory_layers) if vision_guided else ()
        self.memory_tokens = memory_tokens
        self.vv_layers = vv_layers
        self.anomaly_suffixes = anomaly_suffixes
        self.align_weight = align_weight
        self.margin = margin
        self.temperature = temperature
        self.explicit_anomaly_margin = explicit_anomaly_margin
        self.vision_guided = vision_guided
        self.map_size = map_size
        self.sigma = sigma
        self.chunk_size = chunk_size
        shared = dict(
            num_prefix_tokens=num_prefix_tokens,
            num_learnable_suffixes=num_learnable_suffixes,
            num_suffix_tokens=num_suffix_tokens,
            semantic_concatenation=semantic_concatenation,
        )
        width = self.backbone.text_width
        self.image_prompts = PromptLearner(width, num_normal_prompts=image_normal_prompts, **shared)
        self.pixel_prompts = PromptLearner(width, num_normal_prompts=pixel_normal_prompts, **shared)
        self.class_name: str | None = None
        self._prompts_built_for: tuple[str, str | None] | None = None
        # vision memory R (eq. 8): [n_layers, M, C]; rebuilt from the shots, never checkpointed
        self.register_buffer("memory_bank", torch.empty(0), persistent=False)
        # [2, D] normal / anomaly prototypes of each set frozen for inference, cleared when prompts may change
        self.register_buffer("image_text_prototypes", torch.empty(0), persistent=False)
        self.register_buffer("pixel_text_prototypes", torch.empty(0), persistent=False)

    # ------------------------------------------------------------------ prompts
    def prompt_learner(self, prompt_set: str) -> PromptLearner:
        """The :class:`PromptLearner` of ``prompt_set`` (``"image"`` or ``"pixel"``)."""
        if prompt_set not in PROMPT_SETS:
            raise ValueError(f"prompt set must be one of {PROMPT_SETS}, got {prompt_set!r}")
        return self.image_prompts if prompt_set == "image" else self.pixel_prompts

    @property
    def logit_scale(self) -> Tensor | float:
        """``1 / tau``: ``temperature`` if given, else CLIP's own ``exp(logit_scale)``."""
        if self.temperature is not None:
            return float(self.temperature)
        return self.backbone.model.logit_scale.detach().exp().float()

    def _clear_text_prototypes(self) -> None:
        device = self.image_text_prototypes.device
        self.image_text_prototypes = torch.empty(0, device=device)
        self.pixel_text_prototypes = torch.empty(0, device=device)

    def set_class_name(self, class_name: str, category: str | None = None) -> None:
        """Lay out both prompt sets for the object ``class_name``; ``category`` picks per-category suffixes."""
        if (class_name, category) == self._prompts_built_for and self.image_prompts.layout is not None:
            return
        suffixes = resolve_anomaly_suffixes(self.anomaly_suffixes, category or class_name)
        sc = self.image_prompts.semantic_concatenation
        pieces = [PLACEHOLDER_WORD, class_name, ".", *(suffixes if sc else ())]
        encode, sot, eot, context_length = self._piece_encoder(pieces)
        for prompt_set in PROMPT_SETS:
            learner = self.prompt_learner(prompt_set)
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
        self._clear_text_prototypes()

    def _piece_encoder(self, pieces: list[str]):
        """Encode each text piece with the backbone's tokenizer, start / end tokens stripped."""
        tokenized = self.backbone.tokenize(pieces)
        ids, eot_index = tokenized.token_ids.cpu(), tokenized.eot_index.cpu()
        table = {piece: ids[i, 1 : int(eot_index[i])].tolist() for i, piece in enumerate(pieces)}
        sot, eot = int(ids[0, 0]), int(ids[0, int(eot_index[0])])

        def encode(text: str) -> list[int]:
            return table[text]

        return encode, sot, eot, ids.shape[1]

    def encode_prompts(self, prompt_set: str) -> PromptFeatures:
        """Text features ``g(s)`` (unnormalised) of every prompt of a set, by group (differentiable)."""
        learner = self.prompt_learner(prompt_set)
        embeddings = learner()
        features = self.backbone.encode_text_embeddings(embeddings, learner.eot_index, normalize=False)
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

    def freeze_text_prototypes(self) -> tuple[Tensor, Tensor]:
        """Compute and keep ``[w_n, w_a]`` (normalised, ``[2, D]``) of the image and the pixel set."""
        frozen = []
        with torch.no_grad():
            for prompt_set in PROMPT_SETS:
                prompts = self.encode_prompts(prompt_set)
                frozen.append(torch.stack([prompts.normal_prototype(), prompts.anomaly_prototype()]))
        self.image_text_prototypes, self.pixel_text_prototypes = frozen
        return self.image_text_prototypes, self.pixel_text_prototypes

    # ------------------------------------------------------------------ training
    def set_losses(self, prompt_set: str, visual_features: Tensor) -> dict[str, Tensor]:
        """``L_clip`` (eq. 12), ``L_ema`` (eq. 13) and ``L_align`` (eq. 15) of one prompt set on normal
        ``visual_features`` ``[K, D]``, named ``clip_<set>``, ``ema_<set>``, ``align_<set>``."""
        prompts = self.encode_prompts(prompt_set)
        w_n = prompts.normal_prototype()
        losses = {
            f"clip_{prompt_set}": clip_contrastive_loss(
                visual_features, w_n, prompts.anomaly_features(), self.logit_scale
            )
        }
        if self.explicit_anomaly_margin:
            losses[f"ema_{prompt_set}"] = explicit_anomaly_margin_loss(
                visual_features, w_n, prompts.anomaly_prototype(), self.margin
            )
        if prompts.manual is not None and prompts.learnable is not None and self.align_weight > 0:
            losses[f"align_{prompt_set}"] = alignment_loss(
                prompts.manual, prompts.learnable, self.align_weight
            )
        return losses

    def compute_losses(self, images: Tensor, prompt_sets: Sequence[str] = PROMPT_SETS) -> dict[str, Tensor]:
        """Prompt-learning losses of ``prompt_sets`` on normal ``images`` ``[B, 3, H, W]``; ``loss`` is their
        sum.

        The image set learns from the global features only, the pixel set from every VV patch feature of
        every shot only (official ``train_cls.py`` / ``train_seg.py``); the two sets share no parameter, so
        the sum trains each exactly as on its own. The VV branch runs only when the pixel set trains.
        """
        if not prompt_sets or any(name not in PROMPT_SETS for name in prompt_sets):
            raise ValueError(f"prompt_sets must be a non-empty subset of {PROMPT_SETS}, got {prompt_sets!r}")
        self._clear_text_prototypes()
        with torch.no_grad():
            vv_layers = self.vv_layers if "pixel" in prompt_sets else 0
            visual = self.backbone.encode_image(images, vv_layers=vv_layers)
        losses: dict[str, Tensor] = {}
        if "image" in prompt_sets:
            losses.update(self.set_losses("image", visual.global_embedding))
        if "pixel" in prompt_sets:
            local = visual.vv_patch_tokens.reshape(-1, visual.vv_patch_tokens.shape[-1])
            losses.update(self.set_losses("pixel", local))
        losses["loss"] = torch.stack(list(losses.values())).sum()
        return losses

    # ------------------------------------------------------------------ inference
    @torch.no_grad()
    def fit_memory(self, images: Tensor) -> None:
        """Vision memory ``R``: every patch token of the memory blocks of the normal ``images``."""
        if not self.vision_guided:
            self.memory_bank = torch.empty(0, device=images.device)
            return
        visual = self.backbone.encode_image(
            images, layers=self.memory_layers, patch_tokens_from=self.memory_tokens
        )
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
        """Image scores ``[B]`` and anomaly maps ``[B, map_size, map_size]`` for query ``images``.

        Eq. 16 is written for the normal class; the anomaly score is its complement, the softmax
        probability of ``w_a`` (:func:`~fsad_lightning.scoring.text_anomaly_probability`): ``S_t`` with the
        image set's prototypes, ``M_t`` with the pixel set's. Eq. 17 fuses ``M_v`` and ``M_t`` on the
        patch grid; the result is upsampled to ``map_size`` and blurred there. Eq. 18 fuses ``S_t`` with
        the maximum of ``M_v`` upsampled to ``map_size`` (no blur), as the official code does.
        """
        if self.image_text_prototypes.numel() == 0 or self.pixel_text_prototypes.numel() == 0:
            self.freeze_text_prototypes()
        visual = self.backbone.encode_image(
            images, layers=self.memory_layers, vv_layers=self.vv_layers, patch_tokens_from=self.memory_tokens
        )
        grid = visual.grid_size
        size = self.map_size if self.map_size is not None else tuple(images.shape[-2:])
        scale = self.logit_scale
        # S_t with the image set's prototypes, M_t with the pixel set's
        image_text = text_anomaly_probability(visual.global_embedding, self.image_text_prototypes, scale)
        pixel_text = text_anomaly_probability(visual.vv_patch_tokens, self.pixel_text_prototypes, scale)
        pixel_text = pixel_text.reshape(-1, *grid)  # M_t
        if self.vision_guided:
            pixel_vision = self.vision_guided_map(visual.patch_tokens, grid)  # M_v
            pixel = fuse(pixel_vision, pixel_text)  # eq. 17
            vision_peak = upsample_and_smooth(pixel_vision, size, sigma=0.0).flatten(1).max(dim=1).values
            scores = fuse(vision_peak, image_text)  # eq. 18
        else:
            pixel, scores = pixel_text, image_text
        maps = upsample_and_smooth(pixel, size, self.sigma)
        return scores, maps
