"""Per-query latency and peak memory of fsad_lightning methods at inference.

    python benchmarks/latency.py --method winclip --batch-sizes 1 16 --device cpu --repeats 5

Each method is an entry of :data:`REGISTRY`: a builder that returns a ready-to-score module (shots already
fitted) with the *full-size* architecture and random weights (``pretrained=None``: speed does not depend on
the weight values, and nothing is downloaded). The timed call is the method's ``predict_anomaly`` on a
batch of random images at the method's input size: feature extraction, scoring, upsampling and blur.

Measurements per batch size: ``--warmup`` untimed calls, then ``--repeats`` timed calls
(``torch.cuda.synchronize`` around each on CUDA); the latency per query is the median call time divided by
the batch size. Peak memory is ``torch.cuda.max_memory_allocated`` on CUDA (reset per batch size) and the
process's peak resident set size on CPU (it includes the model and only grows, so read it as "at most").
The published figure the method's papers report is printed beside, with its hardware: compare with care.

Other methods add an entry with :func:`register`.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from benchmarks.memory_estimate import LiveTensorBytes  # noqa: E402
from fsad_lightning.data.batch import CATEGORY, IMAGE  # noqa: E402

#: a built method: ``score(images [B, 3, H, W]) -> anything`` (the method's output)
Scorer = Callable[[torch.Tensor], Any]


@dataclass
class BenchmarkEntry:
    """How to build one method for timing.

    ``build(device, args)`` returns a :data:`Scorer` with the shots already fitted; ``image_size`` is the
    side of the query images; ``anchor`` is a published latency to print beside ours.
    """

    build: Callable[[torch.device, argparse.Namespace], Scorer]
    image_size: int
    anchor: str
    description: str


REGISTRY: dict[str, BenchmarkEntry] = {}


def register(name: str, image_size: int, anchor: str, description: str):
    """Decorator adding a builder to :data:`REGISTRY` under ``name``."""

    def wrap(build: Callable[[torch.device, argparse.Namespace], Scorer]):
        if name in REGISTRY:
            raise ValueError(f"benchmark entry {name!r} is registered twice")
        REGISTRY[name] = BenchmarkEntry(build, image_size, anchor, description)
        return build

    return wrap


def _shots(k: int, size: int, device: torch.device, category: str) -> dict[str, Any]:
    generator = torch.Generator().manual_seed(0)
    return {IMAGE: torch.rand(k, 3, size, size, generator=generator).to(device), CATEGORY: [category] * k}


# ---------------------------------------------------------------------------------------------- entries
@register(
    "winclip",
    image_size=240,
    anchor="WinCLIP 389 ms/query (One-to-Normal, Li et al. NeurIPS 2024, RTX 4090)",
    description="WinCLIP+ ViT-B-16-plus-240 (random weights), windows 2 and 3, k-shot reference memory",
)
def build_winclip(device: torch.device, args: argparse.Namespace) -> Scorer:
    from fsad_lightning.methods.winclip import WinCLIPModule

    module = WinCLIPModule(
        model_name="ViT-B-16-plus-240", pretrained=None, image_size=240, precision=args.precision
    )
    module.to(device).eval()
    with torch.no_grad():
        module.fit_shots(_shots(args.k_shot, 240, device, "bottle"))

    def score(images: torch.Tensor):
        return module.predict_anomaly({IMAGE: images, CATEGORY: ["bottle"] * images.shape[0]})

    return score


@register(
    "promptad",
    image_size=240,
    anchor="PromptAD issue goal on an H100: fit <= 60 s per category (100 epochs), "
    "<= 30 ms/query at batch 16",
    description="PromptAD ViT-B-16-plus-240 (random weights), VV on all 12 blocks, image set N=3 and pixel "
    "set N=1 (E_N=4 L=4 E_A=1, generic suffixes), memory of blocks 3 and 8, 400 px maps; fit timed first "
    "(FSAD_PROMPTAD_FIT_EPOCHS, default 100 epochs of the image set, the pixel set its 1, all shots per step)",
)
def build_promptad(device: torch.device, args: argparse.Namespace) -> Scorer:
    import os

    from fsad_lightning.methods.promptad import PromptADModule

    module = PromptADModule(
        model_name="ViT-B-16-plus-240", pretrained=None, image_size=240, precision=args.precision
    )
    module.to(device).train()
    shots = _shots(args.k_shot, 240, device, "bottle")
    epochs = module.prompt_epochs(int(os.environ.get("FSAD_PROMPTAD_FIT_EPOCHS", "100")))
    optimizer, scheduler = module.build_optimizer(epochs)
    _sync(device)
    start = time.perf_counter()
    module.prepare_prompts(shots)
    for epoch in range(max(epochs.values())):  # one step per epoch: all shots in one batch, as in the paper
        prompt_sets = module.active_prompt_sets(epoch, epochs)
        loss = module.model.compute_losses(shots[IMAGE], prompt_sets)["loss"]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
    module.eval()
    with torch.no_grad():
        module.fit_shots(shots)
    _sync(device)
    seconds = time.perf_counter() - start
    print(
        f"promptad fit: {epochs['image']} image-set + {epochs['pixel']} pixel-set epochs on {args.k_shot} "
        f"shots + memory: {seconds:.1f} s"
    )

    def score(images: torch.Tensor):
        return module.predict_anomaly({IMAGE: images, CATEGORY: ["bottle"] * images.shape[0]})

    return score


def _one_to_normal(device: torch.device, args: argparse.Namespace, tiny: bool) -> Scorer:
    """One-to-Normal: fit timed first (class images, DreamBooth-LoRA steps, pool + memory bank), then a
    per-stage split of ``predict_anomaly`` (personalization / features / scoring) at each batch size.

    Sizes come from the paper's config unless overridden: FSAD_O2N_FIT_STEPS (500), FSAD_O2N_CLASS_IMAGES
    (100), FSAD_O2N_SAMPLING_STEPS (25: class images and pool), FSAD_O2N_POOL_SIZE (30),
    FSAD_O2N_STEPS (20: the personalization schedule, t = 0.3 runs 6 steps from timestep 300),
    FSAD_O2N_VAE_BATCH (8: images per VAE pass). As ``fsad fit`` does, the class images are generated under
    the fit's precision and CLIP waits on the CPU during the LoRA steps. On CUDA the fit and the queries run
    under bf16 autocast, with gradient checkpointing.
    """
    import os

    from fsad_lightning.backbones.sampling import path_key
    from fsad_lightning.methods.one_to_normal import DreamBoothNormalModule

    size = 64 if tiny else 240
    options = dict(
        diffusion_model="fsad-tiny-sd", resolution=32, num_class_images=4, class_inference_steps=2,
        num_inference_steps=10, pool_size=6, pool_inference_steps=4, image_encoder="cnn",
        cnn_backbone="tf_efficientnet_lite0", cnn_stages=[2, 3], cnn_weights="random",
        clip_model="fsad-tiny-vit", clip_pretrained=None, clip_image_size=64, learning_rate=1e-3,
    ) if tiny else dict(
        diffusion_model="fsad-random-sd15", clip_model="ViT-L-14", clip_pretrained=None,
        clip_precision=args.precision, gradient_checkpointing=device.type == "cuda",
    )
    steps = int(os.environ.get("FSAD_O2N_FIT_STEPS", "4" if tiny else "500"))
    for variable, names in (
        ("FSAD_O2N_CLASS_IMAGES", ["num_class_images"]),
        ("FSAD_O2N_SAMPLING_STEPS", ["class_inference_steps", "pool_inference_steps"]),
        ("FSAD_O2N_POOL_SIZE", ["pool_size"]),
        ("FSAD_O2N_STEPS", ["num_inference_steps"]),
        ("FSAD_O2N_VAE_BATCH", ["vae_batch_size"]),
    ):
        if variable in os.environ:
            options.update({name: int(os.environ[variable]) for name in names})
    module = DreamBoothNormalModule(**options).to(device)
    shots = _shots(args.k_shot, size, device, "bottle")
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    parts = {}
    _sync(device)
    start = time.perf_counter()
    with torch.no_grad(), autocast:
        module.model.prepare_prompts("bottle")
        if module.hparams.prior_loss_weight > 0:
            module.model.set_class_latents(module.class_images("bottle"))
    _sync(device)
    parts["class images"] = time.perf_counter() - start
    module.model.move_image_encoders("cpu")  # unused by the LoRA steps
    module.train()
    optimizer = module.configure_optimizers()
    generator = torch.Generator(device=device).manual_seed(0)
    for _ in range(steps):
        with autocast:
            losses = module.model.dreambooth_loss(shots[IMAGE][:1], module.hparams.prior_loss_weight, generator)
        loss = losses["loss"]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    _sync(device)
    parts[f"{steps} LoRA steps"] = time.perf_counter() - start - sum(parts.values())
    module.model.move_image_encoders(device)
    module.eval()
    with torch.no_grad(), autocast:
        module.fit_shots(shots)
    _sync(device)
    parts["pool + memory"] = time.perf_counter() - start - sum(parts.values())
    fit_memory = peak_memory_text(device)
    split = ", ".join(f"{name} {seconds:.1f} s" for name, seconds in parts.items())
    print(f"one_to_normal fit ({args.k_shot} shots): {sum(parts.values()):.1f} s ({split}); {fit_memory}")

    def score(images: torch.Tensor, timings: dict[str, float] | None = None):
        keys = [path_key(f"query{i}") for i in range(images.shape[0])]
        with autocast:
            return module.model(images, keys, timings)

    print_stage_split("one_to_normal", score, args.batch_sizes, size, device, warm_up=True)
    return score


@register(
    "one_to_normal",
    image_size=240,
    anchor="One-to-Normal ~WinCLIP 389 ms + 200-300 ms/query, InCTRL 276 ms (Li et al., NeurIPS 2024, "
    "RTX 4090); issue goals on an H100: <= 150 ms/query at batch 16, fit <= 5 min, fit peak <= 16 GB",
    description="One-to-Normal, SD 1.5 architecture + CLIP ViT-L-14 (random weights), LoRA rank 4, t = 0.3 "
    "(6 DDIM steps from timestep 300, stride of 20), 3 prompts, pool of 30, 240 px; fit timed first "
    "(FSAD_O2N_FIT_STEPS, FSAD_O2N_CLASS_IMAGES, FSAD_O2N_SAMPLING_STEPS, FSAD_O2N_POOL_SIZE, FSAD_O2N_STEPS, "
    "FSAD_O2N_VAE_BATCH)",
)
def build_one_to_normal(device: torch.device, args: argparse.Namespace) -> Scorer:
    return _one_to_normal(device, args, tiny=False)


@register(
    "one_to_normal_tiny",
    image_size=64,
    anchor="none: tiny random twins (configs/one_to_normal_tiny.yaml), plumbing cost only",
    description="One-to-Normal offline config: tiny SD (32 px, 3 of 10 steps), tiny CLIP, "
    "EfficientNet-Lite0, pool of 6, 64 px",
)
def build_one_to_normal_tiny(device: torch.device, args: argparse.Namespace) -> Scorer:
    return _one_to_normal(device, args, tiny=True)


#: the assumption behind the GPU estimate of AnomalySD: H100 SXM dense bf16 peak (TFLOP/s) and the share of
#: it a UNet / VAE batch of 32 at 512 px achieves (convolutions and attention, bf16, no CUDA graphs)
H100_BF16_PEAK_TFLOPS = 989.0
ACHIEVED_SHARE = (0.4, 0.6)


def anomalysd_flops(model: Any) -> dict[str, float]:
    """FLOPs of one image through each network of an AnomalySD model at its working resolution.

    ``unet`` (one denoising pass), ``vae_encode`` and ``vae_decode`` are counted with
    :class:`torch.utils.flop_counter.FlopCounterMode` on copies of the UNet and the VAE built from the
    model's configs on the ``meta`` device (no weights, no compute: every convolution and matmul at the
    exact shapes, attention as its two batched matmuls -- a fused attention kernel, as the CPU runs, is
    not counted by the flop counter); ``alexnet`` (the distance features of one image, eq. 16) and
    ``efficientnet`` (the prototype features of one query, eq. 12) on the real modules. FLOPs = 2 x
    multiply-adds.
    """
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from torch.utils.flop_counter import FlopCounterMode

    def count(run: Callable[[], Any]) -> float:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            run()
        return float(counter.get_total_flops())

    diffusion, size = model.diffusion, model.resolution
    side = size // diffusion.vae_scale_factor
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(diffusion.unet.config)
        vae = AutoencoderKL.from_config(diffusion.vae.config)
        unet_input = torch.zeros(1, unet.config.in_channels, side, side)
        context = torch.zeros(1, diffusion.max_prompt_length, unet.config.cross_attention_dim)
        timestep = torch.full((1,), 500.0)
        pixels = torch.zeros(1, 3, size, size)
        latents = torch.zeros(1, vae.config.latent_channels, side, side)
    real = torch.zeros(1, 3, size, size, device=diffusion.device)
    flops = {
        "unet": count(lambda: unet(unet_input, timestep, encoder_hidden_states=context)),
        "vae_encode": count(lambda: vae.encode(pixels)),
        "vae_decode": count(lambda: vae.decode(latents)),
        "alexnet": count(lambda: model.perceptual.features(real)),
        "efficientnet": count(lambda: model.prototype_features(real)) if model.prototype_encoder is not None else 0.0,
    }
    return flops


def vae_decode_activation_gib(model: Any, batch_size: int, dtype: torch.dtype = torch.bfloat16) -> float:
    """Peak live activations (GiB) of one VAE decode of ``batch_size`` latents at the model's resolution in
    ``dtype``, counted on a ``meta`` copy of the VAE (group norms in float32, as CUDA autocast runs them,
    take up to ~1.6 x more)."""
    from diffusers import AutoencoderKL

    side = model.resolution // model.diffusion.vae_scale_factor
    with torch.device("meta"):
        vae = torch.nn.Module.to(AutoencoderKL.from_config(model.diffusion.vae.config), dtype)  # quietly
        latents = torch.zeros(batch_size, vae.config.latent_channels, side, side, dtype=dtype)
    counter = LiveTensorBytes()
    with torch.no_grad(), counter:
        vae.decode(latents)
    return counter.peak / 2**30


def anomalysd_cost_lines(model: Any, batch_size: int) -> list[str]:
    """The cost lines of the AnomalySD benchmark: network calls and FLOPs per query (from
    :meth:`~fsad_lightning.methods.anomalysd.torch_model.AnomalySDModel.network_calls_per_query` and
    :func:`anomalysd_flops`) and the GPU time they imply under :data:`ACHIEVED_SHARE` of
    :data:`H100_BF16_PEAK_TFLOPS`."""
    calls = model.network_calls_per_query(batch_size)
    flops = anomalysd_flops(model)
    parts = {
        "UNet": calls["unet_passes"] * flops["unet"],
        "VAE encode": calls["vae_encodes"] * flops["vae_encode"],
        "VAE decode": calls["vae_decodes"] * flops["vae_decode"],
        "AlexNet + EfficientNet": (calls["vae_decodes"] + 1) * flops["alexnet"] + flops["efficientnet"],
    }
    total = sum(parts.values())
    split = ", ".join(f"{name} {value / 1e12:.4g}" for name, value in parts.items())
    low, high = (total / (share * H100_BF16_PEAK_TFLOPS * 1e12) for share in reversed(ACHIEVED_SHARE))
    return [
        f"anomalysd work per query (batch {batch_size}): {calls['unet_passes']:.0f} UNet passes "
        f"({flops['unet'] / 1e12:.4g} TFLOPs each), {calls['vae_encodes']:.2f} VAE encodes "
        f"({flops['vae_encode'] / 1e12:.4g} TFLOPs), {calls['vae_decodes']:.0f} VAE decodes "
        f"({flops['vae_decode'] / 1e12:.4g} TFLOPs)",
        f"anomalysd FLOPs per query: {total / 1e15:.4g} PFLOPs (TFLOPs: {split})",
        f"anomalysd VAE decode activations (bf16, meta count): "
        f"{vae_decode_activation_gib(model, model.diffusion.vae_batch_size or model.inpaint_batch_size):.2f} "
        f"GiB per slice of {model.diffusion.vae_batch_size or model.inpaint_batch_size}, "
        f"{vae_decode_activation_gib(model, model.inpaint_batch_size):.2f} GiB for a whole UNet chunk of "
        f"{model.inpaint_batch_size}",
        f"anomalysd GPU estimate: {low:.3g}-{high:.3g} s per query on an H100 SXM, assuming bf16 at "
        f"{int(100 * ACHIEVED_SHARE[0])}-{int(100 * ACHIEVED_SHARE[1])} % of its {H100_BF16_PEAK_TFLOPS:.0f} "
        "TFLOP/s dense peak (FLOPs / throughput; no GPU measured here)",
    ]


def learned_state_mib(module: Any) -> float:
    """MiB of the learned state a checkpoint of ``module`` holds (the state_dict entries it keeps)."""
    keep, state = module.learned_state_keys(), module.state_dict()
    return sum(state[k].numel() * state[k].element_size() for k in keep if k in state) / 2**20


def _anomalysd(device: torch.device, args: argparse.Namespace, tiny: bool) -> Scorer:
    """AnomalySD: fit steps timed first (UNet phase, then decoder phase, at batch 8), prototype banks, the
    learned state's size, the work and FLOPs per query with a GPU estimate (:func:`anomalysd_cost_lines`),
    then ``predict_anomaly`` with a per-stage split (encode / prototype mask / masked latents / inpainting /
    distances / scoring) at each batch size.

    Shorten with environment variables: FSAD_ANOMALYSD_STEPS (sampling schedule, 50; ``int(0.4 * steps)``
    are run), FSAD_ANOMALYSD_SCALES (``1,2,4,8``), FSAD_ANOMALYSD_RESOLUTION (512; tiny 32),
    FSAD_ANOMALYSD_INPAINT_BATCH (32), FSAD_ANOMALYSD_VAE_BATCH (8), FSAD_ANOMALYSD_FIT_STEPS (UNet steps
    timed, 10; tiny 4; 0 skips the fit), FSAD_ANOMALYSD_DECODER_STEPS (decoder steps timed, 4; tiny 2),
    FSAD_ANOMALYSD_UNET_FINETUNE (``full`` as the paper's configs, ``lora``; the full UNet's Adam state
    needs ~14 GB), FSAD_ANOMALYSD_COMPILE (1: ``compile: true``), FSAD_ANOMALYSD_MODEL (the full-size
    random architecture, ``fsad-random-sd15-inpaint``). On CUDA the fit runs under bf16 autocast with
    gradient checkpointing; ``--precision bf16`` computes the SD networks in bf16 (frozen weights cast).
    """
    import math
    import os

    from fsad_lightning.backbones.sampling import path_key
    from fsad_lightning.methods.anomalysd import InpaintFinetuneModule

    env = os.environ.get
    scales = [int(k) for k in env("FSAD_ANOMALYSD_SCALES", "1,2,4,8").split(",") if k.strip()]
    steps = int(env("FSAD_ANOMALYSD_STEPS", "10" if tiny else "50"))
    size = 64 if tiny else 512
    dtypes = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
    options = dict(
        diffusion_model="fsad-tiny-sd-inpaint" if tiny else env("FSAD_ANOMALYSD_MODEL", "fsad-random-sd15-inpaint"),
        diffusion_dtype=dtypes.get(args.precision, "float32"),  # frozen SD weights cast to it
        resolution=int(env("FSAD_ANOMALYSD_RESOLUTION", "32" if tiny else "512")),
        num_inference_steps=steps,
        scales=scales,
        inpaint_batch_size=int(env("FSAD_ANOMALYSD_INPAINT_BATCH", "32")),
        vae_batch_size=int(env("FSAD_ANOMALYSD_VAE_BATCH", "8")),
        unet_finetune=env("FSAD_ANOMALYSD_UNET_FINETUNE", "lora" if tiny else "full"),
        compile=env("FSAD_ANOMALYSD_COMPILE", "0") == "1",
        prototype_backbone="tf_efficientnet_lite0" if tiny else "tf_efficientnet_b6",
        prototype_weights="random",
        perceptual_weights="random",
        gradient_checkpointing=device.type == "cuda",
    )
    module = InpaintFinetuneModule(**options).to(device)
    model = module.model
    model.set_compute_dtype(module.diffusion_compute_dtype)
    unet_steps = int(env("FSAD_ANOMALYSD_FIT_STEPS", "4" if tiny else "10"))
    decoder_steps = int(env("FSAD_ANOMALYSD_DECODER_STEPS", "2" if tiny else "4"))
    train_images = torch.rand(8, 3, size, size, generator=torch.Generator().manual_seed(3)).to(device)
    train_categories = ["bottle"] * 8
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    model.prepare_prompts(["bottle"])
    module.train()
    optimizer = module.configure_optimizers()
    generator = torch.Generator().manual_seed(0)
    per_step = {}
    for phase, count in (("unet", unet_steps), ("decoder", decoder_steps)):
        times = []
        for _ in range(count):
            _sync(device)
            start = time.perf_counter()
            with autocast:
                if phase == "unet":
                    loss = model.inpainting_loss(train_images, train_categories, generator)
                else:
                    loss = model.decoder_loss(train_images, generator)["loss"]
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            _sync(device)
            times.append(time.perf_counter() - start)
        # the first step pays one-off costs (allocations, kernels): the median of the rest when there is one
        per_step[phase] = statistics.median(times[1:] or times) if times else float("nan")
    module.eval()
    shots = _shots(args.k_shot, size, device, "bottle")
    _sync(device)
    start = time.perf_counter()
    with torch.no_grad(), autocast:
        module.fit_shots(shots)
    _sync(device)
    bank_seconds = time.perf_counter() - start
    fit_memory = peak_memory_text(device)
    # the paper's schedule on MVTec AD, multi-class: 15 categories x k shots per epoch at batch 8
    steps_per_epoch = math.ceil(15 * args.k_shot / 8)
    total = per_step["unet"] * 4000 * steps_per_epoch + per_step["decoder"] * 200 * steps_per_epoch
    print(
        f"anomalysd fit: UNet step {per_step['unet']:.2f} s, decoder step {per_step['decoder']:.2f} s (batch 8, "
        f"median of {unet_steps} / {decoder_steps}); prototype banks {bank_seconds:.2f} s; "
        f"{fit_memory}; the paper's schedule "
        f"(MVTec AD, 15 x {args.k_shot} shots, 4,000 + 200 epochs = {4200 * steps_per_epoch} steps) "
        f"would take {total / 3600:.1f} h"
    )
    print(
        f"anomalysd learned state (the checkpoint): {learned_state_mib(module):.1f} MiB "
        f"(unet_finetune {model.unet_finetune}, decoder_finetune {model.decoder_finetune})"
    )
    print(
        f"anomalysd inference: {model.inpaintings_per_query()} inpaintings per query, "
        f"{int(model.noise_strength * steps)} of {steps} DDIM steps each (lambda = {model.noise_strength}), "
        f"scales {scales}, resolution {model.resolution}, UNet chunks of {model.inpaint_batch_size}, VAE "
        f"slices of {model.diffusion.vae_batch_size}, compute dtype {model.compute_dtype}, "
        f"compiled UNet {model.diffusion.denoiser is not model.diffusion.unet}"
    )
    for batch_size in args.batch_sizes:
        print("\n".join(anomalysd_cost_lines(model, batch_size)))

    def score(images: torch.Tensor, timings: dict[str, float] | None = None):
        keys = [path_key(f"query{i}") for i in range(images.shape[0])]
        with autocast:
            return model(images, ["bottle"] * images.shape[0], keys, timings)

    # one call per batch size: a query is 86 inpaintings, a warm-up call would double the run
    print_stage_split("anomalysd", score, args.batch_sizes, size, device, warm_up=False)
    return score


@register(
    "anomalysd",
    image_size=512,
    anchor="AnomalySD issue goal on an H100: <= 2 s/query at the paper's 50 steps (85 + 1 inpaintings); "
    "the paper gives no timing",
    description="AnomalySD, SD 1.5 inpainting architecture (random weights), full UNet (or LoRA) + full decoder, "
    "EfficientNet-B6 prototype masks, LPIPS-AlexNet distances, 512 px; fit steps timed first "
    "(FSAD_ANOMALYSD_* shorten it, see _anomalysd)",
)
def build_anomalysd(device: torch.device, args: argparse.Namespace) -> Scorer:
    return _anomalysd(device, args, tiny=False)


@register(
    "anomalysd_tiny",
    image_size=64,
    anchor="none: tiny random twins (configs/anomalysd_tiny.yaml), plumbing cost only",
    description="AnomalySD offline config: tiny inpainting SD (32 px, 4 of 10 steps), 85 + 1 inpaintings, "
    "EfficientNet-Lite0 prototype masks, 64 px",
)
def build_anomalysd_tiny(device: torch.device, args: argparse.Namespace) -> Scorer:
    return _anomalysd(device, args, tiny=True)


def _adp(device: torch.device, args: argparse.Namespace, tiny: bool) -> Scorer:
    """ADP: concept learning timed first -- shot encodes, the c_n* steps (eq. 3), the SDEdit pseudo-anomalies,
    the c_a* steps (eq. 4), self-tuning (eq. 5-6: 20 SDEdits with c_a* + prototypes) and the reference
    memory -- with steps/s of each concept and the projected time of both concepts at the paper's length;
    then ``predict_anomaly`` (eq. 7-10) on 512 px queries (CLIP resizes them to 224).

    Fit sizes are the paper's unless shortened with environment variables: FSAD_ADP_STEPS (steps per
    concept, 3000), FSAD_ADP_BATCH (4), FSAD_ADP_RESOLUTION (512), FSAD_ADP_PSEUDO (pseudo-anomalies per
    set, 20), FSAD_ADP_SAMPLING_STEPS (SDEdit schedule, 30; strength 0.5 runs half). On CUDA the frozen SD
    runs in bf16; CLIP in --precision (use bf16 on a GPU). The concept embedding is fp32.
    """
    import os

    from fsad_lightning.methods.adp import ADPConceptModule

    def setting(name: str, paper: int, tiny_value: int) -> int:
        return int(os.environ.get(name, tiny_value if tiny else paper))

    steps = setting("FSAD_ADP_STEPS", 3000, 2)
    batch = setting("FSAD_ADP_BATCH", 4, 2)
    resolution = setting("FSAD_ADP_RESOLUTION", 512, 32)
    pseudo = setting("FSAD_ADP_PSEUDO", 20, 4)
    sampling_steps = setting("FSAD_ADP_SAMPLING_STEPS", 30, 4)
    backbones = dict(
        diffusion_model="fsad-tiny-sd", clip_model="fsad-tiny-vit-sd", clip_image_size=64,
    ) if tiny else dict(
        diffusion_model="fsad-random-sd21", clip_model="ViT-H-14", clip_image_size=224,
        diffusion_dtype="bfloat16" if device.type == "cuda" else "float32", clip_precision=args.precision,
    )
    module = ADPConceptModule(
        **backbones, clip_pretrained=None, resolution=resolution, steps_per_concept=steps,
        num_pseudo_anomalies=pseudo, num_self_tuning_anomalies=pseudo, num_inference_steps=sampling_steps,
    ).to(device)
    shots = _shots(args.k_shot, 64 if tiny else 512, device, "bottle")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    parts: dict[str, float] = {}
    step_times: list[list[float]] = [[], []]

    def lap(name: str, start: float) -> float:
        _sync(device)
        parts[name] = time.perf_counter() - start
        return time.perf_counter()

    _sync(device)
    start = clock = time.perf_counter()
    module.prepare_training(shots)  # the shots' VAE latents (and mirrors) and CLIP embeddings, once
    clock = lap("shot encodes", clock)
    optimizer = module.build_optimizer(batch)
    module.train()
    for step in range(2 * steps):
        if step == steps:
            clock = lap(f"c_n* {steps} steps", clock)
            module.start_anomaly_phase(optimizer)
            clock = lap(f"{pseudo} pseudo-anomalies", clock)
        step_start = time.perf_counter()
        shot_indices = torch.arange(step * batch, (step + 1) * batch) % args.k_shot
        loss = module.training_losses(shot_indices, step)["loss"]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        _sync(device)
        step_times[step >= steps].append(time.perf_counter() - step_start)
    clock = lap(f"c_a* {steps} steps", clock)
    module.eval()
    with torch.no_grad():
        module.fit_shots(shots)
    lap(f"self-tuning ({pseudo} SDEdits) + memory", clock)
    total = time.perf_counter() - start
    fit_memory = peak_memory_text(device)
    split = ", ".join(f"{name} {seconds:.1f} s" for name, seconds in parts.items())
    rates = [1.0 / statistics.median(times) for times in step_times]
    generation = sum(v for k, v in parts.items() if "pseudo" in k or "self-tuning" in k)
    median_step = statistics.median(step_times[0] + step_times[1])
    projected = 2 * 3000 * median_step + generation + parts["shot encodes"]
    print(
        f"adp fit ({args.k_shot} shots, batch {batch}, {resolution} px, {steps} steps per concept, SDEdit "
        f"{int(0.5 * sampling_steps)} of {sampling_steps} steps): {total:.1f} s ({split}); "
        f"c_n* {rates[0]:.2f} steps/s, c_a* {rates[1]:.2f} steps/s (median step); "
        f"projected for 2 x 3000 steps at these settings: {projected / 60:.1f} min; "
        f"{fit_memory}"
    )

    def score(images: torch.Tensor):
        return module.predict_anomaly({IMAGE: images, CATEGORY: ["bottle"] * images.shape[0]})

    return score


@register(
    "adp",
    image_size=512,
    anchor="ADP 0.73 s/query incl. CLIP ViT-H/14 (Kwak et al. Table 8, RTX 3090); concept learning "
    "~1.5 h per concept on an RTX 3090 (Appendix C); issue goals on an H100: both concepts <= 15 min "
    "(bf16), <= 100 ms/query",
    description="ADP, SD 2.1 architecture (fsad-random-sd21) + CLIP ViT-H-14 (random weights), 512 px "
    "concept learning at batch 4, SDEdit strength 0.5 of 30 steps, 20 + 20 pseudo-anomalies, windows 2 and "
    "3; fit timed first (FSAD_ADP_STEPS, FSAD_ADP_BATCH, FSAD_ADP_RESOLUTION, FSAD_ADP_PSEUDO, "
    "FSAD_ADP_SAMPLING_STEPS)",
)
def build_adp(device: torch.device, args: argparse.Namespace) -> Scorer:
    return _adp(device, args, tiny=False)


@register(
    "adp_tiny",
    image_size=64,
    anchor="none: tiny random twins (configs/adp_tiny.yaml), plumbing cost only",
    description="ADP offline config: tiny SD (32 px, 2 of 4 SDEdit steps) + tiny CLIP sharing its text space "
    "(64 px), 2 steps per concept, 4 + 4 pseudo-anomalies",
)
def build_adp_tiny(device: torch.device, args: argparse.Namespace) -> Scorer:
    return _adp(device, args, tiny=True)


# ---------------------------------------------------------------------------------------------- timing
def print_stage_split(
    method: str,
    score: Callable[..., Any],
    batch_sizes: list[int],
    image_size: int,
    device: torch.device,
    warm_up: bool,
) -> None:
    """Print the per-stage ms / query of ``score(images, timings)`` at each batch size (after one untimed
    call when ``warm_up``); the harness times the whole call separately."""
    for batch_size in batch_sizes:
        generator = torch.Generator().manual_seed(2)
        images = torch.rand(batch_size, 3, image_size, image_size, generator=generator).to(device)
        timings: dict[str, float] = {}
        with torch.inference_mode():
            if warm_up:
                score(images)
            score(images, timings)
        stages = ", ".join(f"{name} {1000 * seconds / batch_size:.1f}" for name, seconds in timings.items())
        when = "" if warm_up else " (first call)"
        print(f"{method} batch {batch_size}: ms / query by stage{when}: {stages}")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_memory_text(device: torch.device) -> str:
    """``"peak allocated 123 MiB"`` (CUDA) or ``"peak RSS 123 MiB"`` (CPU), as the fit lines print it."""
    return f"peak {'allocated' if device.type == 'cuda' else 'RSS'} {_peak_memory_mib(device):.0f} MiB"


def _peak_memory_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def measure(score: Scorer, batch_size: int, image_size: int, device: torch.device, warmup: int, repeats: int):
    """Median per-query latency (ms), all call times (s) and peak memory (MiB) at one batch size."""
    images = torch.rand(batch_size, 3, image_size, image_size, generator=torch.Generator().manual_seed(1))
    images = images.to(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    with torch.inference_mode():
        for step in range(warmup + repeats):
            _sync(device)
            start = time.perf_counter()
            score(images)
            _sync(device)
            if step >= warmup:
                times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times) / batch_size, times, _peak_memory_mib(device)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--method", required=True, choices=sorted(REGISTRY))
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per batch size")
    parser.add_argument("--warmup", type=int, default=2, help="untimed calls per batch size")
    parser.add_argument("--k-shot", type=int, default=4, help="normal shots fitted before timing")
    parser.add_argument("--precision", default="fp32", help="backbone precision (fp32, fp16, bf16)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results to this file")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but CUDA is not available")
    if args.repeats < 1 or args.warmup < 0 or args.k_shot < 1 or min(args.batch_sizes) < 1:
        parser.error("--repeats, --k-shot and --batch-sizes must be >= 1 and --warmup >= 0")
    return args


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    entry = REGISTRY[args.method]
    torch.manual_seed(0)
    score = entry.build(device, args)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"{args.method}: {entry.description}\ndevice: {name}; {args.warmup} warm-up + {args.repeats} timed calls")
    memory_label = "peak allocated MiB" if device.type == "cuda" else "peak RSS MiB"
    print(f"| batch | ms / query (median) | ms / batch (min-max) | {memory_label} |")
    print("|---|---|---|---|")
    rows = []
    for batch_size in args.batch_sizes:
        per_query, times, memory = measure(score, batch_size, entry.image_size, device, args.warmup, args.repeats)
        print(
            f"| {batch_size} | {per_query:.1f} | {1000 * min(times):.0f}-{1000 * max(times):.0f} | {memory:.0f} |"
        )
        rows.append(
            {
                "method": args.method,
                "device": name,
                "batch_size": batch_size,
                "ms_per_query": per_query,
                "batch_seconds": times,
                "peak_memory_mib": memory,
                "memory_kind": memory_label,
            }
        )
    print(f"anchor: {entry.anchor}")
    if args.json is not None:
        args.json.write_text(json.dumps(rows, indent=2))
    return rows


if __name__ == "__main__":
    main()
