"""WinCLIP / WinCLIP+ (Jeong et al., "WinCLIP: Zero-/Few-Shot Anomaly Classification and Segmentation",
CVPR 2023) as a plain ``nn.Module`` on top of :class:`~fsad_lightning.backbones.clip.CLIPBackbone`.

Zero-shot (WinCLIP):

- compositional prompt ensemble (§4.1): normal / anomalous state words x templates, averaged into two
  text prototypes ``[g_n, g_a]``;
- image score (§3, the binary CLIP classifier): ``ascore_0(x) = softmax(<f(x), [g_n, g_a]> / tau)[a]``
  with the cosine similarity and ``1 / tau = 100`` (CLIP's logit scale);
- window scores (§4.2): every ``k x k`` window of the patch grid (stride 1; ``k = 2, 3`` for the 15 x 15
  grid of ViT-B-16+ at 240 px) is embedded on its own and scored like an image; window scores are
  *harmonically* aggregated onto the patches each window covers; the map is the mean of the window-scale
  maps and the (broadcast) image score.

Few-normal-shot (WinCLIP+, §4.3): a reference memory holds the patch tokens and the window embeddings of
the k normal shots; a query patch / window scores ``min_r (1 - cos(f, r)) / 2`` against the memory of its
own scale, window scores are harmonically aggregated onto patches, and the scales are averaged into the
vision map ``M_W``. WinCLIP+ combines language and vision: pixel map ``(M_0 + M_W) / 2`` and image score
``(ascore_0 + max M_W) / 2``.

Choices where the paper leaves room (written down here):

- the patch-level memory uses the last block's patch tokens after ``ln_post`` and *without* ``proj``
  (``patch_layer=-1``, ``project_patch_tokens=False``); both are configurable;
- the scale maps are combined by arithmetic mean (the harmonic mean is used within a scale, across windows);
- the image score of WinCLIP+ uses the max of the vision map at patch-grid resolution, before upsampling.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from fsad_lightning.backbones.clip import CLIPBackbone, CLIPImageFeatures
from fsad_lightning.prompts import (
    WINCLIP_ANOMALOUS_STATES,
    WINCLIP_NORMAL_STATES,
    WINCLIP_TEMPLATES,
    compose_prompts,
)
from fsad_lightning.scoring import full_precision, min_cosine_distance, text_anomaly_probability


@dataclass
class WinCLIPOutput:
    """Scores of a batch at patch-grid resolution.

    ``pred_score``: ``[B]`` image scores; ``grid_map``: ``[B, h, w]`` patch scores (upsample them to pixels);
    ``zero_shot_score`` / ``zero_shot_map``: the language-only parts; ``few_shot_map``: the vision map
    ``M_W`` (``None`` in zero-shot mode).
    """

    pred_score: Tensor
    grid_map: Tensor
    zero_shot_score: Tensor
    zero_shot_map: Tensor
    few_shot_map: Tensor | None = None


@dataclass
class ReferenceMemory:
    """WinCLIP+ reference memory of one category: ``patch`` ``[M_p, C]`` patch tokens of the normal shots and
    ``windows`` one ``[M_k, D]`` bank of window embeddings per window size."""

    patch: Tensor
    windows: list[Tensor]


@full_precision
def harmonic_window_aggregation(
    window_scores: Tensor, window_indices: Tensor, num_patches: int, eps: float = 1e-12
) -> Tensor:
    """WinCLIP §4.2 harmonic aggregation of windows onto patches.

    ``M_ij = ( (1 / |u_ij|) * sum_{k in u_ij} 1 / s_k )^-1`` where ``u_ij`` are the windows covering patch
    ``(i, j)`` and ``s_k`` their scores. This is the harmonic mean of a *variable* number of windows per
    patch (corner patches lie in fewer windows), so it is computed with a scatter-add of reciprocals rather
    than :func:`fsad_lightning.scoring.harmonic_mean` (which takes equally many tensors); like it, a zero
    window score gives zero to the patches it covers.

    Args:
        window_scores: ``[B, n_windows]`` non-negative scores.
        window_indices: ``[n_windows, k * k]`` patch indices of each window (:func:`window_masks`).
        num_patches: ``h * w``.
    Returns:
        ``[B, num_patches]``.
    """
    if window_scores.ndim != 2 or window_scores.shape[1] != window_indices.shape[0]:
        raise ValueError(
            f"window_scores {tuple(window_scores.shape)} do not match {window_indices.shape[0]} windows"
        )
    scores = window_scores.float()
    b = scores.shape[0]
    k2 = window_indices.shape[1]
    index = window_indices.reshape(1, -1).expand(b, -1).to(scores.device)  # [B, n_windows * k2]
    reciprocal = (1.0 / scores.clamp_min(eps)).repeat_interleave(k2, dim=1)
    zero = (scores <= eps).float().repeat_interleave(k2, dim=1)
    inv_sum = torch.zeros(b, num_patches, device=scores.device).scatter_add_(1, index, reciprocal)
    count = torch.zeros(b, num_patches, device=scores.device).scatter_add_(1, index, torch.ones_like(reciprocal))
    has_zero = torch.zeros(b, num_patches, device=scores.device).scatter_add_(1, index, zero) > 0
    if (count == 0).any():
        raise ValueError("some patches are covered by no window")
    return torch.where(has_zero, torch.zeros_like(inv_sum), count / inv_sum)


def visual_association_score(query: Tensor, memory: Tensor) -> Tensor:
    """WinCLIP+ §4.3 reference association: ``min_{r in R} (1 - cos(f, r)) / 2`` for every query feature.

    ``query``: ``[..., C]``; ``memory``: ``[M, C]``. Returns ``[...]`` in ``[0, 1]``.
    """
    return 0.5 * min_cosine_distance(query, memory)


class WinCLIPModel(nn.Module):
    """WinCLIP (zero-shot) and WinCLIP+ (with a reference memory of normal shots).

    Args:
        backbone: a :class:`CLIPBackbone` (ViT-B-16-plus-240 at 240 px in the paper).
        window_sizes: window scales in patches (small and mid: ``(2, 3)`` for a 15 x 15 grid).
        temperature: ``1 / tau`` of the text softmax (CLIP's logit scale, 100).
        normal_states / anomalous_states / templates: the compositional prompt ensemble.
        patch_layer: block whose patch tokens form the patch-level memory of WinCLIP+.
        project_patch_tokens: map the patch-level tokens into the joint space (``ln_post`` + ``proj``)
            instead of ``ln_post`` only.
    """

    def __init__(
        self,
        backbone: CLIPBackbone,
        window_sizes: Sequence[int] = (2, 3),
        temperature: float = 100.0,
        normal_states: Sequence[str] = WINCLIP_NORMAL_STATES,
        anomalous_states: Sequence[str] = WINCLIP_ANOMALOUS_STATES,
        templates: Sequence[str] = WINCLIP_TEMPLATES,
        patch_layer: int = -1,
        project_patch_tokens: bool = False,
    ) -> None:
        super().__init__()
        grid = backbone.grid_size
        for size in window_sizes:
            if not 1 <= int(size) <= min(grid):
                raise ValueError(f"window size {size} does not fit the {grid[0]}x{grid[1]} patch grid")
        self.backbone = backbone
        self.window_sizes = tuple(int(s) for s in window_sizes)
        self.temperature = float(temperature)
        self.normal_states = tuple(normal_states)
        self.anomalous_states = tuple(anomalous_states)
        self.templates = tuple(templates)
        for states in (self.normal_states, self.anomalous_states):  # fail on a malformed list now, not at test
            compose_prompts(states, self.templates, "object")
        self.patch_layer = int(patch_layer)
        self.project_patch_tokens = bool(project_patch_tokens)
        # derived state, rebuilt from prompts / shots, never checkpointed
        self._text_cache: dict[tuple[str, str], Tensor] = {}
        self.references: dict[str, ReferenceMemory] = {}

    # ------------------------------------------------------------------ features
    def extract(self, images: Tensor) -> CLIPImageFeatures:
        """Global embedding, patch tokens of ``patch_layer`` and window embeddings in one pass."""
        features = self.backbone.encode_image(
            images,
            layers=(self.patch_layer,),
            project_patches=self.project_patch_tokens,
            window_sizes=self.window_sizes,
        )
        if not self.project_patch_tokens:  # ln_post without proj: the token space of the last block
            ln_post = self.backbone.visual.ln_post
            features.patch_tokens = [ln_post(t.to(self.backbone.dtype)).float() for t in features.patch_tokens]
        return features

    def text_features(self, class_name: str) -> Tensor:
        """``[2, D]`` normal / anomalous prompt-ensemble prototypes of ``class_name`` (cached per device)."""
        device = self.backbone.pixel_mean.device
        key = (class_name, str(device))
        if key not in self._text_cache:
            self._text_cache[key] = self.backbone.text_features_for(
                self.normal_states, self.anomalous_states, self.templates, class_name
            ).detach()
        return self._text_cache[key]

    # ------------------------------------------------------------------ reference memory (WinCLIP+)
    @property
    def has_reference(self) -> bool:
        """Whether WinCLIP+ is active (some category has a reference memory)."""
        return bool(self.references)

    def reset_reference(self) -> None:
        """Forget every reference memory (back to zero-shot WinCLIP)."""
        self.references = {}

    @torch.no_grad()
    def fit_reference(self, images: Tensor, category: str = "") -> None:
        """Store the patch tokens and window embeddings of the normal shots ``[k, 3, H, W]`` of ``category``.

        Memories are kept per category, so a multi-category run compares each query with the shots of
        its own category only.
        """
        if images.ndim != 4 or images.shape[0] == 0:
            raise ValueError(f"fit_reference needs a non-empty [k, 3, H, W] batch, got {tuple(images.shape)}")
        features = self.extract(images)
        patch = features.patch_tokens[0]
        self.references[category] = ReferenceMemory(
            patch=patch.reshape(-1, patch.shape[-1]),
            windows=[w.reshape(-1, w.shape[-1]) for w in features.window_embeddings],
        )

    # ------------------------------------------------------------------ scores
    def _text_probability(self, image_features: Tensor, text_features: Tensor) -> Tensor:
        """``ascore_0`` for ``[B, ..., D]`` features: one ``[2, D]`` text pair, or ``[B, 2, D]`` per image."""
        if text_features.ndim == 2:
            return text_anomaly_probability(image_features, text_features, self.temperature)
        return torch.stack(
            [
                text_anomaly_probability(image_features[i], text_features[i], self.temperature)
                for i in range(image_features.shape[0])
            ]
        )

    def zero_shot_scores(self, features: CLIPImageFeatures, text_features: Tensor) -> tuple[Tensor, Tensor]:
        """WinCLIP zero-shot: image score ``ascore_0`` ``[B]`` and the multi-scale map ``M_0`` ``[B, h, w]``.

        ``text_features``: ``[2, D]`` for the whole batch or ``[B, 2, D]`` per image. ``M_0`` is the mean
        of the image score (broadcast, the image scale) and of each window scale's harmonically
        aggregated window scores.
        """
        h, w = features.grid_size
        image_score = self._text_probability(features.global_embedding, text_features)
        scale_maps = [image_score.view(-1, 1).expand(-1, h * w)]
        for embeddings, indices in zip(features.window_embeddings, features.window_indices):
            window_scores = self._text_probability(embeddings, text_features)  # [B, n_windows]
            scale_maps.append(harmonic_window_aggregation(window_scores, indices, h * w))
        return image_score, torch.stack(scale_maps).mean(dim=0).view(-1, h, w)

    def few_shot_map(self, features: CLIPImageFeatures, memory: ReferenceMemory) -> Tensor:
        """WinCLIP+ vision map ``M_W`` ``[B, h, w]``: patch-level and window-level reference association
        against ``memory``, windows harmonically aggregated onto patches, scales averaged."""
        h, w = features.grid_size
        patch_tokens = features.patch_tokens[0]
        scale_maps = [visual_association_score(patch_tokens, memory.patch.to(patch_tokens.device))]
        for embeddings, indices, bank in zip(features.window_embeddings, features.window_indices, memory.windows):
            window_scores = visual_association_score(embeddings, bank.to(embeddings.device))
            scale_maps.append(harmonic_window_aggregation(window_scores, indices, h * w))
        return torch.stack(scale_maps).mean(dim=0).view(-1, h, w)

    def forward(
        self, images: Tensor, class_names: Sequence[str], categories: Sequence[str] | None = None
    ) -> WinCLIPOutput:
        """Score ``images`` ``[B, 3, H, W]`` in ``[0, 1]``.

        ``class_names``: the object name put into the prompts, one per image. ``categories``: the reference
        memory of each image (default: ``class_names``); used only when a reference memory was fitted.
        """
        if len(class_names) != images.shape[0]:
            raise ValueError(f"got {len(class_names)} class names for {images.shape[0]} images")
        categories = list(class_names if categories is None else categories)
        if len(categories) != images.shape[0]:
            raise ValueError(f"got {len(categories)} categories for {images.shape[0]} images")
        features = self.extract(images)
        if len(set(class_names)) == 1:
            text = self.text_features(class_names[0])  # [2, D], shared by the batch
        else:
            text = torch.stack([self.text_features(name) for name in class_names])  # [B, 2, D]
        zero_score, zero_map = self.zero_shot_scores(features, text)
        if not self.has_reference:
            return WinCLIPOutput(zero_score, zero_map, zero_score, zero_map)

        vision_map = torch.empty_like(zero_map)
        for category in sorted(set(categories)):
            if category not in self.references:
                raise ValueError(
                    f"no reference shots for category {category!r} (fitted: {sorted(self.references)})"
                )
            rows = torch.tensor([i for i, c in enumerate(categories) if c == category], device=images.device)
            vision_map[rows] = self.few_shot_map(select_images(features, rows), self.references[category])
        pred_score = 0.5 * (zero_score + vision_map.flatten(1).amax(dim=1))
        grid_map = 0.5 * (zero_map + vision_map)
        return WinCLIPOutput(pred_score, grid_map, zero_score, zero_map, vision_map)


def select_images(features: CLIPImageFeatures, rows: Tensor) -> CLIPImageFeatures:
    """The features of the images ``rows`` of a batch (index maps are shared and kept)."""
    return CLIPImageFeatures(
        global_embedding=features.global_embedding[rows],
        patch_tokens=[t[rows] for t in features.patch_tokens],
        layers=features.layers,
        vv_patch_tokens=None if features.vv_patch_tokens is None else features.vv_patch_tokens[rows],
        window_embeddings=[w[rows] for w in features.window_embeddings],
        window_indices=features.window_indices,
        window_sizes=features.window_sizes,
        grid_size=features.grid_size,
    )
