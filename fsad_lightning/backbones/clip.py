"""CLIP backbone on top of open_clip: one frozen wrapper every CLIP-based method shares.

:func:`load_clip` builds an open_clip model by name and ``pretrained`` source and wraps it in
:class:`CLIPBackbone`, which

- takes images in ``[0, 1]`` (the batch contract), resizes them to its image size and applies the
  model's own mean / std;
- walks the vision transformer block by block (``conv1`` -> class + positional embedding -> ``ln_pre`` ->
  ``transformer.resblocks`` -> ``ln_post`` -> ``proj``) so that one pass returns the global embedding,
  the patch tokens of any blocks, the CLIP Surgery value-value (VV) local branch (PromptAD eq. 4-7) and
  WinCLIP window embeddings;
- encodes text from sentences, or from token embeddings so that methods can learn context vectors
  (CoOp) or a pseudo-word (textual inversion) in front of the frozen text transformer.

Tiny offline twins (``fsad-tiny-vit``) are registered with open_clip when this module is imported (see
:func:`fsad_lightning.backbones.tiny.register_tiny_clip`), so ``model_name: fsad-tiny-vit`` works from a
YAML config. ``pretrained=None`` builds random weights and must be asked for explicitly: a tag that cannot
be fetched or a missing checkpoint file is an error, never a silent fallback.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field

import open_clip
import torch
import torch.nn.functional as F
from open_clip.transformer import ResidualAttentionBlock, VisionTransformer
from torch import Tensor, nn

from fsad_lightning.backbones.tiny import TINY_CLIP_CONFIGS, register_tiny_clip
from fsad_lightning.prompts import compose_prompts

PRECISIONS = ("fp32", "fp16", "bf16", "pure_fp16", "pure_bf16")
CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".ckpt", ".npz")
#: sentences per text-encoder forward in :meth:`CLIPBackbone.encode_text`
TEXT_BATCH_SIZE = 256
#: window sequences per vision-transformer forward in :meth:`CLIPBackbone.encode_image`
WINDOW_BATCH_SIZE = 4096
#: where :meth:`CLIPBackbone.encode_image` reads the patch tokens of a block ``l`` (its ``patch_tokens_from``):
#: ``"block_output"``, the output of block ``l``; ``"after_next_attention"``, the original stream inside block
#: ``l + 1`` after its attention residual and before its MLP, i.e. the output of block ``l`` plus the
#: attention update of block ``l + 1`` (what PromptAD's official forward hooks end up holding)
PATCH_TOKEN_SOURCES = ("block_output", "after_next_attention")

register_tiny_clip()


class PretrainedWeightsNotFoundError(FileNotFoundError):
    """The requested CLIP weights are neither in the local cache / on disk nor downloadable."""


# ---------------------------------------------------------------------------------------------- outputs
@dataclass
class CLIPImageFeatures:
    """What :meth:`CLIPBackbone.encode_image` returns.

    Attributes:
        global_embedding: ``[B, D]`` class-token embedding of the original branch, through ``ln_post`` and
            ``proj`` -- exactly open_clip's ``model.encode_image`` (not normalised).
        patch_tokens: one ``[B, N, C]`` tensor per requested block (``N = h * w`` patches, class token
            dropped), in the order of ``layers``; ``[B, N, D]`` when ``project_patches`` was set
            (``ln_post`` + ``proj`` applied token-wise, i.e. mapped into the joint image-text space).
        layers: the (non-negative) block indices of ``patch_tokens``.
        patch_tokens_from: where ``patch_tokens`` were read (see :data:`PATCH_TOKEN_SOURCES`).
        vv_patch_tokens: ``[B, N, D]`` projected patch tokens of the VV local branch, or ``None`` when
            ``vv_layers == 0``.
        window_embeddings: one ``[B, n_windows, D]`` tensor per window size (projected class-token
            embedding of each window, as for the whole image).
        window_indices: one ``[n_windows, k * k]`` long tensor per window size: the row-major patch
            indices each window covers (see :func:`window_masks`).
        window_sizes: the window sizes, in patches, of ``window_embeddings``.
        grid_size: ``(h, w)`` patch grid.
    """

    global_embedding: Tensor
    patch_tokens: list[Tensor] = field(default_factory=list)
    layers: tuple[int, ...] = ()
    patch_tokens_from: str = "block_output"
    vv_patch_tokens: Tensor | None = None
    window_embeddings: list[Tensor] = field(default_factory=list)
    window_indices: list[Tensor] = field(default_factory=list)
    window_sizes: tuple[int, ...] = ()
    grid_size: tuple[int, int] = (0, 0)


@dataclass
class TokenizedText:
    """Sentences as the text transformer sees them.

    Attributes:
        token_ids: ``[T, L]`` BPE ids (start token, words, end token, zero padding).
        token_embeddings: ``[T, L, W]`` rows of the token-embedding table for ``token_ids``.
        eot_index: ``[T]`` position of the end-of-text token, whose output is the sentence feature.
    """

    token_ids: Tensor
    token_embeddings: Tensor
    eot_index: Tensor


# ---------------------------------------------------------------------------------------------- windows
def window_masks(grid_size: int | tuple[int, int], window_size: int, stride: int = 1) -> Tensor:
    """Patch indices of every ``window_size x window_size`` window of a patch grid (WinCLIP §4.2).

    Windows slide with ``stride`` over the grid (stride 1: every position). Patches are numbered row-major,
    ``index = row * w + col``, as in the token sequence. Returns a long tensor ``[n_windows, k * k]``,
    windows ordered row-major by their top-left corner.
    """
    h, w = (grid_size, grid_size) if isinstance(grid_size, int) else grid_size
    if window_size < 1 or stride < 1:
        raise ValueError(f"window_size and stride must be >= 1, got {window_size} and {stride}")
    if window_size > min(h, w):
        raise ValueError(f"window of {window_size} patches does not fit the {h}x{w} patch grid")
    grid = torch.arange(h * w).reshape(h, w)
    windows = grid.unfold(0, window_size, stride).unfold(1, window_size, stride)  # [nh, nw, k, k]
    return windows.reshape(-1, window_size * window_size)


# ---------------------------------------------------------------------------------------------- OpenCLIP's view
def openclip_crop_boxes(
    height: int, width: int, original_sizes: Tensor | None = None, count: int = 1
) -> list[tuple[int, int, int, int]]:
    """``(top, left, h, w)`` per image of the region OpenCLIP's pipeline keeps (its ``Resize`` of the
    shortest side then ``CenterCrop``: the centred square of side ``min(H0, W0)`` of the source image), in
    the pixels of a ``height x width`` tensor.

    ``original_sizes`` ``[B, 2]`` (``(H0, W0)``, the batch key ``original_size``): the tensor is the
    source resized to ``height x width`` (the datamodule's square images), so the box is where the
    source's centred square lies in it; ``None``: the tensor is the source itself (``count`` images).
    """
    if original_sizes is None:
        sources = [(height, width)] * count
    else:
        sources = [(int(h), int(w)) for h, w in original_sizes.reshape(-1, 2).tolist()]
    boxes = []
    for source_h, source_w in sources:
        if source_h < 1 or source_w < 1:
            raise ValueError(f"original_size must be positive (H, W), got {(source_h, source_w)}")
        side = min(source_h, source_w)
        box_h = max(1, round(side * height / source_h))
        box_w = max(1, round(side * width / source_w))
        boxes.append(((height - box_h) // 2, (width - box_w) // 2, box_h, box_w))
    return boxes


def openclip_view(images: Tensor, size: int, original_sizes: Tensor | None = None) -> Tensor:
    """OpenCLIP's image pipeline on ``[B, 3, H, W]`` images in ``[0, 1]``: the region
    :func:`openclip_crop_boxes` names, resized (bicubic, antialiased) to ``size x size`` -- the shortest
    side resized to ``size`` and the centre cropped, not the whole image squashed. Normalisation is left to
    :meth:`CLIPBackbone.preprocess`. Square sources give the whole image resized."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"expected images of shape [B, 3, H, W], got {tuple(images.shape)}")
    height, width = images.shape[-2:]
    boxes = openclip_crop_boxes(height, width, original_sizes, images.shape[0])
    if len(boxes) != images.shape[0]:
        raise ValueError(f"original_size holds {len(boxes)} sizes for {images.shape[0]} images")
    views = []
    for image, (top, left, box_h, box_w) in zip(images, boxes):
        crop = image[None, :, top : top + box_h, left : left + box_w].float()
        if (box_h, box_w) != (size, size):
            crop = F.interpolate(crop, size=(size, size), mode="bicubic", align_corners=False, antialias=True)
        views.append(crop)
    return torch.cat(views).clamp(0.0, 1.0)


# ---------------------------------------------------------------------------------------------- backbone
class CLIPBackbone(nn.Module):
    """A frozen open_clip CLIP model with its preprocessing, exposing features methods need.

    Build it with :func:`load_clip`. All parameters are frozen and the wrapped model stays in eval mode
    even when the owning LightningModule trains (gradients still flow to *inputs*, e.g. learnable token
    embeddings passed to :meth:`encode_text_embeddings`).

    Args:
        model: an open_clip ``CLIP`` with a ``VisionTransformer`` image tower.
        tokenizer: open_clip tokenizer of the model.
        image_size: side length images are resized to; the positional embedding is interpolated when the
            resulting patch grid differs from the one the model was trained at.
        model_name / pretrained: recorded for reports and error messages.
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer,
        image_size: int | None = None,
        model_name: str = "",
        pretrained: str | None = None,
    ) -> None:
        super().__init__()
        visual = getattr(model, "visual", None)
        if not isinstance(visual, VisionTransformer):
            raise ValueError(
                f"CLIP model {model_name!r} has a {type(visual).__name__} image tower; CLIPBackbone supports "
                "open_clip VisionTransformer towers only"
            )
        if visual.attn_pool is not None or visual.pool_type != "tok":
            raise ValueError(
                f"CLIP model {model_name!r} pools its image tokens with pool_type={visual.pool_type!r} / an "
                "attentional pooler; CLIPBackbone needs class-token pooling ('tok')"
            )
        if not getattr(visual.transformer, "batch_first", True):
            raise ValueError(f"CLIP model {model_name!r}: expected a batch-first vision transformer")
        self.model = model
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.pretrained = pretrained
        self.model.eval()
        self.model.requires_grad_(False)

        native = visual.image_size
        self.native_image_size = int(native[0] if isinstance(native, (tuple, list)) else native)
        self.patch_size = int(visual.patch_size[0])
        self.image_size = int(image_size or self.native_image_size)
        if self.image_size % self.patch_size != 0:
            raise ValueError(
                f"image_size={self.image_size} is not a multiple of the patch size {self.patch_size} of "
                f"{model_name!r}"
            )
        preprocess = getattr(visual, "preprocess_cfg", {}) or {}
        mean = preprocess.get("mean", open_clip.OPENAI_DATASET_MEAN)
        std = preprocess.get("std", open_clip.OPENAI_DATASET_STD)
        self.register_buffer("pixel_mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), False)

    # ------------------------------------------------------------------ properties
    @property
    def visual(self) -> VisionTransformer:
        return self.model.visual

    @property
    def grid_size(self) -> tuple[int, int]:
        """``(h, w)`` patch grid at :attr:`image_size`."""
        side = self.image_size // self.patch_size
        return side, side

    @property
    def num_layers(self) -> int:
        return len(self.visual.transformer.resblocks)

    @property
    def width(self) -> int:
        """Channels ``C`` of the vision tokens."""
        return int(self.visual.conv1.out_channels)

    @property
    def embed_dim(self) -> int:
        """Channels ``D`` of the joint image-text space."""
        return int(self.visual.proj.shape[1])

    @property
    def text_width(self) -> int:
        """Channels ``W`` of the text token embeddings."""
        return int(self.model.token_embedding.weight.shape[1])

    @property
    def dtype(self) -> torch.dtype:
        return self.visual.conv1.weight.dtype

    def train(self, mode: bool = True) -> CLIPBackbone:
        """The backbone is frozen: it stays in eval mode whatever the owner asks."""
        super().train(False)
        return self

    # ------------------------------------------------------------------ image
    def preprocess(self, images: Tensor) -> Tensor:
        """``[B, 3, H, W]`` images in ``[0, 1]`` -> resized (bicubic, antialiased) and normalised.

        The batch images are already square crops at the datamodule's size, so this resizes directly
        (no centre crop as in open_clip's PIL pipeline).
        """
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected images of shape [B, 3, H, W], got {tuple(images.shape)}")
        if not images.is_floating_point():
            raise ValueError(f"expected float images in [0, 1], got dtype {images.dtype}")
        x = images.float()
        if tuple(x.shape[-2:]) != (self.image_size, self.image_size):
            x = F.interpolate(
                x, size=(self.image_size, self.image_size), mode="bicubic", align_corners=False, antialias=True
            ).clamp(0.0, 1.0)
        x = (x - self.pixel_mean) / self.pixel_std
        return x.to(self.dtype)

    def _positional_embedding(self, grid: tuple[int, int]) -> Tensor:
        """Positional embedding for a ``grid`` of patches: the trained one, bicubically resized if needed."""
        pos = self.visual.positional_embedding
        side = self.native_image_size // self.patch_size
        if grid == (side, side) or pos.shape[0] != side * side + 1:
            return pos
        cls_pos, patch_pos = pos[:1], pos[1:]
        patch_pos = patch_pos.reshape(1, side, side, -1).permute(0, 3, 1, 2).float()
        patch_pos = F.interpolate(patch_pos, size=grid, mode="bicubic", align_corners=False, antialias=True)
        patch_pos = patch_pos.permute(0, 2, 3, 1).reshape(grid[0] * grid[1], -1).to(pos.dtype)
        return torch.cat([cls_pos, patch_pos], dim=0)

    def embed_patches(self, pixels: Tensor) -> Tensor:
        """Normalised pixels ``[B, 3, S, S]`` -> input tokens ``[B, 1 + N, C]`` of the first block.

        ``conv1`` patchifies, the class embedding is prepended, the positional embedding added and
        ``ln_pre`` applied (patch dropout is a training-time op and is skipped: the backbone is frozen).
        """
        visual = self.visual
        x = visual.conv1(pixels)  # [B, C, h, w]
        grid = (x.shape[-2], x.shape[-1])
        x = x.flatten(2).transpose(1, 2)  # [B, N, C]
        cls = visual.class_embedding.to(x.dtype).view(1, 1, -1).expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1)
        x = x + self._positional_embedding(grid).to(x.dtype)
        return visual.ln_pre(x)

    def project(self, tokens: Tensor) -> Tensor:
        """``ln_post`` then ``proj``: tokens ``[..., C]`` -> joint-space features ``[..., D]`` (model dtype)."""
        return self.visual.ln_post(tokens.to(self.dtype)) @ self.visual.proj

    def _layer_indices(self, layers: Sequence[int]) -> tuple[int, ...]:
        n = self.num_layers
        out = []
        for layer in layers:
            index = layer + n if layer < 0 else layer
            if not 0 <= index < n:
                raise ValueError(f"layer {layer} is out of range for a vision transformer with {n} blocks")
            out.append(int(index))
        return tuple(out)

    def encode_image(
        self,
        images: Tensor,
        layers: Sequence[int] = (),
        vv_layers: int = 0,
        project_patches: bool = False,
        window_sizes: Sequence[int] = (),
        window_batch_size: int = WINDOW_BATCH_SIZE,
        patch_tokens_from: str = "block_output",
    ) -> CLIPImageFeatures:
        """Run the vision tower once and return the features asked for.

        Args:
            images: ``[B, 3, H, W]`` in ``[0, 1]``.
            layers: blocks (0-based; negative counts from the end, ``-1`` is the last) whose patch tokens
                to return, by default the output of ``transformer.resblocks[layer]``.
            vv_layers: number of final blocks that get a CLIP Surgery value-value local branch beside the
                original one (0: none; ``num_layers``: every block, as PromptAD's official code runs it).
                See :meth:`_vv_attention`.
            project_patches: pass the returned ``patch_tokens`` through ``ln_post`` + ``proj``.
            window_sizes: WinCLIP window sizes in patches (e.g. ``(2, 3)``); each window is embedded by
                running the transformer on the class token plus the window's patch tokens only.
            window_batch_size: window sequences per transformer forward (bounds memory).
            patch_tokens_from: ``"block_output"`` (default) or ``"after_next_attention"``: the patch tokens
                of block ``l`` plus the attention update of block ``l + 1`` (original branch, before that
                block's MLP; for the last block, its output). See :data:`PATCH_TOKEN_SOURCES`.
        """
        if not 0 <= vv_layers <= self.num_layers:
            raise ValueError(f"vv_layers must be in [0, {self.num_layers}], got {vv_layers}")
        if patch_tokens_from not in PATCH_TOKEN_SOURCES:
            raise ValueError(
                f"patch_tokens_from must be one of {PATCH_TOKEN_SOURCES}, got {patch_tokens_from!r}"
            )
        layer_ids = self._layer_indices(layers)
        tokens = self.embed_patches(self.preprocess(images))
        grid = self.grid_size

        blocks = self.visual.transformer.resblocks
        vv_start = self.num_layers - vv_layers
        collected: dict[int, Tensor] = {}
        x_ori = tokens
        x_local: Tensor | None = None
        after_next_attention = patch_tokens_from == "after_next_attention"
        last = self.num_layers - 1
        for index, block in enumerate(blocks):
            if index >= vv_start:
                if x_local is None:  # eq. 5: the local branch starts from the original tokens
                    x_local = x_ori
                x_local = x_local + self._vv_attention(block, x_ori)  # eq. 6-7 (no FFN)
            if after_next_attention and index - 1 in layer_ids:
                x_mid, x_ori = self._block_halves(block, x_ori)
                collected[index - 1] = x_mid[:, 1:]
            else:
                x_ori = block(x_ori)  # the original branch, untouched
            if index in layer_ids and (not after_next_attention or index == last):
                collected[index] = x_ori[:, 1:]

        patch_tokens = [collected[i] for i in layer_ids]
        if project_patches:
            patch_tokens = [self.project(t) for t in patch_tokens]
        features = CLIPImageFeatures(
            global_embedding=self.project(x_ori[:, 0]).float(),
            patch_tokens=[t.float() for t in patch_tokens],
            layers=layer_ids,
            patch_tokens_from=patch_tokens_from,
            vv_patch_tokens=None if x_local is None else self.project(x_local[:, 1:]).float(),
            grid_size=grid,
        )
        for size in window_sizes:
            embeddings, indices = self._encode_windows(tokens, int(size), window_batch_size)
            features.window_embeddings.append(embeddings)
            features.window_indices.append(indices)
        features.window_sizes = tuple(int(s) for s in window_sizes)
        return features

    @staticmethod
    def _block_halves(block: nn.Module, x: Tensor) -> tuple[Tensor, Tensor]:
        """One original block in two halves: ``(x + attention update, block output)``.

        The same operations as open_clip's ``ResidualAttentionBlock.forward`` (self-attention, no mask), so
        the second tensor equals ``block(x)`` exactly.
        """
        if not isinstance(block, ResidualAttentionBlock) or hasattr(block, "ln_1_kv"):
            raise ValueError(
                "patch_tokens_from='after_next_attention' needs open_clip ResidualAttentionBlock "
                f"self-attention blocks, got {type(block).__name__}"
            )
        x_mid = x + block.ls_1(block.attention(q_x=block.ln_1(x)))
        return x_mid, x_mid + block.ls_2(block.mlp(block.ln_2(x_mid)))

    def _vv_attention(self, block: nn.Module, x_ori: Tensor) -> Tensor:
        """CLIP Surgery value-value attention of one block, PromptAD eq. 6-7 without the residual.

        ``[Q, K, V] = QKV_Proj(ln_1(Z_ori^{l-1}))`` (eq. 6, the block's own weights, fed with the
        *original* branch); returns ``Proj(Attn(V, V, V))`` (eq. 7, multi-head, scale ``1/sqrt(d_head)``),
        to which the caller adds ``Z^{l-1}``. The FFN is not applied on this branch. The block's layer
        scale ``ls_1`` (identity for CLIP models) is applied as in the original attention path.
        """
        attn = block.attn
        if getattr(attn, "head_scale", None) is not None or not isinstance(
            getattr(attn, "ln_inner", nn.Identity()), nn.Identity
        ):
            raise ValueError("VV attention does not support blocks with head scaling or inner attention norms")
        width = x_ori.shape[-1]
        hidden = block.ln_1(x_ori)
        v_weight = attn.in_proj_weight[2 * width :]
        v_bias = None if attn.in_proj_bias is None else attn.in_proj_bias[2 * width :]
        v = F.linear(hidden, v_weight, v_bias)  # [B, L, C]
        b, length, _ = v.shape
        heads = attn.num_heads
        v = v.reshape(b, length, heads, width // heads).transpose(1, 2)  # [B, heads, L, d]
        out = F.scaled_dot_product_attention(v, v, v)  # softmax(V V^T / sqrt(d)) V
        out = out.transpose(1, 2).reshape(b, length, width)
        return block.ls_1(attn.out_proj(out))

    def _encode_windows(self, tokens: Tensor, window_size: int, chunk: int) -> tuple[Tensor, Tensor]:
        """WinCLIP window embeddings: ``[B, n_windows, D]`` and the ``[n_windows, k*k]`` index map.

        Each window is the class token plus the window's patch tokens (positional embeddings already
        added, all other tokens dropped), run through every block; its embedding is the projected class
        token, like the whole image's.
        """
        indices = window_masks(self.grid_size, window_size).to(tokens.device)
        b, _, c = tokens.shape
        n_windows, n_patches = indices.shape
        patches = tokens[:, 1:][:, indices]  # [B, n_windows, k*k, C]
        cls = tokens[:, :1].unsqueeze(1).expand(b, n_windows, 1, c)
        sequences = torch.cat([cls, patches], dim=2).reshape(b * n_windows, 1 + n_patches, c)
        outputs = []
        for part in sequences.split(max(1, chunk)):
            x = part
            for block in self.visual.transformer.resblocks:
                x = block(x)
            outputs.append(self.project(x[:, 0]))
        return torch.cat(outputs).reshape(b, n_windows, -1).float(), indices

    def encode_windows(
        self, images: Tensor, window_sizes: Sequence[int], window_batch_size: int = WINDOW_BATCH_SIZE
    ) -> tuple[list[Tensor], list[Tensor]]:
        """Window embeddings only: ``([B, n_windows, D] per size, [n_windows, k*k] per size)``."""
        tokens = self.embed_patches(self.preprocess(images))
        pairs = [self._encode_windows(tokens, int(size), window_batch_size) for size in window_sizes]
        return [p[0] for p in pairs], [p[1] for p in pairs]

    # ------------------------------------------------------------------ text
    def _check_text_tower(self) -> None:
        if not hasattr(self.model, "token_embedding") or self.model.text_pool_type != "argmax":
            raise ValueError(
                f"CLIP model {self.model_name!r}: text from token embeddings needs open_clip's built-in text "
                "transformer with end-of-text (argmax) pooling"
            )

    def tokenize(self, sentences: Sequence[str]) -> TokenizedText:
        """Token ids, token embeddings and end-of-text positions of ``sentences``.

        Edit ``token_embeddings`` and pass them to :meth:`encode_text_embeddings`. Row 0 is the start token
        and words follow one BPE token each (common words are one token), so for CoOp-style context write
        placeholders, e.g. ``"X X X X widget."``, and replace rows ``1:5`` with learnable vectors.
        """
        self._check_text_tower()
        if isinstance(sentences, str) or len(sentences) == 0:
            raise ValueError("tokenize expects a non-empty list of sentences")
        device = self.model.token_embedding.weight.device
        ids = self.tokenizer(list(sentences)).to(device)
        return TokenizedText(
            token_ids=ids,
            token_embeddings=self.model.token_embedding(ids),
            eot_index=ids.argmax(dim=-1),  # the end-of-text id is the largest in the vocabulary
        )

    def encode_text_embeddings(self, token_embeddings: Tensor, eot_index: Tensor, normalize: bool = True) -> Tensor:
        """Text transformer forward from token embeddings ``[T, L, W]`` -> sentence features ``[T, D]``.

        Adds the positional embedding, runs the causal transformer, ``ln_final``, takes the output at
        ``eot_index`` ``[T]`` and applies the text projection -- open_clip's ``encode_text`` minus the
        embedding lookup. Gradients flow to ``token_embeddings``.
        """
        self._check_text_tower()
        model = self.model
        if token_embeddings.ndim != 3 or token_embeddings.shape[-1] != self.text_width:
            raise ValueError(
                f"token_embeddings must be [T, L, {self.text_width}], got {tuple(token_embeddings.shape)}"
            )
        length = token_embeddings.shape[1]
        if length > model.positional_embedding.shape[0]:
            raise ValueError(f"{length} tokens exceed the context length {model.positional_embedding.shape[0]}")
        if eot_index.shape != token_embeddings.shape[:1]:
            raise ValueError(f"eot_index must be [{token_embeddings.shape[0]}], got {tuple(eot_index.shape)}")
        cast_dtype = model.transformer.get_cast_dtype()
        x = token_embeddings.to(cast_dtype) + model.positional_embedding[:length].to(cast_dtype)
        mask = None if model.attn_mask is None else model.attn_mask[:length, :length]
        x = model.transformer(x, attn_mask=mask)
        x = model.ln_final(x)
        x = x[torch.arange(x.shape[0], device=x.device), eot_index.to(x.device)]
        projection = model.text_projection
        if isinstance(projection, nn.Linear):
            x = projection(x)
        elif projection is not None:
            x = x @ projection
        x = x.float()
        return F.normalize(x, dim=-1) if normalize else x

    def encode_text(self, sentences: Sequence[str]) -> Tensor:
        """Sentences -> L2-normalised features ``[T, D]`` (open_clip's ``encode_text``, batched)."""
        if isinstance(sentences, str) or len(sentences) == 0:
            raise ValueError("encode_text expects a non-empty list of sentences")
        device = self.model.token_embedding.weight.device if hasattr(self.model, "token_embedding") else None
        chunks = []
        for start in range(0, len(sentences), TEXT_BATCH_SIZE):
            ids = self.tokenizer(list(sentences[start : start + TEXT_BATCH_SIZE]))
            chunks.append(self.model.encode_text(ids.to(device) if device is not None else ids).float())
        return F.normalize(torch.cat(chunks), dim=-1)

    def prompt_ensemble(self, states: Sequence[str], templates: Sequence[str], class_name: str) -> Tensor:
        """One text prototype ``[D]``: every state x template sentence for ``class_name`` encoded,
        normalised, averaged and re-normalised (WinCLIP's compositional prompt ensemble, §4.1)."""
        features = self.encode_text(compose_prompts(states, templates, class_name))
        return F.normalize(features.mean(dim=0), dim=-1)

    def text_features_for(
        self,
        normal_states: Sequence[str],
        anomalous_states: Sequence[str],
        templates: Sequence[str],
        class_name: str,
    ) -> Tensor:
        """``[2, D]``: row 0 the normal, row 1 the anomalous prompt-ensemble prototype."""
        return torch.stack(
            [
                self.prompt_ensemble(normal_states, templates, class_name),
                self.prompt_ensemble(anomalous_states, templates, class_name),
            ]
        )


# ---------------------------------------------------------------------------------------------- loading
def _looks_like_path(value: str) -> bool:
    return os.sep in value or "/" in value or value.lower().endswith(CHECKPOINT_SUFFIXES) or value.startswith("~")


def load_clip(
    model_name: str,
    pretrained: str | None = None,
    image_size: int | None = None,
    device: str | torch.device | None = None,
    precision: str = "fp32",
    cache_dir: str | None = None,
) -> CLIPBackbone:
    """Build a frozen :class:`CLIPBackbone` from an open_clip model name and a weights source.

    Args:
        model_name: an open_clip architecture (``ViT-B-16-plus-240``, ``ViT-L-14``, ``ViT-H-14``, ...) or a
            tiny offline twin (``fsad-tiny-vit``).
        pretrained: an open_clip tag (``laion400m_e31``, ``openai``, ``laion2b_s32b_b79k``; fetched from the
            Hugging Face hub or its local cache), a local checkpoint file, or ``None`` for random weights
            (tests, latency benchmarks) -- ``None`` must be configured explicitly.
        image_size: side length images are resized to (default: the model's own); the positional
            embedding is interpolated for other sizes.
        device: where to put the model (default CPU; Lightning moves it with its module).
        precision: open_clip precision (``fp32``, ``fp16``, ``bf16``, ``pure_fp16``, ``pure_bf16``).
        cache_dir: download cache for tags (default: the Hugging Face cache).

    Raises:
        ValueError: unknown model name, unknown tag, bad precision.
        PretrainedWeightsNotFoundError (a ``FileNotFoundError``): a tag that cannot be fetched (hub
            unreachable or offline, not cached) or a checkpoint path that does not exist.
    """
    register_tiny_clip()
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if not isinstance(model_name, str) or model_name.startswith(("hf-hub:", "local-dir:")):
        raise ValueError(
            f"model_name must be an open_clip architecture name, got {model_name!r}; for weights in a folder or "
            "on the hub use the architecture name with `pretrained` set to a tag or a checkpoint file"
        )
    model_cfg = open_clip.get_model_config(model_name)
    if model_cfg is None:
        raise ValueError(
            f"unknown open_clip model {model_name!r}: see open_clip.list_models() "
            f"(offline tiny twins: {sorted(TINY_CLIP_CONFIGS)})"
        )
    device = torch.device(device) if device is not None else torch.device("cpu")
    kwargs = dict(precision=precision, device=device, cache_dir=cache_dir)
    hint = "`pretrained` accepts an open_clip tag, a local checkpoint path, or null for random weights"

    if pretrained is None:
        model = open_clip.create_model(model_name, pretrained=None, **kwargs)
    else:
        if not isinstance(pretrained, str) or not pretrained.strip():
            raise ValueError(f"pretrained must be a tag, a checkpoint path or None, got {pretrained!r}")
        tag_cfg = open_clip.get_pretrained_cfg(model_name, pretrained)
        if tag_cfg:
            force_quick_gelu = bool(tag_cfg.get("quick_gelu", False)) and not model_cfg.get("quick_gelu", False)
            try:
                model = open_clip.create_model(
                    model_name, pretrained=pretrained, force_quick_gelu=force_quick_gelu, **kwargs
                )
            except Exception as error:  # noqa: BLE001 - any fetch failure becomes one clear line
                raise PretrainedWeightsNotFoundError(
                    f"CLIP weights {model_name!r} / pretrained={pretrained!r} could not be fetched: the Hugging "
                    f"Face hub is unreachable (or HF_HUB_OFFLINE is set) and they are not in the local cache "
                    f"({type(error).__name__}); download them once online or point to the file: {hint}"
                ) from None
        elif os.path.isfile(os.path.expanduser(pretrained)):
            try:
                model = open_clip.create_model(model_name, pretrained=os.path.expanduser(pretrained), **kwargs)
            except (RuntimeError, KeyError, ValueError) as error:  # a state dict of another architecture
                reason = (str(error).strip().splitlines() or [type(error).__name__])[0][:300]
                raise ValueError(
                    f"CLIP checkpoint {pretrained!r} does not fit the open_clip model {model_name!r}: {reason}"
                ) from None
        elif _looks_like_path(pretrained):
            raise PretrainedWeightsNotFoundError(
                f"CLIP weights {model_name!r} / pretrained={pretrained!r}: checkpoint file is missing; {hint}"
            )
        else:
            tags = open_clip.list_pretrained_tags_by_model(model_name)
            raise ValueError(
                f"pretrained={pretrained!r} is neither a known open_clip tag of {model_name!r} (known: {tags}) "
                f"nor an existing file; {hint}"
            )
    return CLIPBackbone(model, open_clip.get_tokenizer(model_name), image_size, model_name, pretrained)

