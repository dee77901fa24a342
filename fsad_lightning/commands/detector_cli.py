"""``fsad export`` and ``fsad predict --detector``: ship a fitted detector, score folders with it.

::

    fsad export --config X.yaml [--ckpt_path CKPT|last] --output detector/ [--threshold T]
    fsad predict --detector detector/ --data.init_args.predict_dir DIR [--output RUN] [--overlays true]
                 [--threshold T] [--device cpu|cuda] [--batch_size 16]

``export`` builds the configured method and data as ``fsad test`` does (any LightningCLI option of the
config may follow, e.g. ``--data.init_args.shots_dir``), restores a trainable method's learned state
from ``--ckpt_path`` (checked against the config like every other command), sets the decision
threshold (label-free from the shots unless ``threshold`` is given; :mod:`fsad_lightning.thresholds`)
and writes the detector folder (:mod:`fsad_lightning.detector`).

``predict --detector`` needs neither the config nor the dataset: it loads the folder, scores every image
under ``predict_dir`` and writes ``predictions.csv``, ``threshold.json``, ``anomaly_maps.npz`` and, with
``--overlays true``, overlay PNGs (:func:`~fsad_lightning.callbacks.predictions.write_predictions`) into
``--output``, by default a new ``runs/detector/version_<N>``. ``fsad predict`` without ``--detector``
is LightningCLI's predict.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from fsad_lightning.commands.run_folder import LAST, claim_run_folder, find_last_checkpoint

DETECTOR_FLAG = "--detector"
PREDICT_DIR_FLAGS = ("--data.init_args.predict_dir", "--predict_dir")


def _has_flag(argv: list[str], flag: str) -> bool:
    return any(token == flag or token.startswith(flag + "=") for token in argv)


def predict_main(args: list[str] | None) -> Any:
    """``fsad predict``: with ``--detector`` a detector run, else LightningCLI's predict (``args``: the
    whole command line from ``predict`` on, or ``None`` for the process's own)."""
    argv = list(sys.argv[1:] if args is None else args)
    if not _has_flag(argv, DETECTOR_FLAG):
        from fsad_lightning.commands.lightning_cli import run_cli

        return run_cli(args)
    return predict_with_detector(argv[1:] if argv and argv[0] == "predict" else argv)


def _bool(text: str) -> bool:
    value = text.strip().lower()
    if value in ("true", "1", "yes", "on"):
        return True
    if value in ("false", "0", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def predict_with_detector(argv: list[str]) -> dict[str, Any]:
    """Score a folder with a detector folder (module docstring); returns the decision counts."""
    parser = argparse.ArgumentParser(prog="fsad predict --detector", description="score a folder with a detector")
    parser.add_argument(DETECTOR_FLAG, required=True, help="the folder `fsad export` wrote")
    parser.add_argument(*PREDICT_DIR_FLAGS, dest="predict_dir", required=True, help="folder of images to score")
    parser.add_argument("--output", default=None, help="run folder (default: a new runs/detector/version_<N>)")
    parser.add_argument("--overlays", type=_bool, default=False, help="also write an overlay PNG per image")
    parser.add_argument("--threshold", type=float, default=None, help="decide with this threshold instead")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--batch_size", type=int, default=16)
    options = parser.parse_args(argv)

    from fsad_lightning.callbacks.predictions import write_predictions
    from fsad_lightning.callbacks.visualizer import to_uint8_image
    from fsad_lightning.data.folder import check_root, list_image_files
    from fsad_lightning.detector import Detector

    folder = check_root(options.predict_dir, "predict_dir")
    names = list_image_files(folder, recursive=True)
    if not names:
        raise ValueError(f"predict_dir {folder} holds no image files (in any sub-folder)")
    if options.batch_size < 1:
        raise ValueError(f"--batch_size must be >= 1, got {options.batch_size}")
    detector = Detector.load(options.detector, device=options.device)
    if options.threshold is not None:
        detector.set_threshold(options.threshold)
    output = options.output or _new_run_folder()
    paths, scores, maps, images = [], [], [], []
    files = [os.path.join(folder, name) for name in names]
    for start in range(0, len(files), options.batch_size):
        prepared = detector.preprocess(files[start : start + options.batch_size])
        scored = detector.score(*prepared)
        paths += scored.paths
        scores += scored.scores.tolist()
        maps.append(None if scored.maps is None else scored.maps.half())  # written as float16 anyway
        if options.overlays:
            images += [to_uint8_image(image) for image in prepared.images]
    import torch

    all_maps = None if any(m is None for m in maps) else torch.cat(maps).numpy()
    record = detector.threshold_record
    summary = write_predictions(
        output,
        paths,
        scores,
        all_maps,
        None if record is None else record.to_dict(),
        images=images if options.overlays else None,
        root=folder,
    )
    flagged = summary["num_anomalous"]
    threshold = summary["threshold"]
    print(
        f"{summary['num_images']} images scored, {flagged} anomalous"
        + (f" (score >= {threshold:.4g})" if threshold is not None else "")
        + f": predictions written to {output}"
    )
    return summary


def _new_run_folder() -> str:
    from lightning.pytorch.loggers import CSVLogger

    return claim_run_folder(CSVLogger("runs", name="detector"))


def export_main(argv: list[str]) -> str:
    """``fsad export --config X.yaml [--ckpt_path P] --output DIR`` (module docstring); returns DIR."""
    parser = argparse.ArgumentParser(prog="fsad export", add_help=False)
    parser.add_argument("--output", default=None)
    parser.add_argument("--ckpt_path", default=None)
    parser.add_argument("-h", "--help", action="store_true")
    options, rest = parser.parse_known_args(argv)
    if options.help:
        print(
            "usage: fsad export --config X.yaml [--ckpt_path CKPT|last] --output DIR [config options]\n\n"
            "Write a detector folder (config, learned state, shots and their memory, decision threshold,\n"
            "manifest) that `fsad predict --detector DIR` and Detector.load(DIR) use without the dataset."
        )
        return ""
    if not options.output:
        raise ValueError("fsad export needs --output DIR: the detector folder to write")

    from fsad_lightning.checkpoints import read_checkpoint
    from fsad_lightning.commands.lightning_cli import run_cli_without_running
    from fsad_lightning.detector import Detector

    cli = run_cli_without_running(rest)
    model, datamodule, trainer = cli.model, cli.datamodule, cli.trainer
    model.check_image_size(datamodule.image_size)
    path = options.ckpt_path
    if path is None and model.learning_type == "trainable":
        raise ValueError(
            f"{type(model).__name__} learns its state in `fsad fit`: `fsad export` needs --ckpt_path (the fit's "
            "checkpoints/last.ckpt, or `last` for the newest fit's)"
        )
    if path is not None:
        if path == LAST:
            path = find_last_checkpoint(trainer.logger, trainer.callbacks, "export")
        checkpoint = read_checkpoint(path)
        mismatch = model.checkpoint_mismatch(checkpoint, path, datamodule.manifest)
        if mismatch:
            raise ValueError(mismatch)
        model.on_load_checkpoint(checkpoint)
        model.load_state_dict(checkpoint["state_dict"], strict=False)
    detector = Detector.from_datamodule(model, datamodule, device=trainer.strategy.root_device)
    folder = detector.save(options.output)
    record = detector.threshold_record
    how = f"{record.value:.4g} ({record.description})" if record is not None else "none"
    print(f"detector written to {folder}: {type(model).__name__}, {len(detector.shots['path'])} shots, threshold {how}")
    return str(folder)
