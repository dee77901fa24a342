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
