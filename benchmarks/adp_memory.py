"""Peak GPU memory of ADP at the paper's settings, computed without a GPU and without building SD on the CPU.

    python benchmarks/adp_memory.py [--gpu-gib 22.35] [--train-batch 4] [--k-shot 4] [--test-batch 16]

The full-size networks -- SD 2.1's UNet, VAE and text encoder (``fsad-random-sd21``'s architecture) and
OpenCLIP ViT-H/14 with both towers -- are built on the ``meta`` device: no weights are allocated and
nothing is computed, so the estimate runs in seconds in a few hundred MB of RAM. Parameter bytes are
counted exactly (x 4 for fp32, x 2 for bf16); each stage's activation memory is the peak of the bytes its
ops keep alive at once (:class:`~benchmarks.memory_estimate.LiveTensorBytes` on the meta copies, the
backward included), at the batch sizes the stage really runs:

- fit, shot encodes: the VAE encodes the ``2K`` shot views (shots + mirrors) in chunks of 8 at 512 px,
  CLIP embeds them at 224 px;
- fit, a training step of eq. 4 (the larger of the two steps): the SD text encoder on ``B`` prompts with
  the concept spliced in, the UNet forward and backward on ``B`` latents (the concept's gradient flows
  through the cross-attention, so the whole UNet backward runs although no UNet weight learns), the
  CLIP text tower forward and backward on the ``2 x min(2B, 27)`` state sentences, and CLIP on the ``B``
  cropped pseudo-anomalies; with and without UNet gradient checkpointing;
- fit / test, SDEdit (eq. 4's pseudo-anomalies, the self-tuning set): the UNet on ``2 x
  generation_batch_size`` latents (classifier-free guidance) and the VAE decode, ``vae_batch_size`` images
  per pass (before issue 13: the whole call);
- test, a query batch: CLIP's global embedding, last-block patch tokens and the 2 x 2 / 3 x 3 window
  embeddings of ``test_batch`` images (WinCLIP+'s reference association, eq. 8-9).

A phase's peak is its weights (SD + CLIP; the concept, its AdamW moments and the cached pseudo-anomalies
are added, a few MB) plus its largest stage. Two activation figures per stage: counted with bf16 modules
(what ``bf16-mixed`` with bf16 weights stores for convolutions and matmuls) and with fp32 modules (the
bound: autocast keeps normalisation outputs in fp32, so a bf16 run lies between); verdicts use the fp32
bound of the activations. Attention is counted as a fused kernel stores it (output and log-sum-exp, no
T x T matrix; :func:`~benchmarks.memory_estimate.fused_attention`), as on the GPU.

Rows: the weights in fp32 or bf16, UNet gradient checkpointing off or on, the VAE on a whole call or in
slices. ADP before issue 13 ran its module defaults fp32 / off / whole (its configs bf16 / off / whole);
now the defaults (under the configs' ``bf16-mixed``) are bf16 / on / slices of 4. ``--check-tiny`` repeats
the training-step count on the real tiny twins on the CPU and on their meta copies, to show the meta count
is the real one.
"""

from __future__ import annotations

import argparse
import inspect
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from benchmarks.memory_estimate import GIB, MIB, fused_attention, measure, parameter_bytes  # noqa: E402

#: images per VAE encode of the shots (ADP's ``ENCODE_CHUNK``) and the prompt templates of eq. 3-4
ENCODE_CHUNK = 8
NUM_TEMPLATES = 27


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from fsad_lightning.methods.adp import ADPConceptModule

    defaults = {
        name: parameter.default
        for name, parameter in inspect.signature(ADPConceptModule.__init__).parameters.items()
    }
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--gpu-gib", type=float, default=22.35, help="GPU memory to check against (a 24 GB card: 22.35 GiB)"
    )
    parser.add_argument("--train-batch", type=int, default=4, help="shots per step (Appendix A: 4)")
    parser.add_argument("--k-shot", type=int, default=4, help="shots K")
    parser.add_argument("--test-batch", type=int, default=16, help="queries per test batch (data.batch_size)")
    for name in (
        "resolution",
        "generation_batch_size",
        "vae_batch_size",
        "num_pseudo_anomalies",
        "clip_image_size",
    ):
        parser.add_argument("--" + name.replace("_", "-"), type=int, default=defaults[name])
    parser.add_argument("--check-tiny", action="store_true", help="real vs meta count on the tiny twins")
    return parser.parse_args(argv)


# ---------------------------------------------------------------------------------------------- the stages
def sentence_length(clip) -> int:
    """Tokens of ADP's longest CLIP state sentence (the concept sentences are cut after it)."""
    from fsad_lightning.methods.adp.concepts import CLIP_CONCEPT_PLACEHOLDER, state_sentences
    from fsad_lightning.prompts import ADP_ANOMALOUS_STATE, ADP_NORMAL_STATE, ADP_TEMPLATES

    sentences = state_sentences(ADP_NORMAL_STATE, ADP_TEMPLATES, CLIP_CONCEPT_PLACEHOLDER) + state_sentences(
        ADP_ANOMALOUS_STATE, ADP_TEMPLATES, CLIP_CONCEPT_PLACEHOLDER
    )
    return int(clip.tokenizer(sentences).argmax(dim=-1).max()) + 1


def training_step(sd, clip, batch: int, latent: int, length: int) -> None:
    """One eq. 4 step at batch ``batch``: what ADPModel.concept_learning_loss runs, with a concept vector
    added to every token embedding (the memory of the splice) so that gradients reach it."""
    device, dtype = sd.device, sd.dtype
    width = sd.text_encoder.get_input_embeddings().embedding_dim
    concept = torch.nn.Parameter(torch.zeros(width, device=device))
    splice = sd.text_encoder.get_input_embeddings().register_forward_hook(
        lambda module, inputs, output: output + concept.to(output.dtype)
    )
    try:
        with torch.no_grad():  # eq. 4's cropped pseudo-anomalies, read by CLIP without gradients
            clip.encode_image(torch.zeros(batch, 3, clip.image_size, clip.image_size, device=device))
        context = sd.text_encoder(torch.zeros(batch, sd.max_prompt_length, dtype=torch.long, device=device))[
            0
        ]
        latents = torch.zeros(batch, sd.latent_channels, latent, latent, device=device, dtype=dtype)
        timesteps = torch.full((batch,), 500, device=device)
        prediction = sd.unet(latents, timesteps, encoder_hidden_states=context).sample
        loss = prediction.float().pow(2).mean()
        sentences = 2 * min(2 * batch, NUM_TEMPLATES)  # T(S_n(c)), T(S_a(c)) of the step's distinct templates
        tokens = torch.zeros(sentences, length, width, device=device) + concept
        eot = torch.full((sentences,), length - 1, dtype=torch.long, device=device)
        loss = loss + clip.encode_text_embeddings(tokens, eot).sum()
        loss.backward()
    finally:
        splice.remove()


@torch.no_grad()
def unet_sampling(sd, batch: int, latent: int) -> None:
    device = sd.device
    sd.unet(
        torch.zeros(2 * batch, sd.latent_channels, latent, latent, device=device, dtype=sd.dtype),
        torch.full((2 * batch,), 500, device=device),
        encoder_hidden_states=torch.zeros(
            2 * batch, sd.max_prompt_length, sd.unet.config.cross_attention_dim, device=device, dtype=sd.dtype
        ),
    )


@torch.no_grad()
def vae_decode(sd, batch: int, latent: int) -> None:
    sd.vae.decode(torch.zeros(batch, sd.latent_channels, latent, latent, device=sd.device, dtype=sd.dtype))


@torch.no_grad()
def vae_encode(sd, batch: int, resolution: int) -> None:
    sd.vae.encode(torch.zeros(batch, 3, resolution, resolution, device=sd.device, dtype=sd.dtype))


@torch.no_grad()
def clip_query(clip, batch: int) -> None:
    """WinCLIP+'s features of a query batch (eq. 8-9): global embedding, last-block tokens, windows."""
    images = torch.zeros(batch, 3, clip.image_size, clip.image_size, device=clip.pixel_mean.device)
    clip.encode_image(images, layers=(-1,), window_sizes=(2, 3))


# ---------------------------------------------------------------------------------------------- building
def build(device: str, dtype: torch.dtype, tiny: bool, image_size: int):
    """(SD, CLIP) on ``device`` in ``dtype``: full-size SD 2.1 + ViT-H/14, or the tiny twins."""
    import open_clip

    from fsad_lightning.backbones.clip import CLIPBackbone
    from fsad_lightning.backbones.diffusion import StableDiffusion
    from fsad_lightning.backbones.diffusion_zoo import random_stable_diffusion
    from fsad_lightning.backbones.tiny import register_tiny_clip, tiny_stable_diffusion_components

    register_tiny_clip()
    name = "fsad-tiny-vit-sd" if tiny else "ViT-H-14"
    with torch.device(device):
        if tiny:
            sd = StableDiffusion(**tiny_stable_diffusion_components(seed=0))
        else:
            sd = random_stable_diffusion("sd21", "txt2img", "float32", "DDIMScheduler")
        model = open_clip.create_model(name, pretrained=None, device=device)
        clip = CLIPBackbone(model, open_clip.get_tokenizer(name), image_size, name, None)
    if dtype != torch.float32:
        torch.nn.Module.to(sd, dtype)
        torch.nn.Module.to(clip.model, dtype)
    return sd, clip


def check_tiny(args: argparse.Namespace) -> None:
    """The eq. 4 step's activation count on the real tiny twins (CPU) and on their meta copies."""
    from fsad_lightning.backbones.diffusion import set_gradient_checkpointing

    counts = {}
    for device in ("cpu", "meta"):
        torch.manual_seed(0)
        sd, clip = build(device, torch.float32, tiny=True, image_size=64)
        set_gradient_checkpointing(sd.unet, True)
        latent = 32 // sd.vae_scale_factor
        counts[device], seconds = measure(
            training_step, sd, clip, args.train_batch, latent, sentence_length(clip)
        )
        print(
            f"tiny twins ({device}): eq. 4 step at batch {args.train_batch}, 32 px: "
            f"{counts[device] / MIB:.3f} MiB of activations ({seconds:.2f} s)"
        )
    print(f"tiny twins: meta / real = {counts['meta'] / counts['cpu']:.4f}")


# ---------------------------------------------------------------------------------------------- the estimate
def main(argv: list[str] | None = None) -> dict[str, float]:
    args = parse_args(argv)
    with fused_attention():  # attention as a fused GPU kernel stores it, on the CPU and on meta alike
        return estimate(args)


def estimate(args: argparse.Namespace) -> dict[str, float]:
    from fsad_lightning.backbones.diffusion import set_gradient_checkpointing

    if args.check_tiny:
        check_tiny(args)
    start = time.perf_counter()
    latent = args.resolution // 8
    shot_views, gen = 2 * args.k_shot, args.generation_batch_size
    chunk = min(ENCODE_CHUNK, shot_views)
    sliced = {
        "encode": min(args.vae_batch_size or chunk, chunk),
        "decode": min(args.vae_batch_size or gen, gen),
    }
    whole = {"encode": chunk, "decode": gen}  # before issue 13: no VAE slicing
    #: dtype -> stage -> variant -> bytes; variants: checkpointing "off" / "on", VAE "whole" / "sliced", "-"
    stages: dict[str, dict[str, dict[str, float]]] = {}
    weights: dict[str, dict[str, float]] = {}
    for label, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        sd, clip = build("meta", dtype, tiny=False, image_size=args.clip_image_size)
        weights[label] = {
            "UNet": parameter_bytes(sd.unet),
            "VAE": parameter_bytes(sd.vae),
            "SD text encoder": parameter_bytes(sd.text_encoder),
            "CLIP ViT-H/14": parameter_bytes(clip),
        }
        length = sentence_length(clip)
        counted: dict[str, dict[str, float]] = {}
        train = (
            f"train step (eq. 4): UNet fwd + bwd x {args.train_batch}, text towers, CLIP x {args.train_batch}"
        )
        for checkpointing in ("off", "on"):
            set_gradient_checkpointing(sd.unet, checkpointing == "on")
            counted.setdefault(train, {})[checkpointing] = measure(
                training_step, sd, clip, args.train_batch, latent, length
            )[0]
        set_gradient_checkpointing(sd.unet, False)
        for variant, sizes in (("whole", whole), ("sliced", sliced)):
            counted.setdefault("shot encodes: VAE encode", {})[variant] = measure(
                vae_encode, sd, sizes["encode"], args.resolution
            )[0]
            counted.setdefault("SDEdit: VAE decode", {})[variant] = measure(
                vae_decode, sd, sizes["decode"], latent
            )[0]
        counted[f"shot encodes: CLIP x {shot_views}"] = {"-": measure(clip_query, clip, shot_views)[0]}
        counted[f"SDEdit: UNet x {2 * gen} (guidance)"] = {"-": measure(unet_sampling, sd, gen, latent)[0]}
        counted[f"queries: CLIP + windows x {args.test_batch}"] = {
            "-": measure(clip_query, clip, args.test_batch)[0]
        }
        stages[label] = counted
    print(
        f"counted on the meta device in {time.perf_counter() - start:.1f} s: SD 2.1 (fsad-random-sd21) + "
        f"OpenCLIP ViT-H/14, {args.resolution} px / {latent} x {latent} latents, CLIP at {args.clip_image_size} px"
    )
    print(
        "weights: "
        + "; ".join(
            f"{label} "
            + ", ".join(f"{k} {v / GIB:.2f}" for k, v in parts.items())
            + f" = {sum(parts.values()) / GIB:.2f} GiB"
            for label, parts in weights.items()
        )
    )
    print(
        "activations per stage, GiB (bf16 count .. fp32 bound); train step with checkpointing off / on, VAE "
        f"whole call ({whole['encode']} encodes, {whole['decode']} decodes) / sliced ({sliced['encode']}, "
        f"{sliced['decode']}):"
    )
    for name, variants in stages["fp32"].items():
        text = ", ".join(
            f"{variant + ': ' if variant != '-' else ''}{stages['bf16'][name][variant] / GIB:.2f}..{value / GIB:.2f}"
            for variant, value in variants.items()
        )
        print(f"  {name}: {text}")

    extra = float(args.num_pseudo_anomalies * 3 * args.resolution**2 * 4 + 3 * 4 * 1024 * 4)
    rows = [  # (weights, checkpointing, VAE, note)
        ("fp32", "off", "whole", "ADP's module defaults before issue 13"),
        ("bf16", "off", "whole", "ADP's configs before issue 13"),
        ("fp32", "off", "sliced", ""),
        ("fp32", "on", "sliced", ""),
        ("bf16", "off", "sliced", ""),
        ("bf16", "on", "sliced", "now: the defaults under bf16-mixed, the configs"),
    ]

    def stage_bytes(label: str, name: str, checkpointing: str, vae: str) -> float:
        variants = stages[label][name]
        return variants.get(checkpointing, variants.get(vae, variants.get("-")))

    totals = {}
    print(
        f"peaks = weights + the largest stage (fit: + {extra / MIB:.0f} MiB of cached pseudo-anomalies, concept "
        f"and AdamW moments), against {args.gpu_gib:g} GiB:"
    )
    for label, checkpointing, vae, note in rows:
        base = sum(weights[label].values())
        low_label = "bf16" if label == "bf16" else "fp32"  # fp32 weights compute (and store) in fp32
        for phase in ("fit", "test"):
            if phase == "test" and checkpointing == "on":
                continue  # checkpointing acts in training only
            names = [
                name
                for name in stages["fp32"]
                if (phase == "fit" and not name.startswith("queries"))
                or (phase == "test" and not name.startswith(("train", "shot encodes: VAE")))
            ]
            worst = max(names, key=lambda name: stage_bytes("fp32", name, checkpointing, vae))
            low = stage_bytes(low_label, worst, checkpointing, vae)
            high = stage_bytes("fp32", worst, checkpointing, vae)
            fixed = base + (extra if phase == "fit" else 0.0)
            totals[f"{phase} {label} checkpointing {checkpointing} vae {vae}"] = fixed + high
            setting = f"checkpointing {checkpointing}, " if phase == "fit" else ""
            verdict = "fits" if (fixed + high) / GIB <= args.gpu_gib else "does NOT fit"
            print(
                f"  {phase}, weights {label}, {setting}VAE {vae}{' (' + note + ')' if note else ''}: "
                f"{fixed / GIB:.2f} + {low / GIB:.2f}..{high / GIB:.2f} ({worst.split(':')[0]}: "
                f"{worst.split(': ')[1]}) = {(fixed + low) / GIB:.2f}..{(fixed + high) / GIB:.2f} GiB: {verdict}"
            )
    train = next(name for name in stages["fp32"] if name.startswith("train"))
    for label in ("fp32", "bf16"):
        off, on = stages[label][train]["off"], stages[label][train]["on"]
        print(
            f"gradient checkpointing, {label} count: the eq. 4 step keeps {off / on:.1f} x fewer activations "
            f"({off / GIB:.2f} -> {on / GIB:.2f} GiB)"
        )
    print(
        "not counted: the CUDA context (~0.5 GiB), the caching allocator's fragmentation and kernel "
        "workspaces; the reference memories of eq. 8 (K x 256 tokens, a few MB)"
    )
    return totals


if __name__ == "__main__":
    main()
