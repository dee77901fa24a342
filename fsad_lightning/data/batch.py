"""The one batch contract every dataset yields and every method consumes.

A batch is a plain ``dict`` (so Lightning moves it between devices and DDP ranks without help):

==================  =========================================  ==========================================
key                 value                                      meaning
==================  =========================================  ==========================================
``image``           float ``[B, 3, H, W]`` in ``[0, 1]``       RGB at the datamodule's ``image_size``;
                                                               each backbone applies its own normalisation
``mask``            float ``[B, 1, H, W]`` in ``{0, 1}``       ground truth at ``image_size`` (zeros for
                                                               good images and for image-only sets)
``label``           long ``[B]``                               0 normal, 1 anomalous, -1 unknown
                                                               (unlabelled ``predict_dir`` images)
``has_mask``        bool ``[B]``                               a pixel ground truth exists for this image
``path``            ``list[str]``                              the image file (or a ``dataset://`` id)
``mask_path``       ``list[str]``                              the mask file, ``""`` when there is none
``category``        ``list[str]``                              category (class) name
``defect_type``     ``list[str]``                              ``good`` or the defect folder name
``original_size``   long ``[B, 2]``                            ``(H, W)`` of the source image
``gt_mask``         ``list[uint8 [H_i, W_i]]`` (test only)     ground truth at source resolution, for
                                                               evaluation at ground-truth resolution
``content_box``     long ``[B, 4]`` (``resize_mode: pad``)      ``(top, left, height, width)`` of the image
                                                               inside the padded tensor; maps are cropped
                                                               to it before evaluation
==================  =========================================  ==========================================
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

IMAGE = "image"
MASK = "mask"
LABEL = "label"
HAS_MASK = "has_mask"
PATH = "path"
MASK_PATH = "mask_path"
CATEGORY = "category"
DEFECT_TYPE = "defect_type"
ORIGINAL_SIZE = "original_size"
GT_MASK = "gt_mask"
CONTENT_BOX = "content_box"

STACKED_KEYS = (IMAGE, MASK, LABEL, HAS_MASK, ORIGINAL_SIZE)
#: stacked like STACKED_KEYS when present (only some batches carry them)
OPTIONAL_STACKED_KEYS = (CONTENT_BOX,)
LIST_KEYS = (PATH, MASK_PATH, CATEGORY, DEFECT_TYPE, GT_MASK)


def collate_samples(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Collate per-image sample dicts into the batch contract above.

    Tensors of a fixed shape are stacked; strings and source-resolution masks (whose sizes may differ
    from image to image) stay lists.
    """
    if not samples:
        raise ValueError("cannot collate an empty list of samples")
    batch: dict[str, Any] = {}
    for key in samples[0]:
        values = [sample[key] for sample in samples]
        if key in STACKED_KEYS or key in OPTIONAL_STACKED_KEYS:
            batch[key] = torch.stack([torch.as_tensor(v) for v in values])
        else:
            batch[key] = values
    return batch


def select_rows(batch: dict[str, Any], rows: list[int]) -> dict[str, Any]:
    """The images ``rows`` of a collated ``batch`` (in that order; repeats allowed), every key kept."""
    out: dict[str, Any] = {}
    for key, value in batch.items():
        if isinstance(value, Tensor):
            out[key] = value[torch.as_tensor(rows, dtype=torch.long, device=value.device)]
        elif isinstance(value, (list, tuple)):
            out[key] = [value[i] for i in rows]
        else:
            out[key] = value
    return out


@dataclass
class AnomalyOutput:
    """What every method returns for a batch of queries.

    ``pred_score``: ``[B]`` image anomaly scores, higher means more anomalous.
    ``anomaly_map``: ``[B, H, W]`` pixel scores at the batch's image size, or ``None`` for a method
    that only scores images.
    """

    pred_score: Tensor
    anomaly_map: Tensor | None = None

    def detach_cpu(self) -> AnomalyOutput:
        return AnomalyOutput(
            pred_score=self.pred_score.detach().float().cpu(),
            anomaly_map=None if self.anomaly_map is None else self.anomaly_map.detach().float().cpu(),
        )
