"""``fsad generate``: write a generated anomaly-free image pool for one category to the cache.

::

    fsad generate --config configs/one_to_normal_mvtec.yaml --data.init_args.category bottle \\
        [--ckpt_path runs/fsad/version_0/checkpoints/last.ckpt] [--num_images 100] [--cache_dir cache/pools]

The config is the method's ordinary ``fsad fit`` / ``fsad test`` config (model, data, trainer; any
LightningCLI override works). The method must offer ``generate_normal_pool`` (One-to-Normal does). A
trainable method is restored from ``--ckpt_path`` (which must have been fitted on the same shots), or
fitted first when no checkpoint is given. The pool is written atomically image by image under
``<cache_dir>/<key>/images`` with ``<key>`` the hash of (base model, manifest, prompts, seed, learned
weights, sampling settings); an existing complete pool is reused and an interrupted one resumed. The
folder is printed, ready for any method's ``data.init_args.extra_normal_dirs``.

``--num_images`` defaults to the method's own pool (One-to-Normal: ``pool_size - k``, the pool its
``fsad test`` builds the memory bank from, so a later test reuses it); the paper augments other methods
with 100 generated normals per category (§4.1). ``--cache_dir`` defaults to the model's ``cache_dir``,
else ``$FSAD_CACHE_DIR/pools`` (``~/.cache/fsad_lightning/pools``).

The paper's Fig. 4 experiment (other methods with and without the generated normals), per category::

    fsad generate --config configs/one_to_normal_mvtec.yaml --num_images 100          # prints POOL
    fsad test --config configs/patchknn_mvtec.yaml                                     # without
    fsad test --config configs/patchknn_mvtec.yaml --data.init_args.extra_normal_dirs '[POOL]'   # with
    (the same two runs with configs/winclip_mvtec.yaml for WinCLIP+)
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch

from fsad_lightning.cache import ImagePoolCache, default_cache_dir
from fsad_lightning.checkpoints import read_checkpoint
from fsad_lightning.commands.lightning_cli import FSADCLI


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fsad generate",
        description="Write a generated anomaly-free image pool for a category to the cache "
        "(every other argument goes to the method's LightningCLI config, e.g. --config X.yaml).",
    )
    parser.add_argument(
        "--ckpt_path", default=None, help="checkpoint of the fitted method (else it is fitted first)"
    )
    parser.add_argument(
        "--num_images", type=int, default=None, help="images to generate (default: the method's pool)"
    )
    parser.add_argument(
        "--cache_dir",
        default=None,
        help="cache root (default: the model's cache_dir or $FSAD_CACHE_DIR/pools)",
    )
    return parser


def load_learned_state(model: Any, ckpt_path: str, manifest: dict[str, Any]) -> None:
    """Restore a trainable method's learned state from an ``fsad fit`` checkpoint, checking that it was
    written by this method with these fitted settings, on the shots and dataset version the datamodule
    selects (:meth:`~fsad_lightning.methods.base.FewShotAnomalyModule.checkpoint_mismatch`)."""
    checkpoint = read_checkpoint(ckpt_path)
    mismatch = model.checkpoint_mismatch(checkpoint, ckpt_path, manifest)
    if mismatch:
        raise ValueError(mismatch)
    model.on_load_checkpoint(checkpoint)
    missing = sorted(model.learned_state_keys() - set(checkpoint["state_dict"]))
    if missing:
        raise ValueError(
            f"checkpoint {ckpt_path} lacks learned state {missing[:3]} of {type(model).__name__}"
        )
    model.load_state_dict(checkpoint["state_dict"], strict=False)


def generate_main(argv: list[str] | None = None) -> ImagePoolCache:
    """Run ``fsad generate`` (see the module docstring); returns the cache entry written."""
    options, rest = build_parser().parse_known_args(argv)
    if options.num_images is not None and options.num_images < 1:
        raise ValueError(f"--num_images must be >= 1, got {options.num_images}")
    cli = FSADCLI(args=rest, run=False)
    model, datamodule, trainer = cli.model, cli.datamodule, cli.trainer
    if not hasattr(model, "generate_normal_pool"):
        raise ValueError(
            f"{type(model).__name__} cannot generate normal images: use a method with "
            "generate_normal_pool (e.g. DreamBoothNormalModule)"
        )
    manifest = datamodule.manifest
    if model.learning_type == "trainable":
        if options.ckpt_path is not None:
            load_learned_state(model, options.ckpt_path, manifest)
        else:
            trainer.fit(model, datamodule=datamodule)
    model.to(trainer.strategy.root_device)
    model.eval()
    cache_dir = options.cache_dir
    if cache_dir is None and getattr(model.hparams, "cache_dir", None) is None:
        cache_dir = str(default_cache_dir() / "pools")
    shots = model.transfer_batch_to_device(datamodule.shot_batch(), model.device, 0)
    with torch.no_grad(), trainer.precision_plugin.forward_context():  # the trainer's precision, as in test
        images, cache = model.generate_normal_pool(
            shots, manifest, count=options.num_images, cache_dir=cache_dir
        )
    if cache is None or images.shape[0] == 0:
        raise ValueError(
            "the method's own pool has no generated images (pool_size <= k_shot): pass --num_images"
        )
    print(f"fsad generate: {images.shape[0]} anomaly-free images in {Path(cache.image_dir).resolve()}")
    print(
        f"  use them as extra normals: --data.init_args.extra_normal_dirs "
        f"'[{Path(cache.image_dir).resolve()}]'"
    )
    return cache
