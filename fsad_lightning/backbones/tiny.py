"""Offline tiny twins of the foundation models, for tests and offline demo configs.

They are randomly initialised, built from configs with no download, and loaded back through the very
same loading code users hit with real weights. They are never a silent fallback: a user config gets
them only by naming them explicitly.
"""

from __future__ import annotations

# ==================================================================== tiny CLIP (open_clip)
# Tiny open_clip architectures, registered in open_clip's model-config registry under their own names so
# that ``load_clip("fsad-tiny-vit", pretrained=None)`` (and ``model_name: fsad-tiny-vit`` in a YAML config)
# builds them with open_clip's own factory, exactly like a real model. Registration happens when
# ``fsad_lightning.backbones.clip`` is imported and again (idempotently) inside ``load_clip``.

#: name -> open_clip model config (same schema as open_clip's ``model_configs/*.json``)
TINY_CLIP_CONFIGS: dict[str, dict] = {
    # ViT: 64 px images, 8 px patches -> 8 x 8 patch grid, 4 blocks of width 64 (2 heads)
    "fsad-tiny-vit": {
        "embed_dim": 32,
        "vision_cfg": {"image_size": 64, "layers": 4, "width": 64, "head_width": 32, "patch_size": 8},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 4, "layers": 2},
    },
    # the same ViT with a text tower as wide as the tiny Stable Diffusion's text encoder (32), so a token
    # embedding learned in SD's text space also fits CLIP's (as SD 2.1 shares OpenCLIP ViT-H/14's)
    "fsad-tiny-vit-sd": {
        "embed_dim": 32,
        "vision_cfg": {"image_size": 64, "layers": 4, "width": 64, "head_width": 32, "patch_size": 8},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 4, "layers": 2},
    },
}


def register_tiny_clip() -> list[str]:
    """Register :data:`TINY_CLIP_CONFIGS` with open_clip; returns the tiny model names.

    Idempotent: a name already registered with the same config is left alone. open_clip only reads configs
    from JSON files (``open_clip.add_model_config``), so each config is written to a temporary folder that
    is deleted once open_clip has read it (the registry keeps the parsed config in memory).
    """
    import json
    import tempfile
    from pathlib import Path

    import open_clip
    from open_clip.factory import get_model_config

    missing = {name: cfg for name, cfg in TINY_CLIP_CONFIGS.items() if get_model_config(name) != cfg}
    if missing:
        with tempfile.TemporaryDirectory(prefix="fsad_tiny_clip_") as folder:
            for name, cfg in missing.items():
                (Path(folder) / f"{name}.json").write_text(json.dumps(cfg))
            open_clip.add_model_config(folder)
    return list(TINY_CLIP_CONFIGS)


# ==================================================================== tiny Stable Diffusion (diffusers)
# Tiny Stable Diffusion folders, saved with ``save_pretrained`` in the diffusers layout (model_index.json,
# unet/, vae/, text_encoder/, tokenizer/, scheduler/) so that ``load_stable_diffusion(path)`` loads them with
# the very same ``from_pretrained`` code as a hub model. Randomly initialised: they test plumbing, shapes,
# determinism and training mechanics, never image quality.

#: open_clip's bundled BPE merges file (the CLIP tokenizer's source of truth)
CLIP_BPE_FILE = "bpe_simple_vocab_16e6.txt.gz"
#: CLIP's BPE vocabulary: 256 byte symbols, their 256 end-of-word forms, 48,894 merges, 2 special tokens
CLIP_NUM_MERGES = 49152 - 256 - 2
CLIP_BOS, CLIP_EOS = "<|startoftext|>", "<|endoftext|>"
CLIP_CONTEXT_LENGTH = 77

#: the tiny twin's sizes; the VAE has 2 blocks, so its scale factor is 2 (32 px images -> 16 x 16 latents)
TINY_SD_TEXT_DIM = 32
TINY_SD_BLOCKS = (32, 64)
TINY_SD_SAMPLE_SIZE = 32
TINY_SD_VAE_SCALE_FACTOR = 2 ** (len(TINY_SD_BLOCKS) - 1)

_TINY_SD_BUILT: dict[str, tuple[str, int]] = {}


def clip_byte_symbols() -> dict[int, str]:
    """CLIP/GPT-2's reversible byte -> unicode-symbol table used as the BPE base alphabet.

    The 188 printable Latin-1 bytes (``!``..``~``, ``¡``..``¬``, ``®``..``ÿ``) stand for themselves; the
    other 68 bytes (controls, space, soft hyphen) map, in byte order, to the code points from 256 up, so
    no symbol is whitespace or a control character. The dict is in vocabulary order: the printable bytes
    first, then the remapped ones (ids 0-255 of the CLIP vocabulary).
    """
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    table = {byte: chr(byte) for byte in printable}
    extra = 0
    for byte in range(256):
        if byte not in table:
            table[byte] = chr(256 + extra)
            extra += 1
    return table


def _open_clip_bpe_path():
    """The BPE file shipped inside the installed open_clip package, found without importing open_clip."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("open_clip is not installed: the tiny CLIP tokenizer needs its BPE file")
    path = Path(next(iter(spec.submodule_search_locations))) / CLIP_BPE_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the installed open_clip package")
    return path


_CLIP_BPE_CACHE: dict[str, tuple[dict[str, int], list[tuple[str, str]]]] = {}


def clip_bpe_vocab_and_merges() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """CLIP's ``vocab`` (token -> id, 49,408 entries) and ``merges`` (ranked pairs) from open_clip's BPE file.

    Ids, in CLIP's order: the 256 byte symbols of :func:`clip_byte_symbols`, the same symbols with the
    end-of-word marker ``</w>``, one token per merge (the concatenated pair, in rank order), then
    ``<|startoftext|>`` (49406) and ``<|endoftext|>`` (49407). The file's first line is a header.
    """
    if "clip" not in _CLIP_BPE_CACHE:
        import gzip

        with gzip.open(_open_clip_bpe_path()) as handle:
            lines = handle.read().decode("utf-8").split("\n")
        merges = [tuple(line.split()) for line in lines[1 : 1 + CLIP_NUM_MERGES]]
        if len(merges) != CLIP_NUM_MERGES or any(len(pair) != 2 for pair in merges):
            raise ValueError(f"{_open_clip_bpe_path()} does not hold {CLIP_NUM_MERGES} BPE merges")
        symbols = list(clip_byte_symbols().values())
        tokens = [*symbols, *(s + "</w>" for s in symbols), *("".join(pair) for pair in merges)]
        tokens += [CLIP_BOS, CLIP_EOS]
        _CLIP_BPE_CACHE["clip"] = ({token: i for i, token in enumerate(tokens)}, merges)
    vocab, merges = _CLIP_BPE_CACHE["clip"]
    return dict(vocab), list(merges)


def write_clip_bpe_files(folder) -> None:
    """Write CLIP's ``vocab.json`` and ``merges.txt`` (with its ``#version`` header line) into ``folder``."""
    import json
    from pathlib import Path

    vocab, merges = clip_bpe_vocab_and_merges()
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    merges_text = "#version: 0.2\n" + "\n".join(" ".join(pair) for pair in merges) + "\n"
    (folder / "merges.txt").write_text(merges_text, encoding="utf-8")


def tiny_clip_tokenizer(save_dir=None):
    """The CLIP tokenizer (``transformers.CLIPTokenizer``, 49,408 ids, 77 tokens) rebuilt offline.

    Token ids equal open_clip's ``SimpleTokenizer`` (and so those of every SD text encoder) for ordinary
    text; like every Hugging Face CLIP tokenizer it does not undo HTML escapes (``&amp;``) nor apply ftfy
    fixes, which open_clip does. It is loaded with ``CLIPTokenizer.from_pretrained`` from the two BPE
    files (:func:`write_clip_bpe_files`), the hub layout of SD repositories, which every transformers
    version reads. With ``save_dir`` those files and the ``save_pretrained`` files stay there;
    otherwise they go to a temporary folder.
    """
    import tempfile

    from transformers import CLIPTokenizer

    def load(folder):
        write_clip_bpe_files(folder)
        return CLIPTokenizer.from_pretrained(
            str(folder), model_max_length=CLIP_CONTEXT_LENGTH, bos_token=CLIP_BOS, eos_token=CLIP_EOS,
            unk_token=CLIP_EOS, pad_token=CLIP_EOS,
        )

    if save_dir is None:
        with tempfile.TemporaryDirectory(prefix="fsad_clip_tokenizer_") as folder:
            return load(folder)
    tokenizer = load(save_dir)
    tokenizer.save_pretrained(str(save_dir))
    return tokenizer


def tiny_stable_diffusion_components(kind: str = "txt2img", seed: int = 0) -> dict:
    """The random tiny components: ``unet``, ``vae``, ``text_encoder``, ``tokenizer``, ``scheduler``.

    UNet: 2 blocks (32, 64 channels, one cross-attention block), cross-attention width 32, 4 (``txt2img``)
    or 9 (``inpaint``) input channels. VAE: 2 blocks (32, 64), 4 latent channels, scale factor 2. Text
    encoder: CLIP, width 32, 2 layers, 4 heads, 49,408 tokens, 77 positions. Scheduler: DDIM with SD's
    noise schedule (scaled-linear betas 0.00085-0.012, epsilon prediction, timestep offset 1).
    """
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from fsad_lightning.backbones.diffusion import stable_diffusion_ddim_scheduler

    in_channels = {"txt2img": 4, "inpaint": 9}
    if kind not in in_channels:
        raise ValueError(f"kind must be 'txt2img' or 'inpaint', got {kind!r}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(
            sample_size=TINY_SD_SAMPLE_SIZE // TINY_SD_VAE_SCALE_FACTOR,
            in_channels=in_channels[kind],
            out_channels=4,
            block_out_channels=TINY_SD_BLOCKS,
            layers_per_block=1,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            cross_attention_dim=TINY_SD_TEXT_DIM,
            attention_head_dim=8,
            norm_num_groups=32,
        )
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * len(TINY_SD_BLOCKS),
            up_block_types=("UpDecoderBlock2D",) * len(TINY_SD_BLOCKS),
            block_out_channels=TINY_SD_BLOCKS,
            layers_per_block=1,
            latent_channels=4,
            norm_num_groups=32,
            sample_size=TINY_SD_SAMPLE_SIZE,
        )
        text_encoder = CLIPTextModel(
            CLIPTextConfig(
                hidden_size=TINY_SD_TEXT_DIM,
                intermediate_size=4 * TINY_SD_TEXT_DIM,
                projection_dim=TINY_SD_TEXT_DIM,
                num_hidden_layers=2,
                num_attention_heads=4,
                vocab_size=49408,
                max_position_embeddings=CLIP_CONTEXT_LENGTH,
                bos_token_id=49406,
                eos_token_id=49407,
                pad_token_id=49407,
            )
        )
    scheduler = stable_diffusion_ddim_scheduler()
    return {
        "unet": unet, "vae": vae, "text_encoder": text_encoder, "tokenizer": tiny_clip_tokenizer(),
        "scheduler": scheduler,
    }


def build_tiny_stable_diffusion(path, kind: str = "txt2img", seed: int = 0) -> str:
    """Save a tiny random Stable Diffusion (``kind`` ``"txt2img"`` or ``"inpaint"``) to ``path``; returns it.

    Written with the diffusers pipeline's ``save_pretrained`` (``StableDiffusionPipeline`` or
    ``StableDiffusionInpaintPipeline``, no safety checker), so the folder is a regular diffusers model
    that ``load_stable_diffusion(path, kind=kind)`` and diffusers' own pipelines load. Built once per
    ``(path, kind, seed)`` in a process; a later call returns the folder as it is.
    """
    from pathlib import Path

    from diffusers import StableDiffusionInpaintPipeline, StableDiffusionPipeline

    folder = Path(path)
    key = str(folder.resolve())
    if _TINY_SD_BUILT.get(key) == (kind, seed) and (folder / "model_index.json").is_file():
        return str(folder)
    pipeline_cls = StableDiffusionInpaintPipeline if kind == "inpaint" else StableDiffusionPipeline
    components = tiny_stable_diffusion_components(kind=kind, seed=seed)
    pipeline = pipeline_cls(
        **components, safety_checker=None, feature_extractor=None, requires_safety_checker=False
    )
    pipeline.save_pretrained(str(folder), safe_serialization=True)
    # the hub layout of SD tokenizers also carries vocab.json + merges.txt
    tiny_clip_tokenizer(save_dir=folder / "tokenizer")
    _TINY_SD_BUILT[key] = (kind, seed)
    return str(folder)
