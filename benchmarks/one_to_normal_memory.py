"""Peak GPU memory of One-to-Normal at the paper's settings, estimated from CPU measurements.

    python benchmarks/one_to_normal_memory.py [--gpu-gib 24] [--test-batch 16] [--train-batch 1]

No GPU is needed. The full-size architectures (SD 1.5 UNet / VAE / text encoder, CLIP ViT-L/14) are built
with random weights on the CPU; their parameter bytes are counted exactly, and the activation memory of each
stage is *measured* at a small batch by counting the bytes of every tensor the ops create while it is alive
(a ``TorchDispatchMode``: the CPU analogue of ``torch.cuda.max_memory_allocated`` above the weights, without
kernel workspaces). The measured fp32 activation bytes per image are then scaled to the batch a stage sees
at the configured settings (``DreamBoothNormalModule``'s defaults unless overridden). Two figures per stage:
bf16 (x 0.5, what ``bf16-mixed`` autocast stores for matmuls and convolutions) and the fp32 bound (autocast
keeps GroupNorm / softmax outputs in fp32, so the truth lies between); the verdict uses the fp32 bound.
Attention runs as a fused SDPA kernel on both devices, so no T x T attention matrix is stored. The estimate
is printed with its arithmetic, stage by stage, for ``fsad fit`` and ``fsad test``:

- fit: the prior-preservation images (txt2img, ``generation_batch_size`` images, guidance doubles the UNet
  batch), their VAE encode, and a DreamBooth-LoRA training step (UNet forward + backward on the instance and
  class latents, with gradient checkpointing as the configs set it; AdamW state of the LoRA weights);
- test: the pool (as the class images), the personalization of a test batch (``B x P`` img2img pairs in
  chunks of ``personalization_batch_size``, guidance doubling them, decoded ``vae_batch_size`` at a time)
  and the CLIP features of the queries and their personalized images.

The same estimate is printed for the code before issue 13 ("before"): all ``B x P`` reconstructions
decoded in one VAE pass, the 100 class images generated and encoded in one pass outside autocast (fp32),
CLIP on the GPU in training.

CLIP is off the GPU while the UNet trains (``DreamBoothNormalModule`` parks it), so the fit peak counts
the SD weights only; the test peak counts SD and CLIP. Weights stay fp32 (``diffusion_dtype: float32``,
``clip_precision: fp32``, as the configs ship them) unless ``--weights bf16``.
"""

from __future__ import annotations

import argparse
import inspect
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from benchmarks.memory_estimate import GIB, measure, parameter_bytes  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--gpu-gib", type=float, default=22.35, help="GPU memory to check against (a 24 GB card: 22.35 GiB)"
    )
    parser.add_argument("--test-batch", type=int, default=16, help="test queries per batch (data.batch_size)")
    parser.add_argument("--train-batch", type=int, default=1, help="shots per step (data.train_batch_size)")
    from fsad_lightning.methods.one_to_normal import DreamBoothNormalModule

    defaults = {
        name: parameter.default
        for name, parameter in inspect.signature(DreamBoothNormalModule.__init__).parameters.items()
    }
    for name in (
        "num_prompts",
        "personalization_batch_size",
        "vae_batch_size",
        "generation_batch_size",
        "num_class_images",
        "resolution",
    ):
        parser.add_argument("--" + name.replace("_", "-"), type=int, default=defaults[name])
    parser.add_argument("--weights", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument(
        "--no-checkpointing", action="store_true", help="training without gradient checkpointing"
    )
    parser.add_argument("--threads", type=int, default=None)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, float]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from fsad_lightning.backbones.clip import load_clip
    from fsad_lightning.backbones.diffusion import add_unet_lora, set_gradient_checkpointing
    from fsad_lightning.backbones.diffusion_zoo import load_diffusion_model

    torch.manual_seed(0)
    sd = load_diffusion_model("fsad-random-sd15", "txt2img", "float32", "DDIMScheduler")
    add_unet_lora(sd.unet, rank=4, alpha=4.0)
    clip = load_clip("ViT-L-14", pretrained=None, image_size=None, precision="fp32")
    weight_bytes = 2 if args.weights == "bf16" else None
    lora = [p for p in sd.unet.parameters() if p.requires_grad]
    lora_bytes = float(sum(p.numel() * 4 for p in lora))
    weights = {
        "UNet": parameter_bytes(sd.unet, weight_bytes),
        "VAE": parameter_bytes(sd.vae, weight_bytes),
        "text encoder": parameter_bytes(sd.text_encoder, weight_bytes),
        "CLIP ViT-L/14": parameter_bytes(clip, weight_bytes),
    }
    latent = args.resolution // sd.vae_scale_factor
    context = torch.randn(1, 77, 768)
    measured: dict[str, tuple[float, float, str]] = {}  # stage -> (fp32 bytes per unit, seconds, unit)

    with torch.no_grad():
        per, seconds = measure(
            lambda: sd.unet(torch.randn(2, 4, latent, latent), 500, context.expand(2, -1, -1))
        )
        measured["UNet inference"] = (per / 2, seconds, "UNet sample")
        per, seconds = measure(lambda: sd.vae.decode(torch.randn(1, 4, latent, latent)).sample)
        measured["VAE decode"] = (per, seconds, "image")
        per, seconds = measure(
            lambda: sd.vae.encode(torch.rand(1, 3, args.resolution, args.resolution)).latent_dist
        )
        measured["VAE encode"] = (per, seconds, "image")
        per, seconds = measure(lambda: clip.encode_image(torch.rand(2, 3, 224, 224), layers=[5, 11, 17, 23]))
        measured["CLIP features"] = (per / 2, seconds, "image")

    set_gradient_checkpointing(sd.unet, not args.no_checkpointing)
    sd.unet.train()

    def training_step():
        latents = torch.randn(2, 4, latent, latent)
        prediction = sd.unet(
            latents, torch.tensor([500, 500]), encoder_hidden_states=context.expand(2, -1, -1)
        ).sample
        prediction.float().pow(2).mean().backward()

    per, seconds = measure(training_step)
    measured["UNet train step"] = (per / 2, seconds, "UNet sample")
    sd.unet.eval()

    print(
        f"measured on the CPU ({torch.get_num_threads()} threads), fp32, random weights, "
        f"{args.resolution} px / {latent} x {latent} latents:"
    )
    for name, (per, seconds, unit) in measured.items():
        print(f"  {name}: {per / GIB:.3f} GiB fp32 activations per {unit} ({seconds:.1f} s)")

    print(
        "weights (" + args.weights + "): " + ", ".join(f"{k} {v / GIB:.2f} GiB" for k, v in weights.items())
    )
    totals = {}
    for before in (False, True):
        for phase, total in estimate(args, measured, weights, 3 * lora_bytes, before).items():
            totals[f"{phase} {'before' if before else 'now'}"] = total
    return totals


def estimate(args, measured, weights, adam: float, before: bool) -> dict[str, float]:
    """Print the fit and test peaks (weights + the largest stage) of the current or the old code; return
    their fp32 bounds in bytes. ``adam``: the LoRA gradient and AdamW's two moments (fp32)."""
    sd_weights = weights["UNet"] + weights["VAE"] + weights["text encoder"]
    gen_unet = 2 * args.generation_batch_size
    all_pairs = args.test_batch * args.num_prompts
    pairs = all_pairs if before else min(args.personalization_batch_size, all_pairs)
    decodes = all_pairs if before else min(args.vae_batch_size, all_pairs)
    generation_decodes = args.generation_batch_size if before else args.vae_batch_size
    class_encodes = args.num_class_images if before else args.vae_batch_size
    query_encodes = args.test_batch if before else min(args.vae_batch_size, args.test_batch)
    train_samples = 2 * args.train_batch  # instance + class latents in one UNet pass
    # stage -> (measurement, count, always fp32: the old class-latent encode ran outside autocast)
    stages = {
        "fit": {
            f"class images: UNet x {gen_unet} (guidance)": ("UNet inference", gen_unet, before),
            f"class images: VAE decode x {generation_decodes}": ("VAE decode", generation_decodes, before),
            f"class latents: VAE encode x {class_encodes}": ("VAE encode", class_encodes, before),
            f"train step: UNet x {train_samples}": ("UNet train step", train_samples, False),
        },
        "test": {
            f"pool: UNet x {gen_unet} (guidance)": ("UNet inference", gen_unet, False),
            f"personalization: UNet x {2 * pairs} ({pairs} of {all_pairs} pairs, guidance)": (
                "UNet inference",
                2 * pairs,
                False,
            ),
            f"personalization: VAE decode x {decodes}": ("VAE decode", decodes, False),
            f"queries: VAE encode x {query_encodes}": ("VAE encode", query_encodes, False),
            f"features: CLIP x {2 * args.test_batch}": ("CLIP features", 2 * args.test_batch, False),
        },
    }
    totals = {}
    for phase, parts in stages.items():
        clip_on_gpu = phase == "test" or before
        base = (
            sd_weights + (weights["CLIP ViT-L/14"] if clip_on_gpu else 0.0) + (adam if phase == "fit" else 0)
        )
        where = "SD + CLIP" if clip_on_gpu else "SD; CLIP parked on the CPU"
        extra = f", LoRA grads + AdamW {adam / GIB:.3f}" if phase == "fit" else ""
        print(
            f"{phase} ({'before issue 13' if before else 'now'}): weights {base / GIB:.2f} GiB ({where}{extra})"
        )
        bounds = {}
        for name, (stage, count, fp32) in parts.items():
            per = measured[stage][0]
            low, high = per * count * (1.0 if fp32 else 0.5), per * count
            bounds[name] = (low, high)
            print(
                f"  {name}: {count} x {per / GIB:.3f} GiB = {high / GIB:.2f} GiB fp32, "
                f"{low / GIB:.2f} GiB bf16" + (" (run in fp32)" if fp32 else "")
            )
        worst = max(bounds, key=lambda name: bounds[name][1])
        low, high = bounds[worst]
        totals[phase] = base + high
        verdict = "fits" if totals[phase] / GIB <= args.gpu_gib else "does NOT fit"
        print(
            f"  peak = {base / GIB:.2f} + {low / GIB:.2f}..{high / GIB:.2f} ({worst.split(':')[0]}) = "
            f"{(base + low) / GIB:.2f}..{totals[phase] / GIB:.2f} GiB: {verdict} in {args.gpu_gib:g} GiB"
        )
    return totals


if __name__ == "__main__":
    main()
